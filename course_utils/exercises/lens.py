"""Exercises of 02_logit_lens: the residual stream, the logit lens, its statistics, the tuned lens, induction heads.

Every case is small (tiny random models, vocabularies of a few dozen tokens) so that a check runs in
well under a second. Each exercise lists the typical wrong answers it recognises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_utils import lens as L
from course_utils.checks import Case, exercise, mistake
from course_utils.checks import generator as _gen
from course_utils.models import block_output, lm_parts, tiny_lm


# --- 1. the residual stream -------------------------------------------------------------------
def _ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=_gen(seed))


def _stream_cases() -> list[Case]:
    return [
        Case("tiny Llama, 3 blocks, batch of 2", (tiny_lm("llama", n_layers=3, d_model=32, vocab=101, seed=1),
                                                 _ids(101, 2, 6, 11))),
        Case("tiny GPT-2 (learned positions), 2 blocks", (tiny_lm("gpt2", n_layers=2, d_model=32, vocab=97, seed=2),
                                                         _ids(97, 1, 5, 12))),
        Case("tiny Llama, 1 block, one token", (tiny_lm("llama", n_layers=1, d_model=16, vocab=50, seed=3),
                                               _ids(50, 1, 1, 13))),
    ]


def _user_hooks(model: nn.Module) -> dict[str, int]:
    """Forward (pre-)hooks per module, leaving out the output recorders that transformers installs itself."""
    def mine(hooks: dict) -> int:
        return sum(not getattr(fn, "__module__", "").startswith("transformers") for fn in hooks.values())

    counts = {n or "model": mine(m._forward_hooks) + mine(m._forward_pre_hooks) for n, m in model.named_modules()}
    return {n: c for n, c in counts.items() if c}


def _no_hooks_left(answer, **_: object) -> str | None:
    model = tiny_lm("llama", n_layers=2, d_model=16, vocab=50, seed=4)
    before = _user_hooks(model)
    answer(model, _ids(50, 1, 4, 14))
    left = [n for n, c in _user_hooks(model).items() if c > before.get(n, 0)]
    if left:
        return (f"hooks are still registered on {left[:3]} after your function returned; keep every handle "
                f"that register_forward_hook returns and call handle.remove() in a finally: block")
    return None


@exercise("lens.residual_stream", title="Capture the residual stream after every block", cases=_stream_cases,
          hints=('The stream has L+1 entries: what goes into the first block, then what comes out of '
                 'each block.',
                 'Entry 0 is the embedding (positions included: embed_fn); hook every block and keep '
                 'block_output(output); stack the L+1 tensors on a new first axis; remove the hooks.'),
          validate=_no_hooks_left,
          hint="h_0 = the embedding of the ids (positions included, what enters block 0); h_ℓ = the hidden "
               "states that block ℓ outputs, ℓ = 1..L; stacked: ids [B, T] -> [L+1, B, T, d], with no hooks left"
               " on the model.")
def residual_stream(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """ids: [B, T] -> [L+1, B, T, d]: the embedding, then the output of every block."""
    return L.residual_stream(model, ids)


@mistake("lens.residual_stream", "took output_hidden_states, whose last entry is already normalised",
         "Hugging Face's hidden_states[-1] is final_norm(h_L), not the residual h_L: the model applies its final "
         "norm before returning it. Hook the blocks themselves, so that the last entry is the raw residual.")
def _stream_from_hidden_states(model, ids):
    with torch.no_grad():
        return torch.stack(model(ids, output_hidden_states=True).hidden_states)


@mistake("lens.residual_stream", "captured each block's input instead of its output (off by one)",
         "A forward hook receives (module, inputs, output); the residual AFTER block l is `output`. With the "
         "inputs, every entry is one layer late and the last block's work is missing.")
def _stream_block_inputs(model, ids):
    parts, caught = lm_parts(model), []
    hooks = [b.register_forward_pre_hook(lambda m, args, kwargs: caught.append(
        (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True) for b in parts.blocks]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([parts.embed_fn(ids), *caught])


@mistake("lens.residual_stream", "the embedding (entry 0) is missing",
         "The stream has L+1 entries: put parts.embed_fn(ids) first, then the L block outputs.")
def _stream_no_embedding(model, ids):
    return L.residual_stream(model, ids)[1:]


@mistake("lens.residual_stream", "GPT-2's position embeddings left out of entry 0",
         "For GPT-2 the residual before block 0 is token embedding + position embedding: use parts.embed_fn(ids), "
         "not parts.embed(ids).")
def _stream_no_positions(model, ids):
    res = L.residual_stream(model, ids).clone()
    res[0] = lm_parts(model).embed(ids)
    return res


@mistake("lens.residual_stream", "hooks left registered",
         "Keep the handles that register_forward_hook returns and remove them after the forward pass, in a "
         "finally: block so that an error cannot leave them behind.")
def _stream_leaky(model, ids):
    parts, caught = lm_parts(model), []
    for b in parts.blocks:
        b.register_forward_hook(lambda m, i, o: caught.append(block_output(o).detach()))
    with torch.no_grad():
        model(ids)
    return torch.stack([parts.embed_fn(ids), *caught])


# --- 2. decode a layer ------------------------------------------------------------------------
def _decode_case(seed: int, layers: int, T: int, d: int, V: int, scales: list[float], zero: bool = False):
    g = _gen(seed)
    res = torch.randn(layers, T, d, generator=g) * torch.tensor(scales)[:, None, None]
    if zero:
        res[0, 0] = 0.0
    gamma = 0.5 + torch.rand(d, generator=g)
    W_U = torch.randn(V, d, generator=g) / d**0.5
    return (res, gamma, W_U, 1e-5)


def _decode_cases() -> list[Case]:
    return [
        Case("4 layers whose residual grows 1 -> 300", _decode_case(21, 4, 3, 8, 11, [1.0, 5.0, 40.0, 300.0])),
        Case("entries in the thousands, like SmolLM2's", _decode_case(22, 3, 2, 16, 20, [2000.0, 3000.0, 50.0])),
        Case("a tiny residual (where eps matters)", _decode_case(23, 2, 2, 8, 7, [1.0, 1e-4])),
    ]


@exercise("lens.logit_lens", title="Decode every layer: RMSNorm on its own residual, then W_U",
          hints=("Every layer's residual must go through the same final norm the model applies to its"
                 ' last layer, then the unembedding.',
                 'RMSNorm each vector over its own last axis (eps inside the square root), multiply '
                 'by gamma, then project with the unembedding matrix (mind its orientation).'),
          cases=_decode_cases, rtol=1e-4, atol=1e-4,
          hint="logits_ℓ = (γ ⊙ h_ℓ / √(mean_i h_ℓ,i² + ε)) · W_Uᵀ: [L+1, T, d] -> [L+1, T, V], each vector "
               "normalised by its own root mean square (W_U is [V, d]).")
def logit_lens(residuals: torch.Tensor, gamma: torch.Tensor, W_U: torch.Tensor, eps: float) -> torch.Tensor:
    """residuals: [L+1, T, d], gamma: [d], W_U: [V, d] -> logits [L+1, T, V]."""
    return L.rms_norm_decode(residuals, gamma, W_U, eps)


def _rms(x: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    return torch.sqrt(x.pow(2).mean(dim, keepdim=True) + eps)


@mistake("lens.logit_lens", "eps added outside the square root",
         "RMSNorm adds eps to the mean square INSIDE the square root: sqrt(mean(h^2) + eps).")
def _lens_eps_outside(residuals, gamma, W_U, eps):
    return residuals / (residuals.pow(2).mean(-1, keepdim=True).sqrt() + eps) * gamma @ W_U.T


@mistake("lens.logit_lens", "final norm forgotten",
         "The unembedding was trained on normalised vectors: apply the RMSNorm (divide by the RMS, times gamma) "
         "before W_U. Without it, late layers with big residuals get absurdly confident logits.")
def _decode_no_norm(residuals, gamma, W_U, eps):
    return residuals @ W_U.T


@mistake("lens.logit_lens", "the final layer's cached scale used for every layer",
         "Each layer must be divided by ITS OWN RMS. Reusing the last layer's scale (what the model computed, "
         "what a cache holds) multiplies each layer's logits by rms(h_L)/rms(h_l): ranks survive, probabilities don't.")
def _decode_cached_scale(residuals, gamma, W_U, eps):
    return (residuals / _rms(residuals[-1], eps) * gamma) @ W_U.T


@mistake("lens.logit_lens", "gamma (the norm's weight) forgotten",
         "RMSNorm ends with an elementwise multiplication by its learned weight gamma: h / rms(h) * gamma.")
def _decode_no_gamma(residuals, gamma, W_U, eps):
    return (residuals / _rms(residuals, eps)) @ W_U.T


@mistake("lens.logit_lens", "mean subtracted (LayerNorm instead of RMSNorm)",
         "Llama's RMSNorm does not centre: divide h by sqrt(mean(h**2) + eps); do not subtract the mean.")
def _decode_layernorm(residuals, gamma, W_U, eps):
    c = residuals - residuals.mean(-1, keepdim=True)
    return (c / _rms(c, eps) * gamma) @ W_U.T


@mistake("lens.logit_lens", "divided by the mean square, not its square root",
         "Divide by the ROOT mean square: torch.sqrt(mean(h**2) + eps) (or multiply by torch.rsqrt(...)).")
def _decode_no_sqrt(residuals, gamma, W_U, eps):
    return (residuals / (residuals.pow(2).mean(-1, keepdim=True) + eps) * gamma) @ W_U.T


@mistake("lens.logit_lens", "the mean taken over the wrong axis",
         "The RMS is over the d features of ONE vector: mean(dim=-1, keepdim=True), not over layers or positions.")
def _decode_wrong_axis(residuals, gamma, W_U, eps):
    return (residuals / _rms(residuals, eps, dim=0) * gamma) @ W_U.T


@mistake("lens.logit_lens", "eps left out",
         "Add eps inside the square root: it keeps a tiny residual tiny (and a zero one from giving 0/0 = NaN), "
         "exactly as the model's own RMSNorm does.")
def _decode_no_eps(residuals, gamma, W_U, eps):
    return (residuals / residuals.pow(2).mean(-1, keepdim=True).sqrt() * gamma) @ W_U.T


# --- 3. the lens table ------------------------------------------------------------------------
def _top_cases() -> list[Case]:
    g = _gen(31)
    return [
        Case("3 layers, 4 positions, 20 tokens, k=3", (torch.randn(3, 4, 20, generator=g), 3)),
        Case("peaked logits, k=5", (5 * torch.randn(2, 5, 30, generator=g), 5)),
        Case("one position, k=1", (torch.randn(1, 1, 7, generator=g), 1)),
    ]


@exercise("lens.top_tokens", title="The k most likely tokens at every layer and position", cases=_top_cases,
          hints=("Turn each position's logits into a distribution over the vocabulary first, then "
                 'pick the most likely tokens.',
                 'softmax over the last (vocabulary) axis, then topk along that axis; return '
                 '(probabilities, ids), largest first.'),
          hint="p = softmax(logits) over V; return the k largest p and their token ids along V, in decreasing "
               "order: [..., V] -> ([..., k], [..., k]).")
def top_tokens(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [..., V] -> (probs [..., k], ids [..., k]), most likely first."""
    probs, ids = logits.softmax(-1).topk(k, -1)
    return probs, ids


