"""Exercises of 05_toolbox: precision at k (the label bug), FGSM, global magnitude masks, loss
recovered, the rock's loss and the AUROC."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from course_utils import ablation as AB
from course_utils import anomaly as AN
from course_utils import attacks as AT
from course_utils import label_bugs as LB
from course_utils import pruning as PR
from course_utils.checks import Case, exercise, mistake
from course_utils.checks import generator as _gen


# --- 1. precision at k ------------------------------------------------------------------------
def _precision_cases() -> list[Case]:
    g = _gen(51)
    cases = []
    for label, n, k in [("30 examples, 8 relevant, k=5", 30, 5), ("200 examples, 40 relevant, k=25", 200, 25)]:
        relevant = torch.zeros(n, dtype=torch.bool)
        relevant[torch.randperm(n, generator=g)[: (8 if n == 30 else 40)]] = True
        relevant[:3] = torch.tensor([True, False, True])  # some of the first k are relevant
        scores = torch.randn(n, generator=g) + 1.2 * relevant.float()
        cases.append(Case(label, (scores, relevant, k)))
    return cases


@exercise("toolbox.precision_at_k", title="Precision at k: how many of the top-k losses are the bug?",
          cases=_precision_cases,
          hints=('Which examples does the ranking put first, and how many of those are really planted?',
                 'Take the k examples with the largest scores and count how many of them are marked as planted; '
                 'divide by k.'),
          hint="P@k = |top_k(scores) ∩ relevant| / k, top_k = the k indices with the largest scores: [N], [N] ->"
               " a Python float.")
def precision_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """scores [N], relevant bool [N], k -> the fraction of the k highest scores that are relevant."""
    return LB.precision_at_k(scores, relevant, k)


@mistake("toolbox.precision_at_k", "the k lowest scores taken",
         "torch.topk returns the LARGEST values by default; sorting in ascending order picks the examples the "
         "network finds easiest, the opposite of suspicious ones.")
def _precision_lowest(scores, relevant, k):
    return float(relevant[torch.topk(scores, k, largest=False).indices].float().mean())


@mistake("toolbox.precision_at_k", "divided by the number of relevant examples (recall, not precision)",
         "Precision divides by k, the number of examples you looked at; dividing by the number of planted "
         "examples gives the recall.")
def _precision_recall(scores, relevant, k):
    return float(relevant[torch.topk(scores, k).indices].float().sum() / relevant.sum())


@mistake("toolbox.precision_at_k", "the first k examples, unsorted",
         "Sort by the score first: scores[:k] are the first k examples of the data set, not the k highest.")
def _precision_unsorted(scores, relevant, k):
    return float(relevant[:k].float().mean())


@mistake("toolbox.precision_at_k", "divided by the number of all examples",
         "Divide the count of relevant examples among the top k by k, not by N.")
def _precision_over_n(scores, relevant, k):
    return float(relevant[torch.topk(scores, k).indices].float().sum() / len(scores))


@mistake("toolbox.precision_at_k", "k + 1 examples taken",
         "Take exactly k examples: torch.topk(scores, k), or a slice [:k] of the sorted indices.")
def _precision_k_plus_one(scores, relevant, k):
    return float(relevant[torch.topk(scores, k + 1).indices].float().mean())


# --- 2. FGSM ----------------------------------------------------------------------------------
def _toy_model(seed: int) -> nn.Module:
    g = _gen(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8)
    return model.eval()


def _fgsm_cases() -> list[Case]:
    out = []
    for seed, eps in [(61, 0.05), (62, 0.2)]:
        g = _gen(seed + 100)
        x = torch.rand(5, 3, 4, 4, generator=g)
        x[0, 0, 0] = 0.01                                   # pixels near the edges of [0, 1]
        x[1, 1, 1] = 0.99
        out.append(Case(f"a small classifier, 5 images, eps={eps}", (_toy_model(seed), x,
                                                                      torch.randint(0, 4, (5,), generator=g), eps)))
    return out


@exercise("toolbox.fgsm", title="FGSM: one step along the sign of the loss gradient", cases=_fgsm_cases,
          hints=('One step, of size epsilon, in the direction that increases the loss fastest under an L-infinity '
                 'budget.',
                 'Get the gradient of the loss with respect to the input images, step along its sign, and keep '
                 'pixels in [0, 1].'),
          hint="x' = clip_[0,1](x + ε · sign(∇_x L(f(x), y))), L the mean cross-entropy at the TRUE labels, the "
               "gradient taken at the clean images: [N, 3, H, W] -> [N, 3, H, W], detached.")
def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Untargeted FGSM: images [N, 3, H, W] in [0, 1], labels [N] -> [N, 3, H, W] in [0, 1], detached."""
    return AT.fgsm(model, images, labels, eps)


