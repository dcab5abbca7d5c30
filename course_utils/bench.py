"""`python -m course_utils.bench [SECTION ...]`: measured figures for the course's helpers.

Each section is a function registered in `SECTIONS` (name -> function(args) -> rows). It
measures, and prints rows of `| section | figure | value | note |`. Speed is quoted as a ratio
to a baseline measured in the same run wherever there is a sensible one, since absolute times
depend on the machine (and, on a shared machine, on who else is running).

    python -m course_utils.bench              # every section
    python -m course_utils.bench train        # just the trainer
    python -m course_utils.bench train --repeats 5 --threads 1

Sections now: `train`. To add one (gradcam, monge, leace, lens), write
`@section("name") def bench_name(args) -> list[Row]` in this module.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from course_utils.config import CFG


@dataclass(frozen=True)
class Row:
    """One figure of the table."""

    section: str
    figure: str
    value: str
    note: str = ""


SECTIONS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {}


def section(name: str) -> Callable[[Callable[[argparse.Namespace], list[Row]]], Callable[[argparse.Namespace], list[Row]]]:
    """Register `fn(args) -> list[Row]` as the bench section `name`."""

    def register(fn: Callable[[argparse.Namespace], list[Row]]) -> Callable[[argparse.Namespace], list[Row]]:
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
    from course_utils.train import _widths

    widths, bs = _widths(rec["width"]), rec["batch_size"]
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
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils.bench", description=__doc__.split("\n")[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"sections to run (default: all): {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timing (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from: {', '.join(SECTIONS)}")
    chosen = args.sections or list(SECTIONS)
    print_rows([], header=True)
    for name in chosen:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