@mistake("lens.top_tokens", "softmax over the top k logits only",
         "The probabilities are over the WHOLE vocabulary: softmax first, then keep the top k.")
def _top_renormalised(logits, k):
    values, ids = logits.topk(k, dim=-1)
    return values.softmax(-1), ids


@mistake("lens.top_tokens", "softmax missing: logits returned instead of probabilities",
         "Turn the logits into probabilities first: logits.softmax(dim=-1).")
def _top_no_softmax(logits, k):
    return tuple(logits.topk(k, -1))


@mistake("lens.top_tokens", "softmax over the wrong axis",
         "Normalise over the vocabulary, the LAST axis: softmax(dim=-1). "
         "Over dim 0 you compare layers with each other.")
def _top_wrong_axis(logits, k):
    return tuple(logits.softmax(0).topk(k, -1))


@mistake("lens.top_tokens", "the k LEAST likely tokens",
         "topk returns the largest by default; sorting ascending (largest=False, or argsort) gives the least likely.")
def _top_smallest(logits, k):
    return tuple(logits.softmax(-1).topk(k, -1, largest=False))


@mistake("lens.top_tokens", "log-probabilities instead of probabilities",
         "The table shows probabilities in [0, 1]: softmax, not log_softmax.")
def _top_logprobs(logits, k):
    return tuple(logits.log_softmax(-1).topk(k, -1))


