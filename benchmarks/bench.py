"""`python -m benchmarks.bench [SECTION ...]`: measured figures for the course's helpers.

Each section is a function registered in `SECTIONS` (name -> function(args) -> rows). It
measures, and prints rows of `| section | figure | value | note |`. Speed is quoted as a ratio
to a baseline measured in the same run wherever there is a sensible one, since absolute times
depend on the machine (and, on a shared machine, on who else is running). Timings are the
median of `--repeats` runs after one warm-up, baseline and ours interleaved; results are
checked against the baseline before anything is timed. Every section runs on the CPU, and
again on the GPU (with bigger shapes) when `torch.cuda.is_available()`.

A maintainer's tool, not part of the learners' package: it calls only public names of
`course_utils`. Run it from the repository root:

    python -m benchmarks.bench                      # every section
    python -m benchmarks.bench train                # just the trainer
    python -m benchmarks.bench train --repeats 5 --threads 1
    python -m benchmarks.bench gradcam monge leace lens --repeats 3
    python -m benchmarks.bench lens --small --repeats 1   # tiny shapes: a smoke test, seconds

Sections:

- `train`: `train_classifier`'s throughput against a plain fp32 loop; time to a test accuracy.
- `gradcam`: `course_utils.gradcam` against `pytorch_grad_cam.GradCAM`, same model (EfficientNet-
  Lite0, head activation), layer, batch of 64 images and classes; maps compared first.
- `monge`: `moments.monge_maps` for all 90 ordered CIFAR-10 class pairs against POT's
  `ot.gaussian.bures_wasserstein_mapping` looped over the pairs (numpy and torch backends).
- `leace`: `erasure.LeaceFitter` against `concept_erasure.LeaceFitter` (fit + eraser).
- `lens`: `lens.lens_stats` (streaming / fused backends) against a naive lens that builds all
  `[L+1, N, V]` logits: time AND peak memory ratios.

To add one, write `@section("name") def bench_name(args) -> list[Row]` in this module.
`tests/test_bench.py` runs every section under `--small`.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import permutations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from course_utils.config import CFG

if TYPE_CHECKING:
    from course_utils.lens import LensStats

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (where `benchmarks` and `course_utils` live)."""


@dataclass(frozen=True)
class Row:
    """One figure of the table."""

    section: str
    figure: str
    value: str
    note: str = ""


Section = Callable[[argparse.Namespace], list[Row]]
"""A bench section: `fn(args) -> list[Row]`."""

SECTIONS: dict[str, Section] = {}


def section(name: str) -> Callable[[Section], Section]:
    """Register `fn(args) -> list[Row]` as the bench section `name`."""

    def register(fn: Section) -> Section:
        SECTIONS[name] = fn
        return fn

    return register


