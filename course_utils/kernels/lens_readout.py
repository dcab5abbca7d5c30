"""The fused logit-lens read-out behind `lens.lens_stats`: a PyTorch reference and a Triton kernel.

For every read-out `l` (layer) and token `n`, with logits `z = normed[l, n] @ W_U.T` (`[V]`),
both return the same `LensReadout` (entropy, top-k, KL to the last layer, the target's
log-probability and rank) without ever holding `[L+1, N, V]` logits:

- `lens_readout_reference` (PyTorch) takes chunks of tokens and sweeps the vocabulary in chunks
  with an online log-sum-exp (as in flash attention);
- `lens_readout_triton`: each program owns one layer and a block of tokens, sweeps the
  vocabulary in tiles, computes each tile with `tl.dot`, and carries in registers the online
  log-sum-exp (`m = max z`, `s = sum e^(z-m)`, `sz = sum e^(z-m) z` for the entropy), the running
  top-k (logits and ids), the count of logits above the target's and the target's logit;
- `lens_readout(..., backend=)` runs one of them (`kernels.dispatch`).

The kernel's KL to the last layer needs no second sweep over the vocabulary per layer. With
`p_L = softmax(z_L)` and `E = sum_v p_L(v) W_U[v]` (`[N, d]`, the expected unembedding row),

    KL(p_L || p_l) = sum_v p_L(v) (z_L(v) - z_l(v)) - log Z_L + log Z_l
                   = (x_L - x_l) . E + log Z_l - log Z_L,

so once the kernel has `log Z_L`, one streamed pass over the last layer gives `E`, and the KL of
every layer is a dot product in `d`. Memory: `O(N * (d + k))` beyond the inputs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from course_utils.kernels import dispatch, require_triton

__all__ = ["LensReadout", "check_lens_inputs", "lens_readout", "lens_readout_reference", "lens_readout_triton"]


class LensReadout(NamedTuple):
    """Per-layer read-out statistics of `N` tokens, on the inputs' device (`lens.LensStats` wraps them).

    entropy `[L+1, N]` (nats), topk_ids `[L+1, N, k]` int64 and topk_probs `[L+1, N, k]` (best
    first), kl_to_final `[L+1, N]` (`KL(p_L || p_l)`, zero at the last layer), and, only with
    targets, target_logprob `[L+1, N]` and target_rank `[L+1, N]` int64 (0 = top-1), else None.
    """

    entropy: torch.Tensor
    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    kl_to_final: torch.Tensor
    target_logprob: torch.Tensor | None
    target_rank: torch.Tensor | None


def check_lens_inputs(normed: torch.Tensor, W_U: torch.Tensor, targets: torch.Tensor | None, k: int) -> None:
    """Raise a ValueError that says what to do unless normed `[L+1, N, d]`, W_U `[V, d]`, targets `[N]`, 1 <= k <= V."""
    if normed.dim() != 3:
        raise ValueError(f"normed must be [L+1, N, d] (layers, tokens, width), got {tuple(normed.shape)}; "
                         "flatten batch and positions first: x.flatten(1, -2)")
    if W_U.dim() != 2 or W_U.shape[1] != normed.shape[-1]:
        raise ValueError(f"W_U must be [V, d] with d = {normed.shape[-1]}, got {tuple(W_U.shape)}")
    if targets is not None and tuple(targets.shape) != (normed.shape[1],):
        raise ValueError(f"targets must be [N] = [{normed.shape[1]}], got {tuple(targets.shape)}")
    if not 1 <= k <= W_U.shape[0]:
        raise ValueError(f"k must be between 1 and the vocabulary size {W_U.shape[0]}, got {k}")


# ----------------------------------------------------------------------------------------------
# The reference (plain PyTorch)
# ----------------------------------------------------------------------------------------------
def _merge_topk(tv: torch.Tensor, ti: torch.Tensor, z: torch.Tensor, v0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k (values `tv`, ids `ti`, `[..., k]`) merged with a chunk of logits `z [..., c]` from id `v0`."""
    k = tv.shape[-1]
    cv, ci = z.topk(min(k, z.shape[-1]), -1)
    tv, pick = torch.cat([tv, cv], -1).topk(k, -1)
    return tv, torch.cat([ti, ci + v0], -1).gather(-1, pick)


def _count_above(z: torch.Tensor, z_t: torch.Tensor, tgt: torch.Tensor, v0: int) -> torch.Tensor:
    """How many logits of the chunk `z [L+1, n, c]` (ids from `v0`) exceed the target's `z_t [L+1, n]`."""
    gt = z > z_t[..., None]
    inside = (tgt >= v0) & (tgt < v0 + z.shape[-1])
    if inside.any():  # the target never counts itself, whatever the rounding
        cols = (tgt - v0).clamp(0, z.shape[-1] - 1)
        gt[:, inside, cols[inside]] = False
    return gt.sum(-1)


_Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _chunk_readout(x: torch.Tensor, W: torch.Tensor, tgt: torch.Tensor | None, k: int, vocab_chunk: int) -> _Chunk:
    """One chunk of tokens x `[L+1, n, d]`: `(entropy, kl, topk_probs, topk_ids, target_logprob, rank)`,
    the last two None without `tgt`. The vocabulary is swept with an online log-sum-exp, carrying per
    layer and token the running max `m`, `s = sum e^(z-m)`, `sz = sum e^(z-m) z` (entropy), for the last
    layer `cross = sum e^(z_L-m_L) (z_L - z_l)` (KL), the running top-k, and the count above the target."""
    n_read, n, _ = x.shape
    dev = x.device
    m = torch.full((n_read, n), -math.inf, device=dev)
    s, sz, cross = (torch.zeros(n_read, n, device=dev) for _ in range(3))
    tv = torch.full((n_read, n, k), -math.inf, device=dev)
    ti = torch.zeros(n_read, n, k, dtype=torch.long, device=dev)
    if tgt is not None:  # the target's own logit, to count the tokens above it
        z_t = (x * W[tgt]).sum(-1)
        above = torch.zeros(n_read, n, dtype=torch.long, device=dev)
    for v0 in range(0, W.shape[0], vocab_chunk):
        z = (x @ W[v0 : v0 + vocab_chunk].T).float()  # [L+1, n, c]
        m_new = torch.maximum(m, z.amax(-1))
        rescale = torch.exp(m - m_new)
        e = torch.exp(z - m_new[..., None])
        s = s * rescale + e.sum(-1)
        sz = sz * rescale + (e * z).sum(-1)
        cross = cross * rescale[-1] + (e[-1] * (z[-1] - z)).sum(-1)
        m = m_new
        tv, ti = _merge_topk(tv, ti, z, v0)
        if tgt is not None:
            above += _count_above(z, z_t, tgt, v0)
    log_z = m + s.log()
    kl = (cross / s[-1] - log_z[-1] + log_z).clamp_min(0)
    tlp, rank = (z_t.float() - log_z, above) if tgt is not None else (None, None)
    return log_z - sz / s, kl, torch.exp(tv - log_z[..., None]), ti, tlp, rank


@torch.no_grad()
def lens_readout_reference(normed: torch.Tensor, W_U: torch.Tensor, *, targets: torch.Tensor | None = None,
                           k: int = 5, token_chunk: int = 128, vocab_chunk: int = 8192) -> LensReadout:
    """Per-layer statistics of `logits = normed @ W_U.T`, streamed, in plain PyTorch.

    normed: `[L+1, N, d]`, the residuals AFTER the final norm (and, for a tuned lens, after the
    translators); the last layer is the model's output. W_U: `[V, d]`. targets: `[N]` or None.
    Memory is `O((L+1) * token_chunk * vocab_chunk)`: see `_chunk_readout`.
    """
    check_lens_inputs(normed, W_U, targets, k)
    W = W_U.to(normed.dtype)
    chunks = [_chunk_readout(normed[:, t0 : t0 + token_chunk], W,
                             targets[t0 : t0 + token_chunk].to(normed.device) if targets is not None else None,
                             k, vocab_chunk)
              for t0 in range(0, max(normed.shape[1], 1), token_chunk)]  # N = 0: one empty chunk
    entropy, kl, top_p, top_ids = (torch.cat(part, 1) for part in zip(*(c[:4] for c in chunks)))
    tlp = ranks = None
    if targets is not None:  # then every chunk has them
        tlp, ranks = (torch.cat([t for t in part if t is not None], 1) for part in zip(*(c[4:] for c in chunks)))
    return LensReadout(entropy=entropy, topk_ids=top_ids, topk_probs=top_p, kl_to_final=kl,
                       target_logprob=tlp, target_rank=ranks)