# --- 4. KL to the final layer -----------------------------------------------------------------
def _kl_cases() -> list[Case]:
    g = _gen(41)
    return [
        Case("4 layers, 5 positions, 12 tokens", (torch.randn(4, 5, 12, generator=g),)),
        Case("sharp distributions, 50 tokens", (4 * torch.randn(3, 6, 50, generator=g),)),
        Case("2 layers, one position", (torch.randn(2, 1, 6, generator=g),)),
        Case("extreme logits: some probabilities underflow to 0", (300 * torch.randn(3, 4, 10, generator=g),)),
    ]


@exercise("lens.kl_to_final", title="KL from the final layer's distribution, per layer", cases=_kl_cases,
          hints=('KL is not symmetric: check which distribution is the reference, and over which axes'
                 ' you sum and average.',
                 'Work with log-softmax over the vocabulary; KL(p_L || p_l) weights the log-ratio by '
                 "the FINAL layer's probabilities; sum over the vocabulary, then average over "
                 'positions.'),
          hint="KL_ℓ = (1/T) Σ_t Σ_v p_L[t, v] (log p_L[t, v] − log p_ℓ[t, v]), with p = softmax over V: [L+1, "
               "T, V] -> [L+1], and KL_L = 0.")
def kl_to_final(logits: torch.Tensor) -> torch.Tensor:
    """logits: [L+1, T, V] -> [L+1]: KL(p_L || p_l), averaged over the T positions."""
    return L.kl_to_final(logits).mean(-1)


@mistake("lens.kl_to_final", "compared with the first layer",
         "The reference distribution is the FINAL layer's, logits[-1]: every layer is compared with it.")
