"""`benchmarks/bench.py` (`python -m benchmarks.bench`): every section runs under `--small`, returns
rows, and its checks agree; the bench uses only public names of `course_utils`."""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect

import pytest
import torch

from benchmarks import bench
from course_utils.lens import lens_stats_reference
from tests.conftest import asset_or_skip


def small_args(*sections: str) -> argparse.Namespace:
    return bench.parse_args([*sections, "--small", "--repeats", "1"])


def checks(rows: list[bench.Row]) -> list[bench.Row]:
    """The agreement rows (their note starts with "agree" or "DISAGREE")."""
    return [r for r in rows if r.note.startswith(("agree", "DISAGREE"))]


def assert_agree_and_timed(rows: list[bench.Row], section: str) -> None:
    assert rows and all(isinstance(r, bench.Row) and r.section == section for r in rows)
    agreement = checks(rows)
    assert agreement, "no agreement row"
    bad = [r for r in agreement if not r.note.startswith("agree")]
    assert not bad, bad
    ratios = [r for r in rows if "time /" in r.figure]
    assert ratios and all(r.value.endswith("x") and float(r.value[:-1]) > 0 for r in ratios)
    goals = [r for r in rows if r.figure.startswith("goal: ")]
    assert goals and all(r.value in ("met", "NOT met") or r.value.startswith("not measured") for r in goals)


def test_cli_knows_the_sections_and_small():
    args = small_args("gradcam", "monge", "leace", "lens")
    assert args.small and args.repeats == 1 and args.sections == ["gradcam", "monge", "leace", "lens"]
    assert {"train", "gradcam", "monge", "leace", "lens"} <= set(bench.SECTIONS)
    assert not bench.parse_args([]).small
    with pytest.raises(SystemExit):
        bench.parse_args(["nope"])


def test_bench_registers_sections_and_rejects_unknown_ones(capsys):
    assert "train" in bench.SECTIONS
    with pytest.raises(SystemExit):
        bench.main(["no-such-section"])
    assert "unknown section" in capsys.readouterr().err


def course_utils_names(source: str) -> tuple[list[tuple[str, str]], list[str]]:
    """`([(module, name) imported from course_utils], [attributes read off course_utils modules])`."""
    tree = ast.parse(source)
    imported, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course_utils"):
            for alias in node.names:
                imported.append((node.module, alias.name))
                if inspect.ismodule(getattr(importlib.import_module(node.module), alias.name, None)):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("course_utils")}
    attributes = [node.attr for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules]
    return imported, attributes


def test_bench_uses_only_public_names_of_course_utils():
    imported, attributes = course_utils_names(inspect.getsource(bench))
    assert ("course_utils.train", "train_classifier") in imported and "monge_maps" in attributes
    private = [f"{m}.{n}" for m, n in imported if n.startswith("_")] + [a for a in attributes if a.startswith("_")]
    assert not private, f"the bench reaches into private names: {private}"
    for module, name in imported:  # and what it imports, the module exports
        exported = getattr(importlib.import_module(module), "__all__", None)
        is_module = inspect.ismodule(getattr(importlib.import_module(module), name, None))
        assert exported is None or is_module or name in exported, f"{module}.{name} is not in its __all__"
    # the checker itself sees a private import when there is one
    private = course_utils_names("from course_utils.moments import _add_ridge")[0]
    assert private == [("course_utils.moments", "_add_ridge")]


def test_gradcam_small():
    pytest.importorskip("pytorch_grad_cam")
    rows = bench.SECTIONS["gradcam"](small_args("gradcam"))
    assert_agree_and_timed(rows, "gradcam")
    assert any(r.figure.endswith("model") and r.value.startswith("EfficientNet-Lite0") for r in rows)


def test_monge_small_on_cifar():
    pytest.importorskip("ot")
    asset_or_skip("cifar10")
    rows = bench.SECTIONS["monge"](small_args("monge"))
    assert_agree_and_timed(rows, "monge")
    assert any(r.figure.endswith("data") and r.value.startswith("CIFAR-10") for r in rows)
    assert sum("vs POT" in r.figure for r in rows) >= 2  # numpy and torch backends, every method


def test_monge_falls_back_to_synthetic_classes(monkeypatch):
    import course_utils.cifar

    def missing(*args, **kwargs):
        raise FileNotFoundError("no CIFAR-10 here")

    monkeypatch.setattr(course_utils.cifar, "load_cifar10", missing)
    x, y, what = bench._class_data(48, torch.device("cpu"), small=True)
    assert x.shape == (2000, 48) and y.shape == (2000,) and set(y.tolist()) == set(range(10))
    assert what.startswith("FALLBACK") and "no CIFAR-10 here" in what


def test_leace_small():
    pytest.importorskip("concept_erasure")
    rows = bench.SECTIONS["leace"](small_args("leace"))
    assert_agree_and_timed(rows, "leace")


def test_lens_small():
    rows = bench.SECTIONS["lens"](small_args("lens"))
    assert_agree_and_timed(rows, "lens")
    memory = [r for r in rows if "peak memory /" in r.figure]
    assert memory and all(r.value.endswith("x") and float(r.value[:-1]) > 0 for r in memory)


@pytest.mark.parametrize("shape", [(3, 7, 8, 50), (4, 5, 16, 300)])
def test_naive_lens_matches_reference(shape):
    normed, W_U, targets = bench._lens_inputs(*shape, seed=1)
    naive = bench._naive_lens_stats(normed, W_U, targets=targets, k=5)
    ref = lens_stats_reference(normed, W_U, targets=targets, k=5, token_chunk=4, vocab_chunk=32)
    for field in ("entropy", "topk_probs", "kl_to_final", "target_logprob"):
        torch.testing.assert_close(getattr(naive, field), getattr(ref, field), atol=1e-4, rtol=1e-4)
    assert torch.equal(naive.topk_ids, ref.topk_ids)
    assert torch.equal(naive.target_rank, ref.target_rank)
    assert float(naive.kl_to_final[-1].abs().max()) < 1e-5  # the last layer against itself
    no_targets = bench._naive_lens_stats(normed, W_U, k=3)
    assert no_targets.target_logprob is None and no_targets.target_rank is None
    assert no_targets.topk_ids.shape == (shape[0], shape[1], 3)
