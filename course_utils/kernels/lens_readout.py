"""The fused logit-lens read-out: a Triton kernel behind `lens.lens_stats(..., backend="triton")`.

For every read-out `l` (layer) and token `n`, with logits `z = normed[l, n] @ W_U.T` (`[V]`), it
returns the same statistics as `lens.lens_stats_reference` without ever holding `[L+1, N, V]`
logits: each program owns one layer and a block of tokens, sweeps the vocabulary in tiles,
computes each tile with `tl.dot`, and carries in registers

- the online log-sum-exp: `m = max z`, `s = sum e^(z-m)`, `sz = sum e^(z-m) z` (entropy),
- the running top-k (logits and ids), the count of logits above the target's, the target's logit.

The KL to the last layer needs no second sweep over the vocabulary per layer. With
`p_L = softmax(z_L)` and `E = sum_v p_L(v) W_U[v]` (`[N, d]`, the expected unembedding row),

    KL(p_L || p_l) = sum_v p_L(v) (z_L(v) - z_l(v)) - log Z_L + log Z_l
                   = (x_L - x_l) . E + log Z_l - log Z_L,

so once the kernel has `log Z_L`, one streamed pass over the last layer gives `E`, and the KL of
every layer is a dot product in `d`. Memory: `O(N * (d + k))` beyond the inputs.
"""
from __future__ import annotations

import math

import torch

from course_utils.kernels import require_triton

__all__ = ["lens_stats_triton"]

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
            # the worst kept, if better"
            for _ in tl.static_range(K):
                best = tl.max(z, 1)
                where = tl.argmax(z, 1)
                worst = tl.min(top_v, 1)
                slot = tl.argmin(top_v, 1)
                swap = (ks[None, :] == slot[:, None]) & (best > worst)[:, None]
                top_v = tl.where(swap, best[:, None], top_v)
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
    f32 = dict(device=dev, dtype=torch.float32)
    out = {name: torch.empty(R, N, **f32) for name in ("logz", "entropy", "t_logit")}
    out["above"] = torch.zeros(R, N, device=dev, dtype=torch.int32)
    out["top_v"] = torch.empty(R, N, k, **f32)
    out["top_i"] = torch.empty(R, N, k, device=dev, dtype=torch.int32)
    if targets is not None:
        tgt = targets.to(dev, torch.int64).contiguous()
        z_t = torch.einsum("lnd,nd->ln", normed.float(), W[tgt].float()).contiguous()
    else:
        tgt, z_t = out["above"], out["t_logit"]  # unused placeholders
    bt, bv, bd = blocks
    grid = (math.ceil(N / bt), R)
    _kernel[grid](normed, W, tgt, z_t, out["logz"], out["entropy"], out["t_logit"], out["above"],
                  out["top_v"], out["top_i"], N, V, D, HAS_TGT=targets is not None, K=k,
                  KP=max(2, 1 << (k - 1).bit_length()), BT=bt, BV=bv, BD=bd, PRECISION=precision)
    return out


def _expected_unembedding(x_last: torch.Tensor, W: torch.Tensor, log_z: torch.Tensor, chunk: int) -> torch.Tensor:
    """`E = softmax(x_last @ W.T) @ W`, streamed over the vocabulary: x_last `[N, d]`, log_z `[N]` -> `[N, d]`."""
    E = torch.zeros(x_last.shape, device=x_last.device, dtype=torch.float32)
    for v0 in range(0, W.shape[0], chunk):
        w = W[v0:v0 + chunk].float()
        E += torch.exp(x_last.float() @ w.T - log_z[:, None]) @ w
    return E


@torch.no_grad()
def lens_stats_triton(normed: torch.Tensor, W_U: torch.Tensor, *, targets: torch.Tensor | None = None,
                      k: int = 5, blocks: tuple[int, int, int] = (64, 128, 64), precision: str | None = None,
                      vocab_chunk: int = 8192, token_chunk: int | None = None):
    """`lens.lens_stats` with the fused Triton kernel. normed `[L+1, N, d]`, W_U `[V, d]`, targets `[N]`.

    `blocks = (tokens, vocab, width)` tile sizes. `precision`: `tl.dot`'s input precision; for fp32
    inputs the default is "ieee" (exact fp32, like the reference); "tf32" is faster and rounds each
    product's inputs to 10 mantissa bits. bf16/fp16 inputs use the tensor cores as they are.
    """
    from course_utils.lens import LensStats, _check_stats_inputs

    _check_stats_inputs(normed, W_U, targets, k)
    require_triton(normed, "lens_stats")
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
    top_i = out["top_i"].long().gather(-1, order)
    has_t = targets is not None
    return LensStats(entropy=out["entropy"].cpu(), topk_ids=top_i.cpu(), topk_probs=torch.exp(top_v - log_z[..., None]).cpu(),
                     kl_to_final=kl.clamp_min(0).cpu(),
                     target_logprob=(out["t_logit"] - log_z).cpu() if has_t else None,
                     target_rank=out["above"].long().cpu() if has_t else None)
