"""`course_utils.config`: the tiers, every COURSE_* setting, and the rule that no other module
reads a COURSE_* variable. Configs are built from explicit dicts (`Config.from_env(env)`) and
the GPU is faked, so nothing here depends on the machine."""
from __future__ import annotations

import ast
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from course_utils import config
from course_utils.config import MODES, VARIABLES, Config, env_vars, parse_bool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=[False, True], ids=["no-gpu", "gpu"])
def gpu(request, monkeypatch) -> bool:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: request.param)
    return request.param


def cfg(**env: str) -> Config:
    return Config.from_env({f"COURSE_{k.upper()}": v for k, v in env.items()})


# --------------------------------------------------------------------------------------------
# tiers
# --------------------------------------------------------------------------------------------
def test_hardware_default_is_full_with_a_gpu_and_laptop_without(gpu):
    c = cfg()
    assert c.mode == ("full" if gpu else "laptop") and not c.fast
    assert c.device == ("cuda" if gpu else "cpu")
    assert cfg(device="cpu").mode == "laptop"  # a GPU you do not use does not make it full
    assert cfg(device="cuda:1").mode == "full"


@pytest.mark.parametrize("value, mode", [("ci", "ci"), ("laptop", "laptop"), ("full", "full"),
                                         (" FULL ", "full"), ("", None)])
def test_course_mode_chooses_the_tier(gpu, value, mode):
    c = cfg(mode=value)
    assert c.mode == (mode or ("full" if gpu else "laptop"))
    assert c.fast == (c.mode == "ci")


@pytest.mark.parametrize("fast, expected", [("1", "ci"), ("true", "ci"), ("ON", "ci"),
                                            ("0", None), ("no", None), ("", None)])
def test_course_fast_is_an_alias_of_ci(gpu, fast, expected):
    assert cfg(fast=fast).mode == (expected or ("full" if gpu else "laptop"))


def test_course_mode_wins_over_course_fast_with_a_warning(gpu):
    with pytest.warns(UserWarning, match="COURSE_MODE wins"):
        c = cfg(mode="laptop", fast="1")
    assert c.mode == "laptop" and not c.fast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg(mode="ci", fast="1").mode == "ci"  # agreeing: no warning
        assert cfg(mode="full", fast="0").mode == "full"


