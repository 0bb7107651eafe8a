"""How many trials each tuner needs: FixNorm's coordinate search against Optuna TPE / random on SGD + weight decay.

Phase 1 (``--phase grid``, the expensive part): train every point of two lattices (8 x 7 and 8 x 5) with the
`fmnist-tune` recipe (small CNN, 15k Fashion-MNIST images, 3 epochs, accuracy on a 5k holdout of
the training set), once each:

    SGD + WD:  lr 0.0125 .. 1.6 (x2 steps)  x  weight decay 1e-5 .. 1e-2 (x sqrt(10) steps)
    FixNorm:   lr 0.0125 .. 1.6 (x2 steps)  x  fc_scale 1/4 .. 4 (x2 steps: the classifier at that multiple of
               the norm the free phase chose; what ``fixnorm tune`` searches at the defaults)

Every trial is a real run directory (reused when finished, resumed when interrupted); the table of
accuracies is written after each trial, so the phase can be stopped and continued.

Phase 2 (``--phase tuners``, seconds): run the tuners of ``fixnorm.tune`` on that table (a tabular
benchmark: a trial looks its accuracy up instead of training again) through the same `Tuner`
class and Optuna storage as ``fixnorm tune``, over many tuner seeds. Reported per tuner: trials
needed to come within 0.3 points of the method's grid best, and the best accuracy found at equal
numbers of trials. The lookup removes trial-to-trial noise; each grid point was trained once.

    python benchmarks/tuning_efficiency.py --phase grid [--max-new N] [--shard K/N]
    python benchmarks/tuning_efficiency.py --phase tuners [--tuner-seeds 20]
    python benchmarks/tuning_efficiency.py --phase recheck [--recheck-seeds 1 2 3]   # the best points again
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (atomic_write_json, atomic_write_text, command_line, machine_info, markdown_table,  # noqa: E402
                     parse_shard)
from fixnorm_vs_wd import paired_stats  # noqa: E402

import torch  # noqa: E402

from fixnorm.report import plot_best_so_far  # noqa: E402
from fixnorm.train.config import load_recipe  # noqa: E402
from fixnorm.tune import SECOND_AXIS, Axis, SearchSpace, Tuner, run_key, training_objective  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 0.003  # 0.3 points of accuracy

SPACES = {
    "sgd": SearchSpace((Axis("lr", 0.1, 2.0, -3, 4), Axis("weight_decay", 10 ** -3.5, math.sqrt(10), -3, 3))),
    "fixnorm": SearchSpace((Axis("lr", 0.1, 2.0, -3, 4), Axis("fc_scale", 1.0, 2.0, -2, 2))),
}
# (label, method, tuner); the coordinate search is deterministic, the samplers get many seeds
TUNERS = [("FixNorm coordinate search", "fixnorm", "coordinate"), ("TPE on SGD+WD", "sgd", "tpe"),
          ("TPE on FixNorm", "fixnorm", "tpe"), ("random on SGD+WD", "sgd", "random"),
          ("random on FixNorm", "fixnorm", "random")]


def grid_phase(args: argparse.Namespace) -> None:
    settings = {**load_recipe("fmnist-tune"), "threads": args.threads}
    new = 0
    for method in args.methods:
        space = SPACES[method]
        runs = Path(args.runs) / method
        objective = training_objective({**settings, "method": method, "seed": args.seed}, runs)
        for index, point in enumerate(space.grid()):
            values = space.values(point)
            if index % args.shard[1] != args.shard[0]:
                continue
            if (runs / run_key(values) / "summary.json").exists():
                objective(values, None)  # reused: read, or refused if it was trained with other settings
                continue
            if args.max_new is not None and new >= args.max_new:
                print(f"stopping after {new} new trials (--max-new)")
                return
            start = time.perf_counter()
            accuracy = objective(values, None)
            new += 1
            print(f"{method} {run_key(values)}: {accuracy:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            write_table(args, settings)
    write_table(args, settings)
    print("grid complete")


def write_table(args: argparse.Namespace, settings: dict) -> None:
    """The table of every finished grid run, rebuilt from the run directories (several grid workers may write it).

    Rows of the current lattices already in the table are kept when their run directories are not here (a grid
    trained on another machine or session); rows of a lattice that changed are dropped.
    """
    path = Path(args.results) / "tuning_grid.json"
    previous = json.loads(path.read_text())["methods"] if path.exists() else {}
    table = {"meta": {"recipe": "fmnist-tune", "settings": settings, "seed": args.seed,
                      "spaces": {m: s.to_dict() for m, s in SPACES.items()},
                      "machine": machine_info(torch.device("cpu")), "command": command_line()}, "methods": {}}
    for method, space in SPACES.items():
        rows = table["methods"].setdefault(method, {})
        for point in space.grid():
            values = space.values(point)
            if run_key(values) in previous.get(method, {}):
                rows[run_key(values)] = previous[method][run_key(values)]
            summary = Path(args.runs) / method / run_key(values) / "summary.json"
            if summary.exists():
                data = json.loads(summary.read_text())
                rows[run_key(values)] = {"point": list(point), **values, "accuracy": data["final_test_acc"],
                                         "train_seconds": data["train_seconds"]}
    atomic_write_json(path, table)


def tuners_phase(args: argparse.Namespace) -> None:
    results_dir = Path(args.results)
    table = json.loads((results_dir / "tuning_grid.json").read_text())
    grid_best = {m: max(r["accuracy"] for r in rows.values()) for m, rows in table["methods"].items()}
    for method, space in SPACES.items():
        if len(table["methods"].get(method, {})) != len(space.grid()):
            raise SystemExit(f"the {method} grid is incomplete: run --phase grid first")
    budget = args.budget
    results = []
    for label, method, tuner in TUNERS:
        rows = table["methods"][method]
        seeds = [0] if tuner == "coordinate" else list(range(args.tuner_seeds))
        curves, needed = [], []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                run = Tuner(SPACES[method], lambda values, trial, rows=rows: rows[run_key(values)]["accuracy"],
                            tuner=tuner, n_trials=budget, out_dir=tmp, seed=seed, steps=(2, 1), poll_seconds=0)
                result = run.run()
            curve = result.best_so_far()
            curve += [curve[-1]] * (budget - len(curve))  # a finished search keeps its best
            curves.append(curve)
            hit = next((i + 1 for i, v in enumerate(curve) if v >= grid_best[method] - TOLERANCE), None)
            needed.append(hit)
            if tuner == "coordinate":
                coordinate_trials = len(result.trials)
                coordinate_best = {axis.name: result.best[axis.name] for axis in SPACES[method].axes}
        reached = [n for n in needed if n is not None]
        # a seed that never got there counts as "more than the budget": the median stays defined while most do
        censored = sorted(n if n is not None else math.inf for n in needed)
        median_trials = statistics.median(censored)
        entry = {"tuner": label, "method": method, "sampler": tuner, "seeds": len(seeds),
                 "grid_best": grid_best[method], "trials_to_within_0.3": needed,
                 "median_trials": median_trials if math.isfinite(median_trials) else None,
                 "reached_fraction": len(reached) / len(needed),
                 "mean_best_at": {str(k): statistics.mean(c[k - 1] for c in curves) for k in args.at if k <= budget},
                 "mean_curve": [statistics.mean(c[i] for c in curves) for i in range(budget)]}
        if tuner == "coordinate":
            entry["search_length"] = coordinate_trials
            entry["best_values"] = coordinate_best
        results.append(entry)
        print(f"{label}: trials to within 0.3 points of the grid best {grid_best[method]:.4f}: "
              f"median {entry['median_trials']} (reached in {entry['reached_fraction']:.0%} of {len(seeds)} seeds)")
    by_label = {r["tuner"]: r for r in results}
    fix, tpe = by_label["FixNorm coordinate search"], by_label["TPE on SGD+WD"]
    if fix["median_trials"] and tpe["median_trials"]:
        print(f"trials ratio FixNorm coordinate / TPE on SGD+WD: {fix['median_trials'] / tpe['median_trials']:.2f} "
              "(target <= 0.5)")
    print(f"grid best FixNorm - SGD+WD: {100 * (grid_best['fixnorm'] - grid_best['sgd']):+.2f} points (target >= 0)")
    out = {"meta": {"command": command_line(), "budget": budget, "tolerance": TOLERANCE,
                    "grid": table["meta"]}, "grid_best": grid_best, "tuners": results}
    atomic_write_json(results_dir / "tuning_efficiency.json", out)
    atomic_write_text(results_dir / "tuning_efficiency.md", _markdown(out, args.at) + "\n")
    plot_best_so_far({f"{r['tuner']} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})": r["mean_curve"]
                      for r in out["tuners"]}, results_dir / "tuning_efficiency.png",
                     references={f"grid best {m}": v for m, v in grid_best.items()},
                     title="Tuning efficiency on Fashion-MNIST (mean over tuner seeds)")


def recheck_phase(args: argparse.Namespace) -> None:
    """Retrain each method's grid-best point (and the coordinate search's pick) on more seeds.

    A grid maximum over 56 single-seed runs is biased upwards by noise (the winner's curse); the
    mean over fresh seeds is the fair comparison of the two methods' best settings.
    """
    results_dir = Path(args.results)
    table = json.loads((results_dir / "tuning_grid.json").read_text())
    efficiency = json.loads((results_dir / "tuning_efficiency.json").read_text())
    settings = {**load_recipe("fmnist-tune"), "threads": args.threads}
    picks = {}
    for method, rows in table["methods"].items():
        best = max(rows.values(), key=lambda r: r["accuracy"])
        second = next(k for k in ("fc_scale", SECOND_AXIS[method]) if k in best)
        picks[f"{method} grid best"] = (method, {k: best[k] for k in ("lr", second)})
    coordinate = next(r for r in efficiency["tuners"] if r["sampler"] == "coordinate")
    picks["fixnorm coordinate-search pick"] = ("fixnorm", coordinate["best_values"])
    rows_out = []
    for label, (method, values) in picks.items():
        accs = []
        for seed in args.recheck_seeds:
            objective = training_objective({**settings, "method": method, "seed": seed},
                                           Path(args.runs) / f"{method}-seed{seed}")
            accs.append(objective(values, None))
            print(f"{label} {run_key(values)} seed {seed}: {accs[-1]:.4f}", flush=True)
        rows_out.append({"pick": label, "method": method, "values": values, "seeds": list(args.recheck_seeds),
                         "accuracies": accs, "mean": statistics.mean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
        print(f"{label}: {100 * rows_out[-1]['mean']:.2f} +- {100 * rows_out[-1]['std']:.2f}")
    # each FixNorm pick against SGD + WD's grid best, paired by training seed (the grid maxima are single seeds)
    reference = next(r for r in rows_out if r["pick"] == "sgd grid best")
    differences = []
    if len(args.recheck_seeds) > 1:
        for r in rows_out:
            if r is not reference:
                stats = paired_stats([a - b for a, b in zip(r["accuracies"], reference["accuracies"])])
                differences.append({"pick": r["pick"], "against": reference["pick"], **stats})
    atomic_write_json(results_dir / "tuning_recheck.json", {"meta": {"command": command_line()}, "rows": rows_out,
                                                            "paired_differences": differences})
    lines = [f"Command: `{command_line()}`", "", "| pick | values | holdout accuracy, mean +- std (%) | per seed |",
             "|---|---|---|---|"]
    lines += [f"| {r['pick']} | {run_key(r['values'])} | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} | "
              f"{', '.join(f'{100 * a:.2f}' for a in r['accuracies'])} |" for r in rows_out]
    if differences:
        lines += ["", f"Paired by seed against {reference['pick']} ({len(args.recheck_seeds)} seeds; mean +- standard "
                  "error, 95% t-interval, points):", ""]
        lines += [f"- {d['pick']}: {100 * d['diff']:+.2f} +- {100 * d['se']:.2f} "
                  f"[{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]" for d in differences]
    atomic_write_text(results_dir / "tuning_recheck.md", "\n".join(lines) + "\n")


def _markdown(out: dict, at: list[int]) -> str:
    headers = ["tuner", "seeds", "trials to within 0.3 pt (median)", "reached"] + [f"best @ {k}" for k in at]
    rows = [[r["tuner"], r["seeds"], r["median_trials"] if r["median_trials"] is not None else f"> {out['meta']['budget']}",
             f"{r['reached_fraction']:.0%}"] + [f"{100 * r['mean_best_at'][str(k)]:.2f}" for k in at
                                                if str(k) in r["mean_best_at"]] for r in out["tuners"]]
    lines = ["# Tuning efficiency (Fashion-MNIST, small CNN, recipe fmnist-tune)", "",
             f"Command: `{out['meta']['command']}` after `python benchmarks/tuning_efficiency.py --phase grid`.", "",
             f"Grid best (holdout accuracy): SGD+WD {100 * out['grid_best']['sgd']:.2f}%, "
             f"FixNorm {100 * out['grid_best']['fixnorm']:.2f}%.", "",
             markdown_table(headers, rows), "",
             "Trials are looked up in the trained grid (`tuning_grid.json`), so tuners differ only in where they "
             "look. \"best @ k\": mean over tuner seeds of the best holdout accuracy (%) after k trials."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("grid", "tuners", "recheck"), required=True)
    parser.add_argument("--recheck-seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", default="runs/tuning_efficiency", help="run directories of the grid phase")
    parser.add_argument("--results", default=str(RESULTS), help="folder of tuning_grid.json and the results")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every grid point")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per trial (1 keeps trials steady on a shared machine)")
    parser.add_argument("--methods", nargs="+", choices=list(SPACES), default=list(SPACES),
                        help="grid phase: which lattices to train (run one process per method to use 2 cores)")
    parser.add_argument("--shard", default="0/1", help="grid phase: train every N-th point from the K-th (K/N), "
                        "one process per shard")
    parser.add_argument("--max-new", type=int, default=None, help="grid phase: stop after this many new trials")
    parser.add_argument("--tuner-seeds", type=int, default=20)
    parser.add_argument("--budget", type=int, default=30, help="trials per tuner run")
    parser.add_argument("--at", type=int, nargs="+", default=[5, 10, 15, 20, 30])
    args = parser.parse_args()
    args.shard = parse_shard(args.shard)
    {"grid": grid_phase, "tuners": tuners_phase, "recheck": recheck_phase}[args.phase](args)


if __name__ == "__main__":
    main()
