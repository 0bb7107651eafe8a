"""A-FAN against its baseline: clean accuracy, the size of the feature perturbations, and the cost per epoch.

Arms (overrides of one recipe, paired seeds): ``sgd`` (the baseline), ``afan-aug`` (augmentation only: one point
at full strength, no mix), ``afan`` (four points, mix on the last two: the full method), ``afan-frozen`` (the
extra forwards leave BN statistics alone), ``afan-abs`` (step size 0.5/255 in absolute units, as released),
and under FixNorm: ``fixnorm`` and ``afan-fixnorm``. Runs are reused and resumed like ``fixnorm_vs_wd.py``
(same ``--shard``/``--table`` options); the table adds the mean L-infinity and L2 size of ``h_a - h``, the
features' RMS and seconds per epoch relative to the reference arm (run side by side, so the ratio holds):

    python benchmarks/afan.py --recipe fmnist-tune --arms sgd afan-aug afan --seeds 0-7 --out runs/afan --shard 0/2 &
    python benchmarks/afan.py ... --shard 1/2 &
    python benchmarks/afan.py ... --table --name afan_fmnist_tune
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixnorm_vs_wd as arms_runner  # noqa: E402

import _common  # noqa: E402

import torch  # noqa: E402

ARMS: dict[str, dict[str, Any]] = {
    "sgd": {"method": "sgd"},
    "afan-aug": {"method": "afan", "method_kwargs": {"afan": {"strengths": [1.0], "mixed": [False]}}},
    "afan": {"method": "afan"},
    "afan-frozen": {"method": "afan", "method_kwargs": {"afan": {"bn_mode": "frozen"}}},
    "afan-abs": {"method": "afan", "method_kwargs": {"afan": {"step_unit": "absolute"}}},
    "fixnorm": {"method": "fixnorm"},
    "afan-fixnorm": {"method": "afan", "method_kwargs": {"afan": {"optimizer": "fixnorm"}}},
}


def _last_row(run_dir: Path) -> dict[str, str]:
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def _mean_column(run_dir: Path, key: str) -> float | None:
    with (run_dir / "metrics.csv").open() as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return statistics.mean(values) if values else None


_accuracy_table = arms_runner.table


def table(args: Any) -> None:
    result = _accuracy_table(args)  # accuracy: mean ± std and the paired difference to the reference
    ref_seconds = {}
    lines = ["| arm | mean ‖h_a − h‖∞ | mean ‖h_a − h‖₂ | feature RMS | s / epoch | × reference |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        extra: dict[str, list[float]] = {"linf": [], "l2": [], "rms": [], "seconds": []}
        for seed in row["seeds"]:
            run_dir = Path(args.out) / arms_runner.run_dir_name(row["arm"], seed)
            for key, column in (("linf", "afan/linf"), ("l2", "afan/l2"), ("rms", "afan/feature_rms"),
                                ("seconds", "seconds")):
                value = _mean_column(run_dir, column)
                if value is not None:
                    extra[key].append(value)
        means = {k: statistics.mean(v) if v else None for k, v in extra.items()}
        if row["arm"] == args.reference:
            ref_seconds = means
        row.update({f"mean_{k}": v for k, v in means.items()})
    for row in result["rows"]:
        ratio = (row["mean_seconds"] / ref_seconds["seconds"]
                 if ref_seconds.get("seconds") and row["mean_seconds"] else None)
        row["cost_ratio"] = ratio
        fmt = lambda v, f: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa: E731
        lines.append(f"| {row['arm']} | {fmt(row['mean_linf'], '.4f')} | {fmt(row['mean_l2'], '.3f')} | "
                     f"{fmt(row['mean_rms'], '.3f')} | {fmt(row['mean_seconds'], '.1f')} | {fmt(ratio, '.2f')} |")
    text = "\n".join(lines)
    print(text)
    if args.name:
        path = os.path.join(_common.RESULTS_DIR, f"{args.name}.md")
        with open(path) as f:
            accuracy = f.read()
        command = "python benchmarks/afan.py " + " ".join(sys.argv[1:])
        accuracy = accuracy.replace("python benchmarks/fixnorm_vs_wd.py " + " ".join(sys.argv[1:]), command)
        _common.atomic_write_text(path, accuracy + "\n" + text + "\n\nSizes are per-sample norms averaged over "
                                  "batches and epochs; seconds per epoch averaged over epochs and seeds, the arms "
                                  "run interleaved by the same processes.\n")
        result["command"] = command
        _common.atomic_write_json(os.path.join(_common.RESULTS_DIR, f"{args.name}.json"),
                                  {**result, "machine": _common.machine_info(torch.device("cpu"))})


if __name__ == "__main__":
    arms_runner.ARMS.clear()
    arms_runner.ARMS.update(ARMS)
    arms_runner.table = table  # the shared main runs or tabulates; the table adds A-FAN's columns
    arms_runner.main()