def _kl_first(logits):
    logp = logits.log_softmax(-1)
    return (logp[0].exp() * (logp[0] - logp)).sum(-1).mean(-1)


@mistake("lens.kl_to_final", "log of the softmax (underflows to log 0)",
         "log(softmax(x)) is -inf where a probability underflows to 0; log_softmax stays finite.")
def _kl_log_softmax(logits):
    p = logits.softmax(-1)
    return (p[-1] * (p[-1].log() - p.log())).sum(-1).mean(-1)


@mistake("lens.kl_to_final", "KL arguments swapped",
         "KL is not symmetric. We ask how much the layer's read-out loses against the model's output: "
         "KL(p_L || p_l) = sum p_L (log p_L - log p_l), weighted by the FINAL distribution. "
         "(F.kl_div(input, target) computes KL(target || input) and wants input as log-probabilities.)")
def _kl_swapped(logits):
    logp = logits.log_softmax(-1)
    return (logp.exp() * (logp - logp[-1])).sum(-1).mean(-1)


@mistake("lens.kl_to_final", "log-softmax missing: raw logits used as log-probabilities",
         "Logits are log-probabilities only up to a constant per row: use logits.log_softmax(-1).")
def _kl_no_logsoftmax(logits):
    p = logits[-1].softmax(-1)
    return (p * (logits[-1] - logits)).sum(-1).mean(-1)


@mistake("lens.kl_to_final", "summed over positions instead of averaged",
         "Report the mean over positions (so that passages of different lengths compare): .mean(-1), not .sum(-1).")
def _kl_sum_positions(logits):
    return L.kl_to_final(logits).sum(-1)


@mistake("lens.kl_to_final", "averaged over the vocabulary instead of summed",
         "KL sums over the vocabulary, then averages over positions. (F.kl_div(reduction='mean') makes the same "
         "mistake: use reduction='batchmean' or sum yourself.)")
def _kl_mean_vocab(logits):
    logp = logits.log_softmax(-1)
    return (logp[-1].exp() * (logp[-1] - logp)).mean(-1).mean(-1)


@mistake("lens.kl_to_final", "F.kl_div given probabilities as input",
         "F.kl_div(input, target) expects input as LOG-probabilities: F.kl_div(logp_l, p_L, reduction='none').")
def _kl_div_probs(logits):
    p = logits.softmax(-1)
    return F.kl_div(p, p[-1].expand_as(p), reduction="none").sum(-1).mean(-1)


# --- 5. rank of the answer --------------------------------------------------------------------
def _rank_cases() -> list[Case]:
    g = _gen(51)
    climbing = torch.randn(6, 100, generator=g)
    climbing[:, 42] = torch.linspace(-2.0, 6.0, 6)  # the answer rises to the top in the late layers
    return [
        Case("5 layers, 30 tokens, target 7", (torch.randn(5, 30, generator=g), 7)),
        Case("an answer that climbs to the top", (climbing, 42)),
        Case("1 layer, 4 tokens, target 0", (torch.randn(1, 4, generator=g), 0)),
        Case("tied logits (scores rounded to integers)", ((2 * torch.randn(4, 20, generator=g)).round(), 3)),
    ]


@exercise("lens.answer_rank", title="Rank of the answer at every layer", cases=_rank_cases,
          hints=('The rank is a count: how many tokens beat the answer at that layer?',
                 "Compare every logit of a layer with that layer's own logit of the target, count the"
                 ' strictly larger ones, and return int64 counts.'),
          hint="rank_ℓ = #{v : logits[ℓ, v] > logits[ℓ, target]}: [L+1, V] -> [L+1] integers (int64), 0 when the"
               " target is top-1; ties do not count.")
def answer_rank(logits: torch.Tensor, target: int) -> torch.Tensor:
    """logits: [L+1, V], target: a token id -> [L+1] int64: how many tokens score higher (0 = top-1)."""
    return L.target_rank(logits, target)


@mistake("lens.answer_rank", "position in a sorted order (ties counted as higher)",
         "With ties, a position in a sorted list depends on the tie order: count the tokens STRICTLY above "
         "the answer instead.")
def _rank_argsort(logits, target):
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    return (order == target).nonzero()[:, 1]


@mistake("lens.answer_rank", "the final layer's logit as the bar for every layer",
         "Compare each layer with ITS OWN logit of the answer, logits[l, target].")
def _rank_final_bar(logits, target):
    return (logits > logits[-1, target]).sum(-1)


@mistake("lens.answer_rank", "counted the target itself (>= instead of >)",
         "Count the tokens STRICTLY above the target (>), so that the top token has rank 0.")
def _rank_ge(logits, target):
    return (logits >= logits[:, target : target + 1]).sum(-1)


@mistake("lens.answer_rank", "counted the tokens below the target",
         "The rank counts the tokens that score HIGHER than the answer: logits > own, not <.")
