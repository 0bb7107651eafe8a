#!/usr/bin/env python
"""Tuned against tuned, tuning seed by tuning seed: each search's pick retrained on fresh paired seeds.

One search on one tuning seed is one draw: its trials are noisy, so two tuning seeds of the same search can pick
settings that retrain half a point apart. This table treats the tuning seed as the unit: for every tuning seed k it
takes FixNorm's recommendation (``fitted_point`` of its trials) and the other search's pick (its best trial), finds
both retrained on the same fresh seeds (runs made by ``fixnorm_vs_wd.py`` into ``--runs``), and reports

- per tuning seed: each pick's accuracy (mean ± std over the fresh seeds) and their paired difference ± se;
- over tuning seeds: the mean of the per-seed differences ± its standard error across tuning seeds, with a 95%
  t-interval (the search's randomness included, which a single tuning seed cannot show).

    python benchmarks/tuner_picks.py --fixnorm runs/tune24_cap runs/tune26_seed1 ... --other runs/tpe0 ... \\
        --runs runs/nsc23 --seeds 100-115 --name fixnorm_tuner_picks

Missing retrained runs are listed with the ``fixnorm_vs_wd.py`` command that makes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts src/ on the path when run from a checkout)
from fixnorm_vs_wd import paired_stats, parse_seeds, run_dir_name  # noqa: E402

from fixnorm.io import write_json_atomic, write_text_atomic  # noqa: E402
from fixnorm.tune import fitted_point  # noqa: E402
from fixnorm.train.config import TrainConfig  # noqa: E402
from fixnorm.tune.lattice import Axis, SearchSpace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pick_of(source: str) -> dict[str, Any]:
    """The search's pick as settings: FixNorm's recommendation (``fitted_point`` of its trials, as ``fixnorm tune``
    computes it, so tune.json files written before it was recorded read the same), any other search's best trial.
    ``source`` is a tune folder, or ``ARM@SEED`` for a search whose folder is gone but whose pick was recorded (e.g.
    ``sgd:lr=0.565685,weight_decay=0.001@0``)."""
    if "@" in source and not Path(source).exists():
        arm, _, seed = source.rpartition("@")
        method, _, spec = arm.partition(":")
        values = {k: float(v) for k, v in (item.split("=") for item in spec.split(",") if item)}
        return {"method": method, "tuning_seed": int(seed), "rule": "recorded pick", "values": values}
    folder = Path(source)
    tune = json.loads((folder / "tune.json").read_text())
    seed = tune["settings"].get("seed")
    if seed is None:  # the recipe's seed, the config's default
        seed = TrainConfig().seed
    space = SearchSpace(tuple(Axis(**axis) for axis in tune["space"]["axes"]))
    names = [axis.name for axis in space.axes]
    if tune["method"] != "fixnorm":
        return {"method": tune["method"], "tuning_seed": seed, "rule": "best trial",
                "values": {n: tune["best"][n] for n in names}}
    results = {}
    for trial in tune["trials"]:
        point = space.point_of(trial)
        if trial["state"] == "complete" and point is not None:
            results[point] = trial["value"]
    best = space.point_of(tune["best"])
    point, _ = fitted_point(space, results, best)
    return {"method": "fixnorm", "tuning_seed": seed, "rule": "recommended",
            "values": space.values(point)}


def arm_of(pick: dict[str, Any]) -> str:
    """The ``fixnorm_vs_wd.py`` arm that retrains a pick (fc_scale 1 is the default and is left out)."""
    parts = [f"{name}={value:.6g}" for name, value in pick["values"].items()
             if not (name == "fc_scale" and abs(value - 1) < 1e-9)]
    return f"{pick['method']}:{','.join(parts)}"


def accuracies(runs: Path, arm: str, seeds: list[int]) -> dict[int, float]:
    found = {}
    for seed in seeds:
        path = runs / run_dir_name(arm, seed) / "summary.json"
        if path.exists():
            found[seed] = 100 * json.loads(path.read_text())["final_test_acc"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixnorm", nargs="+", required=True, help="FixNorm's tune folders, one per tuning seed")
    parser.add_argument("--other", nargs="+", required=True,
                        help="the other search's folders (or ARM@SEED picks), same tuning seeds")
    parser.add_argument("--runs", required=True, help="the folder of the retrained runs (fixnorm_vs_wd.py --out)")
    parser.add_argument("--seeds", nargs="+", default=["100-115"], help="the fresh seeds the picks were retrained on")
    parser.add_argument("--name", default=None, help="write benchmarks/results/<name>.md and .json")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    runs = Path(args.runs)

    rows, missing = [], []
    for ours_dir, other_dir in zip(args.fixnorm, args.other, strict=True):
        ours, other = pick_of(ours_dir), pick_of(other_dir)
        if ours["tuning_seed"] != other["tuning_seed"]:
            raise SystemExit(f"{ours_dir} and {other_dir} were tuned on different seeds "
                             f"({ours['tuning_seed']} and {other['tuning_seed']})")
        row: dict[str, Any] = {"tuning_seed": ours["tuning_seed"]}
        for key, pick in (("fixnorm", ours), ("other", other)):
            arm = arm_of(pick)
            accs = accuracies(runs, arm, seeds)
            if len(accs) < len(seeds):
                missing.append(arm)
            row[key] = {"arm": arm, "rule": pick["rule"], "accs": accs,
                        "mean": statistics.mean(accs.values()) if accs else None,
                        "std": statistics.stdev(accs.values()) if len(accs) > 1 else None}
        paired = sorted(set(row["fixnorm"]["accs"]) & set(row["other"]["accs"]))
        if len(paired) >= 2:
            row["paired"] = len(paired)
            row.update(paired_stats([row["fixnorm"]["accs"][s] - row["other"]["accs"][s] for s in paired]))
        rows.append(row)
    if missing:
        print("missing retrained runs; make them with:")
        for arm in dict.fromkeys(missing):
            print(f"  python benchmarks/fixnorm_vs_wd.py --recipe fmnist-tune --arms {arm} "
                  f"--seeds {' '.join(args.seeds)} --out {args.runs}")

    lines = ["| tuning seed | FixNorm recommended | retrained (%) | other search's pick | retrained (%) "
             "| Δ FixNorm − other (paired ± se) | 95% CI |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, o = r["fixnorm"], r["other"]

        def acc(side: dict[str, Any]) -> str:
            return f"{side['mean']:.2f} ± {side['std']:.2f} ({len(side['accs'])})" if side["std"] is not None else "-"
        delta = f"{r['diff']:+.2f} ± {r['se']:.2f}" if "diff" in r else "-"
        ci = f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]" if "diff" in r else "-"
        lines.append(f"| {r['tuning_seed']} | {f['arm']} | {acc(f)} | {o['arm']} | {acc(o)} | {delta} | {ci} |")
    complete = [r for r in rows if "diff" in r and r["paired"] == len(seeds)]
    summary: dict[str, Any] = {}
    if len(complete) >= 2:
        summary = paired_stats([r["diff"] for r in complete])
        summary.update(tuning_seeds=[r["tuning_seed"] for r in complete],
                       fixnorm_mean=statistics.mean(r["fixnorm"]["mean"] for r in complete),
                       other_mean=statistics.mean(r["other"]["mean"] for r in complete),
                       ahead=sum(r["diff"] > 0 for r in complete))
        lines += ["", f"Over the {len(complete)} tuning seeds with every fresh seed retrained "
                  f"({', '.join(str(s) for s in summary['tuning_seeds'])}): FixNorm's recommendation "
                  f"{summary['fixnorm_mean']:.2f}, the other search's pick {summary['other_mean']:.2f}; the mean of "
                  f"the per-tuning-seed differences {summary['diff']:+.2f} ± {summary['se']:.2f} (standard error "
                  f"across tuning seeds), 95% CI [{summary['ci'][0]:+.2f}, {summary['ci'][1]:+.2f}]; FixNorm ahead "
                  f"on {summary['ahead']} of {len(complete)}."]
    command = "python benchmarks/tuner_picks.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines)
    print(text)
    if args.name:
        write_text_atomic(RESULTS / f"{args.name}.md", f"# {args.name}\n\n{text}\n\nCommand: `{command}`\n")
        write_json_atomic(RESULTS / f"{args.name}.json", {"command": command, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