def print_rows(rows: list[Row], header: bool = False) -> None:
    """Print rows of the markdown table (with its header when `header`)."""
    if header:
        print("| section | figure | value | note |")
        print("|---|---|---|---|")
    for r in rows:
        print(f"| {r.section} | {r.figure} | {r.value} | {r.note} |", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine_rows(name: str, device: torch.device) -> list[Row]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = os.cpu_count() or 0
    busy = " (busy machine: times are inflated"
    busy += "; several threads spin-wait on each other there, try --threads 1)" if torch.get_num_threads() > 1 else ")"
    rows = [Row(name, "device", str(device), CFG.describe()),
            Row(name, "torch threads / cores", f"{torch.get_num_threads()} / {cores}",
                f"load average {load:.1f}" + (busy if load > cores else ""))]
    if device.type == "cuda":
        rows.append(Row(name, "gpu", torch.cuda.get_device_name(device), f"torch {torch.__version__}"))
    return rows


def _emit(out: list[Row], rows: list[Row]) -> None:
    """Print `rows` now (a slow section shows its progress) and keep them in `out`."""
    print_rows(rows)
    out.extend(rows)


def _devices() -> list[torch.device]:
    """Where a section runs: the CPU, then the GPU when there is one."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


Fns = dict[str, Callable[[], Any]]
"""Named functions to time side by side."""


def _warm(fns: Fns) -> dict[str, Any]:
    """One warm-up call of each function (allocator, lazy initialisation); returns their results."""
    return {name: fn() for name, fn in fns.items()}


def _time(fns: Fns, device: torch.device, repeats: int, budget_s: float | None = None,
          keep: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """Seconds of each call, `repeats` rounds, the functions interleaved so that all see the same load.
    A function whose runs already add up to `budget_s` is not run again (each runs at least once): the
    note then says "median of 1". `keep`, when given, receives each function's last result."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            if runs[name] and budget_s is not None and sum(runs[name]) >= budget_s:
                continue
            _sync(device)
            t0 = time.perf_counter()
            result = fn()
            _sync(device)
            runs[name].append(time.perf_counter() - t0)
            if keep is not None:
                keep[name] = result
            del result
    return runs


def _secs(seconds: float) -> str:
    """A duration for the table: ms below one second."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _runs_note(runs: dict[str, list[float]], scale: dict[str, float] | None = None) -> str:
    """`name median` for each timed function (times `scale[name]`), and of how many runs."""
    scale = scale or {}
    counts = {len(r) for r in runs.values()}
    each = len(counts) > 1
    parts = [f"{n} {_secs(statistics.median(r) * scale.get(n, 1.0))}"
             + (f" ({len(r)} run{'s' * (len(r) > 1)})" if each else "") for n, r in runs.items()]
    return ("" if each else f"median of {counts.pop()}: ") + ", ".join(parts)


def _goal(name: str, goal: str, met: bool | None, note: str, why_not: str = "not measured") -> Row:
    """A goal row: met / not met, or `why_not` when `met` is None."""
    return Row(name, f"goal: {goal}", why_not if met is None else ("met" if met else "NOT met"), note)


def _agree_note(ok: bool, detail: str) -> str:
    return ("agree" if ok else "DISAGREE") + f"; {detail}"


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def _reference_loop(widths: tuple[int, int, int], x: torch.Tensor, y: torch.Tensor, batch_size: int,
                    steps: int, device: torch.device) -> float:
    """A plain fp32 loop over the same network: no augmentation, no autocast, default memory
    format, SGD. Returns images per second."""
    from course_utils.train import make_cifar_net

    torch.manual_seed(0)
    net = make_cifar_net(10, widths).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        i = (s * batch_size) % (len(x) - batch_size + 1)
        xb, yb = x[i:i + batch_size].float() / 255, y[i:i + batch_size]
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def _trainer_throughput(widths: tuple[int, int, int], x: torch.Tensor, y: torch.Tensor, batch_size: int,
                        steps: int, device: torch.device) -> float:
    from course_utils.train import train_classifier

    r = train_classifier(x[:batch_size * steps], y[:batch_size * steps], epochs=1, batch_size=batch_size,
                         width=widths, checkpoints=None, device=device, progress=False)
    return r.steps * batch_size / r.seconds


def _throughput_rows(name: str, rec: dict, device: torch.device, repeats: int, label: str) -> list[Row]:
    """Images/s of `train_classifier`'s loop against the plain fp32 loop, same net and batch."""
    from course_utils.train import make_cifar_net

    widths, bs = make_cifar_net(10, rec["width"]).widths, rec["batch_size"]
    steps = 20 if device.type == "cuda" else 6
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (bs * steps, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (bs * steps,), generator=g).to(device)
    _reference_loop(widths, x, y, bs, 2, device)  # warm-up (allocator, cuDNN autotuning)
    _trainer_throughput(widths, x[: bs * 2], y[: bs * 2], bs, 2, device)
    ref, ours = [], []
    for _ in range(repeats):  # interleaved, so both see the same load
        ref.append(_reference_loop(widths, x, y, bs, steps, device))
        ours.append(_trainer_throughput(widths, x, y, bs, steps, device))
    ref_m, ours_m = statistics.median(ref), statistics.median(ours)
    cfg = f"widths {widths}, batch {bs}, {steps} steps, median of {repeats}"
    return [
        Row(name, f"{label}: trainer throughput", f"{ours_m:,.0f} img/s",
            f"{cfg}; runs {', '.join(f'{v:,.0f}' for v in ours)}"),
        Row(name, f"{label}: plain fp32 loop throughput", f"{ref_m:,.0f} img/s",
            "same net, contiguous, no augmentation, no autocast"),
        Row(name, f"{label}: trainer / plain loop", f"{ours_m / ref_m:.2f}x",
            "includes the on-device flip+translate augmentation"
            + ("; bf16 autocast + channels_last" if device.type == "cuda" else "; channels_last")),
    ]


def _training_rows(name: str, rec: dict, device: torch.device, target: float, budget_s: float,
                   label: str) -> list[Row]:
    """Train the recipe on real CIFAR-10, report time to `target` test accuracy and the final one."""
    from course_utils.cifar import load_cifar10
    from course_utils.train import log_steps, train_classifier

    try:
        t = time.perf_counter()
        train = load_cifar10("train", n=rec["n_train"])
        test = load_cifar10("test", n=rec["n_test"])
        load_s = time.perf_counter() - t
    except Exception as err:  # noqa: BLE001 - a missing dataset is a skip, not a crash
        return [Row(name, f"{label}: CIFAR-10 run", "skipped", str(err).splitlines()[0])]
    n, bs = len(train.images), min(rec["batch_size"], len(train.images))
    spe = n // bs
    total = math.ceil(rec["epochs"] * spe)
    half = max(1, spe // 2)  # checkpoints every half epoch too, to time the target finely
    steps = sorted(set(log_steps(total)) | set(range(half, total + 1, half)))
    lr = rec["lr_per_1024"] * bs / 1024
    cpu0, wall0 = time.process_time(), time.perf_counter()
    r = train_classifier(train.images, train.labels, test=(test.images, test.labels), epochs=rec["epochs"],
                         batch_size=bs, lr=lr, width=rec["width"], checkpoints=steps, device=device,
                         progress=False)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    hit = next((c for c in r.checkpoints if c.test_acc is not None and c.test_acc >= target), None)
    final = r.checkpoints[-1].test_acc
    data = f"{n:,} train / {len(test.images):,} test images ({train.source})"
    rows = [Row(name, f"{label}: data", data, f"loaded in {load_s:.1f} s")]
    if hit is not None:
        rows.append(Row(name, f"{label}: time to {target:.0%} test acc", f"{hit.seconds:.1f} s",
                        f"step {hit.step} (epoch {hit.epoch:.1f}); {hit.seconds / budget_s:.2f} of the "
                        f"{budget_s:.0f} s budget; {hit.seconds / r.seconds:.2f} of the run"))
    else:
        rows.append(Row(name, f"{label}: time to {target:.0%} test acc", "not reached",
                        f"best {max(a for a in r.accuracies() if a is not None):.3f}"))
    threads = torch.get_num_threads()
    rows += [
        Row(name, f"{label}: final test acc", f"{final:.3f}",
            f"{r.steps} steps, {rec['epochs']:g} epochs, widths {r.config['width']}, batch {bs}"),
        Row(name, f"{label}: training time", f"{r.seconds:.1f} s",
            "the whole run; checkpoint evaluation excluded"),
        Row(name, f"{label}: wall time", f"{r.wall_seconds:.1f} s",
            f"with {len(r.checkpoints)} checkpoint evaluations and the whitening init"),
        Row(name, f"{label}: training throughput", f"{r.steps * bs / r.seconds:,.0f} img/s",
            f"{r.steps * bs:,} images seen"),
    ]
    if device.type == "cpu":
        rows.append(Row(name, f"{label}: CPU time", f"{cpu_s:.1f} s",
                        f"share of {threads} thread(s) actually running: "
                        f"{cpu_s / (wall_s * threads):.0%}"))
    return rows


@section("train")
def bench_train(args: argparse.Namespace) -> list[Row]:
    """Trainer throughput against a plain fp32 loop; the fast recipe on CPU (time to 45% test
    accuracy, budget 90 s); on a GPU the full recipe (time to 93%, budget 15 s)."""
    from course_utils.train import recipe

    name = "train"
    rows = _machine_rows(name, torch.device("cpu"))
    print_rows(rows)
    out = list(rows)

    def emit(new: list[Row]) -> None:
        print_rows(new)
        out.extend(new)

    cpu = torch.device("cpu")
    fast = recipe(fast=True)
    emit(_throughput_rows(name, fast, cpu, args.repeats, "cpu fast"))
    if CFG.fast or not torch.cuda.is_available():
        emit(_training_rows(name, fast, cpu, 0.45, 90.0, "cpu fast"))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        full = recipe(fast=False)
        emit(_machine_rows(name, gpu)[2:])
        emit(_throughput_rows(name, full, gpu, args.repeats, "gpu full"))
        emit(_training_rows(name, full, gpu, 0.93, 15.0, "gpu full"))
    return out


# --------------------------------------------------------------------------------------------
# gradcam: course_utils.gradcam against pytorch-grad-cam
# --------------------------------------------------------------------------------------------
def _gradcam_model(device: torch.device) -> tuple[torch.nn.Module, str, str]:
    """`(model, layer name, description)`: EfficientNet-Lite0 with its head ReLU6 as its own module
    (`_head_act`, `[B, 1280, 7, 7]`); torchvision's resnet18 with random weights if it cannot be built."""
    try:
        from course_utils.gradcam import add_head_activation
        from course_utils.models import load_efficientnet

        return (add_head_activation(load_efficientnet(device)), "_head_act",
                "EfficientNet-Lite0 (ImageNet weights), layer _head_act")
    except Exception as err:  # noqa: BLE001 - fall back, and say so in the table
        from torchvision.models import resnet18

        return (resnet18(weights=None).eval().to(device), "layer4",
                f"FALLBACK resnet18(weights=None), layer layer4 (EfficientNet-Lite0 unavailable: "
                f"{str(err).splitlines()[0][:80]})")


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map `[B, H, W]` scaled to [0, 1] by its own min and max (a flat map becomes 0)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-30), torch.zeros_like(maps))


