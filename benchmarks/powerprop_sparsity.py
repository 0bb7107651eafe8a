"""Powerpropagation vs plain training: test accuracy after one-shot global magnitude pruning, no fine-tuning.

Trains the small CNN on Fashion-MNIST (recipe `fmnist-small-cnn`: SGD Nesterov 0.9, lr 0.2 cosine,
batch 128, weight decay 5e-4 on v, crop augmentation) with method `powerprop` for each alpha
(alpha = 1 is the plain network, bit for bit the `sgd` baseline), then zeroes the smallest-|w|
fraction of all conv and linear weights together (`magnitude_prune_(scope="global")`, ranked by the
effective weight w) and evaluates on the test set, BatchNorm statistics left as trained.

    flock /tmp/fixnorm-cpu.lock python benchmarks/powerprop_sparsity.py [--alphas 1 2 3] [--seeds 0] [--epochs 1]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from fixnorm.methods.powerprop import magnitude_prune_
from fixnorm.train import Trainer, load_recipe, make_config
from fixnorm.io import write_json_atomic, write_text_atomic

SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98]


@torch.no_grad()
def small_weight_fraction(model: torch.nn.Module) -> float:
    """Fraction of effective conv/linear weights below 10% of their layer's RMS: the mass near zero."""
    small = total = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach()
            small += int((w.abs() < 0.1 * w.pow(2).mean().sqrt()).sum())
            total += w.numel()
    return small / total


def markdown(meta: dict, table: list[dict], sparsities: list[float]) -> str:
    """The accuracy-vs-sparsity table, one row per alpha, and how it was made."""
    headers = ["alpha", "seeds"] + [f"{s:.0%}" for s in sparsities] + ["weights below 0.1 x layer RMS"]
    lines = ["Test accuracy after one-shot global magnitude pruning (no fine-tuning), mean over seeds.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for t in table:
        cells = [f"{t['alpha']:g}", ",".join(map(str, t["seeds"]))]
        cells += [f"{t['mean_accuracy'][f'{s:g}']:.4f}" for s in sparsities]
        cells.append(f"{t['small_weight_fraction']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nCommand: `{meta['command']}` (torch {meta['torch']}, {meta['cpus']} CPUs, {meta['date']}). "
                 f"Recipe `fmnist-small-cnn` with method `powerprop`: small CNN (width 32), {meta['epochs']} "
                 "epoch(s), SGD Nesterov 0.9, lr 0.2 cosine, batch 128, weight decay 5e-4 on v, crop augmentation; "
                 "sparsity is the fraction of all conv and linear weights set to zero (global ranking by |w|); "
                 "BatchNorm statistics are not recalibrated after pruning. Last column: fraction of the weights "
                 "whose magnitude is below 0.1 x their layer's RMS, before pruning.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (1)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--runs", default="runs/powerprop_sparsity", help="run directories (must not exist yet)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "powerprop_sparsity"))
    args = parser.parse_args()
    base = load_recipe("fmnist-small-cnn")
    epochs = args.epochs or base["epochs"]
    results = []
    for alpha in args.alphas:
        for seed in args.seeds:
            cfg = make_config(base, {"method": "powerprop", "method_kwargs": {"powerprop": {"alpha": alpha}},
                                     "seed": seed, "epochs": epochs, "train_subset": args.train_subset})
            trainer = Trainer(cfg, Path(args.runs) / f"alpha{alpha:g}-s{seed}")
            summary = trainer.fit()
            row = {"alpha": alpha, "seed": seed, "train_seconds": summary["train_seconds"],
                   "small_weight_fraction": small_weight_fraction(trainer.model), "accuracy": {}, "achieved": {}}
            print(f"alpha {alpha:g} seed {seed}: trained, test accuracy {summary['final_test_acc']:.4f} "
                  f"({summary['train_seconds']:.0f} s)", flush=True)
            for sparsity in args.sparsities:
                pruned = copy.deepcopy(trainer.model)
                achieved = magnitude_prune_(pruned, sparsity, scope="global")["overall"]
                acc = trainer.evaluate(pruned)[1]
                row["accuracy"][f"{sparsity:g}"], row["achieved"][f"{sparsity:g}"] = acc, achieved
                print(f"alpha_{alpha:g}_seed_{seed}_sparsity_{sparsity:g}_test_acc: {acc:.4f}", flush=True)
            results.append(row)

    table = []
    for alpha in args.alphas:
        rows = [r for r in results if r["alpha"] == alpha]
        means = {f"{s:g}": statistics.mean(r["accuracy"][f"{s:g}"] for r in rows) for s in args.sparsities}
        small = statistics.mean(r["small_weight_fraction"] for r in rows)
        table.append({"alpha": alpha, "seeds": [r["seed"] for r in rows], "mean_accuracy": means,
                      "small_weight_fraction": small})
        for s in args.sparsities:
            print(f"alpha_{alpha:g}_sparsity_{s:g}_test_acc: {means[f'{s:g}']:.4f}")
        print(f"alpha_{alpha:g}_small_weight_fraction: {small:.4f}")
    if 1.0 in args.alphas:
        plain = next(t for t in table if t["alpha"] == 1.0)
        for t in table:
            if t["alpha"] != 1.0:
                for s in args.sparsities:
                    diff = t["mean_accuracy"][f"{s:g}"] - plain["mean_accuracy"][f"{s:g}"]
                    print(f"alpha_{t['alpha']:g}_minus_alpha_1_sparsity_{s:g}: {diff:+.4f}")

    command = " ".join(["flock /tmp/fixnorm-cpu.lock python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
    meta = {"command": command, "recipe": "fmnist-small-cnn", "epochs": epochs, "train_subset": args.train_subset,
            "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(args.out + ".json", {"meta": meta, "runs": results, "table": table})
    write_text_atomic(args.out + ".md", markdown(meta, table, args.sparsities))


if __name__ == "__main__":
    main()
