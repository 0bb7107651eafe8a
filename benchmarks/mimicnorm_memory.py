#!/usr/bin/env python
"""Training memory of ResNet-20 with BatchNorm versus its MimicNorm form, side by side in one run.

The MimicNorm paper (Wen et al., AAAI 2021) reports about 20% less GPU memory than BN training:
a BN layer keeps its input for the backward pass, and MimicNorm keeps one BN (on the logits).

One training step each (zero_grad, forward, cross-entropy, backward, SGD step; the MimicNorm
model with its filter centring attached), batch 128 of 1x28x28 (Fashion-MNIST) inputs, in fp32
and under bf16 autocast, contiguous and channels_last (the ``fmnist-resnet20`` recipe's format).
A warm-up step first, so that the momentum buffers already exist, as in training. Measured:

* on the CPU, **peak memory** of the step from the profiler's memory timeline
  (``torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)`` and
  ``export_memory_timeline``): every allocation and free on the device, summed over the
  categories (parameters, gradients, optimizer state, inputs, activations, temporaries, ...);
  the peak is taken relative to the memory held before the step. On CUDA it is
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step;
* **saved activations**: the bytes of the distinct tensors autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters left out -- the part BN removal saves;
* the **time of a training step** (median of interleaved rounds; CPU timings are noisy when
  other processes share the cores).

``--runs DIR ...`` adds the accuracy of finished training runs (their config, metrics.csv and
summary.json) to the results, e.g. the BN baseline and MimicNorm on Fashion-MNIST::

    fixnorm train --recipe fmnist-resnet20 --set method=mimicnorm --run-dir runs/mimicnorm
    fixnorm train --recipe fmnist-resnet20 --set method=sgd --run-dir runs/sgd

Prints ``name: value`` lines and writes ``benchmarks/results/mimicnorm_memory.{json,md}``.

    python benchmarks/mimicnorm_memory.py --runs runs/mimicnorm runs/sgd   # about a minute on 2 CPU cores
    python benchmarks/mimicnorm_memory.py --no-write                       # print only
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fixnorm.methods.baselines import decay_groups  # noqa: E402
from fixnorm.methods.mimicnorm import attach_weight_centering, centered_weights, mimicnorm_model_  # noqa: E402
from fixnorm.models import create_model  # noqa: E402

from _common import (RESULTS_DIR, atomic_write_json, atomic_write_text, command_line,  # noqa: E402
                     interleaved_rounds, machine_info, markdown_table, median, paired_ratios, resolve_device)

MODEL, CLASSES, CHANNELS, SIZE = "resnet20", 10, 1, 28
# the columns of the profiler's memory timeline (torch.profiler._memory_profiler._CATEGORY_TO_INDEX + 1)
TIMELINE_COLUMNS = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient",
                    "autograd_detail", "unknown")


def build(kind: str, device: torch.device, channels_last: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and the optimizer the engine would build: SGD momentum 0.9, wd 5e-4 on weights."""
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=CLASSES, in_channels=CHANNELS)
    if kind == "mimicnorm":
        mimicnorm_model_(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(decay_groups(model, 5e-4), lr=0.05, momentum=0.9, nesterov=True)
    if kind == "mimicnorm":
        attach_weight_centering(opt, centered_weights(model))
    return model, opt


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              bf16: bool) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()

    return step


