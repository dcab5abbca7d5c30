"""The logit lens and the tuned lens: read a language model's residual stream layer by layer.

Conventions, used everywhere in this module and in notebook 02:

- A model has `L = parts.n_layers` blocks. The **residual stream** is `h_0, ..., h_L`: `h_0` is
  the embedding (GPT-2: plus positions), `h_l` the output of block `l` (1-based). Stacked, it is
  `residuals: [L+1, B, T, d]` (`residual_stream`). `h_l` equals Hugging Face's
  `output_hidden_states[l]` for `l < L`; HF's last entry is `final_norm(h_L)`, not `h_L`.
- The **logit lens** (nostalgebraist 2020) decodes every layer as if it were the last:
  `logits_l = W_U · final_norm(h_l)`, the norm recomputed on `h_l` itself. At `l = L` it is the
  model's own output.
- The **tuned lens** (Belrose et al. 2023) first applies a learned affine translator per layer,
  `h -> h + A_l h + b_l`, zero-initialised so that training starts from the logit lens.
- Statistics over tokens are per position `[L+1, N]` (flattened `B*T`), reduced by the caller.
  KL is `KL(p_L || p_l)`: how many nats the layer-l read-out loses against the model's output.

The fused read-out `lens_stats(normed, W_U, targets=...)` returns entropy, top-k, KL to the last
layer, the target's log-probability and rank for every layer and token, streaming over token
and vocabulary chunks so that the `[L+1, N, V]` logits never exist at once.
The statistics come from the kernel module `kernels.lens_readout` (plain tensors; a PyTorch
reference and a Triton kernel, chosen by `kernels.dispatch`); this module wraps them in `LensStats`.
`lens_stats_reference` always runs the plain-PyTorch reference.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from course_utils.kernels.lens_readout import LensReadout, lens_readout, lens_readout_reference
from course_utils.models import LMParts, block_output, lm_parts

__all__ = [
    "residual_stream",
    "collect_residuals",
    "rms_norm_decode",
    "cached_scale_norm",
    "kl_to_final",
    "cross_entropy_per_layer",
    "target_rank",
    "unigram_logprobs",
    "rock_cross_entropy",
    "LensStats",
    "lens_stats",
    "lens_stats_reference",
    "LogitLens",
    "TunedLens",
    "FitLog",
    "translate",
    "final_topk",
    "bucket_kl",
    "sampled_log_partition",
    "exact_mean_kl",
    "loss_approximation",
    "lens_training_set",
    "fit_tuned_lens",
    "excess_kurtosis",
    "max_to_median",
    "clip_outliers",
    "repeated_random_tokens",
    "attention_patterns",
    "induction_score",
    "induction_scores",
    "rank_bucket",
]


def _parts(model_or_parts: nn.Module | LMParts) -> LMParts:
    return model_or_parts if isinstance(model_or_parts, LMParts) else lm_parts(model_or_parts)


# ----------------------------------------------------------------------------------------------
# 1. The residual stream
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def residual_stream(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Run `model` once on `ids: [B, T]`; return the residual stream `[L+1, B, T, d]`.

    Entry 0 is the embedding (`parts.embed_fn(ids)`), entry `l` the output of block `l`, caught
    with a forward hook. Every hook is removed before returning, even on error.
    """
    parts = _parts(model)
    caught: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: caught.append(block_output(o).detach()))
             for b in parts.blocks]
    try:
        parts.model(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([parts.embed_fn(ids), *caught])


@torch.no_grad()
def collect_residuals(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8,
                      skip_first: int = 1, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals of many token windows, flattened over tokens, for lens statistics and training.

    windows: `[n, T]` token ids. Returns `(residuals [L+1, N, d], next_ids [N])`, where the tokens
    are every position `skip_first <= t < T-1` of every window (so each has a next token), and
    `next_ids` the token that follows each. `skip_first=1` drops position 0: there the model parks
    its "attention sink", a residual with entries in the tens of thousands that no lens reads.
    """
    if windows.dim() != 2 or windows.shape[1] < skip_first + 2:
        raise ValueError(f"windows must be [n, T] with T >= {skip_first + 2}, got {tuple(windows.shape)}")
    chunks, nexts = [], []
    for start in tqdm(range(0, len(windows), batch_size), desc="residuals", disable=not progress):
        ids = windows[start : start + batch_size]
        res = residual_stream(model, ids.to(_device(model)))[:, :, skip_first:-1]
        chunks.append(res.flatten(1, 2).cpu())
        nexts.append(ids[:, skip_first + 1 :].reshape(-1))
    return torch.cat(chunks, 1), torch.cat(nexts)


def _device(model: nn.Module | LMParts) -> torch.device:
    return _parts(model).unembed.weight.device


# ----------------------------------------------------------------------------------------------
# 2. Decoding a layer
# ----------------------------------------------------------------------------------------------
def rms_norm_decode(residuals: torch.Tensor, gamma: torch.Tensor, W_U: torch.Tensor, eps: float) -> torch.Tensor:
    """The logit lens under RMSNorm, written out: `W_U (gamma * h / sqrt(mean(h^2) + eps))`.

    residuals: `[..., d]` (e.g. `[L+1, T, d]`), gamma: `[d]`, W_U: `[V, d]` -> logits `[..., V]`.
    The scale is recomputed on each vector itself.
    """
    scale = torch.rsqrt(residuals.pow(2).mean(-1, keepdim=True) + eps)
    return (residuals * scale * gamma) @ W_U.T


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))


def cached_scale_norm(norm: nn.Module, residuals: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The pitfall (TransformerLens #1076): normalise `residuals` with the SCALE of `reference`.

    residuals: `[L+1, ..., d]`, reference: `[..., d]` (usually `h_L`, the one the model normalised).
    RMSNorm: `gamma * h_l / rms(h_L)`. LayerNorm: `gamma * (h_l - mean(h_l)) / std(h_L) + beta`
    (centring is linear, so it stays per layer; only the scale is cached). Under RMSNorm this is a
    positive multiple of the right answer per token; under LayerNorm the bias is not scaled along.
    """
    eps = _norm_eps(norm)
    if isinstance(norm, nn.LayerNorm):
        ref_std = torch.sqrt(reference.var(-1, unbiased=False, keepdim=True) + eps)
        centred = residuals - residuals.mean(-1, keepdim=True)
        out = centred / ref_std * norm.weight
        return out + norm.bias if norm.bias is not None else out
    ref_rms = torch.sqrt(reference.pow(2).mean(-1, keepdim=True) + eps)
    gamma = norm.weight
    assert isinstance(gamma, torch.Tensor), f"{type(norm).__name__}.weight must be a tensor (the norm's gain)"
    return residuals / ref_rms * gamma


# ----------------------------------------------------------------------------------------------
# 3. Per-layer statistics on full logits (small inputs; the fused version is below)
# ----------------------------------------------------------------------------------------------
def kl_to_final(logits: torch.Tensor) -> torch.Tensor:
    """`KL(p_L || p_l)` per layer and token. logits: `[L+1, ..., V]` -> `[L+1, ...]` (nats)."""
    logp = logits.float().log_softmax(-1)
    final = logp[-1]
    return (final.exp() * (final - logp)).sum(-1)


def cross_entropy_per_layer(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of each layer's read-out, in nats.

    logits: `[L+1, T, V]` (position t predicts token t+1), ids: `[T]` -> `[L+1]`, the mean over
    the `T-1` positions that have a next token.
    """
    logp = logits[:, :-1].float().log_softmax(-1)
    nxt = ids[1:].expand(logp.shape[0], -1)
    return -logp.gather(-1, nxt[..., None])[..., 0].mean(-1)


def target_rank(logits: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
    """How many tokens score strictly higher than `target` (0 = top-1). logits `[..., V]` -> `[...]` int64."""
    t = torch.as_tensor(target, device=logits.device).expand(logits.shape[:-1])
    own = logits.gather(-1, t[..., None])
    return (logits > own).sum(-1)


def rank_bucket(rank: int) -> str:
    """A coarse, run-to-run stable label for a rank: `"top-1"`, `"2-10"`, `"11-100"`, ... (rank 0 = top-1)."""
    r = int(rank) + 1
    if r == 1:
        return "top-1"
    hi = 10 ** math.ceil(math.log10(r))
    return f"{hi // 10 + 1}-{hi}"


def unigram_logprobs(ids: torch.Tensor, vocab_size: int, *, alpha: float = 0.1) -> torch.Tensor:
    """The rock: a constant next-token distribution, token frequencies with add-`alpha` smoothing.

    ids: any LongTensor of token ids (the text the rock is fitted on) -> log-probabilities `[V]`.
    """
    counts = torch.bincount(ids.reshape(-1).cpu(), minlength=vocab_size).double() + alpha
    return (counts / counts.sum()).log().float()


def rock_cross_entropy(rock_logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    """Cross-entropy (nats) of the constant model on the tokens `ids` (any shape)."""
    return float(-rock_logprobs[ids.reshape(-1).cpu()].mean())


# ----------------------------------------------------------------------------------------------
# 4. The fused read-out
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LensStats:
    """Per-layer read-out statistics of `N` tokens (from `lens_stats`). All tensors on the CPU.

    - `entropy [L+1, N]`: entropy of each layer's next-token distribution (nats).
    - `topk_ids [L+1, N, k]`, `topk_probs [L+1, N, k]`: the k most likely tokens, best first.
    - `kl_to_final [L+1, N]`: `KL(p_L || p_l)` (nats); zero at the last layer.
    - `target_logprob [L+1, N]`, `target_rank [L+1, N]` (int64, 0 = top-1): only with `targets`.
    """

    entropy: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    kl_to_final: torch.Tensor
    target_logprob: torch.Tensor | None = None
    target_rank: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        """`L+1`: the number of read-outs (embedding included)."""
        return self.entropy.shape[0]

    def mean_kl(self) -> torch.Tensor:
        """`[L+1]`: the KL to the last layer, averaged over tokens."""
        return self.kl_to_final.mean(1)

    def cross_entropy(self) -> torch.Tensor:
        """`[L+1]`: the mean next-token cross-entropy of each layer (needs `targets`)."""
        if self.target_logprob is None:
            raise ValueError("cross_entropy needs the targets: call lens_stats(..., targets=next_ids)")
        return -self.target_logprob.mean(1)

    @classmethod
    def of(cls, readout: LensReadout) -> LensStats:
        """The kernels' plain tensors (`kernels.lens_readout.LensReadout`), moved to the CPU."""
        fields: dict[str, Any] = {name: None if t is None else t.cpu() for name, t in readout._asdict().items()}
        return cls(**fields)


def lens_stats_reference(normed: torch.Tensor, W_U: torch.Tensor, *, targets: torch.Tensor | None = None,
                         k: int = 5, token_chunk: int = 128, vocab_chunk: int = 8192) -> LensStats:
    """`lens_stats` in plain PyTorch (`kernels.lens_readout.lens_readout_reference`), streamed.

    normed: `[L+1, N, d]`, the residuals AFTER the final norm (and, for a tuned lens, after the
    translators); the last layer is the model's output. W_U: `[V, d]`. targets: `[N]` or None.
    Memory is `O((L+1) * token_chunk * vocab_chunk)`.
    """
    return LensStats.of(lens_readout_reference(normed, W_U, targets=targets, k=k, token_chunk=token_chunk,
                                               vocab_chunk=vocab_chunk))


def lens_stats(normed: torch.Tensor, W_U: torch.Tensor, *, targets: torch.Tensor | None = None,
               k: int = 5, backend: str = "auto", **kwargs) -> LensStats:
    """Per-layer read-out statistics (see `LensStats`) without materialising `[L+1, N, V]` logits.

    normed: `[L+1, N, d]` (after the final norm), W_U: `[V, d]`, targets: `[N]` or None.
    `backend`: "auto" (the fused Triton kernel for CUDA tensors when Triton is installed, else the
    PyTorch reference; a kernel that fails warns and falls back), "reference" or "triton" (see
    `kernels.dispatch`). `kwargs`: tuning of `kernels.lens_readout.lens_readout` (`token_chunk`,
    `vocab_chunk`, `blocks`, `precision`).
    """
    return LensStats.of(lens_readout(normed, W_U, targets=targets, k=k, backend=backend, **kwargs))


# ----------------------------------------------------------------------------------------------
# 5. The lenses
# ----------------------------------------------------------------------------------------------
class LogitLens:
    """Decode any layer with the model's own final norm and unembedding (nostalgebraist 2020).

        lens = LogitLens(model)
        res = residual_stream(model, ids)          # [L+1, B, T, d]
        logits = lens.logits(res)                   # [L+1, B, T, V]  (small inputs only)
        stats = lens.stats(res_flat, targets=nxt)   # LensStats, streamed: any number of tokens
    """

    def __init__(self, model: nn.Module | LMParts):
        self.parts = _parts(model)

    @property
    def n_layers(self) -> int:
        return self.parts.n_layers

    def normed(self, residuals: torch.Tensor) -> torch.Tensor:
        """`final_norm` applied to every layer's own residual: `[..., d]` -> `[..., d]`."""
        with torch.no_grad():
            return self.parts.final_norm(residuals)

    def logits(self, residuals: torch.Tensor) -> torch.Tensor:
        """`[..., d]` -> `[..., V]`. Materialises the logits: use `stats` for many tokens."""
        with torch.no_grad():
            return self.parts.unembed(self.normed(residuals))

    def cached_scale_logits(self, residuals: torch.Tensor) -> torch.Tensor:
        """The pitfall: every layer normalised with the last layer's scale. `[L+1, ..., d]` -> `[L+1, ..., V]`."""
        with torch.no_grad():
            return self.parts.unembed(cached_scale_norm(self.parts.final_norm, residuals, residuals[-1]))

    def stats(self, residuals: torch.Tensor, *, targets: torch.Tensor | None = None, k: int = 5,
              **kwargs) -> LensStats:
        """`lens_stats` of `residuals: [L+1, N, d]` (or `[L+1, B, T, d]`, flattened to `N = B*T`)."""
        if residuals.dim() == 4:
            residuals = residuals.flatten(1, 2)
            targets = targets.reshape(-1) if targets is not None else None
        return lens_stats(self.normed(residuals), self.parts.unembed.weight.detach(), targets=targets, k=k, **kwargs)


def translate(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The tuned lens's affine translator: `h + h A^T + b`. h: `[..., d]`, weight A: `[d, d]`, bias b: `[d]`.

    With `A = 0, b = 0` it is the identity, so a fresh tuned lens IS the logit lens.
    """
    return h + h @ weight.T + bias


@dataclass
class FitLog:
    """What `TunedLens.fit` / `fit_cached` did: `steps`, the training loss (mean KL over layers) per
    step, and (`fit_cached` with held-out residuals) the exact held-out mean KL `eval_kl` after the
    steps `eval_steps` (step 0 = before training)."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_kl: list[float] = field(default_factory=list)


class TunedLens(nn.Module):
    """One affine translator per layer before the logit lens (Belrose et al. 2023), zero-initialised.

    `lens.logits(residuals)` decodes `W_U final_norm(h_l + A_l h_l + b_l)` for `l < L` and the
    plain `h_L` at the last layer. Train with `fit`, keep with `save` / `TunedLens.load`.

    Parametrisation (what lets one learning rate suit every layer): the residual's norm grows more
    than tenfold through the model, so the bias is stored as `b_l = s_l * b'_l`, with `s_l` the
    typical residual norm per feature of layer l, measured once from data by `fit` and then
    frozen. `weight` is `A` (`[L, d, d]`), `bias` gives `b` (`[L, d]`).
    """

    scale: torch.Tensor  # `[L]`, the buffer `s_l` (registered in __init__)

    def __init__(self, model: nn.Module | LMParts):
        super().__init__()
        self.parts = _parts(model)  # a plain attribute, not a submodule: the model stays frozen
        L, d = self.parts.n_layers, self.parts.d_model
        self.weight = nn.Parameter(torch.zeros(L, d, d))  # A_l, (output, input)
        self.bias_unit = nn.Parameter(torch.zeros(L, d))
        self.register_buffer("scale", torch.ones(L))
        self.to(self.parts.unembed.weight.device)

    @property
    def n_layers(self) -> int:
        return self.parts.n_layers

    @property
    def bias(self) -> torch.Tensor:
        """`[L, d]`: the translators' biases `b_l`."""
        return self.scale[:, None] * self.bias_unit

    def _move(self, h: torch.Tensor, l0: int = 0, l1: int | None = None) -> torch.Tensor:
        """Translators `l0..l1-1` on `h: [l1-l0, ..., d]`: `h + A h + b`."""
        l1 = self.n_layers if l1 is None else l1
        shape = (l1 - l0,) + (1,) * (h.dim() - 2) + (h.shape[-1],)
        return h + torch.einsum("l...d,led->l...e", h, self.weight[l0:l1]) + self.bias[l0:l1].reshape(shape)

    def translated(self, residuals: torch.Tensor) -> torch.Tensor:
        """`[L+1, ..., d]` -> `[L+1, ..., d]`: translator `l` applied to layer `l`; the last layer untouched."""
        if residuals.shape[0] != self.n_layers + 1:
            raise ValueError(f"expected residuals for all {self.n_layers + 1} layers (embedding included) "
                             f"on dim 0, got {residuals.shape[0]}")
        return torch.cat([self._move(residuals[:-1]), residuals[-1:]])

    def normed(self, residuals: torch.Tensor) -> torch.Tensor:
        return self.parts.final_norm(self.translated(residuals))

    def logits(self, residuals: torch.Tensor) -> torch.Tensor:
        """`[L+1, ..., d]` -> `[L+1, ..., V]` (materialised: small inputs only)."""
        return self.parts.unembed(self.normed(residuals))

    def stats(self, residuals: torch.Tensor, *, targets: torch.Tensor | None = None, k: int = 5,
              **kwargs) -> LensStats:
        """`lens_stats` of the translated read-out; `residuals: [L+1, N, d]` or `[L+1, B, T, d]`."""
        if residuals.dim() == 4:
            residuals = residuals.flatten(1, 2)
            targets = targets.reshape(-1) if targets is not None else None
        with torch.no_grad():
            normed = self.normed(residuals.to(self.scale.device))
        return lens_stats(normed, self.parts.unembed.weight.detach(), targets=targets, k=k, **kwargs)

    def fit(self, residuals: torch.Tensor, *, steps: int = 300, batch_tokens: int = 32, lr: float = 1e-3,
            bias_lr: float | None = None, vocab_sample: int | None = None, optimizer: str = "adam", seed: int = 0,
            layer_chunk: int | None = None,
            progress: bool = True) -> FitLog:
        """Train every translator to minimise `KL(p_L || p_l)` on cached residuals `[L+1, N, d]`.

        Adam, `steps` steps of `batch_tokens` random tokens each (all layers at once); the model's
        weights are frozen. The first call also sets each layer's bias scale from the data.

        `vocab_sample=None` computes the exact KL over the whole vocabulary. An int `m` makes a
        step about `V / (k + m)` times cheaper (for a CPU): the KL is summed over the tokens that
        carry the final distribution's mass in this batch (each token's top 32) plus `m` random
        others, weighted by how many tokens each random one stands for (a sampled softmax).
        Returns a `FitLog`; the lens is trained in place.
        """
        if residuals.dim() != 3 or residuals.shape[0] != self.n_layers + 1:
            raise ValueError(f"fit needs cached residuals [L+1, N, d] = [{self.n_layers + 1}, N, "
                             f"{self.parts.d_model}], got {tuple(residuals.shape)} (see collect_residuals)")
        self._init_scale(residuals)
        gen = torch.Generator().manual_seed(seed)
        opt, decay = self._optimiser(lr, bias_lr, optimizer, steps)
        if layer_chunk is None:  # all layers in one go, unless the full-vocabulary logits would be large
            layer_chunk = self.n_layers if vocab_sample is not None else max(1, 2**22 // (batch_tokens * 4096))
        log = FitLog()
        with self._model_frozen():
            for _ in tqdm(range(steps), desc="tuned lens", disable=not progress):
                pick = torch.randint(0, residuals.shape[1], (batch_tokens,), generator=gen)
                res = residuals[:, pick].to(self.scale.device)
                opt.zero_grad(set_to_none=True)
                log.losses.append(self._kl_backward(res, vocab_sample, gen, layer_chunk))
                opt.step()
                decay.step()
                log.steps += 1
        return log

    def _init_scale(self, residuals: torch.Tensor) -> None:
        """Untrained lens: set each layer's bias scale `s_l` from `residuals [L+1, N, d]` (then frozen)."""
        if bool((self.bias_unit == 0).all() and (self.weight == 0).all()):
            with torch.no_grad():
                sample = residuals[:-1, :4096].float()
                self.scale.copy_(sample.pow(2).mean(-1).sqrt().median(1).values.clamp_min(1e-6))

    def _optimiser(self, lr: float, bias_lr: float | None, optimizer: str, steps: int):
        """`(optimizer, scheduler)`: Adam (bias with its own rate) or Nesterov SGD, linear decay to 0."""
        if optimizer == "adam":
            groups = [{"params": [self.weight], "lr": lr},
                      {"params": [self.bias_unit], "lr": bias_lr if bias_lr is not None else lr}]
            opt: torch.optim.Optimizer = torch.optim.Adam(groups, fused=True)
        elif optimizer == "sgd":  # Belrose et al.: SGD with Nesterov momentum
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, nesterov=True)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)

    @contextmanager
    def _model_frozen(self):
        """Gradients for the translators only, never into the model (its flags restored after)."""
        frozen = [(p, p.requires_grad) for p in self.parts.final_norm.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)

    def fit_cached(self, train: dict[str, torch.Tensor], *, steps: int = 300, batch_tokens: int = 64,
                   lr: float = 1e-3, bias_lr: float | None = None, vocab_sample: int | None = 2048,
                   heldout: torch.Tensor | None = None, eval_every: int = 0, seed: int = 0,
                   progress: bool = True) -> FitLog:
        """Train every translator from a cache (`lens_training_set`): the model never runs again.

        train: `residuals [L+1, N, d]`, and the final distribution as `top_ids [N, k]`,
        `top_logp [N, k]`, `tail_logp [N]`. The loss is `bucket_kl` (the KL between the final
        distribution and the layer's, both coarsened to the k top tokens plus one tail bucket), with
        the layer's log-partition `sampled_log_partition` over the batch's top tokens plus
        `vocab_sample` random others (None: the whole vocabulary). With `heldout [L+1, n, d]`, the
        exact held-out mean KL (`exact_mean_kl`, layers 0..L-1) is logged every `eval_every` steps.
        """
        residuals = train["residuals"]
        if residuals.dim() != 3 or residuals.shape[0] != self.n_layers + 1:
            raise ValueError(f"fit_cached needs train['residuals'] = [L+1, N, d] = [{self.n_layers + 1}, N, "
                             f"{self.parts.d_model}], got {tuple(residuals.shape)} (see lens_training_set)")
        self._init_scale(residuals)
        gen = torch.Generator().manual_seed(seed)
        opt, decay = self._optimiser(lr, bias_lr, "adam", steps)
        log = FitLog()
        with self._model_frozen():
            for step in tqdm(range(steps), desc="tuned lens (cached)", disable=not progress):
                if heldout is not None and eval_every and step % eval_every == 0:
                    self._log_heldout(log, heldout, step)
                pick = torch.randint(0, residuals.shape[1], (batch_tokens,), generator=gen)
                opt.zero_grad(set_to_none=True)
                log.losses.append(self._bucket_kl_backward(
                    residuals[:, pick], train["top_ids"][pick], train["top_logp"][pick],
                    train["tail_logp"][pick], vocab_sample, gen))
                opt.step()
                decay.step()
                log.steps += 1
        if heldout is not None and eval_every:
            self._log_heldout(log, heldout, steps)
        return log

    def _log_heldout(self, log: FitLog, heldout: torch.Tensor, step: int) -> None:
        with torch.no_grad():
            kl = exact_mean_kl(self.normed(heldout.to(self.scale.device)), self.parts.unembed.weight.detach())
        log.eval_steps.append(step)
        log.eval_kl.append(float(kl[:-1].mean()))

    def _bucket_kl_backward(self, res: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                            tail_logp: torch.Tensor, vocab_sample: int | None, gen: torch.Generator) -> float:
        """Backpropagate the mean over layers 0..L-1 and tokens of `bucket_kl` for res `[L+1, b, d]`."""
        dev = self.scale.device
        W_U = self.parts.unembed.weight.detach()
        rows, col, log_w = _sampled_rows(top_ids.to(dev), W_U.shape[0], vocab_sample, gen)
        z = (self.parts.final_norm(self._move(res[:-1].to(dev))) @ W_U[rows].T).float()  # [L, b, r]
        kl = _training_kl(z, col, log_w, top_logp.to(dev), tail_logp.to(dev)).mean()
        kl.backward()
        return float(kl.detach())

    def _kl_backward(self, res: torch.Tensor, vocab_sample: int | None, gen: torch.Generator,
                     layer_chunk: int) -> float:
        """Backpropagate the mean over layers and tokens of `KL(p_L || p_l)` for res `[L+1, b, d]`."""
        W_U = self.parts.unembed.weight.detach()
        V = W_U.shape[0]
        with torch.no_grad():
            final = (self.parts.final_norm(res[-1]) @ W_U.T).float().log_softmax(-1)  # [b, V], exact
        rows, log_w = None, None
        if vocab_sample is not None and vocab_sample + 32 * res.shape[1] < V:
            keep = torch.zeros(V, dtype=torch.bool, device=W_U.device)
            keep[final.topk(32, -1).indices.reshape(-1)] = True
            rest = (~keep).nonzero()[:, 0]
            extra = rest[torch.randperm(len(rest), generator=gen)[:vocab_sample].to(rest.device)]
            rows = torch.cat([keep.nonzero()[:, 0], extra])
            log_w = torch.zeros(len(rows), device=W_U.device)
            log_w[int(keep.sum()):] = math.log(len(rest) / len(extra))
            final, W_U = final[:, rows], W_U[rows]
        p_final = final.exp() if log_w is None else (final + log_w).exp()  # weighted by what each stands for
        total = 0.0
        for l0 in range(0, self.n_layers, layer_chunk):  # a few layers at a time: bounded memory
            l1 = min(l0 + layer_chunk, self.n_layers)
            moved = self._move(res[l0:l1], l0, l1)
            z = (self.parts.final_norm(moved) @ W_U.T).float()  # [l, b, V or sampled]
            logq = z - torch.logsumexp(z if log_w is None else z + log_w, -1, keepdim=True)
            kl = (p_final * (final - logq)).sum(-1).mean(-1).sum() / self.n_layers
            kl.backward()
            total += float(kl.detach())
        return total

    def state(self) -> dict[str, torch.Tensor]:
        """The translators as plain CPU tensors: `weight [L, d, d]`, `bias_unit [L, d]`, `scale [L]`."""
        return {name: getattr(self, name).detach().cpu().clone() for name in ("weight", "bias_unit", "scale")}

    @classmethod
    def from_state(cls, model: nn.Module | LMParts, state: dict[str, torch.Tensor]) -> TunedLens:
        """A TunedLens for `model` holding `state` (from `state()` or `fit_tuned_lens`)."""
        lens = cls(model)
        if tuple(state["weight"].shape) != tuple(lens.weight.shape):
            raise ValueError(f"the state holds translators of shape {tuple(state['weight'].shape)}, but this "
                             f"model needs {tuple(lens.weight.shape)}; train the lens for this model")
        with torch.no_grad():
            for name in ("weight", "bias_unit", "scale"):
                getattr(lens, name).copy_(state[name])
        return lens

    def save(self, path: str | Path) -> Path:
        """Write the translators (and what model shape they fit) to `path` (a `.pt` file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({**state, "n_layers": self.n_layers, "d_model": self.parts.d_model}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | LMParts) -> TunedLens:
        """A TunedLens for `model` with the translators saved at `path`."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        parts = _parts(model)
        if (state["n_layers"], state["d_model"]) != (parts.n_layers, parts.d_model):
            raise ValueError(f"{path} holds a tuned lens for {state['n_layers']} layers of width "
                             f"{state['d_model']}, but this model has {parts.n_layers} of {parts.d_model}")
        return cls.from_state(parts, state)


# ----------------------------------------------------------------------------------------------
# 5b. Training the tuned lens from a cache
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def final_topk(final_normed: torch.Tensor, W_U: torch.Tensor, k: int = 32,
               token_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's output distribution, kept as its `k` top tokens plus the mass of the rest.

    final_normed: `[N, d]` (`final_norm(h_L)`), W_U: `[V, d]` -> `(top_ids [N, k] int64,
    top_logp [N, k], tail_logp [N])`, exact log-probabilities, `tail_logp = log(1 - sum top)`.
    """
    ids, logps, tails = [], [], []
    for t0 in range(0, final_normed.shape[0], token_chunk):
        logp = (final_normed[t0 : t0 + token_chunk] @ W_U.T).float().log_softmax(-1)
        top, idx = logp.topk(k, -1)
        ids.append(idx)
        logps.append(top)
        tails.append(torch.log1p(-top.logsumexp(-1).exp().clamp(max=1 - 1e-7)))
    return torch.cat(ids), torch.cat(logps), torch.cat(tails)


def bucket_kl(p_top: torch.Tensor, p_tail: torch.Tensor, q_top: torch.Tensor, q_tail: torch.Tensor) -> torch.Tensor:
    """KL between two distributions coarsened to `k` named tokens plus one tail bucket (nats).

    p_top `[..., k]`, p_tail `[...]` (log-probabilities of the final layer), q_top `[..., k]`,
    q_tail `[...]` (the layer's, same tokens) -> `[...]`. By the data-processing inequality it is
    never above the exact KL, and equals it when the tail holds one token or none.
    """
    top = (p_top.exp() * (p_top - q_top)).sum(-1)
    return top + p_tail.exp() * (p_tail - q_tail)


def sampled_log_partition(z: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """`log sum_r w_r e^{z_r}`: the log-partition from some rows of the vocabulary, each weighted.

    z: `[..., r]` logits of the kept rows, log_w: `[r]` (0 for rows kept for sure, `log(n_rest / m)`
    for `m` rows drawn uniformly from the `n_rest` others) -> `[...]`. `sum_r w_r e^{z_r}` is an
    unbiased estimate of the partition function; with every row kept it is exact.
    """
    return torch.logsumexp(z + log_w, -1)


def _sampled_rows(top_ids: torch.Tensor, V: int, m: int | None,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `W_U` for one step: `(rows [r], col [b, k] (where each top id sits in rows), log_w [r])`."""
    dev = top_ids.device
    if m is None:
        return torch.arange(V, device=dev), top_ids, torch.zeros(V, device=dev)
    kept, col = torch.unique(top_ids, return_inverse=True)
    rest = torch.ones(V, dtype=torch.bool, device=dev)
    rest[kept] = False
    rest = rest.nonzero()[:, 0]
    m = min(m, len(rest))
    extra = rest[torch.randperm(len(rest), generator=gen)[:m].to(dev)]
    log_w = torch.cat([torch.zeros(len(kept), device=dev),
                       torch.full((m,), math.log(len(rest) / max(m, 1)), device=dev)])
    return torch.cat([kept, extra]), col, log_w


def _training_kl(z: torch.Tensor, col: torch.Tensor, log_w: torch.Tensor, top_logp: torch.Tensor,
                 tail_logp: torch.Tensor) -> torch.Tensor:
    """The training loss per token: `bucket_kl` with the layer's log-partition from the kept rows.

    z: `[..., b, r]` logits of the rows `_sampled_rows` chose, col `[b, k]`, log_w `[r]`,
    top_logp `[b, k]`, tail_logp `[b]` -> `[..., b]`.
    """
    log_z = sampled_log_partition(z, log_w)
    q_top = z.gather(-1, col.expand(*z.shape[:-1], col.shape[-1])) - log_z[..., None]
    q_tail = torch.log1p(-q_top.logsumexp(-1).exp().clamp(max=1 - 1e-6))
    return bucket_kl(top_logp, tail_logp, q_top, q_tail)


@torch.no_grad()
def loss_approximation(normed: torch.Tensor, W_U: torch.Tensor, *, k: int, vocab_sample: int | None,
                       seed: int = 0) -> dict[str, float]:
    """The training loss's approximations against the exact KL, on the same tokens.

    normed: `[L+1, N, d]` (a lens's read-out input, the last layer the model's). Returns the mean
    over layers 0..L-1 and tokens of `"exact"` (the KL over the whole vocabulary), `"bucket"`
    (top-k + tail, exact partition) and `"sampled"` (top-k + tail, the partition from the tokens'
    top-k plus `vocab_sample` random rows: the loss `TunedLens.fit_cached` minimises).
    """
    top_ids, top_logp, tail_logp = final_topk(normed[-1], W_U, k)
    out = {"exact": float(exact_mean_kl(normed, W_U)[:-1].mean())}
    gen = torch.Generator().manual_seed(seed)
    for name, m in (("bucket", None), ("sampled", vocab_sample)):
        rows, col, log_w = _sampled_rows(top_ids, W_U.shape[0], m, gen)
        per_layer = [_training_kl((normed[layer] @ W_U[rows].T).float(), col, log_w, top_logp, tail_logp).mean()
                     for layer in range(normed.shape[0] - 1)]
        out[name] = float(torch.stack(per_layer).mean())
    return out


@torch.no_grad()
def exact_mean_kl(normed: torch.Tensor, W_U: torch.Tensor, *, layer_chunk: int = 4,
                  token_chunk: int = 256) -> torch.Tensor:
    """`KL(p_L || p_l)` over the whole vocabulary, averaged over tokens: normed `[L+1, N, d]` -> `[L+1]`.

    The cheap exact check of a tuned lens during training (no top-k, ranks or entropy).
    """
    total = torch.zeros(normed.shape[0], dtype=torch.float64)
    for t0 in range(0, normed.shape[1], token_chunk):
        x = normed[:, t0 : t0 + token_chunk]
        final = (x[-1] @ W_U.T).float().log_softmax(-1)
        for l0 in range(0, x.shape[0], layer_chunk):
            logq = (x[l0 : l0 + layer_chunk] @ W_U.T).float().log_softmax(-1)
            total[l0 : l0 + layer_chunk] += (final.exp() * (final - logq)).sum(-1).sum(-1).double().cpu()
    return (total / max(normed.shape[1], 1)).float()


def lens_training_set(model: nn.Module, windows: torch.Tensor, *, k: int = 32, batch_size: int = 8,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the model once over `windows [n, T]` and keep what training a tuned lens needs.

    Returns `residuals [L+1, N, d]` and `next_ids [N]` (`collect_residuals`, position 0 left out),
    and the final distribution as `final_topk`: `top_ids [N, k]`, `top_logp [N, k]`, `tail_logp [N]`.
    Cache it (`cache.cached`): `TunedLens.fit_cached` then never runs the model.
    """
    parts = _parts(model)
    residuals, next_ids = collect_residuals(model, windows, batch_size=batch_size, progress=progress)
    with torch.no_grad():
        final = parts.final_norm(residuals[-1].to(_device(model)))
    top_ids, top_logp, tail_logp = final_topk(final, parts.unembed.weight.detach(), k)
    return {"residuals": residuals, "next_ids": next_ids, "top_ids": top_ids.cpu(),
            "top_logp": top_logp.cpu(), "tail_logp": tail_logp.cpu()}


def fit_tuned_lens(model: nn.Module, train: dict[str, torch.Tensor], heldout: torch.Tensor, *, steps: int,
                   batch_tokens: int = 64, lr: float = 1e-3, bias_lr: float | None = 1e-2,
                   vocab_sample: int | None = 2048, eval_every: int = 0, seed: int = 0,
                   progress: bool = True) -> dict:
    """A tuned lens trained by `TunedLens.fit_cached`, as a plain result for `cache.cached`.

    Returns `{"state": TunedLens.state(), "losses": [steps], "eval_steps": [...], "eval_kl": [...]}`;
    rebuild the lens with `TunedLens.from_state(model, result["state"])`.
    """
    lens = TunedLens(model)
    log = lens.fit_cached(train, steps=steps, batch_tokens=batch_tokens, lr=lr, bias_lr=bias_lr,
                          vocab_sample=vocab_sample, heldout=heldout, eval_every=eval_every, seed=seed,
                          progress=progress)
    return {"state": lens.state(), "losses": torch.tensor(log.losses),
            "eval_steps": torch.tensor(log.eval_steps), "eval_kl": torch.tensor(log.eval_kl)}


# ----------------------------------------------------------------------------------------------
# 5c. Heavy tails: massive activations in the residual stream
# ----------------------------------------------------------------------------------------------
def excess_kurtosis(residuals: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of each residual vector's coordinates: `[..., d]` -> `[...]`.

    `E[(h - mean)^4] / Var^2 - 3` over the `d` coordinates (population moments): 0 for Gaussian
    coordinates, large when a few coordinates dwarf the rest.
    """
    x = residuals.double()
    c = x - x.mean(-1, keepdim=True)
    var = c.pow(2).mean(-1)
    return (c.pow(4).mean(-1) / var.pow(2) - 3).float()


def max_to_median(residuals: torch.Tensor) -> torch.Tensor:
    """`max_i |h_i| / median_i |h_i|` of each residual vector: `[..., d]` -> `[...]`."""
    a = residuals.abs().float()
    return a.amax(-1) / a.median(-1).values.clamp_min(1e-12)


def clip_outliers(residuals: torch.Tensor, factor: float = 10.0) -> torch.Tensor:
    """Clamp every coordinate to `±factor × median_i |h_i|` of its own vector: `[..., d]` -> `[..., d]`."""
    bound = factor * residuals.abs().median(-1, keepdim=True).values
    return torch.maximum(torch.minimum(residuals, bound), -bound)


# ----------------------------------------------------------------------------------------------
# 6. Induction heads
# ----------------------------------------------------------------------------------------------
def repeated_random_tokens(vocab_size: int, half: int, *, batch: int = 4, seed: int = 0,
                           low: int = 1000) -> torch.Tensor:
    """`[batch, 2*half]`: `half` random token ids (from `low` up, away from special tokens), twice."""
    if vocab_size <= low:
        low = 0
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(low, vocab_size, (batch, half), generator=gen)
    return torch.cat([first, first], 1)


@torch.no_grad()
def attention_patterns(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Every head's attention pattern: `ids [B, T]` -> `[L, B, H, T, T]` (rows: queries, softmaxed keys).

    Needs eager attention (`attn_implementation="eager"`, as `load_lm` and `tiny_lm` give): the
    fused SDPA kernels of transformers 5 do not return attention weights.
    """
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl != "eager":
        raise ValueError(f"attention weights need eager attention, but this model uses {impl!r}; load it "
                         "with attn_implementation='eager' (load_lm does) or call "
                         "model.set_attn_implementation('eager')")
    out = model(ids, output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention weights; load it with attn_implementation='eager'")
    return torch.stack(out.attentions)


def induction_score(pattern: torch.Tensor, half: int) -> torch.Tensor:
    """Mean attention from each second-copy query `t` to key `t - half + 1` (the token after the first copy).

    pattern: `[..., T, T]` on a sequence of `half` random tokens repeated (T = 2*half) -> `[...]`.
    """
    T = pattern.shape[-1]
    q = torch.arange(half, T, device=pattern.device)
    return pattern[..., q, q - half + 1].mean(-1)


def induction_scores(patterns: torch.Tensor, half: int) -> torch.Tensor:
    """`[L, B, H, T, T]` -> `[L, H]`: `induction_score` averaged over the batch."""
    return induction_score(patterns, half).mean(1)