def _rank_below(logits, target):
    return (logits < logits[:, target : target + 1]).sum(-1)


@mistake("lens.answer_rank", "returned floats, not integer counts",
         "A rank is a count: sum the boolean tensor directly ((...).sum(-1) gives int64); don't .float() it.")
def _rank_float(logits, target):
    return (logits > logits[:, target : target + 1]).float().sum(-1)


# --- 6. cross-entropy of each layer -----------------------------------------------------------
def _ce_cases() -> list[Case]:
    g = _gen(61)
    return [
        Case("3 layers, 6 positions, 15 tokens",
             (torch.randn(3, 6, 15, generator=g), torch.randint(0, 15, (6,), generator=g))),
        Case("sharp logits, 40 tokens",
             (4 * torch.randn(2, 9, 40, generator=g), torch.randint(0, 40, (9,), generator=g))),
        Case("two positions: one prediction", (torch.randn(4, 2, 5, generator=g), torch.tensor([3, 1]))),
    ]


@exercise("lens.cross_entropy", title="Next-token cross-entropy of every layer", cases=_ce_cases,
          hints=('At position t the model predicts the NEXT token; line up predictions and targets '
                 'before scoring.',
                 'Use log-softmax over the vocabulary at positions 0..T-2, pick the log-probability '
                 'of ids[1:], negate, and average over positions: one number per layer.'),
          hint="CE_ℓ = −(1/(T−1)) Σ_{t=0}^{T−2} log softmax(logits[ℓ, t])[ids[t+1]]: [L+1, T, V] and [T] -> "
               "[L+1].")
def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits: [L+1, T, V], ids: [T] -> [L+1]: mean over t < T-1 of -log p_l(ids[t+1] | position t)."""
    return L.cross_entropy_per_layer(logits, ids)


def _ce(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, ids.expand(logp.shape[0], -1)[..., None])[..., 0]


@mistake("lens.cross_entropy", "every position scored against its own token",
         "Position t predicts token t+1: drop the last position's logits and the first token.")
def _ce_no_shift_all(logits, ids):
    logp = logits.log_softmax(-1)
    return -logp.gather(-1, ids.expand(logp.shape[0], -1)[..., None])[..., 0].mean(-1)


@mistake("lens.cross_entropy", "softmax over the layers",
         "The distribution is over the vocabulary, the LAST axis, not over the layers.")
def _ce_layers(logits, ids):
    logp = logits.log_softmax(0)[:, :-1]
    return -logp.gather(-1, ids[1:].expand(logp.shape[0], -1)[..., None])[..., 0].mean(-1)


@mistake("lens.cross_entropy", "off by one: scored against the current token, not the next",
         "The read-out at position t is a guess about token t+1: compare logits[:, :-1] with ids[1:].")
def _ce_not_shifted(logits, ids):
    return _ce(logits.log_softmax(-1), ids)[:, :-1].mean(-1)


@mistake("lens.cross_entropy", "shifted the wrong way",
         "Drop the LAST position's logits (nothing follows it) and the FIRST token (nothing predicts it): "
         "logits[:, :-1] against ids[1:].")
def _ce_wrong_shift(logits, ids):
    return _ce(logits[:, 1:].log_softmax(-1), ids[:-1]).mean(-1)


@mistake("lens.cross_entropy", "log-softmax missing",
         "Cross-entropy is minus a LOG-PROBABILITY: apply log_softmax(-1) before picking the target's entry.")
def _ce_no_logsoftmax(logits, ids):
    return _ce(logits[:, :-1], ids[1:]).mean(-1)


@mistake("lens.cross_entropy", "summed over positions instead of averaged",
         "Average over positions (nats per token), so that it compares with the rock's cross-entropy.")
def _ce_sum(logits, ids):
    return _ce(logits[:, :-1].log_softmax(-1), ids[1:]).sum(-1)


# --- heavy tails: excess kurtosis of the residual coordinates ------------------------------------
def _kurtosis_cases() -> list[Case]:
    g = _gen(61)
    massive = torch.randn(3, 4, 16, generator=g) + 0.5
    massive[1:, :, 3] = 60.0  # one massive coordinate from "layer" 1 on, as in SmolLM2
    chi2 = torch.randn(2, 5, 32, 3, generator=g).pow(2).sum(-1)  # Student t with 3 dof: z / sqrt(chi2 / 3)
    student = torch.randn(2, 5, 32, generator=g) / (chi2 / 3).sqrt() + 1.0
    return [
        Case("3 layers x 4 tokens, d=16, a massive coordinate from layer 1 on", (massive,)),
        Case("Gaussian coordinates with mean 2, d=24", (torch.randn(2, 6, 24, generator=g) + 2.0,)),
        Case("heavy-tailed (Student t, 3 dof) coordinates, d=32", (student,)),
    ]


@exercise("lens.excess_kurtosis", title="Heavy tails: excess kurtosis of each residual's coordinates",
          hints=('Kurtosis compares the fourth moment with the squared second moment, of each '
                 "vector's own coordinates.",
                 'Centre each vector on its own mean over the last axis; use population moments '
                 '(divide by d); subtract the Gaussian value 3.'),
          cases=_kurtosis_cases, rtol=1e-3, atol=1e-3,
          hint="κ = m₄ / m₂² − 3 with m_j = (1/d) Σ_i (h_i − h̄)^j over the d coordinates of each vector: [..., "
               "d] -> [...].")
def excess_kurtosis(residuals: torch.Tensor) -> torch.Tensor:
    """residuals: [..., d] -> [...]: E[(h - mean)^4] / Var^2 - 3 over each vector's d coordinates."""
    return L.excess_kurtosis(residuals)


