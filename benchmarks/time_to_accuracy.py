"""Time to a test accuracy, what a user feels: wall-clock seconds from building the run to the first epoch whose
test accuracy reaches ``--target``, per arm and seed, on this machine.

Arms are those of ``fixnorm_vs_wd.py`` (``sgd``, ``fixnorm``, ``name:key=value,...``). Runs go one after the
other (never two at once: the clock is the measurement; the arms' order turns from seed to seed, so a machine whose
speed drifts lands on every arm alike), each with ``--threads`` threads, and are reused when finished (the times
are read from their records). The clock starts before the run is built (data, model, role analysis) and is read
after each epoch's evaluation, so it counts everything but Python's start-up. The table also gives the epoch each
run crosses the target, which a slow spell of the machine does not move, and each run's median seconds per epoch,
which shows such a spell.

    python benchmarks/time_to_accuracy.py --recipe fmnist-resnet20 --set epochs=10 --arms sgd fixnorm \\
        --seeds 0 1 2 --target 94.0 --out runs/tta --name time_to_accuracy

Writes ``benchmarks/results/<name>.{md,json,png}`` (the png: test accuracy against seconds, one line per run).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from fixnorm_vs_wd import arm_settings, parse_seeds, run_dir_name  # noqa: E402

import torch  # noqa: E402

from fixnorm.hooks import Hook, RunState  # noqa: E402
from fixnorm.report import read_run  # noqa: E402
from fixnorm.train.config import load_recipe, make_config, parse_overrides  # noqa: E402
from fixnorm.train.engine import Trainer, check_same_run  # noqa: E402


class WallClock(Hook):
    """Adds ``wall_seconds`` (since ``start``, evaluation included) to every epoch's record."""

    def __init__(self, start: float) -> None:
        self.start = start

    def on_epoch_end(self, trainer: RunState, record: dict[str, Any]) -> None:
        record["wall_seconds"] = time.perf_counter() - self.start


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(wall seconds, test accuracy %) per epoch (the first epoch is 1), from the run's records.

    A run with an EMA (``ema_decay``) is scored by its EMA model alone, the model such a recipe ships: taking the
    better of the two each epoch would choose between models on the test set."""
    rows = read_run(run_dir).rows
    if not rows or math.isnan(rows[0].get("wall_seconds", math.nan)):
        raise SystemExit(f"{run_dir} has no wall_seconds column: it was not made by this script")
    column = "ema_test_acc" if not math.isnan(rows[0].get("ema_test_acc", math.nan)) else "test_acc"
    return [(row["wall_seconds"], 100 * row[column]) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fmnist-resnet20")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for every arm (key=value)")
    parser.add_argument("--arms", nargs="+", default=["sgd", "fixnorm"])
    parser.add_argument("--seeds", nargs="+", default=["0-2"])
    parser.add_argument("--target", type=float, default=94.0, help="test accuracy in %%")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default=None, help="write benchmarks/results/<name>.{md,json,png}")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    recipe, overrides = load_recipe(args.recipe), parse_overrides(args.set)

    for index, seed in enumerate(seeds):  # seed by seed, so that a stopped benchmark leaves pairs
        # the arms' order turns with each seed: a machine that slows (or speeds up) through the benchmark then
        # lands on every arm alike instead of always on the last one
        shift = index % len(args.arms)
        for arm in args.arms[shift:] + args.arms[:shift]:
            run_dir = Path(args.out) / run_dir_name(arm, seed)
            cfg = make_config(recipe, overrides, arm_settings(arm, {}), {"seed": seed, "threads": args.threads})
            if (run_dir / "summary.json").exists():
                check_same_run(run_dir, cfg)  # reused only if trained with the arm's settings
                continue
            if run_dir.exists():
                raise SystemExit(f"{run_dir} is an unfinished run: its clock cannot be resumed; delete it")
            start = time.perf_counter()
            summary = Trainer(cfg, run_dir, hooks=[WallClock(start)]).fit()
            print(f"{arm} seed {seed}: final {100 * summary['final_test_acc']:.2f} after "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    rows, curves = [], {}
    for arm in args.arms:
        hits, epochs, finals, totals, per_epoch = [], [], [], [], []
        for seed in seeds:
            points = curve(Path(args.out) / run_dir_name(arm, seed))
            curves[f"{arm} s{seed}"] = points
            epoch = next((e for e, (_, acc) in enumerate(points, 1) if acc >= args.target), None)
            hits.append(None if epoch is None else points[epoch - 1][0])
            epochs.append(epoch)
            finals.append(points[-1][1])
            totals.append(points[-1][0])
            per_epoch.append(statistics.median(b - a for (a, _), (b, _) in zip(points, points[1:])))
        reached = [h for h in hits if h is not None]
        rows.append({"arm": arm, "seeds": seeds, "seconds_to_target": hits, "epoch_reaching_target": epochs,
                     "median_seconds_per_epoch": per_epoch,
                     "mean_seconds": statistics.mean(reached) if len(reached) == len(hits) else None,
                     "reached": len(reached), "final_mean": statistics.mean(finals),
                     "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "total_seconds": statistics.mean(totals)})
    lines = [f"| arm | seeds reaching {args.target:g}% | seconds to {args.target:g}% (mean; per seed) | epoch it is "
             "crossed | seconds per epoch (median, per seed) | final acc (%) | seconds for the whole run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join("-" if h is None else f"{h:.0f}" for h in r["seconds_to_target"])
        mean = f"{r['mean_seconds']:.0f}" if r["mean_seconds"] is not None else "not every seed"
        crossed = ", ".join("-" if e is None else str(e) for e in r["epoch_reaching_target"])
        speeds = ", ".join(f"{s:.1f}" for s in r["median_seconds_per_epoch"])
        lines.append(f"| {r['arm']} | {r['reached']}/{len(r['seeds'])} | {mean} ({per_seed}) | {crossed} | {speeds} | "
                     f"{r['final_mean']:.2f} ± {r['final_std']:.2f} | {r['total_seconds']:.0f} |")
    command = "python benchmarks/time_to_accuracy.py " + " ".join(sys.argv[1:])
    machine = _common.machine_info(torch.device("cpu"))
    text = "\n".join(lines) + (f"\n\nRecipe `{args.recipe}` with {args.set or 'no overrides'}, {args.threads} threads, "
                               f"runs one at a time. Command: `{command}`\n")
    print(text)
    if args.name:
        _common.atomic_write_json(os.path.join(_common.RESULTS_DIR, f"{args.name}.json"),
                                  {"rows": rows, "curves": curves, "target": args.target, "command": command,
                                   "machine": machine})
        _common.atomic_write_text(os.path.join(_common.RESULTS_DIR, f"{args.name}.md"), f"# {args.name}\n\n{text}")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4.2))
        colours = {arm: f"C{i}" for i, arm in enumerate(args.arms)}
        for label, points in curves.items():
            arm = label.rsplit(" ", 1)[0]
            ax.plot([t for t, _ in points], [a for _, a in points], marker="o", ms=3, color=colours[arm],
                    label=arm if label.endswith(f"s{seeds[0]}") else None)
        ax.axhline(args.target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("wall-clock seconds (build + train + evaluate)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(max(80.0, min(a for p in curves.values() for _, a in p) - 1), None)
        ax.legend()
        ax.set_title(f"{args.recipe}: time to accuracy, {len(seeds)} seed(s) per arm")
        fig.tight_layout()
        path = os.path.join(_common.RESULTS_DIR, f"{args.name}.png")
        fig.savefig(path + ".tmp.png", dpi=110)
        os.replace(path + ".tmp.png", path)


if __name__ == "__main__":
    main()
