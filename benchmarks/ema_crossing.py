#!/usr/bin/env python
"""When does each arm reach a test accuracy, with and without an EMA of its weights? Read from finished runs.

A run trained with ``ema_decay`` evaluates two models every epoch from one training: the weights as trained
(``test_acc``) and their exponential moving average (``ema_test_acc``). The EMA hook only reads the weights, so the
first column is bit for bit the run without an EMA, and the EMA's effect is paired within each run. For each arm
and seed (arms and run folders as ``benchmarks/fixnorm_vs_wd.py`` names them) this prints the first epoch each
model reaches every ``--thresholds`` accuracy (``EMA``: ``ema_test_acc``, scored with the statistics the run's
``ema_bn`` names), the mean accuracy over ``--window`` epochs and the final, then the
paired differences (EMA minus the trained weights within an arm; each arm minus the first, the reference, for
either model) with their standard errors and 95% t-intervals::

    python benchmarks/ema_crossing.py runs/spEma sgd fixnorm --seeds 0-3 --thresholds 93.75 94.0 --window 16 22

A run that never reaches a threshold counts as crossing one epoch after its last (stated in the table). Runs trained
without an EMA give the trained weights alone (every run of one table must then be without one). Runs trained
with ``ema_bn_check=true`` also give ``EMA-rebn``: the EMA weights with BatchNorm statistics re-estimated on 2,000
training images (column ``ema/test_acc_recomputed_bn``), and its paired difference to the EMA's own buffers
(``EMA`` then reads the averaged buffers' column, ``ema/test_acc_ema_buffers``, whatever ``ema_bn`` was).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write_text, command_line, markdown_table, RESULTS_DIR  # noqa: E402
from fixnorm_vs_wd import paired_stats, parse_seeds, run_dir_name  # noqa: E402
from fixnorm.errors import FixNormError  # noqa: E402
from fixnorm.report import read_run  # noqa: E402

MODELS = {"trained": "test_acc", "EMA": "ema_test_acc"}
# with ema_bn_check: the EMA weights with BatchNorm statistics re-estimated on training images (train/hooks.py)
RECOMPUTED = ("EMA-rebn", "ema/test_acc_recomputed_bn")
AVERAGED = "ema/test_acc_ema_buffers"  # the EMA model with its own averaged buffers


def accuracies_by_model(path: Path) -> dict[str, list[float]]:
    """Per model, the test accuracy (%) of every epoch of a finished run, in order."""
    run = read_run(path)
    if not run.summary:
        raise FixNormError(f"{path} has not finished (no summary.json)")
    if not run.rows or [r["epoch"] for r in run.rows] != list(range(1, len(run.rows) + 1)):
        raise FixNormError(f"{path}/metrics.csv does not hold epochs 1..{len(run.rows)} once each")
    if all(math.isnan(r.get("ema_test_acc", math.nan)) for r in run.rows):  # trained without an EMA
        return {"trained": [100 * r["test_acc"] for r in run.rows]}
    models = dict(MODELS)
    if not all(math.isnan(r.get(RECOMPUTED[1], math.nan)) for r in run.rows):
        # with the check, "EMA" is the averaged buffers' own column whatever ema_bn scored ema_test_acc with
        models["EMA"], models[RECOMPUTED[0]] = AVERAGED, RECOMPUTED[1]
    return {model: [100 * r[column] for r in run.rows] for model, column in models.items()}


def first_epoch(accs: list[float], threshold: float) -> int:
    """The first epoch (1-based) at or above ``threshold``; one past the last epoch when never reached."""
    return next((i + 1 for i, a in enumerate(accs) if a >= threshold), len(accs) + 1)


def arm_runs(runs_dir: Path, arm: str, seeds: list[int]) -> dict[int, dict[str, list[float]]]:
    return {seed: accuracies_by_model(runs_dir / run_dir_name(arm, seed)) for seed in seeds}


def summaries(run: dict[str, list[float]], thresholds: list[float], window: tuple[int, int]) -> dict[str, float]:
    out = {}
    for model, accs in run.items():
        if window[1] > len(accs):
            raise FixNormError(f"--window ends at epoch {window[1]} but the runs have {len(accs)} epochs")
        for t in thresholds:
            out[f"{model}: first epoch at {t:g}%"] = first_epoch(accs, t)
        out[f"{model}: mean over epochs {window[0]}-{window[1]}"] = statistics.mean(accs[window[0] - 1:window[1]])
        out[f"{model}: final"] = accs[-1]
    return out


def _fmt(stats: dict) -> str:
    lo, hi = stats["ci"]
    return f"{stats['diff']:+.2f} ± {stats['se']:.2f} [{lo:+.2f}, {hi:+.2f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("arms", nargs="+", help="arms as fixnorm_vs_wd.py --arms names them; the first is the reference")
    parser.add_argument("--seeds", nargs="+", required=True, help="the paired seeds, e.g. 0-3")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[94.0])
    parser.add_argument("--window", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                        help="epochs whose mean accuracy is reported (default: the last third)")
    parser.add_argument("--name", default=None, help="also write benchmarks/results/<name>.md")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if len(seeds) < 2:
        raise FixNormError(f"paired statistics need two seeds, got {seeds}")
    per_arm = {arm: arm_runs(args.runs, arm, seeds) for arm in args.arms}
    kinds = {arm: {tuple(run) for run in runs.values()} for arm, runs in per_arm.items()}
    if len(set().union(*kinds.values())) > 1:  # paired differences need the same models in every run
        raise FixNormError(f"the runs do not all score the same models (with and without an EMA): {kinds}")
    epochs = len(next(iter(next(iter(per_arm.values())).values()))["trained"])
    window = tuple(args.window) if args.window else (epochs - max(1, epochs // 3) + 1, epochs)
    if not 1 <= window[0] <= window[1]:
        raise FixNormError(f"--window {window} is not a range of epochs")
    stats = {arm: {s: summaries(r, args.thresholds, window) for s, r in runs.items()} for arm, runs in per_arm.items()}
    keys = list(next(iter(stats[args.arms[0]].values())))

    rows = []
    for arm, seeds in stats.items():
        for key in keys:
            values = [seeds[s][key] for s in sorted(seeds)]
            shown = ", ".join(f"{v:.0f}" if "epoch at" in key else f"{v:.2f}" for v in values)
            mean, std = statistics.mean(values), statistics.stdev(values)
            rows.append([arm, key, shown, f"{mean:.2f} ± {std:.2f}"])
    text = markdown_table(["arm", "quantity", "per seed (seeds " + ", ".join(map(str, sorted(stats[args.arms[0]])))
                           + ")", "mean ± std"], rows)

    diff_rows = []
    for arm, seeds in stats.items():  # the EMA's effect within each arm
        for key in keys:
            if not key.startswith("EMA: "):
                continue
            twin = "trained: " + key[len("EMA: "):]
            d = [seeds[s][key] - seeds[s][twin] for s in sorted(seeds)]
            diff_rows.append([arm, "EMA − trained", key[len("EMA: "):], _fmt(paired_stats(d))])
        for key in keys:  # re-estimated statistics against the EMA's own buffers, same weights
            if key.startswith(f"{RECOMPUTED[0]}: "):
                twin = "EMA: " + key[len(RECOMPUTED[0]) + 2:]
                d = [seeds[s][key] - seeds[s][twin] for s in sorted(seeds)]
                diff_rows.append([arm, f"{RECOMPUTED[0]} − EMA", key[len(RECOMPUTED[0]) + 2:], _fmt(paired_stats(d))])
    ref = args.arms[0]
    for arm in args.arms[1:]:  # each arm against the reference, model by model, on the same seeds
        for key in keys:
            d = [stats[arm][s][key] - stats[ref][s][key] for s in seeds]
            diff_rows.append([arm, f"− {ref}", key, _fmt(paired_stats(d))])
    text += "\n\nPaired differences (mean ± standard error [95% t-interval]; epochs: later is positive):\n\n"
    text += markdown_table(["arm", "difference", "quantity", "paired Δ"], diff_rows)
    text += (f"\n\nA run that never reaches a threshold counts as crossing at epoch {epochs + 1}. "
             f"Command: `{command_line()}`\n")
    print(text)
    if args.name:
        atomic_write_text(str(Path(RESULTS_DIR) / f"{args.name}.md"), f"# {args.name}\n\n{text}")


if __name__ == "__main__":
    main()