def _gradcam_rows(name: str, device: torch.device, batch: int, size: int,
                  repeats: int) -> tuple[list[Row], float | None]:
    """Check that both libraries give the same maps, then time them on the same batch.
    Returns the rows and the speed ratio (None when the maps disagree)."""
    from pytorch_grad_cam import GradCAM as LibGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from course_utils.gradcam import gradcam, resolve_layer

    model, layer, what = _gradcam_model(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)  # in preprocess_imagenet's range
    classes = torch.randint(0, 1000, (batch,), generator=g)
    lib = LibGradCAM(model=model, target_layers=[resolve_layer(model, layer)])
    targets = [ClassifierOutputTarget(int(c)) for c in classes]

    def run_lib() -> Any:
        maps = lib(input_tensor=x, targets=targets)
        # It keeps `outputs` and with them the graph it backpropagated with retain_graph=True (GiBs at
        # batch 64) until its next call; drop them now (inside its timing), or they weigh on ours.
        lib.outputs = None
        return maps

    fns = {"ours": lambda: gradcam(model, x, layer, classes.to(device)), "pytorch-grad-cam": run_lib}
    label = f"{device.type}, batch {batch}x{size}x{size}"
    try:
        out = _warm(fns)
        # pytorch-grad-cam min-max scales, then resizes (cv2, bilinear, pixel centres); ours upsamples
        # (bilinear, align_corners=False), then divides by the max. Min-max both: the same map.
        diff = float((_minmax(out["ours"]) - _minmax(torch.from_numpy(out["pytorch-grad-cam"]))).abs().max())
        ok = diff < 1e-3
        rows = [Row(name, f"{label}: model", what, f"target classes: {batch} seeded random ImageNet classes"),
                Row(name, f"{label}: maps agree (max |diff| after min-max to [0, 1])", f"{diff:.1e}",
                    _agree_note(ok, f"{tuple(out['ours'].shape)} maps, tolerance 1e-3"))]
        if not ok:
            return rows + [Row(name, f"{label}: speed", "not timed", "the maps disagree")], None
        runs = _time(fns, device, repeats)
    finally:
        lib.activations_and_grads.release()
    ratio = statistics.median(runs["pytorch-grad-cam"]) / statistics.median(runs["ours"])
    return rows + [Row(name, f"{label}: pytorch-grad-cam time / ours", f"{ratio:.2f}x", _runs_note(runs))], ratio