def cpu_peak(step: Callable[[], None]) -> dict[str, float]:
    """Peak bytes above the start of one step, from the profiler's memory timeline, and the peak per category."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # export_memory_timeline is deprecated in favour of CUDA-only tools; on the CPU it is what there is
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(row) for row in sizes]
    result = {"peak_bytes": max(totals) - totals[0], "held_before_bytes": totals[0]}
    for i, name in enumerate(TIMELINE_COLUMNS, start=1):
        result[f"{name}_peak_bytes"] = max(row[i] for row in sizes)
    return result


def cuda_peak(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before, "held_before_bytes": before}


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    del loss, logits
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def read_run(run_dir: str) -> dict[str, Any]:
    """The accuracy record of a finished training run: its settings and test accuracy per epoch."""
    import yaml

    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise SystemExit(f"--runs {run_dir}: not a finished run directory ({exc})") from exc
    keys = ("model", "dataset", "epochs", "batch_size", "lr", "weight_decay", "schedule", "precision",
            "channels_last", "seed", "method_kwargs")
    return {"run_dir": run_dir, "method": summary["method"], "final_test_acc": summary["final_test_acc"],
            "test_acc_per_epoch": [float(r["test_acc"]) for r in rows],
            "final_train_loss": summary["final_train_loss"], "seconds_per_epoch": summary["seconds_per_epoch"],
            "settings": {k: cfg.get(k) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (0: no timing)")
    ap.add_argument("--runs", nargs="*", default=[], metavar="DIR", help="finished `fixnorm train` run directories "
                    "whose accuracy goes into the results (e.g. the mimicnorm and sgd runs of fmnist-resnet20)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = ap.parse_args()
    runs = [read_run(d) for d in args.runs]
    device = resolve_device(args.device)
    info = machine_info(device)
    command = command_line()
    g = torch.Generator().manual_seed(1)
    x_cpu = torch.randn(args.batch, CHANNELS, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g).to(device)
    method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory timeline"

    rows: list[dict[str, Any]] = []
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            fmt = "channels_last" if channels_last else "contiguous"
            x = x_cpu.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            steps: dict[str, Callable[[], None]] = {}
            row: dict[str, Any] = {"precision": precision, "memory_format": fmt}
            for kind in ("bn", "mimicnorm"):
                model, opt = build(kind, device, channels_last)
                step = make_step(model, opt, x, y, precision == "bf16")
                step()  # warm-up: momentum buffers exist from here on
                peak = cuda_peak(step, device) if device.type == "cuda" else cpu_peak(step)
                row[kind] = {**peak, "saved_activation_bytes": saved_activation_bytes(model, x, y, precision == "bf16")}
                steps[kind] = step
            row["peak_ratio"] = row["mimicnorm"]["peak_bytes"] / row["bn"]["peak_bytes"]
            row["saved_activation_ratio"] = (row["mimicnorm"]["saved_activation_bytes"]
                                             / row["bn"]["saved_activation_bytes"])
            if args.rounds > 0:
                samples = interleaved_rounds(steps, rounds=args.rounds, repeat=2, device=device, warmup=1)
                row["step_seconds"] = {k: median(v) for k, v in samples.items()}
                row["step_time_ratio"] = median(paired_ratios(samples["mimicnorm"], samples["bn"]))
            key = f"{precision}.{fmt}"
            mib = 2 ** 20
            print(f"{key}.bn_peak_mib: {row['bn']['peak_bytes'] / mib:.2f}")
            print(f"{key}.mimicnorm_peak_mib: {row['mimicnorm']['peak_bytes'] / mib:.2f}")
            print(f"{key}.peak_ratio: {row['peak_ratio']:.4f}")
            print(f"{key}.saved_activation_ratio: {row['saved_activation_ratio']:.4f}")
            if "step_time_ratio" in row:
                print(f"{key}.step_time_ratio: {row['step_time_ratio']:.4f}")
            rows.append(row)

    for run in runs:
        print(f"{run['method']}.final_test_acc: {run['final_test_acc']:.4f}")
    payload = {"benchmark": "mimicnorm_memory", "command": command, "machine": info, "model": MODEL,
               "input": [args.batch, CHANNELS, SIZE, SIZE], "peak_method": method, "rows": rows, "runs": runs}
    if not args.no_write:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        atomic_write_json(os.path.join(RESULTS_DIR, "mimicnorm_memory.json"), payload)
        atomic_write_text(os.path.join(RESULTS_DIR, "mimicnorm_memory.md"), markdown(payload) + "\n")


def markdown(payload: dict[str, Any]) -> str:
    mib = 2 ** 20
    info = payload["machine"]
    table = []
    for r in payload["rows"]:
        line = [r["precision"], r["memory_format"],
                f"{r['bn']['peak_bytes'] / mib:.1f}", f"{r['mimicnorm']['peak_bytes'] / mib:.1f}",
                f"{r['peak_ratio']:.3f}",
                f"{r['bn']['saved_activation_bytes'] / mib:.1f}",
                f"{r['mimicnorm']['saved_activation_bytes'] / mib:.1f}",
                f"{r['saved_activation_ratio']:.3f}"]
        if "step_seconds" in r:
            line += [f"{r['step_seconds']['bn'] * 1e3:.0f}", f"{r['step_seconds']['mimicnorm'] * 1e3:.0f}",
                     f"{r['step_time_ratio']:.3f}"]
        else:
            line += ["-", "-", "-"]
        table.append(line)
    headers = ["precision", "format", "BN peak MiB", "MimicNorm peak MiB", "peak ratio", "BN saved act. MiB",
               "MimicNorm saved act. MiB", "saved act. ratio", "BN step ms", "MimicNorm step ms", "step time ratio"]
    batch = payload["input"]
    return "\n".join([
        "# MimicNorm: training memory of ResNet-20, BN versus MimicNorm",
        "",
        f"`{payload['command']}` on {info['date']}: torch {info['torch']}, {info['cpu_count']} CPUs "
        f"({info['torch_num_threads']} torch threads), device `{info['device']}`, load average at start "
        f"{info['loadavg_at_start']}.",
        "",
        f"One training step (zero_grad, forward, cross-entropy, backward, SGD step with momentum; MimicNorm with its "
        f"filter centring), batch {batch[0]} of {batch[1]}x{batch[2]}x{batch[3]}, after one warm-up step. "
        f"*Peak* = the step's peak memory above what was held before it ({payload['peak_method']}); *saved act.* = "
        "the distinct tensors autograd saves for backward, parameters excluded; *step ms* = median over interleaved "
        "rounds, step time ratio = median of per-round MimicNorm / BN. Ratios below 1 favour MimicNorm "
        "(the paper: about 0.8 for memory).",
        "",
        markdown_table(headers, table),
    ] + runs_markdown(payload.get("runs", [])))


def runs_markdown(runs: list[dict[str, Any]]) -> list[str]:
    if not runs:
        return []
    table = [[r["method"], r["settings"]["model"], r["settings"]["epochs"], r["settings"]["seed"],
              " / ".join(f"{a:.4f}" for a in r["test_acc_per_epoch"]), f"{r['final_test_acc']:.4f}",
              f"{r['final_train_loss']:.3f}"] for r in runs]
    s = runs[0]["settings"]
    return ["", "## Accuracy on Fashion-MNIST", "",
            "Training runs read from their directories (`--runs`), each trained with "
            "`fixnorm train --recipe fmnist-resnet20 --set method=<method> --run-dir <dir>` "
            f"({s['dataset']}, batch {s['batch_size']}, lr {s['lr']} {s['schedule']}, "
            f"weight decay {s['weight_decay']}, "
            f"{s['precision']}, channels_last={s['channels_last']}); one seed each.", "",
            markdown_table(["method", "model", "epochs", "seed", "test acc. per epoch", "final test acc.",
                            "final train loss"], table)]


if __name__ == "__main__":
    main()
