#!/usr/bin/env python
"""`fast_cnn` with each block's first convolution pooled before its BN and ReLU (``pool_first=True``, airbench's
order) against the default layout: one training step and one test-time-flip evaluation batch, side by side.

Both layouts have the same parameters; pooling first runs the BN and ReLU of three of the six convolutions at a
quarter of the pixels. Steps as the speedrun recipes train them (batch 128 of 28x28 grey images, channels_last,
bf16 autocast where ``precision=auto`` picks it, SGD), interleaved in rounds so a slow spell of the machine lands
on both; each ratio is the median of per-round ratios (pool-first over default: below 1 is faster).

    python benchmarks/fast_cnn_layout_speed.py                 # 2 threads, writes the results file
    python benchmarks/fast_cnn_layout_speed.py --rounds 3 --no-write

Writes ``benchmarks/results/fast_cnn_layout_speed.{md,json}`` (one machine's numbers: the CPU is in the file).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from fixnorm.models import create_model  # noqa: E402
from fixnorm.train.config import native_precision  # noqa: E402

from _common import (RESULTS_DIR, add_timing_arguments, atomic_write_json, atomic_write_text,  # noqa: E402
                     command_line, interleaved_rounds, machine_info, markdown_table, median, paired_ratios)
from precision_speed import training_step  # noqa: E402


def flip_evaluation(bf16: bool, pool_first: bool, batch: int = 500) -> Callable[[], None]:
    """One evaluation batch as ``eval_flip`` scores it: the logits of the images and of their mirrors."""
    torch.manual_seed(0)
    model = create_model("fast_cnn", num_classes=10, in_channels=1, pool_first=pool_first).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 28, 28).to(memory_format=torch.channels_last)

    @torch.no_grad()
    def evaluate() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            (model(x).float() + model(x.flip(-1)).float()) / 2
    return evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(ap, rounds=8, repeat=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    bf16 = native_precision("cpu") == "bf16"
    rows, results = [], {}
    for what, make in (("training step (batch 128)", lambda pf: training_step("fast_cnn", bf16, pool_first=pf)),
                       ("flip evaluation (batch 500)", lambda pf: flip_evaluation(bf16, pf))):
        samples = interleaved_rounds({"default": make(False), "pool_first": make(True)},
                                     rounds=args.rounds, repeat=args.repeat, device=device, warmup=1)
        ratios = paired_ratios(samples["pool_first"], samples["default"])
        results[what] = {"default_ms": 1e3 * median(samples["default"]),
                         "pool_first_ms": 1e3 * median(samples["pool_first"]),
                         "pool_first_over_default": median(ratios), "ratios": ratios}
        rows.append([what, f"{results[what]['default_ms']:.1f}", f"{results[what]['pool_first_ms']:.1f}",
                     f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"])
        print(rows[-1], flush=True)
    table = markdown_table(["what", "default (ms)", "pool_first (ms)", "pool_first / default (median, range)"], rows)
    text = (f"# `fast_cnn` layouts: pooling before BN and ReLU ({args.threads} threads, "
            f"{'bf16' if bf16 else 'fp32'}, channels_last)\n\n`{command_line()}`\n\n"
            f"CPU capability: {torch.backends.cpu.get_cpu_capability()}.\n\n{table}\n")
    print(text)
    if not args.no_write:
        info = machine_info(device) | {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                       "precision": "bf16" if bf16 else "fp32"}
        atomic_write_json(os.path.join(RESULTS_DIR, "fast_cnn_layout_speed.json"),
                          {"command": command_line(), "machine": info, "results": results})
        atomic_write_text(os.path.join(RESULTS_DIR, "fast_cnn_layout_speed.md"), text)


if __name__ == "__main__":
    main()
