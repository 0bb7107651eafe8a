"""How far each arm's scale-invariant weights turn per step, epoch by epoch, against a reference arm.

Reads finished runs trained with ``diagnostics=true`` (their ``metrics.csv``: per layer the mean angle per step
over the epoch, ``diag/invariant/<name>/angle``, and the norm at the epoch's end, ``.../norm``) and prints per
epoch the scheduler's lr and, per arm, the geometric mean over the scale-invariant layers of that angle (averaged
in the log over the arm's seeds), its ratio to the reference arm's, the same ratio for the layers' norms, and the
mean test accuracy. Runs are grouped into arms by their folder name without the
``-s<seed>`` suffix (``benchmarks/fixnorm_vs_wd.py``'s layout); the first arm given is the reference::

    python benchmarks/angle_schedule.py runs/speed sgd fixnorm fixnorm_drift_follows_lrtrue --name angles_speed

``--thresholds 93.5 94.0`` adds, per arm and seed, the first epoch whose test accuracy reaches each threshold.

Under SGD + weight decay the angle per step follows the square root of the lr while the norms can keep up with
their equilibrium and the lr itself once they cannot (late in a decaying schedule); this shows which law an arm
follows, and where.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write_text  # noqa: E402  (importing _common puts src/ on the path from a checkout)
from fixnorm.errors import FixNormError  # noqa: E402


Epoch = tuple[float, float, float, float]  # lr, angle per step, norm (geometric means over the layers), accuracy %


def _geometric_mean(row: dict[str, str], suffix: str, path: Path) -> float:
    values = [float(v) for k, v in row.items() if k.startswith("diag/invariant/") and k.endswith(suffix)]
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise FixNormError(f"{path} has no usable per-layer {suffix[1:]}s at epoch {row.get('epoch')}: train the run "
                           "with --set diagnostics=true")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def epoch_angles(run: Path) -> list[Epoch]:
    """(lr, geometric means over the scale-invariant layers of the angle per step and of the norm, test accuracy %)
    per epoch of one run."""
    path = run / "metrics.csv"
    if not path.is_file():
        raise FixNormError(f"{run} has no metrics.csv: is it a finished run folder?")
    rows = list(csv.DictReader(path.open()))
    return [(float(row["lr"]), _geometric_mean(row, "/angle", path), _geometric_mean(row, "/norm", path),
             100 * float(row["test_acc"])) for row in rows]


def arm_runs(runs_dir: Path, arms: list[str]) -> dict[str, list[list[Epoch]]]:
    """Per arm, per seed (in seed order), the epochs' (lr, angle, norm, accuracy)."""
    per_arm: dict[str, list[list[Epoch]]] = {}
    for arm in arms:
        runs = sorted((p for p in runs_dir.glob(f"{arm}-s*") if p.name[len(arm) + 2:].isdigit()),
                      key=lambda p: int(p.name[len(arm) + 2:]))
        if not runs:
            raise FixNormError(f"no runs {runs_dir}/{arm}-s<seed>")
        per_arm[arm] = [epoch_angles(r) for r in runs]
    return per_arm


def angle_table(per_arm: dict[str, list[list[Epoch]]]) -> str:
    arms = list(per_arm)
    epochs = min(len(e) for seeds in per_arm.values() for e in seeds)
    head = "| epoch | lr | " + " | ".join(
        f"{a} angle (n={len(per_arm[a])}) | ratio | norm ratio | acc" for a in arms) + " |"
    lines = [head, "|" + "---|" * (2 + 4 * len(arms))]
    for e in range(epochs):
        cells, reference = [], None
        for arm in arms:
            seeds = per_arm[arm]
            angle, norm = (math.exp(sum(math.log(s[e][i]) for s in seeds) / len(seeds)) for i in (1, 2))
            acc = sum(s[e][3] for s in seeds) / len(seeds)
            reference = (angle, norm) if reference is None else reference
            cells += [f"{angle:.2e}", f"{angle / reference[0]:.2f}", f"{norm / reference[1]:.2f}", f"{acc:.2f}"]
        lines.append(f"| {e + 1} | {per_arm[arms[0]][0][e][0]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossing_table(per_arm: dict[str, list[list[Epoch]]], thresholds: list[float]) -> str:
    """Per arm and threshold: the first epoch each seed reaches it ("-": never), and their mean over the seeds that
    did."""
    lines = ["| arm | threshold (%) | first epoch reaching it, per seed | mean |", "|---|---|---|---|"]
    for arm, seeds in per_arm.items():
        for t in thresholds:
            firsts = [next((e + 1 for e, epoch in enumerate(s) if epoch[3] >= t), None) for s in seeds]
            reached = [f for f in firsts if f is not None]
            mean = f"{sum(reached) / len(reached):.2f}" + ("" if len(reached) == len(firsts) else
                                                           f" ({len(reached)}/{len(firsts)} seeds)") if reached else "-"
            lines.append(f"| {arm} | {t:g} | {', '.join('-' if f is None else str(f) for f in firsts)} | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("arms", nargs="+", help="folder names without -s<seed>; the first is the reference")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="test accuracies (%%): the first epoch each run reaches them")
    parser.add_argument("--name", help="also write benchmarks/results/<name>.md")
    args = parser.parse_args(argv)
    per_arm = arm_runs(args.runs_dir, args.arms)
    table = angle_table(per_arm)
    if args.thresholds:
        table += "\n\n" + crossing_table(per_arm, args.thresholds)
    print(table)
    if args.name:
        command = "python benchmarks/angle_schedule.py " + " ".join(sys.argv[1:])
        text = (f"# Angle per step by epoch\n\nGeometric mean over the scale-invariant layers of the mean angle per "
                f"step (radians), averaged over seeds in the log; ratio to `{args.arms[0]}`; norm ratio: the same "
                f"geometric mean of the layers' norms at the epoch's end, over `{args.arms[0]}`'s.\n\n{table}\n\n"
                f"Command: `{command}`\n")
        atomic_write_text(Path(__file__).resolve().parent / "results" / f"{args.name}.md", text)


if __name__ == "__main__":
    main()
