"""Which point should a few-trial search hand back: its best trial, or the parabola through the best and its neighbours?

A tuning trial is one run, and on `fmnist-tune` one run's accuracy varies by about 0.5 points from seed to seed: as
much as the differences between neighbouring learning rates. The best trial is then partly the luckiest one.
``fixnorm tune`` recommends ``fixnorm.tune.fitted_point`` (the vertex of the parabola through the best trial and its
evaluated neighbours, in log space, on the lattice). This script measures the two rules under real trial noise,
from runs already trained at several learning rates on many seeds (``fixnorm_vs_wd.py`` folders):

- each seed in turn plays the tuning seed: its runs are the trials, and the coordinate search's line over the lr
  (``--steps``, from ``--centre``, with the points of ``--prior`` already known, as after the search's first line)
  is replayed on them through ``fixnorm.tune.coordinate_search_next``;
- each rule's pick is scored by its mean accuracy over the *other* seeds (leave one out), what retraining the pick
  would give;
- reported: the picks per tuning seed, each rule's expected accuracy (mean ± std over tuning seeds) and the paired
  difference fit − best trial (± standard error, 95% t-interval).

    python benchmarks/tuner_pick_rule.py --runs runs/nsc23 --seeds 100-115 --centre 0.4 --prior 0.1 1.6 \\
        --point 0.1=fixnorm_lr0.1 --point 0.2=fixnorm_lr0.2 ... --reference sgd_lr0.565685_weight_decay0.001 \\
        --name tuner_pick_rule_fmnist_tune
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import fixnorm_vs_wd as arms_runner  # noqa: E402

from fixnorm.tune import Axis, SearchSpace, coordinate_search_next, fitted_point  # noqa: E402


def read_accuracy(folder: Path, seeds: list[int]) -> dict[int, float]:
    """Final accuracy (%) per seed of ``<folder>-s<seed>`` run directories; a missing run is an error."""
    accs = {}
    for seed in seeds:
        path = folder.parent / f"{folder.name}-s{seed}" / "summary.json"
        if not path.is_file():
            raise SystemExit(f"no finished run at {path.parent}")
        accs[seed] = 100 * json.loads(path.read_text())["final_test_acc"]
    return accs


def replay_search(space: SearchSpace, acc: dict[int, dict[int, float]], seed: int, prior: list[int],
                  steps: tuple[int, ...]) -> dict[tuple[int, ...], float]:
    """The trials the coordinate search runs when ``seed``'s runs are the trials (``prior`` points known first)."""
    results = {(k,): acc[k][seed] for k in prior}
    while True:
        pending = coordinate_search_next(space, results, steps)
        if not pending:
            return results
        for (k,) in pending:
            if k not in acc:
                raise SystemExit(f"the search asks for lr {space.axes[0].value(k):.6g}: add --point for it")
            results[(k,)] = acc[k][seed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="folder of fixnorm_vs_wd.py runs")
    parser.add_argument("--seeds", nargs="+", required=True, help="e.g. 100-115")
    parser.add_argument("--point", action="append", required=True, metavar="LR=ARM_DIR",
                        help="the runs at one lr: <runs>/<ARM_DIR>-s<seed>")
    parser.add_argument("--centre", type=float, required=True, help="where the replayed line search starts")
    parser.add_argument("--prior", type=float, nargs="*", default=[], help="lrs the search knows before the line")
    parser.add_argument("--steps", type=int, nargs="+", default=[2], help="lattice steps of the replayed lines")
    parser.add_argument("--ratio", type=float, default=2 ** 0.5)
    parser.add_argument("--reference", default=None, help="ARM_DIR of a reference to compare expected accuracy with")
    parser.add_argument("--name", default=None, help="write benchmarks/results/<name>.md and .json")
    args = parser.parse_args()

    seeds = arms_runner.parse_seeds(args.seeds)
    runs = Path(args.runs)
    axis = Axis("lr", args.centre, args.ratio, -64, 64)
    space = SearchSpace((axis,))
    acc: dict[int, dict[int, float]] = {}
    for item in args.point:
        lr, _, arm = item.partition("=")
        k = axis.index_of(float(lr), rel_tol=1e-5)  # run names round the lr to 6 digits
        if k is None:
            raise SystemExit(f"lr {lr} is not on the lattice {args.centre} x {args.ratio}^k")
        acc[k] = read_accuracy(runs / arm, seeds)
    prior = []
    for lr in args.prior:
        k = axis.index_of(lr, rel_tol=1e-5)
        if k is None or k not in acc:
            raise SystemExit(f"prior lr {lr} needs a --point on the lattice")
        prior.append(k)

    def retrained(k: int, held_out: int) -> float:  # what retraining the pick gives: the other seeds' mean
        return statistics.mean(v for s, v in acc[k].items() if s != held_out)

    searches = {}
    for seed in seeds:
        trials = replay_search(space, acc, seed, prior, tuple(args.steps))
        best = max(trials, key=trials.get)
        searches[seed] = (trials, best, fitted_point(space, trials, best)[0])
    missing = sorted({fitted[0] for _, _, fitted in searches.values()} - set(acc))
    if missing:
        raise SystemExit("the fit picks lrs without runs: " + ", ".join(f"{axis.value(k):.6g}" for k in missing)
                         + "; train them on these seeds and add --point for each")
    rows, best_scores, fit_scores = [], [], []
    for seed, (trials, best, fitted) in searches.items():
        b, f = retrained(best[0], seed), retrained(fitted[0], seed)
        best_scores.append(b)
        fit_scores.append(f)
        rows.append({"tuning_seed": seed, "trials": {f"{axis.value(k):.6g}": v for (k,), v in sorted(trials.items())},
                     "best_trial_lr": axis.value(best[0]), "fitted_lr": axis.value(fitted[0]),
                     "best_trial_retrained": b, "fitted_retrained": f})

    stats = arms_runner.paired_stats([f - b for f, b in zip(fit_scores, best_scores)])
    lines = [f"# {args.name or 'tuner_pick_rule'}", "",
             "Each seed plays the tuning seed in turn; its runs are the trials of the replayed line search. A pick is "
             "scored by the mean accuracy of the other seeds' runs at that lr (what retraining it gives).", "",
             "| tuning seed | trials (lr: accuracy %) | best trial's lr | fitted lr | best trial retrained | "
             "fitted retrained |", "|---|---|---|---|---|---|"]
    for r in rows:
        trials = ", ".join(f"{lr}: {v:.2f}" for lr, v in r["trials"].items())
        lines.append(f"| {r['tuning_seed']} | {trials} | {r['best_trial_lr']:.4g} | {r['fitted_lr']:.4g} | "
                     f"{r['best_trial_retrained']:.2f} | {r['fitted_retrained']:.2f} |")
    summary = {"best_trial": (statistics.mean(best_scores), statistics.stdev(best_scores)),
               "fitted": (statistics.mean(fit_scores), statistics.stdev(fit_scores)), "fitted_minus_best": stats}
    lines += ["", "| rule | expected accuracy (%) over tuning seeds | picks |", "|---|---|---|"]
    for rule, scores, key in (("best trial", best_scores, "best_trial_lr"), ("fitted point", fit_scores, "fitted_lr")):
        picks = sorted({f"{r[key]:.4g}" for r in rows}, key=float)
        counts = ", ".join(f"{lr} ×{sum(f'{r[key]:.4g}' == lr for r in rows)}" for lr in picks)
        lines.append(f"| {rule} | {statistics.mean(scores):.2f} ± {statistics.stdev(scores):.2f} | {counts} |")
    lines += ["", f"Fitted − best trial, paired over tuning seeds: {stats['diff']:+.2f} ± {stats['se']:.2f} "
              f"[{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}] (the tuning seeds share the runs that score them, so the "
              "interval is indicative)."]
    if args.reference:
        ref = read_accuracy(runs / args.reference, seeds)
        summary["reference"] = (statistics.mean(ref.values()), statistics.stdev(ref.values()))
        lines.append(f"Reference `{args.reference}` on the same seeds: {summary['reference'][0]:.2f} ± "
                     f"{summary['reference'][1]:.2f}.")
    lines += ["", f"Command: `python benchmarks/tuner_pick_rule.py {' '.join(sys.argv[1:])}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.name:
        out = Path(_common.RESULTS_DIR) / args.name
        _common.atomic_write_text(str(out) + ".md", text)
        _common.atomic_write_json(str(out) + ".json", {"rows": rows, "summary": summary, "command": sys.argv[1:]})


if __name__ == "__main__":
    main()
