"""The figure of ``docs/related-methods.md``: weight decay and its alternatives, from the committed result tables.

Left: final accuracy against the learning rate on ``fmnist-tune`` (one tuning seed, each method at its other
defaults): how wide each method's good range is. Right: each method's paired difference to SGD + WD with its 95%
interval, per setting (defaults, each tuned on the left panel's sweep, 10 epochs, ResNet-20).

    python benchmarks/weight_decay_alternatives_figure.py   # reads benchmarks/results/weight_decay_alternatives_*.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FIGURE = Path(__file__).parent.parent / "docs" / "weight_decay_alternatives.png"
METHODS = ["sgd", "fixnorm", "lawn", "sal", "pathprox"]
LABELS = {"sgd": "SGD + WD", "fixnorm": "FixNorm", "lawn": "LAWN", "sal": "SAL", "pathprox": "PathProx"}
COLORS = {method: f"C{i}" for i, method in enumerate(METHODS)}  # one colour per method in both panels
# (result name, label of the setting on the right panel)
SETTINGS = [("weight_decay_alternatives_fmnist_tune", "small CNN, defaults"),
            ("weight_decay_alternatives_fmnist_tune_tuned", "small CNN, each tuned"),
            ("weight_decay_alternatives_fmnist_tune_10epochs", "small CNN, 10 epochs"),
            ("weight_decay_alternatives_resnet20", "ResNet-20, defaults")]
SWEEP = "weight_decay_alternatives_fmnist_tune_lr"


def method_of(arm: str) -> str:
    return arm.split(":", 1)[0]


def lr_of(arm: str) -> float | None:
    found = re.search(r"lr=([0-9.e-]+)", arm)
    return float(found.group(1)) if found else None


def main() -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (sweep_ax, delta_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    sweep_path = RESULTS / f"{SWEEP}.json"
    if sweep_path.exists():
        rows = json.loads(sweep_path.read_text())["rows"]
        for method in METHODS:
            points = sorted((lr_of(r["arm"]), r["mean"]) for r in rows
                            if method_of(r["arm"]) == method and lr_of(r["arm"]) is not None)
            if points:
                sweep_ax.plot(*zip(*points), marker="o", label=LABELS[method], color=COLORS[method])
        lrs = sorted({lr_of(r["arm"]) for r in rows if lr_of(r["arm"]) is not None})
        sweep_ax.set_xscale("log")
        sweep_ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        sweep_ax.minorticks_off()
        sweep_ax.set_xlabel("learning rate")
        sweep_ax.set_ylabel("final accuracy (%)")
        sweep_ax.set_ylim(bottom=max(min(r["mean"] for r in rows) - 1, 78))  # a diverged run falls off
        sweep_ax.set_title("fmnist-tune (small CNN, 3 epochs), tuning seed 100")
        sweep_ax.legend()
    settings = [(name, label) for name, label in SETTINGS if (RESULTS / f"{name}.json").exists()]
    width = 0.8 / max(len(METHODS) - 1, 1)
    for k, method in enumerate(METHODS[1:]):
        xs, ys, lows, highs = [], [], [], []
        for i, (name, _) in enumerate(settings):
            rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
            row = next((r for r in rows if method_of(r["arm"]) == method and "diff" in r), None)
            if row is not None:
                xs.append(i + (k - 1.5) * width)
                ys.append(row["diff"])
                lows.append(row["diff"] - row["ci"][0])
                highs.append(row["ci"][1] - row["diff"])
        delta_ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=3, label=LABELS[method],
                          color=COLORS[method])
    delta_ax.axhline(0, color="grey", lw=1)
    delta_ax.set_xticks(range(len(settings)), [label for _, label in settings], rotation=15)
    delta_ax.set_ylabel("Δ accuracy vs SGD + WD (points, paired, 95% CI)")
    delta_ax.set_title("paired differences to SGD + weight decay")
    delta_ax.legend()
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)
    print(f"figure: {FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