@mistake("lens.excess_kurtosis", "centred on the mean of the whole tensor",
         "Each vector is centred on its OWN mean over its d coordinates (keepdim on the last axis).")
def _kurt_global_mean(residuals):
    c = residuals - residuals.mean()
    return (c ** 4).mean(-1) / (c ** 2).mean(-1) ** 2 - 3


@mistake("lens.excess_kurtosis", "plain kurtosis: 3 not subtracted",
         "EXCESS kurtosis subtracts the Gaussian's value 3, so that Gaussian coordinates score about 0.")
def _kurtosis_not_excess(residuals):
    c = residuals - residuals.mean(-1, keepdim=True)
    return c.pow(4).mean(-1) / c.pow(2).mean(-1).pow(2)


@mistake("lens.excess_kurtosis", "coordinates not centred",
         "Subtract each vector's mean over its coordinates first: kurtosis uses CENTRAL moments.")
def _kurtosis_not_centred(residuals):
    return residuals.pow(4).mean(-1) / residuals.pow(2).mean(-1).pow(2) - 3


@mistake("lens.excess_kurtosis", "divided by the variance instead of its square",
         "The fourth moment is compared with the SQUARED variance: m4 / m2**2, which is scale-free.")
def _kurtosis_var_not_squared(residuals):
    c = residuals - residuals.mean(-1, keepdim=True)
    return c.pow(4).mean(-1) / c.pow(2).mean(-1) - 3


@mistake("lens.excess_kurtosis", "unbiased (d-1) variance",
         "Use population moments, both divided by d: torch.var's default divides by d-1 and shifts the value.")
def _kurtosis_unbiased(residuals):
    c = residuals - residuals.mean(-1, keepdim=True)
    return c.pow(4).mean(-1) / residuals.var(-1).pow(2) - 3


@mistake("lens.excess_kurtosis", "moments over the tokens instead of the coordinates",
         "Each vector's own coordinates make the sample: reduce over the last axis (d), not over tokens.")
def _kurtosis_wrong_axis(residuals):
    c = residuals - residuals.mean(-2, keepdim=True)
    return c.pow(4).mean(-2) / c.pow(2).mean(-2).pow(2) - 3


# --- 7. the tuned lens's translator -----------------------------------------------------------
def _translate_cases() -> list[Case]:
    g = _gen(71)
    return [
        Case("3 vectors, d=8", (torch.randn(3, 8, generator=g), torch.randn(8, 8, generator=g) / 3,
                                 torch.randn(8, generator=g))),
        Case("layers x positions, d=6", (torch.randn(2, 4, 6, generator=g), torch.randn(6, 6, generator=g) / 3,
                                          torch.randn(6, generator=g))),
        Case("zero-initialised: the identity", (torch.randn(2, 5, generator=g), torch.zeros(5, 5), torch.zeros(5))),
    ]


@exercise("lens.translate", title="The tuned lens's affine translator", cases=_translate_cases,
          hints=('The translator is a residual correction: with zero weights it must leave h '
                 'unchanged.',
                 'Add to h an affine function of h: the matrix acts on each vector of the last axis '
                 '(row vectors, so mind the transpose), plus the bias.'),
          hint="T(h) = h + W h + b for each vector h ∈ ℝ^d (W [d, d], b [d]): [..., d] -> [..., d], so that W = "
               "0, b = 0 gives T(h) = h.")