@section("gradcam")
def bench_gradcam(args: argparse.Namespace) -> list[Row]:
    """`gradcam(...)` against `pytorch_grad_cam.GradCAM`: same model, layer, images and classes.
    CPU: batch 64 at 224x224 (the goal); GPU: batch 256; `--small`: batch 4 at 96x96."""
    name, out = "gradcam", []
    _emit(out, _machine_rows(name, torch.device("cpu")))
    ratio = None
    for device in _devices():
        if device.type == "cuda":
            _emit(out, _machine_rows(name, device)[2:])
        batch, size = (4, 96) if args.small else ((64, 224) if device.type == "cpu" else (256, 224))
        rows, r = _gradcam_rows(name, device, batch, size, args.repeats)
        _emit(out, rows)
        ratio = r if device.type == "cpu" else ratio
    met = None if args.small or ratio is None else ratio >= 3
    _emit(out, [_goal(name, ">=3x faster than pytorch-grad-cam on CPU, batch 64", met,
                      "" if ratio is None else f"{ratio:.2f}x",
                      "not measured (--small)" if args.small else "not measured (maps disagree)")])
    return out


# --------------------------------------------------------------------------------------------
# monge: moments.monge_maps against POT's bures_wasserstein_mapping, all 90 class pairs
# --------------------------------------------------------------------------------------------
def _class_data(d: int, device: torch.device, small: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`(x [n, d], y [n], description)`: CIFAR-10 pixel vectors at `sqrt(d/3)` pixels a side, or,
    without CIFAR-10, ten random Gaussian classes (said so in the description)."""
    from course_utils.moments import pixels

    res = math.isqrt(d // 3)
    split, n = ("test", 2000) if small else ("train", 20000 if device.type == "cpu" else None)
    try:
        from course_utils.cifar import load_cifar10

        data = load_cifar10(split, n=n)
        return pixels(data.images, res), data.labels, f"CIFAR-10 {split}, {len(data.labels):,} images at {res}x{res}"
    except Exception as err:  # noqa: BLE001 - measure on synthetic classes instead, and say so
        g = torch.Generator().manual_seed(0)
        n = n or 50000
        y = torch.arange(n) % 10
        scales, means = 0.5 + torch.rand(10, d, generator=g), torch.randn(10, d, generator=g)
        x = torch.randn(n, d, generator=g) * scales[y] + means[y]
        return x, y, (f"FALLBACK random Gaussian classes, n={n:,} "
                      f"(CIFAR-10 unavailable: {str(err).splitlines()[0][:80]})")


def _monge_methods() -> list[str | None]:
    """The matrix-root methods `monge_maps` offers (`None`: its only one, no `method` keyword)."""
    from course_utils import moments

    if "method" not in inspect.signature(moments.monge_maps).parameters:
        return [None]
    return list(getattr(moments, "MATRIX_ROOT_METHODS", ())) or [None]


def _pot_maps(means: Any, covs: Any, pairs: list[tuple[int, int]]) -> list[Any]:
    """POT's map `A` for each pair, one `bures_wasserstein_mapping` call per pair (numpy or torch)."""
    from ot.gaussian import bures_wasserstein_mapping

    return [bures_wasserstein_mapping(means[s], means[t], covs[s], covs[t])[0] for s, t in pairs]


def _monge_fns(mom: Any, ridged: torch.Tensor, ridge: float, pairs: list[tuple[int, int]],
               pot_pairs: dict[str, list[tuple[int, int]]]) -> tuple[Fns, Fns]:
    """`(timed, warm-up)` functions: `monge_maps` (each method) on all `pairs`, POT on `pot_pairs[backend]`;
    the warm-ups run one chunk of pairs (lazy initialisation, not a whole run)."""
    from course_utils.moments import monge_maps

    cov_np, mean_np = ridged.cpu().numpy(), mom.means.cpu().numpy()
    fns: Fns = {}
    warm: Fns = {}
    for m in _monge_methods():
        kw = {} if m is None else {"method": m}
        for target, sub in ((fns, pairs), (warm, pairs[:8])):
            target[f"monge_maps[{m or 'default'}]"] = (
                lambda kw=kw, sub=sub: monge_maps(mom, sub, ridge=ridge, progress=False, **kw))
    for target, sub_t, sub_n in ((fns, pot_pairs["POT torch"], pot_pairs["POT numpy"]), (warm, pairs[:1], pairs[:1])):
        target["POT torch"] = lambda sub=sub_t: _pot_maps(mom.means, ridged, sub)
        target["POT numpy"] = lambda sub=sub_n: _pot_maps(mean_np, cov_np, sub)
    return fns, warm


def _monge_agreement(name: str, label: str, out: dict[str, Any], pairs: list[tuple[int, int]],
                     pot_pairs: dict[str, list[tuple[int, int]]]) -> list[Row]:
    """Max relative (Frobenius) difference of each method's maps from POT's, pair by pair."""
    from course_utils.moments import relative_error

    rows = []
    for key in (k for k in out if not k.startswith("POT")):
        for pot, sub in pot_pairs.items():
            err = max(relative_error(out[key][pairs.index(p)].cpu(), torch.as_tensor(a).cpu())
                      for p, a in zip(sub, out[pot]))
            rows.append(Row(name, f"{label}: {key} vs {pot}, max relative difference", f"{err:.1e}",
                            _agree_note(err < 1e-3, f"||A - A_POT||_F / ||A_POT||_F over {len(sub)} pairs, "
                                                    "tolerance 1e-3")))
    return rows


def _monge_rows(name: str, device: torch.device, d: int, small: bool, repeats: int,
                ridge: float = 1e-3) -> tuple[list[Row], dict[str, float]]:
    """Time `monge_maps` (each method) and POT (torch, numpy) on the same ridged covariances, then
    compare the maps. On big shapes POT runs on a subset of pairs (every pair costs the same: two
    `eigh` and an inverse of d x d) and is scaled to 90. Returns the rows and the medians for 90 pairs."""
    from course_utils.gaussian import add_ridge
    from course_utils.moments import fit_class_moments

    pairs = list(permutations(range(10), 2))
    x, y, what = _class_data(d, device, small)
    mom = fit_class_moments(x, y, 10, device=device, progress=False)
    ridged = add_ridge(mom.covs, ridge)  # what monge_maps does to source and target
    big = not small and device.type == "cpu"
    pot_pairs = {"POT torch": pairs[::9] if big else pairs,  # numpy on a GPU machine (d=3072): 1 pair
                 "POT numpy": pairs[::9] if big else (pairs if small else pairs[:1])}
    fns, warm = _monge_fns(mom, ridged, ridge, pairs, pot_pairs)
    _warm(warm)
    out: dict[str, Any] = {}
    # On the CPU a slow method (Newton-Schulz: dozens of d x d matmuls per root) runs once rather than
    # --repeats times, to keep the section to a few minutes; the note gives the number of runs.
    runs = _time(fns, device, repeats, budget_s=30.0 if big else None, keep=out)
    label = f"{device.type}, d={d}"
    rows = [Row(name, f"{label}: data", what, f"10 classes, ridge {ridge} x mean eigenvalue on every covariance")]
    rows += _monge_agreement(name, label, out, pairs, pot_pairs)
    del out
    scale = {k: 90 / len(v) for k, v in pot_pairs.items()}
    med = {k: statistics.median(r) * scale.get(k, 1.0) for k, r in runs.items()}
    sub = "" if all(v == 1 for v in scale.values()) else (
        f"; POT timed on {len(pot_pairs['POT torch'])} (torch) / {len(pot_pairs['POT numpy'])} (numpy) of the "
        "90 pairs and scaled to 90 (every pair costs the same)")
    for key in (k for k in fns if not k.startswith("POT")):
        rows.append(Row(name, f"{label}: {key}, 90 pairs", _secs(med[key]),
                        _runs_note({k: runs[k] for k in (key, *pot_pairs)}, scale)))
        rows += [Row(name, f"{label}: {pot} time / {key}", f"{med[pot] / med[key]:.2f}x",
                     f"POT {_secs(med[pot])} for 90 pairs{sub}") for pot in pot_pairs]
    return rows, med


@section("monge")
def bench_monge(args: argparse.Namespace) -> list[Row]:
    """`monge_maps` for the 90 ordered CIFAR-10 class pairs against POT looped over the pairs.
    CPU: d = 3*16*16 = 768; GPU: d = 3072; `--small`: d = 48."""
    name, out = "monge", []
    _emit(out, _machine_rows(name, torch.device("cpu")))
    gpu: dict[str, float] | None = None
    for device in _devices():
        if device.type == "cuda":
            _emit(out, _machine_rows(name, device)[2:])
        d = 48 if args.small else (768 if device.type == "cpu" else 3072)
        rows, med = _monge_rows(name, device, d, args.small, args.repeats)
        _emit(out, rows)
        if device.type == "cuda" and not args.small:
            gpu = med
    if gpu is None:
        why = "not measured (--small)" if args.small and torch.cuda.is_available() else "not measured (no GPU)"
        goals = [_goal(name, "90 pairs at 3072-d <= 2 s on an H100", None, "", why),
                 _goal(name, ">=5x faster than POT torch backend on the same GPU", None, "", why)]
    else:
        best = min((k for k in gpu if not k.startswith("POT")), key=gpu.get)
        on = torch.cuda.get_device_name()
        goals = [_goal(name, "90 pairs at 3072-d <= 2 s on an H100", gpu[best] <= 2.0,
                       f"{best}: {_secs(gpu[best])} on {on}"),
                 _goal(name, ">=5x faster than POT torch backend on the same GPU", gpu["POT torch"] / gpu[best] >= 5,
                       f"{best}: {gpu['POT torch'] / gpu[best]:.2f}x on {on}")]
    _emit(out, goals)
    return out


# --------------------------------------------------------------------------------------------
# leace: erasure.LeaceFitter against concept_erasure.LeaceFitter
# --------------------------------------------------------------------------------------------
def _leace_data(n: int, d: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded float32 `x [n, d]` (correlated features, class-dependent means) and one-hot `z [n, k]`."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, k, (n,), generator=g)
    mix = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / math.sqrt(d)  # well conditioned, not white
    x = torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(k, d, generator=g)[y]
    return x.to(device), F.one_hot(y, k).float().to(device)


def _leace_rows(name: str, device: torch.device, n: int, d: int, k: int,
                repeats: int) -> tuple[list[Row], float | None]:
    """Fit both (statistics in float64, no shrinkage, no trace constraint, svd_tol 0.01: the same
    estimator), check the erased data agree, then time fit + eraser. Returns rows and the speed ratio."""
    from concept_erasure import LeaceFitter as TheirFitter

    from course_utils.erasure import LeaceFitter

    x, z = _leace_data(n, d, k, device)
    fns = {"ours": lambda: LeaceFitter(d, k, svd_tol=0.01, device=device).update(x, z).eraser,
           "concept-erasure": lambda: TheirFitter(d, k, device=device, dtype=torch.float64, shrinkage=False,
                                                  constrain_cov_trace=False, svd_tol=0.01).update(x, z).eraser}
    label = f"{device.type}, n={n:,} d={d} k={k}"
    out = _warm(fns)
    xd = x.double()
    diff = float((out["ours"](xd) - out["concept-erasure"](xd)).abs().max())
    tol = 1e-4 * float(xd.abs().max())
    rows = [Row(name, f"{label}: erased data agree (max |diff|)", f"{diff:.1e}",
                _agree_note(diff < tol, f"both erasers applied to x in float64; tolerance 1e-4 x max|x| = {tol:.1e}"))]
    ok = diff < tol
    if not ok:
        return rows + [Row(name, f"{label}: speed", "not timed", "the erasers disagree")], None
    runs = _time(fns, device, repeats)
    ratio = statistics.median(runs["concept-erasure"]) / statistics.median(runs["ours"])
    rows.append(Row(name, f"{label}: concept-erasure time / ours", f"{ratio:.2f}x",
                    _runs_note(runs) + "; fit = update on all the data + eraser"))
    return rows, ratio


@section("leace")
def bench_leace(args: argparse.Namespace) -> list[Row]:
    """LEACE fit + eraser against concept-erasure's. CPU: n=20,000, d=768; GPU: n=100,000, d=2048;
    `--small`: n=500, d=32; 10 classes."""
    name, out = "leace", []
    _emit(out, _machine_rows(name, torch.device("cpu")))
    ratios = []
    for device in _devices():
        if device.type == "cuda":
            _emit(out, _machine_rows(name, device)[2:])
        n, d = (500, 32) if args.small else ((20000, 768) if device.type == "cpu" else (100000, 2048))
        rows, ratio = _leace_rows(name, device, n, d, 10, args.repeats)
        _emit(out, rows)
        ratios.append((device.type, ratio))
    met = None if any(r is None for _, r in ratios) else all(r >= 1 for _, r in ratios)
    note = ", ".join(f"{t}: {r:.2f}x" for t, r in ratios if r is not None) + (" (--small shapes)" if args.small else "")
    _emit(out, [_goal(name, "at least as fast as concept-erasure", met, note, "not measured (erasers disagree)")])
    return out


# --------------------------------------------------------------------------------------------
# lens: the fused logit-lens read-out against the naive one
# --------------------------------------------------------------------------------------------
def _lens_inputs(layers: int, n: int, d: int, vocab: int, device: torch.device | str = "cpu",
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded `normed [layers, n, d]`, `W_U [vocab, d]` (logits of std ~3) and `targets [n]`,
    filled in place (no temporaries, so that the RSS before a measured call is the peak so far)."""
    g = torch.Generator().manual_seed(seed)
    normed = torch.empty(layers, n, d).normal_(generator=g)
    W_U = torch.empty(vocab, d).normal_(generator=g).mul_(3 / math.sqrt(d))
    targets = torch.randint(0, vocab, (n,), generator=g)
    return normed.to(device), W_U.to(device), targets.to(device)


@torch.no_grad()
def _naive_lens_stats(normed: torch.Tensor, W_U: torch.Tensor, *, targets: torch.Tensor | None = None,
                      k: int = 5) -> LensStats:
    """The logit lens done the obvious way: all `[L+1, N, V]` logits at once, then `log_softmax`.
    Same outputs as `lens.lens_stats_reference` (entropy, top-k, KL(p_L || p_l), target log-prob, rank)."""
    from course_utils.lens import LensStats

    logits = normed @ W_U.to(normed.dtype).T  # [L+1, N, V]
    tlp = rank = None
    if targets is not None:
        idx = targets.to(logits.device).expand(logits.shape[0], -1)[..., None]  # [L+1, N, 1]
        rank = (logits > logits.gather(-1, idx)).sum(-1)
    logp = logits.log_softmax(-1)
    del logits
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    kl = (p[-1] * (logp[-1] - logp)).sum(-1).clamp_min(0)
    top_lp, top_ids = logp.topk(k, -1)
    if targets is not None:
        tlp = logp.gather(-1, idx)[..., 0].cpu()
    return LensStats(entropy=entropy.cpu(), topk_ids=top_ids.cpu(), topk_probs=top_lp.exp().cpu(),
                     kl_to_final=kl.cpu(), target_logprob=tlp, target_rank=None if rank is None else rank.cpu())


def _lens_fn(variant: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]:
    """`fn(normed, W_U, targets)` for "naive" or a `lens_stats` backend name ("reference", "triton", ...)."""
    if variant == "naive":
        return lambda normed, W_U, targets: _naive_lens_stats(normed, W_U, targets=targets, k=5)
    from course_utils.lens import lens_stats

    return lambda normed, W_U, targets: lens_stats(normed, W_U, targets=targets, k=5, backend=variant)


def _lens_diff(a: Any, b: Any) -> tuple[float, float, float]:
    """`(max |diff| of the float statistics, share of equal top-k ids, share of equal target ranks)`."""
    floats = max(float((getattr(a, f) - getattr(b, f)).abs().max())
                 for f in ("entropy", "topk_probs", "kl_to_final", "target_logprob"))
    ids = float((a.topk_ids == b.topk_ids).double().mean())
    ranks = float((a.target_rank == b.target_rank).double().mean())
    return floats, ids, ranks


def _lens_agree(name: str, label: str, variant: str, a: Any, b: Any) -> Row:
    """The row that says whether `variant` gives the naive lens's statistics (near-ties may swap ids)."""
    floats, ids, ranks = _lens_diff(a, b)
    ok = floats < 1e-3 and ids >= 0.99 and ranks >= 0.99
    return Row(name, f"{label}: naive vs {variant} (max |diff|)", f"{floats:.1e}",
               _agree_note(ok, f"entropy, top-5 probs, KL, target logprob; top-5 ids equal {ids:.2%}, "
                               f"target ranks equal {ranks:.2%} (near-ties may swap)"))


_RSS_SCRIPT = """
import sys, torch
from benchmarks.bench import _lens_fn, _lens_inputs, _proc_status_kib, _reset_peak_rss
torch.set_num_threads(int(sys.argv[1]))
fn = _lens_fn(sys.argv[2])
fn(*_lens_inputs(2, 4, 8, 64))  # warm-up on a tiny case: lazy initialisation is not the call's memory
inputs = _lens_inputs(*(int(v) for v in sys.argv[3:7]))
before, exact = _proc_status_kib("VmRSS"), _reset_peak_rss()
fn(*inputs)
print(_proc_status_kib("VmHWM") - before, int(exact))
"""


def _proc_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB: "VmRSS" (now), "VmHWM" (peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (`VmHWM`) to its current RSS (Linux: write 5 to clear_refs).
    False where that is refused: the peak is then the process's own since exec, and the inputs are
    built in place so that nothing before the call went much above the RSS the call starts from."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes(variant: str, shape: tuple[int, int, int, int]) -> tuple[int, bool]:
    """Peak extra RSS of one call, in a fresh process (no allocator cache, no earlier peak): `VmHWM`
    after the call minus `VmRSS` right before it, the peak reset in between. Not `ru_maxrss`: Linux
    carries it across fork and exec, so the child would report the parent's peak (this benchmark's,
    several GiB). Returns (bytes, whether the peak could be reset)."""
    cmd = [sys.executable, "-c", _RSS_SCRIPT, str(torch.get_num_threads()), variant, *map(str, shape)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": path})
    kib, exact = res.stdout.split()[-2:]
    return int(kib) * 1024, exact == "1"


def _cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak CUDA memory allocated during `fn()`, above what was in use before it."""
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _triton_runs(device: torch.device) -> bool:
    """Whether `lens_stats(..., backend="triton")` can run here: a CUDA device and the `triton` package."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _lens_rows(name: str, device: torch.device, shape: tuple[int, int, int, int],
               repeats: int) -> tuple[list[Row], dict[str, tuple[float, float]]]:
    """Check every backend against the naive lens, then time them and measure their peak memory.
    Returns the rows and `{backend: (time ratio naive/backend, peak ratio naive/backend)}`."""
    from course_utils.lens import lens_stats_reference

    layers, n, d, vocab = shape
    normed, W_U, targets = _lens_inputs(*shape, device)
    variants = ["naive", "reference"] + (["triton"] if _triton_runs(device) else [])
    fns = {v: partial(_lens_fn(v), normed, W_U, targets) for v in variants}
    label = f"{device.type}, L+1={layers} N={n:,} d={d} V={vocab:,}"
    out = _warm(fns)
    ref = lens_stats_reference(normed, W_U, targets=targets, k=5)
    rows = [Row(name, f"{label}: naive logits", f"{layers * n * vocab * 4 / 2**30:.2f} GiB",
                "float32 [L+1, N, V], materialised by the naive lens only"),
            _lens_agree(name, label, "lens_stats_reference", out["naive"], ref)]
    rows += [_lens_agree(name, label, v, out["naive"], out[v]) for v in variants[2:]]
    del out, ref
    runs = _time(fns, device, repeats)
    if device.type == "cuda":
        peaks = {v: _cuda_peak_bytes(fns[v], device) for v in variants}
        how = "torch.cuda.max_memory_allocated above the memory in use before the call"
    else:
        measured = {v: _cpu_peak_bytes(v, shape) for v in variants}
        peaks = {v: b for v, (b, _) in measured.items()}
        how = "peak RSS of the call in a fresh process: VmHWM after - VmRSS before" + (
            ", peak reset before the call" if all(e for _, e in measured.values()) else " (peak not resettable)")
    ratios = {}
    for v in variants[1:]:
        t = statistics.median(runs["naive"]) / statistics.median(runs[v])
        m = peaks["naive"] / max(peaks[v], 1)
        ratios[v] = (t, m)
        rows += [Row(name, f"{label}: naive time / {v}", f"{t:.2f}x", _runs_note({k: runs[k] for k in ("naive", v)})),
                 Row(name, f"{label}: naive peak memory / {v}", f"{m:.1f}x",
                     f"naive {peaks['naive'] / 2**20:,.0f} MiB, {v} {peaks[v] / 2**20:,.0f} MiB; {how}")]
    return rows, ratios


@section("lens")
def bench_lens(args: argparse.Namespace) -> list[Row]:
    """`lens_stats` backends against a naive lens that builds the `[L+1, N, V]` logits: time and
    peak memory. SmolLM2-135M shapes (L+1=31, d=576, V=49152), N=128 on CPU, 2048 on GPU."""
    name, out = "lens", []
    _emit(out, _machine_rows(name, torch.device("cpu")))
    last: tuple[str, str, tuple[float, float]] | None = None
    for device in _devices():
        if device.type == "cuda":
            _emit(out, _machine_rows(name, device)[2:])
        # --small: N=256 keeps the naive logits (5 MB) well above the allocator's reuse of freed
        # pages, so the peak-memory ratio is measurable (at N=16 it read 0 KiB on a CI machine)
        n = 256 if args.small else (128 if device.type == "cpu" else 2048)
        shape = (5, n, 32, 1000) if args.small else (31, n, 576, 49152)
        rows, ratios = _lens_rows(name, device, shape, args.repeats)
        _emit(out, rows)
        fused = "triton" if "triton" in ratios else "reference"
        last = (device.type, fused, ratios[fused])
    dev, fused, (t, m) = last
    small = " (--small shapes)" if args.small else ""
    _emit(out, [_goal(name, "fused lens <= 1/8 of the naive peak memory", m >= 8,
                      f"{dev}, {fused}: {m:.1f}x less{small}"),
                _goal(name, ">=1.5x faster on a GPU", t >= 1.5 if dev == "cuda" else None,
                      f"{dev}, {fused}: {t:.2f}x{small}", "not measured (no GPU)")])
    return out


# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: sections, `--repeats`, `--threads`, `--small` (checked against `SECTIONS`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"sections to run (default: all): {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timing (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes (gradcam, monge, leace, lens): a smoke test in seconds, not a measurement")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections (default: all), printing the table as it goes."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_rows([], header=True)
    for name in args.sections or list(SECTIONS):
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