def _input_grad(model, images, labels, logit: bool = False):
    x = images.clone().requires_grad_(True)
    out = model(x)
    value = out.gather(1, labels[:, None]).sum() if logit else F.cross_entropy(out, labels)
    grad, = torch.autograd.grad(value, x)
    return grad


@mistake("toolbox.fgsm", "the raw gradient, not its sign",
         "FGSM moves every pixel by exactly eps: use grad.sign(). The raw gradient is tiny and uneven.")
def _fgsm_raw(model, images, labels, eps):
    return (images + eps * _input_grad(model, images, labels)).clamp(0, 1)


@mistake("toolbox.fgsm", "a step down the loss (the sign flipped)",
         "An untargeted attack INCREASES the loss of the true class: add eps * sign(grad), don't subtract it.")
def _fgsm_descent(model, images, labels, eps):
    return (images - eps * _input_grad(model, images, labels).sign()).clamp(0, 1)


@mistake("toolbox.fgsm", "no clamp to [0, 1]",
         "The result must still be an image: .clamp(0, 1) after the step.")
def _fgsm_no_clamp(model, images, labels, eps):
    return images + eps * _input_grad(model, images, labels).sign()


@mistake("toolbox.fgsm", "the gradient of the predicted class's loss, not the true class's",
         "Use the true labels in the loss: F.cross_entropy(model(x), labels), not model(x).argmax(1).")
def _fgsm_predicted(model, images, labels, eps):
    pred = model(images).argmax(1)
    return (images + eps * _input_grad(model, images, pred).sign()).clamp(0, 1)


@mistake("toolbox.fgsm", "the gradient of the true class's logit, not of the loss",
         "Differentiate the cross-entropy loss. The logit's gradient ignores the other classes (and raising "
         "it makes the model MORE sure of the true class).")
def _fgsm_logit(model, images, labels, eps):
    return (images + eps * _input_grad(model, images, labels, logit=True).sign()).clamp(0, 1)


# --- 3. global magnitude masks ------------------------------------------------------------------
def _mask_cases() -> list[Case]:
    g = _gen(71)
    big, small = torch.randn(3, 4, generator=g) * 3.0, torch.randn(8, generator=g) * 0.3
    return [Case("two layers of different scales (12 and 8 weights), sparsity 0.33", ([big, small], 0.33)),
            Case("three layers, sparsity 0.6", ([torch.randn(2, 3, 2, generator=g), torch.randn(5, generator=g) * 0.5,
                                                 torch.randn(4, 2, generator=g) * 2], 0.6))]


@exercise("toolbox.magnitude_masks", title="Global magnitude pruning: the masks", cases=_mask_cases,
          hints=('Global means one threshold for all the tensors together, not one per tensor.',
                 'Rank the absolute values of every weight of every tensor at once; the smallest fraction `sparsity` '
                 'of them are pruned.'),
          hint="n = the total number of weights; keep = False exactly at the round(s · n) entries with the "
               "smallest |w| over all tensors together: a list of bool tensors with the weights' shapes.")
