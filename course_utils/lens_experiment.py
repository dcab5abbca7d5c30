"""Notebook 02's tuned-lens experiment: its sizes per tier, and its costly parts through the cache.

    from course_utils import lens_experiment as E
    sizes = E.sizes()                                   # one table per tier (CFG.mode)
    train = E.training_set(model, tok)                  # the residual stream + final top-k, cached
    heldout = E.heldout_residuals(model, tok)           # validation tokens the lens never trains on
    result = E.trained_lens(model, train, heldout)      # the translators and their curves, cached
    stats = E.readout(lens, residuals, targets=next_ids) # a lens's exact read-out statistics, cached

The notebook and `python -m course_utils.cache precompute --tier laptop` call the same functions
with the same arguments, so the precomputed entries are the ones the notebook loads.

Sizes, chosen once from the budget (a 2-core CPU, 5 minutes cold for the laptop tier): a step of
64 tokens over ~3,000 vocabulary rows costs ~0.4 s there, an exact read-out of 500 tokens ~25 s.
"""
from __future__ import annotations

from typing import TypedDict

import torch
from torch import nn

from course_utils import cache
from course_utils import lens as L
from course_utils.config import CFG
from course_utils.text import load_wikitext, token_windows

__all__ = ["Sizes", "sizes", "training_set", "heldout_residuals", "trained_lens", "test_windows", "test_residuals",
           "readout"]


class Sizes(TypedDict):
    """`sizes()`'s table (a plain dict): every entry an int, but `vocab_sample` may be None."""

    seq_len: int
    test_windows: int
    train_windows: int
    heldout_windows: int
    heldout_len: int
    k: int
    steps: int
    batch_tokens: int
    vocab_sample: int | None
    eval_every: int


def sizes() -> Sizes:
    """The experiment's sizes in the current tier.

    `seq_len` tokens a window; `test_windows` (WikiText-2 test, the per-layer figures),
    `train_windows` (validation, the lens's training tokens), `heldout_windows` (validation, after
    the training tokens: the convergence curve); `k` top tokens kept of the final distribution;
    `steps`, `batch_tokens`, `vocab_sample` (None: the exact partition), `eval_every`.
    """
    return Sizes(
        seq_len=CFG.pick(ci=64, laptop=128, full=128),
        test_windows=CFG.pick(ci=2, laptop=4, full=16),
        train_windows=CFG.pick(ci=8, laptop=16, full=64),
        heldout_windows=CFG.pick(ci=1, laptop=1, full=4),
        heldout_len=CFG.pick(ci=32, laptop=64, full=128),
        k=CFG.pick(ci=32, laptop=32, full=128),
        steps=CFG.pick(ci=20, laptop=200, full=2000),
        batch_tokens=CFG.pick(ci=32, laptop=64, full=256),
        vocab_sample=CFG.pick(ci=2048, laptop=2048, full=None),
        eval_every=CFG.pick(ci=4, laptop=40, full=200),
    )


def test_windows(tok) -> torch.Tensor:
    """`[test_windows, seq_len + 1]` token windows of the WikiText-2 test split."""
    s = sizes()
    return token_windows(tok, load_wikitext("test"), seq_len=s["seq_len"] + 1, n_windows=s["test_windows"])


def test_residuals(model: nn.Module, tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test windows' residual stream: `(residuals [L+1, N, d], next ids [N], is_first [N])`, where
    `is_first` marks position 0 of each window (its massive activations are kept apart)."""
    residuals, next_ids = L.collect_residuals(model, test_windows(tok), batch_size=4, skip_first=0)
    is_first = torch.arange(residuals.shape[1]) % sizes()["seq_len"] == 0
    return residuals, next_ids, is_first


def _train_windows(tok) -> torch.Tensor:
    s = sizes()
    return token_windows(tok, load_wikitext("valid"), seq_len=s["seq_len"] + 1, n_windows=s["train_windows"])


def training_set(model: nn.Module, tok, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """`lens.lens_training_set` of the validation windows, through the cache (the model runs once)."""
    return cache.cached("lens_training_set", L.lens_training_set, version=1,
                        args=dict(model=model, windows=_train_windows(tok), k=sizes()["k"]),
                        options=dict(progress=progress))


def heldout_residuals(model: nn.Module, tok) -> torch.Tensor:
    """`[L+1, n, d]` residuals of validation windows taken after the training tokens (never trained on)."""
    s = sizes()
    offset = s["train_windows"] * (s["seq_len"] + 1)
    windows = token_windows(tok, load_wikitext("valid"), seq_len=s["heldout_len"] + 1,
                            n_windows=s["heldout_windows"], offset=offset)
    return L.collect_residuals(model, windows, progress=False)[0]


def trained_lens(model: nn.Module, train: dict[str, torch.Tensor], heldout: torch.Tensor, *,
                 steps: int | None = None, progress: bool = True) -> dict:
    """`lens.fit_tuned_lens` with this tier's sizes (or `steps`), through the cache."""
    s = sizes()
    steps = s["steps"] if steps is None else steps
    eval_every = s["eval_every"] * steps // s["steps"]
    return cache.cached("tuned_lens", L.fit_tuned_lens, version=1,
                        args=dict(model=model, train=train, heldout=heldout, steps=steps,
                                  batch_tokens=s["batch_tokens"], lr=1e-3, bias_lr=1e-2,
                                  vocab_sample=s["vocab_sample"], eval_every=eval_every),
                        options=dict(progress=progress))


def readout(lens: L.LogitLens | L.TunedLens, residuals: torch.Tensor, *, targets: torch.Tensor | None = None,
            k: int = 5) -> L.LensStats:
    """`lens.stats(residuals, targets=targets, k=k)` through the result cache.

    residuals: `[L+1, N, d]`, targets: `[N]` or None. An exact read-out of every layer over the whole
    vocabulary costs about 5 s per 100 tokens on a 2-core CPU; the key is the normed read-out
    `[L+1, N, d]` and the unembedding, so a logit lens and a tuned lens never share an entry.
    """
    with torch.no_grad():
        normed = lens.normed(residuals)
    return cache.cached("lens_readout", L.lens_stats, version=1, verbose=False,
                        args=dict(normed=normed, W_U=lens.parts.unembed.weight.detach(), targets=targets, k=k),
                        encode=_stats_to_dict, decode=_stats_from_dict)


def _stats_to_dict(stats: L.LensStats) -> dict[str, torch.Tensor]:
    return {name: value for name, value in vars(stats).items() if value is not None}


def _stats_from_dict(fields: dict[str, torch.Tensor]) -> L.LensStats:
    return L.LensStats(**{name: value.cpu() for name, value in fields.items()})


@cache.precompute_recipe("02_tuned_lens")
def _precompute_tuned_lens() -> None:
    """Notebook 02's cached parts in the current tier: the training set, the trained lens and both
    lenses' read-outs of the test tokens."""
    from course_utils.models import load_lm

    model, tok = load_lm("smollm2", device=CFG.device)
    tuned = L.TunedLens.from_state(model, trained_lens(model, training_set(model, tok),
                                                       heldout_residuals(model, tok))["state"])
    residuals, next_ids, is_first = test_residuals(model, tok)
    for lens in (L.LogitLens(model), tuned):
        readout(lens, residuals[:, ~is_first], targets=next_ids[~is_first])