# ----------------------------------------------------------------------------------------------
# The Triton kernel
# ----------------------------------------------------------------------------------------------
_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lens_readout_kernel(x_ptr, w_ptr, tgt_ptr, zt_ptr, logz_ptr, ent_ptr, tl_ptr, above_ptr, topv_ptr, topi_ptr,
                            N, V, D, HAS_TGT: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                            BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        layer = tl.program_id(1)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        tok_ok = toks < N
        ks = tl.arange(0, KP)
        x_rows = x_ptr + (layer * N + toks).to(tl.int64)[:, None] * D
        if HAS_TGT:
            tgt = tl.load(tgt_ptr + toks, mask=tok_ok, other=-1)
            z_t = tl.load(zt_ptr + layer * N + toks, mask=tok_ok, other=0.0)
        m = tl.full([BT], float("-inf"), tl.float32)
        s = tl.zeros([BT], tl.float32)
        sz = tl.zeros([BT], tl.float32)
        above = tl.zeros([BT], tl.int32)
        t_logit = tl.zeros([BT], tl.float32)
        # running top-k; the padding columns (k..KP) hold +inf so that they are never the minimum
        top_v = tl.where(ks[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BT, KP], tl.float32)
        top_i = tl.zeros([BT, KP], tl.int32)
        for v0 in range(0, V, BV):
            vs = v0 + tl.arange(0, BV)
            v_ok = vs < V
            z = tl.zeros([BT, BV], tl.float32)
            for d0 in range(0, D, BD):
                ds = d0 + tl.arange(0, BD)
                d_ok = ds < D
                x = tl.load(x_rows + ds[None, :], mask=tok_ok[:, None] & d_ok[None, :], other=0.0)
                w = tl.load(w_ptr + vs.to(tl.int64)[:, None] * D + ds[None, :], mask=v_ok[:, None] & d_ok[None, :],
                            other=0.0)
                z += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            z = tl.where(v_ok[None, :], z, float("-inf"))
            # online log-sum-exp and entropy
            m_new = tl.maximum(m, tl.max(z, 1))
            rescale = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * rescale + tl.sum(e, 1)
            sz = sz * rescale + tl.sum(e * tl.where(v_ok[None, :], z, 0.0), 1)
            m = m_new
            if HAS_TGT:
                is_t = vs[None, :] == tgt[:, None]
                t_logit += tl.sum(tl.where(is_t, z, 0.0), 1)
                above += tl.sum(((z > z_t[:, None]) & ~is_t & v_ok[None, :]).to(tl.int32), 1)
            # merge this tile's top-k into the running top-k: K rounds of "best of the tile replaces
            # the worst kept, if better". (pyright: Triton's stubs make `static_range` un-iterable
            # outside the JIT and `tl.max`/`tl.min` a tensor-or-tuple, hence the ignores.)
            for _ in tl.static_range(K):  # pyright: ignore[reportGeneralTypeIssues]
                best = tl.max(z, 1)
                where = tl.argmax(z, 1)
                worst = tl.min(top_v, 1)
                slot = tl.argmin(top_v, 1)
                swap = (ks[None, :] == slot[:, None]) & (best > worst)[:, None]  # pyright: ignore[reportOperatorIssue, reportIndexIssue]
                top_v = tl.where(swap, best[:, None], top_v)  # pyright: ignore[reportCallIssue, reportArgumentType]
                top_i = tl.where(swap, (v0 + where)[:, None], top_i)
                z = tl.where(tl.arange(0, BV)[None, :] == where[:, None], float("-inf"), z)
        log_z = m + tl.log(s)
        out = layer * N + toks
        tl.store(logz_ptr + out, log_z, mask=tok_ok)
        tl.store(ent_ptr + out, log_z - sz / s, mask=tok_ok)
        if HAS_TGT:
            tl.store(tl_ptr + out, t_logit, mask=tok_ok)
            tl.store(above_ptr + out, above, mask=tok_ok)
        kept = tok_ok[:, None] & (ks[None, :] < K)
        tl.store(topv_ptr + out[:, None] * K + ks[None, :], top_v, mask=kept)
        tl.store(topi_ptr + out[:, None] * K + ks[None, :], top_i, mask=kept)

    return lens_readout_kernel


def _launch(normed: torch.Tensor, W: torch.Tensor, targets: torch.Tensor | None, k: int,
            blocks: tuple[int, int, int], precision: str) -> dict[str, torch.Tensor]:
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    R, N, D = normed.shape
    V = W.shape[0]
    dev = normed.device
    out = {name: torch.empty(R, N, device=dev, dtype=torch.float32) for name in ("logz", "entropy", "t_logit")}
    out["above"] = torch.zeros(R, N, device=dev, dtype=torch.int32)
    out["top_v"] = torch.empty(R, N, k, device=dev, dtype=torch.float32)
    out["top_i"] = torch.empty(R, N, k, device=dev, dtype=torch.int32)
    if targets is not None:
        tgt = targets.to(dev, torch.int64).contiguous()
        z_t = torch.einsum("lnd,nd->ln", normed.float(), W[tgt].float()).contiguous()
    else:
        tgt, z_t = out["above"], out["t_logit"]  # unused placeholders
    bt, bv, bd = blocks
    grid = (math.ceil(N / bt), R)
    # Triton takes plain values for `tl.constexpr` parameters; pyright reads the annotation literally
    _kernel[grid](normed, W, tgt, z_t, out["logz"], out["entropy"], out["t_logit"], out["above"],
                  out["top_v"], out["top_i"], N, V, D, HAS_TGT=targets is not None, K=k,  # pyright: ignore[reportArgumentType]
                  KP=max(2, 1 << (k - 1).bit_length()), BT=bt, BV=bv, BD=bd, PRECISION=precision)  # pyright: ignore[reportArgumentType]
    return out


def _expected_unembedding(x_last: torch.Tensor, W: torch.Tensor, log_z: torch.Tensor, chunk: int) -> torch.Tensor:
    """`E = softmax(x_last @ W.T) @ W`, streamed over the vocabulary: x_last `[N, d]`, log_z `[N]` -> `[N, d]`."""
    E = torch.zeros(x_last.shape, device=x_last.device, dtype=torch.float32)
    for v0 in range(0, W.shape[0], chunk):
        w = W[v0:v0 + chunk].float()
        E += torch.exp(x_last.float() @ w.T - log_z[:, None]) @ w
    return E


@torch.no_grad()
def lens_readout_triton(normed: torch.Tensor, W_U: torch.Tensor, *, targets: torch.Tensor | None = None,
                        k: int = 5, blocks: tuple[int, int, int] = (64, 128, 64), precision: str | None = None,
                        vocab_chunk: int = 8192) -> LensReadout:
    """`lens_readout_reference` with the fused Triton kernel. normed `[L+1, N, d]`, W_U `[V, d]`, targets `[N]`.

    `blocks = (tokens, vocab, width)` tile sizes. `precision`: `tl.dot`'s input precision; for fp32
    inputs the default is "ieee" (exact fp32, like the reference); "tf32" is faster and rounds each
    product's inputs to 10 mantissa bits. bf16/fp16 inputs use the tensor cores as they are.
    `vocab_chunk`: the vocabulary chunk of the streamed pass that gives `E`.
    """
    check_lens_inputs(normed, W_U, targets, k)
    require_triton(normed, "lens_readout")
    normed = normed.contiguous()
    W = W_U.to(device=normed.device, dtype=normed.dtype).contiguous()
    if precision is None:
        precision = "ieee" if normed.dtype == torch.float32 else "tf32"
    out = _launch(normed, W, targets, k, blocks, precision)
    log_z = out["logz"]
    E = _expected_unembedding(normed[-1], W, log_z[-1], vocab_chunk)
    kl = torch.einsum("lnd,nd->ln", normed[-1:].float() - normed.float(), E) + log_z - log_z[-1:]
    kl[-1] = 0.0
    top_v, order = out["top_v"].sort(-1, descending=True)
    has_t = targets is not None
    return LensReadout(entropy=out["entropy"], topk_ids=out["top_i"].long().gather(-1, order),
                       topk_probs=torch.exp(top_v - log_z[..., None]), kl_to_final=kl.clamp_min(0),
                       target_logprob=out["t_logit"] - log_z if has_t else None,
                       target_rank=out["above"].long() if has_t else None)


def lens_readout(normed: torch.Tensor, W_U: torch.Tensor, *, targets: torch.Tensor | None = None, k: int = 5,
                 backend: str = "auto", token_chunk: int = 128, vocab_chunk: int = 8192,
                 blocks: tuple[int, int, int] = (64, 128, 64), precision: str | None = None) -> LensReadout:
    """The reference or the kernel, as `kernels.dispatch` chooses for `backend` ("auto", "reference", "triton").

    normed `[L+1, N, d]`, W_U `[V, d]`, targets `[N]` or None. `token_chunk` is the reference's,
    `blocks` and `precision` the kernel's, `vocab_chunk` both's (see each).
    """
    check_lens_inputs(normed, W_U, targets, k)  # bad input is an error, never a reason to fall back
    return dispatch(normed, backend, what="lens_readout",
                    reference=lambda: lens_readout_reference(normed, W_U, targets=targets, k=k,
                                                             token_chunk=token_chunk, vocab_chunk=vocab_chunk),
                    triton=lambda: lens_readout_triton(normed, W_U, targets=targets, k=k, blocks=blocks,
                                                       precision=precision, vocab_chunk=vocab_chunk))
