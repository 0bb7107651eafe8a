"""Measure FixNorm's reconstructed defaults on Fashion-MNIST: granularity, target, classifier norm.

The paper's full text is not available to us, so these choices are ours; this script is the evidence
behind the defaults in docs/fixnorm.md. Each variant trains the small CNN for one epoch
(recipe `fmnist-small-cnn`, same data order and augmentation per seed) and reports test accuracy,
mean +- std over seeds.

    python benchmarks/defaults_ablation.py [--seeds 0 1] [--train-subset N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fixnorm.train import load_recipe, make_config, train
from fixnorm.io import write_json_atomic, write_text_atomic

VARIANTS = {
    "default (tensor, initial, fc initial)": {},
    "granularity=filter": {"granularity": "filter"},
    "target_norm=1.0 per tensor": {"target_norm": 1.0},
    "fc_norm=2": {"fc_norm": 2.0},
    "fc_norm=8": {"fc_norm": 8.0},
    "fc_norm=8, per class": {"fc_norm": 8.0, "fc_granularity": "class"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--runs", default="runs/defaults_ablation", help="run directories (must not exist yet)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "defaults_ablation"))
    args = parser.parse_args()
    rows = []
    for name, options in VARIANTS.items():
        accs = []
        for seed in args.seeds:
            cfg = make_config(load_recipe("fmnist-small-cnn"), options,
                              {"seed": seed, "train_subset": args.train_subset, "method": "fixnorm"})
            summary = train(cfg, Path(args.runs) / f"{len(rows)}-s{seed}")
            accs.append(summary["final_test_acc"])
            print(f"{name} seed {seed}: test accuracy {accs[-1]:.4f} ({summary['train_seconds']:.0f} s)", flush=True)
        rows.append({"variant": name, "options": options, "accuracies": accs, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    for row in rows:
        print(f"{row['variant']}: {row['mean']:.4f} +- {row['std']:.4f}")
    meta = {"command": " ".join([sys.executable] + sys.argv), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(args.out + ".json", {"meta": meta, "rows": rows})
    lines = ["| variant | test accuracy (mean +- std) | per seed |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['mean']:.4f} +- {r['std']:.4f} | {', '.join(f'{a:.4f}' for a in r['accuracies'])} |"
              for r in rows]
    lines.append(f"\nCommand: `{meta['command']}` (torch {meta['torch']}, {meta['cpus']} CPUs, {meta['date']}); "
                 "recipe `fmnist-small-cnn`: one epoch, small CNN, FixNorm(SGD Nesterov 0.9), lr 0.2 cosine, batch 128.")
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