def translate(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h: [..., d], weight A: [d, d], bias b: [d] -> h + A h + b, [..., d]."""
    return L.translate(h, weight, bias)


@mistake("lens.translate", "bias added before the matrix",
         "The bias is added after the matrix: A h + b, not A (h + b).")
def _translate_bias_inside(h, weight, bias):
    return h + (h + bias) @ weight.T


@mistake("lens.translate", "h updated in place",
         "`h += ...` overwrites the caller's residuals: return h + ... as a new tensor.")
def _translate_in_place(h, weight, bias):
    h += h @ weight.T + bias
    return h


@mistake("lens.translate", "the skip connection (h +) is missing",
         "Add h back: h + h @ weight.T + bias. Without it, the zero-initialised translator maps everything to 0, "
         "not to the logit lens.")
def _translate_no_skip(h, weight, bias):
    return h @ weight.T + bias


@mistake("lens.translate", "weight not transposed",
         "For row vectors, A h is h @ A.T (as nn.Linear computes it), not h @ A.")
def _translate_no_transpose(h, weight, bias):
    return h + h @ weight + bias


@mistake("lens.translate", "bias forgotten",
         "The translator is AFFINE: add the bias b as well.")
def _translate_no_bias(h, weight, bias):
    return h + h @ weight.T


# --- 8. induction heads -----------------------------------------------------------------------
def _causal_pattern(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    T = shape[-1]
    scores = torch.randn(*shape, generator=_gen(seed)) * 2
    return scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)


def _perfect_induction(half: int) -> torch.Tensor:
    T = 2 * half
    pattern = torch.zeros(1, T, T)
    pattern[0, 0, 0] = 1.0
    for t in range(1, T):
        pattern[0, t, t - half + 1 if t >= half else 0] = 1.0
    return pattern


def _induction_cases() -> list[Case]:
    return [
        Case("2 layers x 3 heads, 5 tokens repeated", (_causal_pattern((2, 3, 10, 10), 81), 5)),
        Case("a perfect induction head", (_perfect_induction(4), 4)),
        Case("one head, 3 tokens repeated", (_causal_pattern((1, 6, 6), 82), 3)),
    ]


@exercise("lens.induction_score", title="Induction score of every head", cases=_induction_cases,
          hints=('An induction head, at the second copy of a token, attends to the token that '
                 'FOLLOWED its first copy.',
                 'Only queries in the second half; for query t the key is t - half + 1; average those'
                 ' attention weights.'),
          hint="score = (1/half) Σ_{t=half}^{2·half−1} pattern[..., t, t − half + 1]: the attention from each "
               "query of the repeated half to the token after its first copy; [..., 2·half, 2·half] -> [...].")
def induction_score(pattern: torch.Tensor, half: int) -> torch.Tensor:
    """pattern: [..., T, T] (query rows, key columns), T = 2*half -> [...]: the mean induction attention."""
    return L.induction_score(pattern, half)


@mistake("lens.induction_score", "previous-token attention",
         "A previous-token head looks at t - 1; an induction head looks at the token after the FIRST "
         "occurrence, t - half + 1.")
def _induction_previous(pattern, half):
    return torch.stack([pattern[..., t, t - 1] for t in range(half, 2 * half)], -1).mean(-1)


@mistake("lens.induction_score", "attention to the previous occurrence itself (a duplicate-token head)",
         "An induction head looks at the token AFTER the earlier copy: key t - half + 1, not t - half.")
def _induction_duplicate(pattern, half):
    T = pattern.shape[-1]
    q = torch.arange(half, T)
    return pattern[..., q, q - half].mean(-1)


@mistake("lens.induction_score", "queries from the first copy included",
         "Only the second copy can use induction: queries t from half to 2*half-1.")
def _induction_first_half(pattern, half):
    return torch.diagonal(pattern, offset=-(half - 1), dim1=-2, dim2=-1).mean(-1)


@mistake("lens.induction_score", "queries and keys swapped",
         "Rows are queries, columns keys: pattern[..., query, key]. With a causal mask, key > query is always 0.")
def _induction_transposed(pattern, half):
    T = pattern.shape[-1]
    q = torch.arange(half, T)
    return pattern[..., q - half + 1, q].mean(-1)


@mistake("lens.induction_score", "summed instead of averaged",
         "Average over the queries of the second copy, so that a perfect induction head scores 1.")
def _induction_sum(pattern, half):
    T = pattern.shape[-1]
    q = torch.arange(half, T)
    return pattern[..., q, q - half + 1].sum(-1)


# --- hidden cases (the grader's only) -----------------------------------------------------------
# Drawn by `python -m course_utils.grade` from a seed it keeps secret, with the generator `g`: the
# learner's notebook never sees these inputs, so an answer cannot be fitted to the public cases.
def _hidden_int(g: torch.Generator, low: int, high: int) -> int:
    """A random int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=g))


def _hidden_lead(g: torch.Generator) -> tuple[int, ...]:
    """Random leading dimensions: one or two axes of 1 to 4."""
    return tuple(_hidden_int(g, 1, 5) for _ in range(_hidden_int(g, 1, 3)))


def _hidden_stream(g: torch.Generator) -> list[Case]:
    cases = []
    for family in ("llama", "gpt2"):  # GPT-2 for its position embeddings, Llama for its rotary ones
        layers, d, vocab = _hidden_int(g, 1, 4), 8 * _hidden_int(g, 2, 5), _hidden_int(g, 20, 120)
        model = tiny_lm(family, n_layers=layers, d_model=d, vocab=vocab, seed=_hidden_int(g, 0, 10_000))
        ids = torch.randint(0, vocab, (_hidden_int(g, 1, 4), _hidden_int(g, 2, 9)), generator=g)
        cases.append(Case(f"hidden: a random tiny {family}, {layers} block(s), d={d}", (model, ids)))
    return cases