def magnitude_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """weights (any shapes) -> bool masks of the same shapes, False at the globally smallest |w|."""
    return PR.magnitude_masks(weights, sparsity)


def _masks_from_flat(flat_keep: torch.Tensor, weights) -> list[torch.Tensor]:
    return [m.reshape(w.shape) for m, w in zip(flat_keep.split([w.numel() for w in weights]), weights)]


def _global(weights, k: int, values=None, largest: bool = False) -> list[torch.Tensor]:
    flat = torch.cat([w.abs().flatten() for w in weights]) if values is None else values
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=largest).indices] = False
    return _masks_from_flat(keep, weights)


@mistake("toolbox.magnitude_masks", "a threshold per layer, not one for the whole network",
         "Global pruning ranks ALL the weights together: concatenate every layer's |w| before choosing the k "
         "smallest. Per layer, each layer loses the same fraction whatever its scale.")
def _masks_per_layer(weights, sparsity):
    return [_global([w], round(sparsity * w.numel()))[0] for w in weights]


@mistake("toolbox.magnitude_masks", "the largest weights pruned",
         "Prune the SMALLEST magnitudes: torch.topk(flat, k, largest=False).")
def _masks_largest(weights, sparsity):
    return _global(weights, round(sparsity * sum(w.numel() for w in weights)), largest=True)


@mistake("toolbox.magnitude_masks", "sparsity read as the fraction kept",
         "Sparsity is the fraction of weights set to ZERO: k = round(sparsity * n) weights are pruned.")
def _masks_kept(weights, sparsity):
    return _global(weights, round((1 - sparsity) * sum(w.numel() for w in weights)))


@mistake("toolbox.magnitude_masks", "signed values ranked, not magnitudes",
         "Rank |w|: a large negative weight matters as much as a large positive one.")
def _masks_signed(weights, sparsity):
    flat = torch.cat([w.flatten() for w in weights])
    return _global(weights, round(sparsity * flat.numel()), values=flat)


@mistake("toolbox.magnitude_masks", "k truncated with int() instead of rounded",
         "Round the count as torch's pruning does: k = round(sparsity * n), not int(sparsity * n).")
def _masks_truncated(weights, sparsity):
    return _global(weights, int(sparsity * sum(w.numel() for w in weights)))


# --- 4. loss recovered ------------------------------------------------------------------------
def _recovered_cases() -> list[Case]:
    return [Case("three explanations, clean 0.6, ablated 3.2", (torch.tensor([2.9, 1.7, 0.8]), 0.6, 3.2)),
            Case("one explanation worse than the ablated model", (torch.tensor([3.5, 1.0]), 1.0, 3.0))]


@exercise("toolbox.loss_recovered", title="Loss recovered", cases=_recovered_cases,
          hints=('0 means no better than the fully ablated model, 1 means as good as the clean model.',
                 'A ratio of two gaps: how far the explanation is from the ablated loss, over how far the clean loss '
                 'is from it.'),
          hint="recovered_k = (L_ablated − L_k) / (L_ablated − L_clean): [K] -> [K]; 0 = no better than ablating"
               " everything, 1 = as good as the clean model.")
def loss_recovered(loss: torch.Tensor, clean: float, ablated: float) -> torch.Tensor:
    """loss [K] of K explanations, the clean and fully ablated losses -> the fraction recovered [K]."""
    return (ablated - loss) / (ablated - clean)


@mistake("toolbox.loss_recovered", "the fraction NOT recovered (1 minus the answer)",
         "Measure from the ablated end: (ablated - loss) / (ablated - clean), so that the clean model scores 1.")
def _recovered_missing(loss, clean, ablated):
    return (loss - clean) / (ablated - clean)


@mistake("toolbox.loss_recovered", "divided by the ablated loss, not by the gap",
         "Normalise by the whole gap (ablated - clean), not by the ablated loss alone.")
