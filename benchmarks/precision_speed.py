#!/usr/bin/env python
"""bf16 autocast against fp32 on this machine: one training step of each model, side by side.

What ``precision=auto`` decides (``fixnorm.train.config.native_precision``): bf16 where the device computes it
natively, fp32 elsewhere. This measures whether that decision is the fast one here: the same step (forward,
backward, SGD step; batch 128 of 28x28 grey images, channels_last as the recipes train) in both precisions,
interleaved in rounds so a slow spell of the machine lands on both; the ratio is the median of per-round ratios.

    python benchmarks/precision_speed.py                      # fast_cnn, small_cnn, resnet20
    python benchmarks/precision_speed.py --models fast_cnn --rounds 3 --no-write

Writes ``benchmarks/results/precision_speed.{md,json}`` (one machine's numbers: the CPU is in the file).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fixnorm.models import create_model  # noqa: E402
from fixnorm.train.config import native_precision  # noqa: E402

from _common import (RESULTS_DIR, add_timing_arguments, atomic_write_json, atomic_write_text,  # noqa: E402
                     command_line, interleaved_rounds, machine_info, markdown_table, median, paired_ratios)


def training_step(model_name: str, bf16: bool, batch: int = 128, **model_kwargs: Any) -> Callable[[], None]:
    """One SGD step of a fresh model in fp32 or under bf16 autocast, on fixed random images."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_channels=1, **model_kwargs)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with context:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["fast_cnn", "small_cnn", "resnet20"])
    add_timing_arguments(ap, rounds=5, repeat=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows, results = [], {}
    for name in args.models:
        samples = interleaved_rounds({"fp32": training_step(name, False), "bf16": training_step(name, True)},
                                     rounds=args.rounds, repeat=args.repeat, device=device, warmup=1)
        ratios = paired_ratios(samples["bf16"], samples["fp32"])
        results[name] = {"fp32_ms": 1e3 * median(samples["fp32"]), "bf16_ms": 1e3 * median(samples["bf16"]),
                         "bf16_over_fp32": median(ratios), "ratios": ratios}
        rows.append([name, f"{results[name]['fp32_ms']:.1f}", f"{results[name]['bf16_ms']:.1f}",
                     f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"])
        print(rows[-1], flush=True)
    verdict = native_precision("cpu")
    capability = torch.backends.cpu.get_cpu_capability()
    table = markdown_table(["model", "fp32 step (ms)", "bf16 step (ms)", "bf16 / fp32 (median, range over rounds)"],
                           rows)
    text = (f"# bf16 autocast against fp32, one training step (batch 128, channels_last, {args.threads} threads)\n\n"
            f"`{command_line()}`\n\nCPU capability: {capability}; `precision=auto` picks **{verdict}** here.\n\n"
            f"{table}\n")
    print(text)
    if not args.no_write:
        info = machine_info(device) | {"cpu_capability": capability, "auto_precision": verdict}
        atomic_write_json(os.path.join(RESULTS_DIR, "precision_speed.json"),
                          {"command": command_line(), "machine": info, "results": results})
        atomic_write_text(os.path.join(RESULTS_DIR, "precision_speed.md"), text)


if __name__ == "__main__":
    main()
