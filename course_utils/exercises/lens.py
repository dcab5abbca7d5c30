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
          hint="parts = lm_parts(model). Entry 0 is parts.embed_fn(ids); then hook every block in parts.blocks "
               "and keep block_output(output) of each; torch.stack the L+1 tensors; remove the hooks.")
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
          hint="For each vector h (the last axis): h / sqrt(mean(h**2) + eps) * gamma, then @ W_U.T. Use "
               "keepdim=True so the scale broadcasts, and compute it from every layer's own h.")
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
          hint="probs = logits.softmax(dim=-1) (over the vocabulary), then probs.topk(k, dim=-1) gives "
               "(values, indices), largest first: return them as (probs, ids).")
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
          hint="logp = logits.log_softmax(-1); p_L = logp[-1].exp(); KL_l = sum over the vocabulary of "
               "p_L * (logp[-1] - logp[l]); then the mean over positions: [L+1].")
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
          hint="Take the target's own logit, logits[:, target:target+1] (keep the axis), and count the tokens "
               "strictly above it: (logits > own).sum(-1). Rank 0 means top-1.")
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
          hint="Position t predicts token t+1: logp = logits[:, :-1].log_softmax(-1); pick logp at ids[1:] "
               "(gather on the last axis); minus the mean over positions: [L+1].")
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
          hint="Over the LAST axis (the d coordinates of one vector): c = h - h.mean(-1, keepdim=True), "
               "m2 = (c**2).mean(-1), m4 = (c**4).mean(-1), and return m4 / m2**2 - 3 (population moments: "
               "divide by d, not d-1).")
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
          hint="h + h @ weight.T + bias: the translator is a residual correction, so that weight = 0 and "
               "bias = 0 leave h unchanged (the tuned lens starts as the logit lens).")
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
          hint="For the queries t = half, ..., 2*half-1 (the second copy) take pattern[..., t, t - half + 1], "
               "the token AFTER the first occurrence, and average over those queries.")
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