def _recovered_over_ablated(loss, clean, ablated):
    return (ablated - loss) / ablated


@mistake("toolbox.loss_recovered", "a ratio of losses (clean / loss)",
         "A ratio of losses ignores the ablated baseline; loss recovered places the loss between the two ends.")
def _recovered_ratio(loss, clean, ablated):
    return clean / loss


@mistake("toolbox.loss_recovered", "the gap measured to the explanation's loss",
         "The denominator is the gap between the two ends, ablated - clean, which does not depend on the "
         "explanation.")
def _recovered_wrong_gap(loss, clean, ablated):
    return (ablated - loss) / (loss - clean)


@mistake("toolbox.loss_recovered", "parentheses missing: ablated - loss / (ablated - clean)",
         "Put the numerator in parentheses: (ablated - loss) / (ablated - clean).")
def _recovered_precedence(loss, clean, ablated):
    return ablated - loss / (ablated - clean)


# --- 5. the rock -------------------------------------------------------------------------------
def _rock_cases() -> list[Case]:
    g = _gen(81)
    train = torch.multinomial(torch.tensor([0.5, 0.2, 0.2, 0.1]), 400, replacement=True, generator=g)
    test = torch.multinomial(torch.tensor([0.3, 0.3, 0.3, 0.1]), 150, replacement=True, generator=g)
    return [Case("4 unbalanced classes, the test set balanced differently", (train, test, 4)),
            Case("3 classes, one rare", (torch.tensor([0] * 30 + [1] * 15 + [2] * 5), torch.tensor([0, 1, 2, 2]), 3))]


@exercise("toolbox.rock_loss", title="The rock: the loss of a constant model", cases=_rock_cases,
          hints=('The rock ignores the image and always predicts the same distribution over classes.',
                 'Estimate the class frequencies from the training labels, then take the cross-entropy of the test '
                 'labels under them.'),
          hint="p_c = n_c(train) / N(train); rock loss = −(1/M) Σ_{j=1}^{M} ln p_{y_j} over the M test labels: a"
               " Python float, in nats.")
def rock_loss(train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int) -> float:
    """The cross-entropy on test_labels of always predicting the training class frequencies."""
    return AB.rock_loss(train_labels, test_labels, num_classes)


def _freq(labels, num_classes):
    return torch.bincount(labels, minlength=num_classes).double() / len(labels)


@mistake("toolbox.rock_loss", "a uniform prediction, log C",
         "The best constant prediction is the class FREQUENCIES, not uniform: log C is the rock's loss only "
         "when the classes are balanced.")
def _rock_uniform(train_labels, test_labels, num_classes):
    return math.log(num_classes)


@mistake("toolbox.rock_loss", "frequencies counted on the test labels",
         "The rock is fitted on the TRAINING labels, like any other model, and scored on the test labels.")
def _rock_test_freq(train_labels, test_labels, num_classes):
    return float(-_freq(test_labels, num_classes)[test_labels].log().mean())


@mistake("toolbox.rock_loss", "log base 2 (bits, not nats)",
         "Use the natural log (torch.log), as F.cross_entropy does, so the rock compares with the network's loss.")
def _rock_bits(train_labels, test_labels, num_classes):
    return float(-_freq(train_labels, num_classes)[test_labels].log2().mean())


@mistake("toolbox.rock_loss", "the minus sign forgotten",
         "A cross-entropy is -mean log p[y]: the logs are negative, so the loss is positive.")
def _rock_sign(train_labels, test_labels, num_classes):
    return float(_freq(train_labels, num_classes)[test_labels].log().mean())


@mistake("toolbox.rock_loss", "the entropy of the training labels, not scored on the test labels",
         "Score the constant prediction on the test labels: -mean over TEST examples of log p[y].")
def _rock_entropy(train_labels, test_labels, num_classes):
    p = _freq(train_labels, num_classes)
    return float(-(p[p > 0] * p[p > 0].log()).sum())