@pytest.mark.parametrize("env, message", [
    ({"mode": "fast"}, "ci, laptop, full"),
    ({"mode": "gpu"}, "not a course tier"),
    ({"fast": "maybe"}, "COURSE_FAST='maybe' is not a yes/no value"),
    ({"seed": "one"}, "COURSE_SEED='one'"),
    ({"seed": "-3"}, "COURSE_SEED"),
])
def test_bad_values_are_clear_errors(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg(**env)


def test_bad_values_read_at_use_are_clear_errors():
    with pytest.raises(ValueError, match="COURSE_THREADS='0'"):
        _ = cfg(threads="0").threads
    with pytest.raises(ValueError, match="COURSE_OFFLINE='perhaps'"):
        _ = cfg(offline="perhaps").offline
    with pytest.raises(ValueError, match="ci, laptop, full"):
        Config(requested_mode="turbo")


def test_parse_bool_is_the_one_boolean_parser():
    assert [parse_bool(v) for v in ("1", "TRUE", " yes ", "on")] == [True] * 4
    assert [parse_bool(v) for v in (None, "", "0", "False", "no", "off")] == [False] * 6
    with pytest.raises(ValueError, match="X='2'"):
        parse_bool("2", "X")


# --------------------------------------------------------------------------------------------
# pick
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_pick_with_three_tiers(mode):
    c = Config(requested_mode=mode)
    assert c.pick(ci=1, laptop=2, full=3) == {"ci": 1, "laptop": 2, "full": 3}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_pick_with_the_legacy_two(mode):
    c = Config(requested_mode=mode)
    expected = "small" if mode == "ci" else "big"  # laptop gets the full value
    assert c.pick(fast="small", full="big") == expected
    assert c.pick(ci="small", full="big") == expected
    assert c.pick(fast=None, full=[1]) == (None if mode == "ci" else [1])  # None is a value


def test_pick_rejects_ambiguous_or_missing_values():
    c = Config(requested_mode="ci")
    with pytest.raises(TypeError, match="not both"):
        c.pick(fast=1, ci=1, full=2)
    with pytest.raises(TypeError, match="needs ci= .* and full="):
        c.pick(ci=1, laptop=2)
    with pytest.raises(TypeError, match="needs ci="):
        c.pick(full=2)
    with pytest.raises(TypeError):
        c.pick(1, 2)  # keyword-only: no silent mix-up of the order


# --------------------------------------------------------------------------------------------
# describe, device, settings read at use
# --------------------------------------------------------------------------------------------
def test_describe_names_tier_device_seed_and_how_to_change():
    text = Config(requested_mode="ci", seed=7, requested_device="cpu").describe()
    first, second = text.splitlines()
    assert "tier: ci" in first and "device: cpu" in first and "seed: 7" in first
    assert "COURSE_MODE=ci|laptop|full" in second and "make lab MODE=ci" in second
    assert "\n" not in Config(requested_mode="full").describe(hint=False)


def test_device_setting_wins_over_the_hardware(gpu):
    assert cfg(device="meta").device == "meta"
    assert cfg(seed="3").seed == 3 and cfg().seed == 0


def test_settings_read_at_use_follow_the_environment(tmp_path, monkeypatch):
    env: dict[str, str] = {}
    c = Config.from_env(env)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert c.cache_dir == tmp_path / "xdg" / "course_utils"  # platformdirs
    assert (c.data_dirs, c.offline, c.grade_log, c.asset_registry, c.threads) == ([], False, None, None, None)
    env.update({"COURSE_CACHE_DIR": str(tmp_path / "c"), "COURSE_OFFLINE": "yes",
                "COURSE_DATA_DIR": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}",
                "COURSE_GRADE_LOG": str(tmp_path / "log"), "COURSE_THREADS": "3",
                "COURSE_ASSET_REGISTRY": str(tmp_path / "r.json")})
    assert c.cache_dir == tmp_path / "c" and c.offline and c.threads == 3
    assert c.data_dirs == [tmp_path / "a", tmp_path / "b"]
    assert c.grade_log == tmp_path / "log" and c.asset_registry == tmp_path / "r.json"
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "live"))
    assert config.CFG.cache_dir == tmp_path / "live"  # CFG reads os.environ itself


def test_env_vars_spell_the_variables_for_child_processes(tmp_path):
    assert env_vars(grade_log=tmp_path / "g", mode="ci") == {
        "COURSE_GRADE_LOG": str(tmp_path / "g"), "COURSE_MODE": "ci"}
    with pytest.raises(ValueError, match="unknown course setting"):
        env_vars(grade_logs="x")
    with pytest.raises(ValueError, match="ci, laptop, full"):
        env_vars(mode="fast")


@pytest.mark.parametrize("env, threads", [({"COURSE_MODE": "ci"}, 1),
                                          ({"COURSE_MODE": "ci", "COURSE_THREADS": "2"}, 2),
                                          ({"COURSE_MODE": "laptop", "COURSE_THREADS": "2"}, 2)])
def test_seed_everything_keeps_the_one_thread_rule_of_the_ci_tier(monkeypatch, env, threads):
    before = torch.get_num_threads()
    monkeypatch.setattr(config, "CFG", Config.from_env(env))
    try:
        assert config.seed_everything(5) == 5
        assert torch.get_num_threads() == threads
        a = torch.rand(3)
        config.seed_everything(5)
        assert torch.equal(a, torch.rand(3))
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(False)


