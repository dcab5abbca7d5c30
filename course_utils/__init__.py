"""course_utils: the package behind the interpretability course.

Data, models, hooks, plots, widgets, exercise checks and grading live here, so that notebook
cells can stay about the ideas. See README.md for the map of modules.
"""
from course_utils.config import CFG, Config, seed_everything

__all__ = ["CFG", "Config", "seed_everything"]
__version__ = "0.1.0"
