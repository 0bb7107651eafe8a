"""The learning-rate sweep of benchmarks/fixnorm_vs_wd.py as one table (arms x lr), from finished runs only.

    python benchmarks/_lr_sweep_table.py --runs runs/lrsweep runs/screen1 --seeds 0 1 2 --name fixnorm_vs_wd_lr_sweep
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

LABELS = {"sgd": "SGD + WD (wd 5e-4)", "fixnorm-init": "held at initial norms", "free25": "free 25 steps",
          "free100": "free 100 steps, lr_power 1", "free100_lr_power0.5": "free 100 steps, lr_power 0.5 (default)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="folders of fixnorm_vs_wd.py runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--default-lr", type=float, default=0.1, help="lr of runs without _lr in their name")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    accs: dict[tuple[str, float], dict[int, float]] = {}
    for folder in args.runs:
        for summary in Path(folder).glob("*/summary.json"):
            match = re.fullmatch(r"(.+?)(?:_lr([\d.]+))?-s(\d+)", summary.parent.name)
            if not match or match.group(1) not in LABELS or int(match.group(3)) not in args.seeds:
                continue
            lr = float(match.group(2) or args.default_lr)
            accs.setdefault((match.group(1), lr), {})[int(match.group(3))] = \
                100 * json.loads(summary.read_text())["final_test_acc"]
    lrs = sorted({lr for _, lr in accs})
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for arm, label in LABELS.items():
        cells = []
        for lr in lrs:
            values = list(accs.get((arm, lr), {}).values())
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.2f}{spread} ({len(values)})" if values else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + (f"\n\nMean ± std of the final accuracy (%) over seeds (count in brackets), on the "
                               f"runs' evaluation set. "
                               f"Command: `python benchmarks/_lr_sweep_table.py {' '.join(sys.argv[1:])}`\n")
    print(text)
    if args.name:
        _common.atomic_write_text(os.path.join(_common.RESULTS_DIR, f"{args.name}.md"), f"# {args.name}\n\n{text}")


if __name__ == "__main__":
    main()