def _hidden_decode(g: torch.Generator) -> list[Case]:
    layers, T, d, V = _hidden_int(g, 2, 6), _hidden_int(g, 1, 5), _hidden_int(g, 4, 24), _hidden_int(g, 5, 30)
    scales = 10 ** (torch.rand(layers, generator=g) * 7 - 3.5)  # from ~3e-4 (eps matters) to ~3e3
    scales[_hidden_int(g, 0, layers)] = 1e-4
    res = torch.randn(layers, T, d, generator=g) * scales[:, None, None]
    gamma = 0.5 + torch.rand(d, generator=g)
    W_U = torch.randn(V, d, generator=g) / d**0.5
    eps = float(10 ** -(5 + torch.rand(1, generator=g)))
    return [Case("hidden: random residuals of very different scales", (res, gamma, W_U, eps))]


def _hidden_top(g: torch.Generator) -> list[Case]:
    V = _hidden_int(g, 5, 40)
    shape = (*_hidden_lead(g), _hidden_int(g, 1, 5), V)
    scale = 0.5 + 4 * float(torch.rand(1, generator=g))
    return [Case("hidden: random logits", (scale * torch.randn(shape, generator=g), _hidden_int(g, 1, min(V, 7))))]


def _hidden_kl(g: torch.Generator) -> list[Case]:
    shape = (_hidden_int(g, 2, 6), _hidden_int(g, 2, 7), _hidden_int(g, 4, 40))
    scale = 0.5 + 4 * float(torch.rand(1, generator=g))
    return [Case("hidden: random logits", (scale * torch.randn(shape, generator=g),)),
            Case("hidden: extreme logits (probabilities underflow)", (300 * torch.randn(shape, generator=g),))]


def _hidden_rank(g: torch.Generator) -> list[Case]:
    layers, V = _hidden_int(g, 2, 7), _hidden_int(g, 5, 60)
    return [Case("hidden: random logits", (torch.randn(layers, V, generator=g), _hidden_int(g, 0, V))),
            Case("hidden: tied logits", ((2 * torch.randn(layers, V, generator=g)).round(), _hidden_int(g, 0, V)))]


def _hidden_ce(g: torch.Generator) -> list[Case]:
    layers, T, V = _hidden_int(g, 1, 6), _hidden_int(g, 2, 12), _hidden_int(g, 4, 40)
    scale = 0.5 + 4 * float(torch.rand(1, generator=g))
    return [Case("hidden: random logits and tokens", (scale * torch.randn(layers, T, V, generator=g),
                                                     torch.randint(0, V, (T,), generator=g)))]


def _hidden_kurtosis(g: torch.Generator) -> list[Case]:
    shape, d = _hidden_lead(g), _hidden_int(g, 8, 40)
    massive = torch.randn(*shape, d, generator=g) + 0.5
    massive[..., _hidden_int(g, 0, d)] = 20.0 + 60 * float(torch.rand(1, generator=g))
    chi2 = torch.randn(*shape, d, 3, generator=g).pow(2).sum(-1)
    student = torch.randn(*shape, d, generator=g) / (chi2 / 3).sqrt() + float(torch.randn(1, generator=g))
    return [Case("hidden: a massive coordinate", (massive,)),
            Case("hidden: heavy-tailed coordinates with a random mean", (student,))]


def _hidden_translate(g: torch.Generator) -> list[Case]:
    d = _hidden_int(g, 2, 12)
    return [Case("hidden: a random translator", (torch.randn(*_hidden_lead(g), d, generator=g),
                                                 torch.randn(d, d, generator=g) / 3, torch.randn(d, generator=g)))]


def _hidden_induction(g: torch.Generator) -> list[Case]:
    half = _hidden_int(g, 3, 8)  # from 3: with 2, key t - 1 is also t - half + 1
    T = 2 * half
    scores = torch.randn(*_hidden_lead(g), T, T, generator=g) * 2
    pattern = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
    return [Case(f"hidden: random causal patterns, {half} tokens repeated", (pattern, half)),
            Case(f"hidden: a perfect induction head, {half} tokens repeated", (_perfect_induction(half), half))]


HIDDEN_CASES = {
    "lens.residual_stream": _hidden_stream,
    "lens.logit_lens": _hidden_decode,
    "lens.top_tokens": _hidden_top,
    "lens.kl_to_final": _hidden_kl,
    "lens.answer_rank": _hidden_rank,
    "lens.cross_entropy": _hidden_ce,
    "lens.excess_kurtosis": _hidden_kurtosis,
    "lens.translate": _hidden_translate,
    "lens.induction_score": _hidden_induction,
}
