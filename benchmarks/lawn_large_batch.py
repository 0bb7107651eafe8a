"""Large-batch Adam on Fashion-MNIST: LAWN-Adam vs Adam vs AdamW vs FixNorm(Adam), through the engine.

Every arm trains the small CNN (recipe `fmnist-small-cnn`) with the same data order, augmentation,
batch size, learning rate and schedule per seed; only the method differs:

  adam          method adamw, weight_decay 0 (AdamW without decay is Adam)
  adamw         method adamw, weight_decay --adamw-wd on weights (decoupled), none on biases / BN
  fixnorm-adam  method fixnorm, base adam: BN-invariant convs and the classifier at their initial norms
  lawn-adam     method lawn, base adam, no weight decay anywhere (the ICLR-2022 version of LAWN):
                free for --lawn-warmup epochs, then the final homogeneous sub-network (here the
                classifier) held at its norm at the end of the warm-up

    python benchmarks/lawn_large_batch.py [--seeds 0] [--epochs 3] [--batch-size 1024] [--lr 0.003]

A finished run is reused and an interrupted one resumed (each only if trained with the same settings), so a
killed benchmark picks up where it stopped. Prints `name: value` lines and writes results/lawn_large_batch.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write_json, atomic_write_text, command_line, load_average, machine_info  # noqa: E402

import torch  # noqa: E402

from fixnorm.train import load_recipe, make_config  # noqa: E402
from fixnorm.train.engine import train_or_reuse  # noqa: E402


def arms(adamw_wd: float, lawn_warmup: float) -> dict[str, dict[str, Any]]:
    return {
        "adam": {"method": "adamw", "weight_decay": 0.0},
        "adamw": {"method": "adamw", "weight_decay": adamw_wd},
        "fixnorm-adam": {"method": "fixnorm", "base": "adam"},
        "lawn-adam": {"method": "lawn", "base": "adam", "weight_decay": 0.0,
                      "method_kwargs": {"lawn": {"warmup_epochs": lawn_warmup}}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's lr for every arm (1e-3 at batch 128, x sqrt(8))")
    parser.add_argument("--adamw-wd", type=float, default=0.05)
    parser.add_argument("--lawn-warmup", type=float, default=1.0, help="LAWN's free epochs")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/lawn_large_batch")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lawn_large_batch"))
    args = parser.parse_args()

    common = dict(load_recipe("fmnist-small-cnn"), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  warmup_epochs=0.5, schedule="cosine", threads=args.threads, train_subset=args.train_subset)
    variants = arms(args.adamw_wd, args.lawn_warmup)
    runs = []
    for name, options in variants.items():
        for seed in args.seeds:
            run_dir = Path(args.runs) / f"{name}-b{args.batch_size}-e{args.epochs}-s{seed}"
            summary = train_or_reuse(make_config(common, options, {"seed": seed}), run_dir)  # a reused one is checked
            metrics = (run_dir / "metrics.csv").read_text().strip().splitlines()
            runs.append({"arm": name, "seed": seed, "run_dir": str(run_dir), "final_test_acc": summary["final_test_acc"],
                         "best_test_acc": summary["best_test_acc"], "final_train_loss": summary["final_train_loss"],
                         "train_seconds": summary["train_seconds"], "metrics_csv": metrics})
            print(f"{name} seed {seed}: final test acc {summary['final_test_acc']:.4f}, train loss "
                  f"{summary['final_train_loss']:.4f} ({summary['train_seconds']:.0f} s)", flush=True)

    rows = []
    for name in variants:
        mine = [r for r in runs if r["arm"] == name]
        accs = [r["final_test_acc"] for r in mine]
        losses = [r["final_train_loss"] for r in mine]
        rows.append({"arm": name, "settings": variants[name], "runs": len(mine), "final_test_acc_mean": statistics.mean(accs),
                     "final_test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "final_train_loss_mean": statistics.mean(losses),
                     "seconds_per_run": statistics.mean(r["train_seconds"] for r in mine), "per_seed": accs})
    base = next(r for r in rows if r["arm"] == "adam")["final_test_acc_mean"]
    for r in rows:
        print(f"{r['arm']}: {r['final_test_acc_mean']:.4f} (vs adam {100 * (r['final_test_acc_mean'] - base):+.2f} points)")
    meta = {"command": command_line(), "machine": machine_info(torch.device("cpu")), "loadavg_at_end": load_average(),
            "common_settings": common}
    atomic_write_json(args.out + ".json", {"meta": meta, "rows": rows, "runs": runs})
    lines = ["| arm | settings | runs | final test acc (%) | final train loss | per seed | s / run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        shown = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(f"| {r['arm']} | {shown} | {r['runs']} | {100 * r['final_test_acc_mean']:.2f} ± "
                     f"{100 * r['final_test_acc_std']:.2f} | {r['final_train_loss_mean']:.4f} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in r['per_seed'])} | {r['seconds_per_run']:.0f} |")
    lines.append(f"\nCommand: `{meta['command']}` (torch {torch.__version__}, {meta['machine']['cpu_count']} CPUs, "
                 f"{meta['machine']['date']}). Common: small CNN (width 32), Fashion-MNIST 60k/10k, {args.epochs} "
                 f"epochs, batch {args.batch_size}, Adam lr {args.lr} (betas 0.9/0.999), 0.5-epoch linear LR warm-up "
                 "then cosine, random-crop augmentation (pad 2). Mean ± std over seeds (std 0 with one seed).")
    atomic_write_text(args.out + ".md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