# --- 6. AUROC ---------------------------------------------------------------------------------
def _auroc_cases() -> list[Case]:
    g = _gen(91)
    return [Case("integer scores with ties, 12 negatives and 7 positives",
                 (torch.randint(0, 5, (12,), generator=g).float(), torch.randint(1, 6, (7,), generator=g).float())),
            Case("continuous scores, 40 and 25", (torch.randn(40, generator=g), torch.randn(25, generator=g) + 1)),
            # an odd number of ties (one): half a tie must count as exactly one half
            Case("by hand: 3 negatives, 2 positives, one tie (AUROC 4.5 / 6 = 0.75)",
                 (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 3.0])))]


@exercise("toolbox.auroc", title="AUROC: how well does a score separate two sets?", cases=_auroc_cases,
          hints=('The probability that a random positive scores higher than a random negative; ties count one half.',
                 'Compare every positive with every negative: count the wins, add half the ties, divide by the '
                 'number of pairs.'),
          hint="AUROC = (1/(n·m)) Σ_{i, j} ( [s⁺_j > s⁻_i] + ½ [s⁺_j = s⁻_i] ): negatives [n], positives [m] -> "
               "a Python float in [0, 1].")
def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """negatives [n], positives [m] -> P(positive scores higher) + P(tie) / 2."""
    return AN.auroc(negatives, positives)


def _pairs(neg, pos):
    return pos[:, None] > neg[None, :], pos[:, None] == neg[None, :]


@mistake("toolbox.auroc", "positives and negatives swapped",
         "The AUROC asks how often a POSITIVE (anomalous) example scores above a negative (clean) one; yours is "
         "1 minus that.")
def _auroc_swapped(negatives, positives):
    above, tie = _pairs(positives, negatives)
    return float(above.double().mean() + 0.5 * tie.double().mean())


@mistake("toolbox.auroc", "ties counted as wins",
         "A tie is a coin flip: count pos == neg as 1/2, not 1 (>=).")
def _auroc_ties_win(negatives, positives):
    above, tie = _pairs(negatives, positives)
    return float((above | tie).double().mean())


@mistake("toolbox.auroc", "ties counted as losses",
         "A tie is a coin flip: count pos == neg as 1/2, not 0 (only >).")
def _auroc_ties_lose(negatives, positives):
    above, _ = _pairs(negatives, positives)
    return float(above.double().mean())


@mistake("toolbox.auroc", "one threshold at the negatives' mean (a true-positive rate, not the area)",
         "The area averages over ALL thresholds: compare each positive with each negative, not with one cut.")
def _auroc_one_threshold(negatives, positives):
    return float((positives > negatives.mean()).double().mean())


@mistake("toolbox.auroc", "divided by n_neg squared, not n_neg * n_pos",
         "There are n_pos * n_neg pairs: take the mean over the [n_pos, n_neg] comparison matrix.")
def _auroc_wrong_count(negatives, positives):
    above, tie = _pairs(negatives, positives)
    return float((above.double().sum() + 0.5 * tie.double().sum()) / len(negatives) ** 2)