def test_laptop_tier_leaves_the_thread_count_alone(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(config, "CFG", Config.from_env({"COURSE_MODE": "laptop"}))
    try:
        torch.set_num_threads(2)
        config.seed_everything()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(False)


# --------------------------------------------------------------------------------------------
# one place: the table, and no COURSE_* reads outside config.py
# --------------------------------------------------------------------------------------------
def _table(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("| `COURSE_")]


def test_every_variable_is_in_one_table_in_config_and_readme():
    doc = _table(config.__doc__ or "")
    assert [row.split("`")[1] for row in doc] == list(VARIABLES.values())
    assert _table((ROOT / "README.md").read_text()) == doc


ENV_ACCESS = re.compile(r"\b(environ|getenv|putenv)\b")
COURSE_NAME = re.compile(r"COURSE_[A-Z0-9_]*")


def course_env_uses(source: str) -> list[str]:
    """Lines that read or write a COURSE_* variable: a string that is a bare variable name (only
    the environment needs one), or a simple statement that touches the environment and names one."""
    tree, lines = ast.parse(source), source.splitlines()
    found = [f"line {n.lineno}: {n.value!r}" for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and COURSE_NAME.fullmatch(n.value)]
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and not any(isinstance(c, ast.stmt) for c in ast.iter_child_nodes(node)):
            segment = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if ENV_ACCESS.search(segment) and COURSE_NAME.search(segment):
                found.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


@pytest.mark.parametrize("bad", [
    'import os\nx = os.environ.get("COURSE_FAST")',
    'import os\nif os.environ.get("COURSE_OFFLINE"):\n    pass',
    'import os\nos.environ["COURSE_FAST"] = "1"',
    'import os\nenv = {**os.environ, "COURSE_GRADE_LOG": "x"}',
    'from os import getenv\nv = getenv("COURSE_" + name)',
    'import os\nv = os.environ.get(f"COURSE_{name}")',
])
def test_the_scanner_finds_course_variable_reads(bad):
    assert course_env_uses(bad)


def test_the_scanner_ignores_docs_and_other_variables():
    good = '"""Set `COURSE_DATA_DIR` to the folder."""\nimport os\nx = os.environ.get("HF_ENDPOINT")\n' \
           'msg = f"skipped (COURSE_OFFLINE is set)"'
    assert course_env_uses(good) == []


def test_no_module_but_config_reads_a_course_variable():
    package = ROOT / "course_utils"
    offenders = {str(p.relative_to(ROOT)): hits for p in sorted(package.rglob("*.py"))
                 if p != package / "config.py" and (hits := course_env_uses(p.read_text()))}
    assert offenders == {}, f"read COURSE_* settings through course_utils.config: {offenders}"


def test_expected_run_time_reads_the_measured_table():
    from course_utils.config import expected_run_time

    table = {"machines": {"cpu": "a 2-core CPU", "gpu": "a GPU"},
             "notebooks": {"03_x": {"laptop": {"cpu": {"cold": 200, "warm": 40, "date": "2026-11-30"}}}}}
    line = expected_run_time("03_x.ipynb", "laptop", "cpu", table)
    assert line == ("run time of this notebook in the laptop tier on a 2-core CPU: about 3 min from an empty "
                    "result cache, 40 s with a warm result cache (measured 2026-11-30)")
    assert "not measured yet" in expected_run_time("03_x", "laptop", "cuda:0", table)
    assert "not measured yet" in expected_run_time("09_new", "ci", "cpu", table)
    # the table shipped with the package has an entry shape this function reads
    for notebook in ("00_orientation", "01_gradcam", "02_logit_lens", "03_moment_editing", "04_concept_erasure"):
        assert expected_run_time(notebook, "laptop", "cpu").startswith("run time of this notebook")


def test_instructors_table_states_the_measured_laptop_times():
    """INSTRUCTORS.md's run-time table and `run_times.json` (what `CFG.describe` prints) say the same."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    times = json.loads((root / "course_utils" / "run_times.json").read_text())["notebooks"]
    text = (root / "INSTRUCTORS.md").read_text()
    for name, tiers in times.items():
        row = re.search(rf"^\| `{name}` \|([^|]*)\|([^|]*)\|", text, re.M)
        assert row, f"INSTRUCTORS.md has no run-time row for {name}"
        cold, warm = (int(re.findall(r"(\d+) s", cell)[-1]) for cell in row.groups())
        measured = tiers["laptop"]["cpu"]
        assert (cold, warm) == (measured["cold"], measured["warm"]), name
