"""`python -m course_utils.assets status|fetch|path` (see `course_utils.assets.cli`)."""
import sys

from course_utils.assets.cli import main

sys.exit(main())
