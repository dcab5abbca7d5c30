"""Tests of course_utils.lens (logit lens, tuned lens, fused statistics), course_utils.text and the lens checks.

Tiny random GPT-2 / Llama models cover both norm families without any download; the tests on the
real SmolLM2 skip unless `$COURSE_DATA_DIR` holds its GGUF (CI sets it).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from course_utils import lens as L
from course_utils.checks import evaluate, exercises_of
from course_utils.exercises.lens import _user_hooks
from course_utils.models import lm_parts, tiny_lm
from tests.conftest import asset_or_skip

FAMILIES = ["gpt2", "llama"]


def ids_for(vocab: int, batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm a random weight (and bias, if it has one), like a trained model's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model = randomise_norms(tiny_lm(request.param, n_layers=3, d_model=32, vocab=61, seed=1))
    return model, ids_for(61)


@pytest.fixture(scope="module")
def smollm2():
    asset_or_skip("lm/SmolLM2-135M-Instruct.Q4_1.gguf")
    from course_utils.models import load_lm

    return load_lm("smollm2")


# ---------------------------------------------------------------------------------------------
# residual stream and the logit lens
# ---------------------------------------------------------------------------------------------
def test_residual_stream_matches_hidden_states_and_leaves_no_hooks(tiny):
    model, ids = tiny
    parts = lm_parts(model)
    before = _user_hooks(model)
    res = L.residual_stream(model, ids)
    assert _user_hooks(model) == before
    assert res.shape == (parts.n_layers + 1, *ids.shape, parts.d_model)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for k in range(parts.n_layers):
        torch.testing.assert_close(res[k], hs[k], rtol=1e-5, atol=1e-5)
    # the pitfall: HF's last hidden state is already normalised
    torch.testing.assert_close(parts.final_norm(res[-1]), hs[-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(res[-1], hs[-1])


def test_last_layer_lens_equals_model_logits_tiny(tiny):
    model, ids = tiny
    res = L.residual_stream(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(L.LogitLens(model).logits(res)[-1], logits, rtol=1e-4, atol=1e-4)


def test_rms_decode_equals_llama_norm_and_unembed():
    model = randomise_norms(tiny_lm("llama", n_layers=2, d_model=32, vocab=61, seed=2))
    parts, ids = lm_parts(model), ids_for(61)
    res = L.residual_stream(model, ids)
    norm = parts.final_norm
    ours = L.rms_norm_decode(res, norm.weight.detach(), parts.unembed.weight.detach(), L._norm_eps(norm))
    torch.testing.assert_close(ours, L.LogitLens(model).logits(res), rtol=1e-4, atol=1e-4)


def test_cached_scale_keeps_ranks_under_rmsnorm_but_not_probabilities():
    model = randomise_norms(tiny_lm("llama", n_layers=4, d_model=32, vocab=61, seed=3))
    res = L.residual_stream(model, ids_for(61, seq=12))
    lens = L.LogitLens(model)
    right, cached = lens.logits(res), lens.cached_scale_logits(res)
    ratio = cached / right  # one positive constant per layer and position
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-3, atol=1e-3)
    assert torch.equal(right.argsort(-1), cached.argsort(-1))
    assert not torch.allclose(right.softmax(-1)[:-1], cached.softmax(-1)[:-1], atol=1e-3)
    torch.testing.assert_close(right[-1], cached[-1])  # the last layer is the one the scale belongs to


def test_cached_scale_changes_ranks_under_layernorm_with_bias():
    model = randomise_norms(tiny_lm("gpt2", n_layers=4, d_model=32, vocab=61, seed=4))
    res = L.residual_stream(model, ids_for(61, seq=12))
    lens = L.LogitLens(model)
    top_right = lens.logits(res).argmax(-1)[:-1]
    top_cached = lens.cached_scale_logits(res).argmax(-1)[:-1]
    assert (top_right != top_cached).any()


# ---------------------------------------------------------------------------------------------
# statistics: full-logit helpers and the fused read-out
# ---------------------------------------------------------------------------------------------
def naive_stats(logits: torch.Tensor, targets: torch.Tensor, k: int):
    logp = logits.double().log_softmax(-1)
    p = logp.exp()
    top_p, top_i = p.topk(k, -1)
    own = logits.gather(-1, targets.expand(logits.shape[0], -1)[..., None])
    return dict(entropy=-(p * logp).sum(-1), kl=(p[-1] * (logp[-1] - logp)).sum(-1), top_p=top_p, top_i=top_i,
                tlp=logp.gather(-1, targets.expand(logits.shape[0], -1)[..., None])[..., 0],
                rank=(logits > own).sum(-1))


@pytest.mark.parametrize("token_chunk,vocab_chunk", [(4, 7), (128, 8192), (5, 61)])
def test_lens_stats_equals_naive_computation(token_chunk, vocab_chunk):
    g = torch.Generator().manual_seed(5)
    normed = 3 * torch.randn(5, 13, 16, generator=g)
    W_U = torch.randn(61, 16, generator=g)
    targets = torch.randint(0, 61, (13,), generator=g)
    got = L.lens_stats_reference(normed, W_U, targets=targets, k=4, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    want = naive_stats(normed @ W_U.T, targets, 4)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.entropy.double(), want["entropy"], **tol)
    torch.testing.assert_close(got.kl_to_final.double(), want["kl"], **tol)
    torch.testing.assert_close(got.topk_probs.double(), want["top_p"], **tol)
    assert torch.equal(got.topk_ids, want["top_i"])
    torch.testing.assert_close(got.target_logprob.double(), want["tlp"], **tol)
    assert torch.equal(got.target_rank, want["rank"])
    assert torch.equal(got.kl_to_final[-1], torch.zeros(13))
    torch.testing.assert_close(got.cross_entropy().double(), -want["tlp"].mean(1), **tol)


def test_kl_is_zero_at_the_last_layer_and_positive_before(tiny):
    model, ids = tiny
    res = L.residual_stream(model, ids)
    stats = L.LogitLens(model).stats(res, targets=ids)
    assert stats.mean_kl()[-1].item() == 0.0
    assert (stats.mean_kl()[:-1] > 0).all()
    full = L.kl_to_final(L.LogitLens(model).logits(res))
    assert full[-1].abs().max() < 1e-6
    torch.testing.assert_close(stats.kl_to_final, full.flatten(1), rtol=1e-4, atol=1e-5)


def test_lens_stats_dispatches_through_the_kernels_rule(monkeypatch):
    from course_utils import kernels
    from course_utils.kernels import lens_readout

    calls = []

    def fake(normed, W_U, **kwargs):
        calls.append(kwargs)
        return lens_readout.lens_readout_reference(normed, W_U, targets=kwargs["targets"], k=kwargs["k"])

    normed, W_U = torch.randn(2, 3, 4), torch.randn(9, 4)
    monkeypatch.setattr(lens_readout, "lens_readout_triton", fake)
    monkeypatch.setattr(kernels, "use_triton", lambda x: x.shape[-1] == 4)
    got = L.lens_stats(normed, W_U, k=2)
    assert len(calls) == 1
    assert isinstance(got, L.LensStats) and got.entropy.device.type == "cpu"
    L.lens_stats(normed, W_U, k=2, backend="reference")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        L.lens_stats(normed, W_U, backend="nope")
    with pytest.raises(ValueError, match=r"\[L\+1, N, d\]"):
        L.lens_stats(torch.randn(2, 3, 4, 4), W_U)
    assert not hasattr(L, "register_lens_stats_backend")  # one dispatch rule, in course_utils.kernels


def test_small_helpers():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    assert L.target_rank(logits, 2).tolist() == [1, 2]
    assert [L.rank_bucket(r) for r in (0, 1, 9, 10, 188, 12446)] == [
        "top-1", "2-10", "2-10", "11-100", "101-1000", "10001-100000"]
    rock = L.unigram_logprobs(torch.tensor([0, 0, 1]), 3, alpha=0.0)
    assert rock.exp().sum().item() == pytest.approx(1.0)
    want = -(0.5 * (torch.tensor(2 / 3).log() + torch.tensor(1 / 3).log())).item()
    assert L.rock_cross_entropy(rock, torch.tensor([0, 1])) == pytest.approx(want, rel=1e-5)
    ce = L.cross_entropy_per_layer(torch.zeros(2, 4, 5), torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(ce, torch.full((2,), float(torch.tensor(5.0).log())))


# ---------------------------------------------------------------------------------------------
# the tuned lens
# ---------------------------------------------------------------------------------------------
def _residuals(model, n: int, seed: int) -> torch.Tensor:
    res, _ = L.collect_residuals(model, ids_for(model.config.vocab_size, batch=n, seq=17, seed=seed), progress=False)
    return res


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("vocab_sample", [None, 64])
def test_tuned_lens_starts_as_logit_lens_and_training_lowers_kl(family, vocab_sample, tmp_path):
    model = randomise_norms(tiny_lm(family, n_layers=3, d_model=32, vocab=2000, seed=1))
    with torch.no_grad():  # sharper output distributions than a random init gives, as in a trained model
        lm_parts(model).final_norm.weight.mul_(20)
    train, held_out = _residuals(model, 16, 1), _residuals(model, 4, 2)
    tuned = L.TunedLens(model)
    torch.testing.assert_close(tuned.logits(held_out), L.LogitLens(model).logits(held_out))
    before = tuned.stats(held_out).mean_kl()
    # batch 8 x vocab_sample 64 << 2000 tokens: the sampled-vocabulary KL really is used
    log = tuned.fit(train, steps=60, batch_tokens=8, lr=1e-2, bias_lr=1e-2, vocab_sample=vocab_sample, progress=False)
    after = tuned.stats(held_out).mean_kl()
    assert log.steps == 60 and len(log.losses) == 60
    assert after[-1] == 0
    moved = tuned.translated(held_out)
    for layer in range(lm_parts(model).n_layers):  # the library's translator is the exercise's formula
        torch.testing.assert_close(moved[layer], L.translate(held_out[layer], tuned.weight[layer], tuned.bias[layer]))
    torch.testing.assert_close(moved[-1], held_out[-1])
    assert (after[:-1] < before[:-1]).all(), (before, after)
    assert after[:-1].mean() < 0.9 * before[:-1].mean(), (before, after)
    assert all(p.grad is None for p in model.parameters()), "training must not touch the model"
    assert all(p.requires_grad for p in model.parameters()), "fit must restore requires_grad"
    # save / load round trip
    path = tuned.save(tmp_path / "lens.pt")
    again = L.TunedLens.load(path, model)
    torch.testing.assert_close(again.logits(held_out), tuned.logits(held_out))
    other = tiny_lm("llama", n_layers=2, d_model=32, vocab=61)
    with pytest.raises(ValueError, match="tuned lens for 3 layers"):
        L.TunedLens.load(path, other)


def test_tuned_lens_rejects_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="cached residuals"):
        L.TunedLens(model).fit(torch.randn(2, 5, 32), steps=1)
    with pytest.raises(ValueError, match="optimizer"):
        L.TunedLens(model).fit(torch.randn(4, 5, 32), steps=1, optimizer="lbfgs")


# ---------------------------------------------------------------------------------------------
# induction heads
# ---------------------------------------------------------------------------------------------
def test_induction_scores_shapes_and_a_perfect_head(tiny):
    model, _ = tiny
    ids = L.repeated_random_tokens(model.config.vocab_size, 6, batch=2, seed=0)
    assert torch.equal(ids[:, :6], ids[:, 6:])
    pats = L.attention_patterns(model, ids)
    parts = lm_parts(model)
    assert pats.shape[:3] == (parts.n_layers, 2, model.config.num_attention_heads)
    torch.testing.assert_close(pats.sum(-1), torch.ones(pats.shape[:-1]))
    scores = L.induction_scores(pats, 6)
    assert scores.shape == (parts.n_layers, model.config.num_attention_heads)
    perfect = torch.zeros(8, 8)
    for t in range(4, 8):
        perfect[t, t - 3] = 1
    assert L.induction_score(perfect, 4).item() == 1.0


def test_attention_patterns_need_eager():
    model = tiny_lm("llama", n_layers=1, d_model=16, vocab=50)
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="eager"):
        L.attention_patterns(model, ids_for(50))


# ---------------------------------------------------------------------------------------------
# the checks reject the typical mistakes named in the issue
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,label", [
    ("lens.logit_lens", "final norm forgotten"),
    ("lens.logit_lens", "the final layer's cached scale used for every layer"),
    ("lens.residual_stream", "captured each block's input instead of its output (off by one)"),
    ("lens.residual_stream", "took output_hidden_states, whose last entry is already normalised"),
    ("lens.cross_entropy", "off by one: scored against the current token, not the next"),
    ("lens.kl_to_final", "KL arguments swapped"),
    ("lens.kl_to_final", "log-softmax missing: raw logits used as log-probabilities"),
    ("lens.cross_entropy", "log-softmax missing"),
])
def test_checks_reject_the_typical_mistakes(name, label):
    ex = {e.name: e for e in exercises_of("lens")}[name]
    m = next(m for m in ex.mistakes if m.label == label)
    outcome = evaluate(name, m.fn)
    assert outcome.status == "failed" and outcome.mistake == label, outcome.line()


def test_every_lens_exercise_has_three_mistakes_and_its_reference_passes():
    for ex in exercises_of("lens"):
        assert len(ex.mistakes) >= 3, ex.name
        assert evaluate(ex.name, ex.reference).passed, ex.name


def test_a_stub_is_reported_as_not_done():
    def stub(*args):
        raise NotImplementedError("stub")

    assert all(evaluate(ex.name, stub).status == "todo" for ex in exercises_of("lens"))


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def test_clean_wikitext_undoes_the_release_tokenisation():
    from course_utils.text import clean_wikitext

    raw = " = Robert = \n \n He had a guest @-@ starring role , in 1 @,@ 000 films ( 2 @.@ 5 hours ) . \n"
    assert clean_wikitext(raw) == "He had a guest-starring role, in 1,000 films (2.5 hours)."


class _CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    def __call__(self, texts, add_special_tokens=False, return_tensors=None):
        if isinstance(texts, str):
            ids = [[ord(c) % 61 for c in texts]]
            return type("E", (), {"input_ids": torch.tensor(ids)})() if return_tensors else {"input_ids": ids[0]}
        return {"input_ids": [[ord(c) % 61 for c in t] for t in texts]}

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def test_token_windows_shapes_and_errors():
    from course_utils.text import token_windows

    tok, text = _CharTokenizer(), "abcdefghij\nklmnopqrst\nuvwxyz"
    w = token_windows(tok, text, seq_len=5, n_windows=3)
    assert w.shape == (3, 5) and w.dtype == torch.long
    assert token_windows(tok, text, seq_len=5).shape == (5, 5)
    with pytest.raises(ValueError, match="not enough"):
        token_windows(tok, text, seq_len=5, n_windows=100)


def test_wikitext_assets_load():
    asset_or_skip("text/wikitext-2-test.txt")
    from course_utils.text import load_wikitext

    text = load_wikitext("test")
    assert " @-@ " not in text and len(text) > 1_000_000
    with pytest.raises(ValueError, match="split"):
        load_wikitext("train")


# ---------------------------------------------------------------------------------------------
# pictures and the explorer (smoke tests)
# ---------------------------------------------------------------------------------------------
def test_plots_and_explorer_build(tiny):
    import matplotlib

    matplotlib.use("Agg")
    from course_utils.viz import lens as V

    model, ids = tiny
    res = L.residual_stream(model, ids[:1])[:, 0]
    stats = L.LogitLens(model).stats(res, k=3)
    labels = [[str(int(i)) for i in row] for row in stats.topk_ids[..., 0]]
    V.lens_heatmap(stats.topk_probs[..., 0].reshape(res.shape[0], -1), labels, input_tokens=list("abcdefghi"),
                   next_tokens=list("bcdefghij"))
    V.plot_per_layer({"KL": stats.mean_kl()}, rock=1.0)
    V.plot_attention(torch.rand(2, 5, 5), ["a", "b"])
    V.plot_induction_scores(torch.rand(3, 4))
    widget = V.lens_explorer(model, _CharTokenizer(), prompt="hello", k=3)
    text, slider, _ = widget.children
    slider.value = 1
    text.value = "other prompt"
    assert slider.max == lm_parts(model).n_layers


# ---------------------------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------------------------
@pytest.mark.assets
def test_real_model_last_layer_lens_and_paris(smollm2):
    model, tok = smollm2
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    res = L.residual_stream(model, ids)
    lens = L.LogitLens(model)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(lens.logits(res[-1:])[0], logits, rtol=1e-4, atol=1e-4)
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]
    stats = lens.stats(res[:, 0, -1:], targets=torch.tensor([paris]))
    ranks = stats.target_rank[:, 0]
    assert ranks[:22].min() > 1000 and ranks[28:].max() == 0  # PROVENANCE.md section 2
    assert stats.mean_kl()[-1] == 0


# ---------------------------------------------------------------------------------------------
# training the tuned lens from a cache: each approximation against the exact KL
# ---------------------------------------------------------------------------------------------
def _exact_kl(final_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    p, q = final_logits.log_softmax(-1), logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_final_topk_and_bucket_kl_against_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    d, V, N = 16, 300, 40
    W_U = torch.randn(V, d, generator=g)
    final, layer = torch.randn(N, d, generator=g) * 2, torch.randn(N, d, generator=g) * 2
    exact = _exact_kl(final @ W_U.T, layer @ W_U.T)
    for k in (1, 8, 64, V - 1, V):
        ids, top, tail = L.final_topk(final, W_U, k, token_chunk=7)
        torch.testing.assert_close(top, (final @ W_U.T).log_softmax(-1).gather(-1, ids))
        q = (layer @ W_U.T).log_softmax(-1)
        q_top = q.gather(-1, ids)
        q_tail = torch.log1p(-q_top.logsumexp(-1).exp().clamp(max=1 - 1e-7))
        approx = L.bucket_kl(top, tail, q_top, q_tail)
        assert (approx <= exact + 1e-4).all(), k  # data processing: coarsening never adds KL
        if k >= V - 1:  # a tail of one token (or none) loses nothing
            torch.testing.assert_close(approx, exact, atol=1e-3, rtol=1e-3)
    assert (approx - exact).abs().max() < 1e-3


def test_sampled_log_partition_is_exact_with_every_row_and_unbiased_when_sampled():
    g = torch.Generator().manual_seed(1)
    V = 500
    z = torch.randn(3, V, generator=g)
    exact = z.logsumexp(-1)
    top_ids = torch.tensor([[0, 1, 2], [2, 3, 4], [5, 6, 7]])
    rows, col, log_w = L._sampled_rows(top_ids, V, None, g)
    torch.testing.assert_close(L.sampled_log_partition(z[:, rows], log_w), exact)
    rows, col, log_w = L._sampled_rows(top_ids, V, 10_000, g)  # m larger than the rest: every row once
    torch.testing.assert_close(L.sampled_log_partition(z[:, rows], log_w), exact)
    assert torch.equal(rows[col], top_ids)  # col says where each top id sits among the rows
    estimates = []
    for _ in range(400):
        rows, col, log_w = L._sampled_rows(top_ids, V, 50, g)
        assert len(rows) == 8 + 50 and torch.equal(rows[col], top_ids)
        estimates.append(L.sampled_log_partition(z[:, rows], log_w).exp())
    mean = torch.stack(estimates).mean(0)
    torch.testing.assert_close(mean, exact.exp(), rtol=0.03, atol=0)  # E[estimate] = Z


def test_exact_mean_kl_equals_the_fused_readout():
    g = torch.Generator().manual_seed(2)
    normed, W_U = torch.randn(4, 50, 8, generator=g), torch.randn(97, 8, generator=g)
    got = L.exact_mean_kl(normed, W_U, layer_chunk=3, token_chunk=17)
    torch.testing.assert_close(got, L.lens_stats_reference(normed, W_U).mean_kl(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, _exact_kl(normed[-1] @ W_U.T, normed @ W_U.T).mean(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vocab_sample", [None, 64])
def test_fit_cached_trains_from_the_cache_and_lowers_the_heldout_kl(vocab_sample):
    model = randomise_norms(tiny_lm("llama", n_layers=3, d_model=32, vocab=2000, seed=1))
    with torch.no_grad():
        lm_parts(model).final_norm.weight.mul_(20)
    windows = ids_for(2000, batch=16, seq=17, seed=1)
    train = L.lens_training_set(model, windows, k=64, progress=False)
    res, nxt = L.collect_residuals(model, windows, progress=False)
    assert torch.equal(train["residuals"], res) and torch.equal(train["next_ids"], nxt)
    assert train["top_ids"].shape == (res.shape[1], 64) and train["tail_logp"].shape == (res.shape[1],)
    held_out = _residuals(model, 4, 2)
    result = L.fit_tuned_lens(model, train, held_out, steps=60, batch_tokens=8, lr=1e-2, bias_lr=1e-2,
                              vocab_sample=vocab_sample, eval_every=20, progress=False)
    assert result["eval_steps"].tolist() == [0, 20, 40, 60] and len(result["losses"]) == 60
    tuned = L.TunedLens.from_state(model, result["state"])
    W_U = lm_parts(model).unembed.weight.detach()
    before = L.exact_mean_kl(L.LogitLens(model).normed(held_out), W_U)
    after = L.exact_mean_kl(tuned.normed(held_out).detach(), W_U)
    torch.testing.assert_close(float(result["eval_kl"][0]), float(before[:-1].mean()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(float(result["eval_kl"][-1]), float(after[:-1].mean()), rtol=1e-4, atol=1e-5)
    assert (after[:-1] < before[:-1]).all() and after[:-1].mean() < 0.9 * before[:-1].mean(), (before, after)
    assert all(p.grad is None for p in model.parameters()), "training must not touch the model"
    with pytest.raises(ValueError, match="lens_training_set"):
        L.TunedLens(model).fit_cached({"residuals": torch.randn(2, 5, 32)}, steps=1)
    with pytest.raises(ValueError, match="train the lens for this model"):
        L.TunedLens.from_state(tiny_lm("llama", n_layers=2, d_model=32, vocab=61), result["state"])


# ---------------------------------------------------------------------------------------------
# heavy tails
# ---------------------------------------------------------------------------------------------
def test_excess_kurtosis_max_to_median_and_clipping():
    from scipy import stats

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 64, generator=g)
    x[0, :, 7] = 300.0  # a massive coordinate
    want = torch.from_numpy(stats.kurtosis(x.numpy(), axis=-1, fisher=True, bias=True)).float()
    torch.testing.assert_close(L.excess_kurtosis(x), want, rtol=1e-4, atol=1e-4)
    assert (L.excess_kurtosis(x)[0] > 50).all() and L.excess_kurtosis(x)[1:].abs().max() < 3
    ratio = L.max_to_median(x)
    torch.testing.assert_close(ratio, x.abs().amax(-1) / x.abs().median(-1).values)
    clipped = L.clip_outliers(x, factor=5.0)
    bound = 5.0 * x.abs().median(-1, keepdim=True).values
    assert (clipped.abs() <= bound + 1e-6).all() and (clipped[0, :, 7] < 300).all()
    inside = x.abs() <= bound
    assert torch.equal(clipped[inside], x[inside])  # only the outliers move


def test_loss_approximation_reports_the_exact_kl_and_bounds():
    g = torch.Generator().manual_seed(4)
    normed, W_U = torch.randn(4, 30, 8, generator=g) * 2, torch.randn(200, 8, generator=g)
    got = L.loss_approximation(normed, W_U, k=8, vocab_sample=50)
    exact = _exact_kl(normed[-1] @ W_U.T, normed[:-1] @ W_U.T).mean()
    assert got["exact"] == pytest.approx(float(exact), rel=1e-4)
    assert got["bucket"] <= got["exact"] + 1e-5  # coarsening never adds KL
    full = L.loss_approximation(normed, W_U, k=199, vocab_sample=None)
    assert full["bucket"] == pytest.approx(full["exact"], rel=1e-3) and full["sampled"] == full["bucket"]


def test_cached_readout_equals_the_lens_and_is_loaded_the_second_time(tiny, tmp_path, monkeypatch):
    from course_utils import lens_experiment as E

    monkeypatch.setenv("COURSE_RESULTS_DIR", str(tmp_path))
    model, ids = tiny
    res = L.residual_stream(model, ids)[:, 0]  # [L+1, T, d]
    targets = ids[0, 1:]
    lens = L.LogitLens(model)
    direct = lens.stats(res[:, :-1], targets=targets, k=3)
    first = E.readout(lens, res[:, :-1], targets=targets, k=3)
    entries = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    again = E.readout(lens, res[:, :-1], targets=targets, k=3)
    for got in (first, again):
        for name in ("entropy", "topk_ids", "topk_probs", "kl_to_final", "target_logprob", "target_rank"):
            torch.testing.assert_close(getattr(got, name), getattr(direct, name))
    assert entries and sorted(p for p in tmp_path.rglob("*") if p.is_file()) == entries  # loaded, nothing new
    tuned = L.TunedLens(model)
    with torch.no_grad():
        tuned.bias_unit.add_(0.5)  # a tuned lens that differs from the logit lens gets its own entry
    shifted = E.readout(tuned, res[:, :-1], targets=targets, k=3)
    assert not torch.allclose(shifted.kl_to_final, first.kl_to_final)
    assert len(sorted(p for p in tmp_path.rglob("*") if p.is_file())) > len(entries)