# --- hidden cases (the grader's only) -----------------------------------------------------------
# Drawn by `python -m course_utils.grade` from a seed it keeps secret, with the generator `g`: the
# learner's notebook never sees these inputs, so an answer cannot be fitted to the public cases.
def _hidden_int(g: torch.Generator, low: int, high: int) -> int:
    """A random int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=g))


def _hidden_float(g: torch.Generator, low: float, high: float) -> float:
    """A random float in [low, high)."""
    return low + (high - low) * float(torch.rand(1, generator=g))


def _hidden_precision(g: torch.Generator) -> list[Case]:
    n = _hidden_int(g, 20, 300)
    relevant = torch.rand(n, generator=g) < _hidden_float(g, 0.1, 0.4)
    relevant[torch.randperm(n, generator=g)[:2]] = True  # at least one planted example
    scores = torch.randn(n, generator=g) + _hidden_float(g, 0.5, 2.0) * relevant.float()
    k = _hidden_int(g, 1, n // 2)
    return [Case(f"hidden: {n} examples, {int(relevant.sum())} relevant, k={k}", (scores, relevant, k))]


def _hidden_fgsm(g: torch.Generator) -> list[Case]:
    h, w, width, classes, n = (_hidden_int(g, 2, 6), _hidden_int(g, 2, 6), _hidden_int(g, 3, 10),
                               _hidden_int(g, 2, 7), _hidden_int(g, 1, 7))
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own initialisation draws from the global RNG
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, width), nn.Tanh(), nn.Linear(width, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8)
    x = torch.rand(n, 3, h, w, generator=g)
    eps = round(_hidden_float(g, 0.02, 0.3), 3)
    return [Case(f"hidden: a random classifier, {n} images of {h}x{w}, eps={eps}",
                 (model.eval(), x, torch.randint(0, classes, (n,), generator=g), eps))]


def _hidden_masks(g: torch.Generator) -> list[Case]:
    shapes = [tuple(_hidden_int(g, 1, 6) for _ in range(_hidden_int(g, 1, 4))) for _ in range(_hidden_int(g, 2, 5))]
    weights = [torch.randn(s, generator=g) * _hidden_float(g, 0.1, 3.0) for s in shapes]
    n = sum(w.numel() for w in weights)
    # sparsity * n has a fractional part in (0.55, 0.95): rounding and truncating give different counts
    sparsity = (_hidden_int(g, 0, n) + _hidden_float(g, 0.55, 0.95)) / n
    return [Case(f"hidden: {len(weights)} random layers, sparsity {sparsity:.4f}", (weights, sparsity))]


def _hidden_recovered(g: torch.Generator) -> list[Case]:
    clean = round(_hidden_float(g, 0.2, 2.0), 3)
    ablated = round(clean + _hidden_float(g, 0.5, 4.0), 3)
    loss = clean + (ablated - clean) * (torch.rand(_hidden_int(g, 1, 7), generator=g) * 1.3 - 0.1)
    return [Case(f"hidden: clean {clean}, ablated {ablated}", (loss, clean, ablated))]


def _hidden_rock(g: torch.Generator) -> list[Case]:
    c = _hidden_int(g, 2, 7)
    train_p, test_p = torch.rand(c, generator=g) + 0.1, torch.rand(c, generator=g) + 0.1
    train = torch.cat([torch.arange(c), torch.multinomial(train_p, _hidden_int(g, 20, 300), replacement=True,
                                                          generator=g)])  # every class seen in training
    test = torch.multinomial(test_p, _hidden_int(g, 5, 100), replacement=True, generator=g)
    return [Case(f"hidden: {c} classes, random frequencies", (train, test, c))]


def _hidden_auroc(g: torch.Generator) -> list[Case]:
    n, m = _hidden_int(g, 3, 40), _hidden_int(g, 3, 40)
    top = _hidden_int(g, 3, 8)
    return [Case("hidden: integer scores with ties", (torch.randint(0, top, (n,), generator=g).float(),
                                                      torch.randint(1, top + 1, (m,), generator=g).float())),
            Case("hidden: continuous scores", (torch.randn(n, generator=g),
                                               torch.randn(m, generator=g) + _hidden_float(g, 0.0, 2.0)))]


HIDDEN_CASES = {
    "toolbox.precision_at_k": _hidden_precision,
    "toolbox.fgsm": _hidden_fgsm,
    "toolbox.magnitude_masks": _hidden_masks,
    "toolbox.loss_recovered": _hidden_recovered,
    "toolbox.rock_loss": _hidden_rock,
    "toolbox.auroc": _hidden_auroc,
}
