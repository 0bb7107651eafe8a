"""FixNorm against tuned weight decay: arms (hypotheses for FixNorm's gap and the peers) x paired seeds.

Every arm is a set of overrides of one recipe, trained through the engine (``fixnorm.train.Trainer``); runs live in
``OUT/<arm>-s<seed>`` and are reused when finished, resumed when interrupted, so the script can be killed and
started again; a folder whose run was trained with other settings than the arm's today is an error, never reused.
``--shard i/n`` splits the runs between processes (two 1-thread processes share 2 cores well).
``--table`` only reads the finished runs and writes the paired comparison against ``--reference``:

    python benchmarks/fixnorm_vs_wd.py --recipe fmnist-tune --arms sgd fixnorm free100 --seeds 0-15 \\
        --out runs/vs_wd_tune --shard 0/2 &
    python benchmarks/fixnorm_vs_wd.py ... --shard 1/2 &
    python benchmarks/fixnorm_vs_wd.py ... --table --name vs_wd_tune

The table gives, per arm, mean ± std over seeds and the paired difference to the reference arm with its standard
error and a 95% t-interval; ``within noise`` when the interval contains 0.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

from fixnorm.optim import from_weight_decay  # noqa: E402
from fixnorm.train.config import TrainConfig, load_recipe, make_config, parse_overrides  # noqa: E402
from fixnorm.run_folder import RunFolder  # noqa: E402
from fixnorm.train.engine import check_same_run, train_or_reuse  # noqa: E402

# The arms: the baseline, FixNorm's variants (one hypothesis each) and the peers a user would pick instead.
ARMS: dict[str, dict[str, Any]] = {
    "sgd": {"method": "sgd"},
    "fixnorm": {"method": "fixnorm"},                               # today's defaults, whatever they are
    # the variants pin lr_power=1 (the default before the schedule law) and fixed norms (norm_drift=None, the
    # default before drifting norms) so that their names keep one meaning
    # the first reconstruction; then the free phase with the schedule itself (the default before the schedule law)
    "fixnorm-init": {"method": "fixnorm", "free_steps": 0, "lr_power": 1.0, "norm_drift": None},
    "fixnorm-lp1": {"method": "fixnorm", "lr_power": 1.0, "norm_drift": None},
    "free25": {"method": "fixnorm", "free_steps": 25, "lr_power": 1.0, "norm_drift": None},
    "free50": {"method": "fixnorm", "free_steps": 50, "lr_power": 1.0, "norm_drift": None},
    "free100": {"method": "fixnorm", "free_steps": 100, "lr_power": 1.0, "norm_drift": None},
    "free200": {"method": "fixnorm", "free_steps": 200, "lr_power": 1.0, "norm_drift": None},
    "free400": {"method": "fixnorm", "free_steps": 400, "lr_power": 1.0, "norm_drift": None},
    "fc5.5": {"method": "fixnorm", "free_steps": 0, "fc_norm": 5.5, "lr_power": 1.0, "norm_drift": None},
    "fc5.5-free100": {"method": "fixnorm", "free_steps": 100, "fc_norm": 5.5, "lr_power": 1.0, "norm_drift": None},
    # rotational: every scale-invariant weight turns by the angle SGD+WD's equilibrium would give (from the
    # recipe's lr, weight_decay, momentum), following the LR schedule (power 1) or its square root (0.5)
    "rot": {"method": "fixnorm", "angular_update": "from_wd", "lr_power": 1.0, "norm_drift": None},
    "rot-p0.5": {"method": "fixnorm", "angular_update": "from_wd", "angle_power": 0.5, "lr_power": 1.0,
                 "norm_drift": None},
    "rot-fc5.5": {"method": "fixnorm", "angular_update": "from_wd", "fc_norm": 5.5, "lr_power": 1.0,
                  "norm_drift": None},
    "rot-p0.5-fc5.5": {"method": "fixnorm", "angular_update": "from_wd", "angle_power": 0.5, "fc_norm": 5.5,
                       "lr_power": 1.0, "norm_drift": None},
    "lawn": {"method": "lawn"},
    # the peers a user would pick instead (the adamp package; its SGDP calls .view on gradients, which fails on
    # channels_last tensors, so these arms train without channels_last)
    "sgdp": {"method": "sgdp", "channels_last": False},
    # the Adam family at Adam's usual lr 1e-3 (the recipes' lr is SGD's), the two decayed ones at AdamW's default
    # decoupled decay 0.01 (the recipes' 5e-4 is an SGD decay: decoupled at lr 1e-3 it would do nothing)
    "adamp": {"method": "adamp", "channels_last": False, "lr": 1e-3, "weight_decay": 0.01},
    "adamw": {"method": "adamw", "lr": 1e-3, "weight_decay": 0.01},
    "fixnorm-adam": {"method": "fixnorm", "base": "adam", "lr": 1e-3},
    "sgd-nowd": {"method": "sgd", "weight_decay": 0.0},
}

# 95% two-sided t quantiles by degrees of freedom (1..30); beyond 30 the normal 1.96 is close enough
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def paired_stats(diffs: list[float]) -> dict[str, Any]:
    """Mean paired difference, its standard error and 95% t-interval (at least two differences)."""
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = t975(len(diffs) - 1) * se
    return {"diff": mean, "se": se, "ci": (mean - half, mean + half)}


def register_peers() -> None:
    """SGDP and AdamP (Heo et al. 2021, the ``adamp`` package) as engine methods, with the recipe's weight decay.

    Benchmark-only: the package is a test/benchmark extra, not a dependency of fixnorm.
    """
    from dataclasses import replace

    from fixnorm.methods import Method, list_methods, register_method
    from fixnorm.methods.baselines import base_optimizer, decay_groups

    if "sgdp" in list_methods():
        return

    def sgdp(model, cfg, example):
        from adamp import SGDP

        _, kwargs = base_optimizer(replace(cfg, base="sgd"))
        return SGDP(decay_groups(model, cfg.weight_decay), **kwargs)

    def adamp(model, cfg, example):
        from adamp import AdamP

        _, kwargs = base_optimizer(replace(cfg, base="adam"))
        return AdamP(decay_groups(model, cfg.weight_decay), **kwargs)

    register_method(Method("sgdp", "SGDP (adamp package) with the recipe's weight decay", sgdp))
    register_method(Method("adamp", "AdamP (adamp package) with the recipe's weight decay, decoupled as AdamW", adamp))


def parse_seeds(text: list[str]) -> list[int]:
    seeds: list[int] = []
    for item in text:
        if "-" in item:
            lo, hi = item.split("-")
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(item))
    return seeds


def arm_settings(arm: str, extra: dict[str, Any]) -> dict[str, Any]:
    """An arm by name, or ``name:key=value,key=value`` for an ad-hoc variant of a named arm."""
    name, _, spec = arm.partition(":")
    if name not in ARMS:
        raise SystemExit(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
    settings = dict(ARMS[name])
    if spec:
        settings.update(parse_overrides(spec.split(",")))
    settings.update(extra.get(arm, {}))
    return settings


def run_dir_name(arm: str, seed: int) -> str:
    return f"{arm.replace(':', '_').replace(',', '_').replace('=', '')}-s{seed}"


def run_all(args: argparse.Namespace, recipe: dict[str, Any], overrides: dict[str, Any]) -> None:
    shard, shards = _common.parse_shard(args.shard)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seed-major: paired results arrive together
    for index, (arm, seed) in enumerate(jobs):
        if index % shards != shard:
            continue
        run_dir = Path(args.out) / run_dir_name(arm, seed)
        finished = RunFolder(run_dir).finished
        summary = train_or_reuse(arm_config(arm, seed, recipe, overrides, args.threads), run_dir)  # checks a reused one
        if not finished:
            print(f"{arm} seed {seed}: final {100 * summary['final_test_acc']:.2f}", flush=True)


def arm_config(arm: str, seed: int, recipe: dict[str, Any], overrides: dict[str, Any],
               threads: int | None) -> TrainConfig:
    """The config of one arm's run on one seed."""
    settings = arm_settings(arm, {})
    if settings.get("angular_update") == "from_wd":  # the recipe's SGD+WD equilibrium angle
        base = make_config(recipe, overrides, {k: v for k, v in settings.items() if k != "angular_update"})
        settings["angular_update"] = from_weight_decay(base.lr, base.weight_decay, base.momentum)["angular_update"]
    return make_config(recipe, overrides, settings, {"seed": seed, "threads": threads})


def table(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, dict[int, dict[str, Any]]] = {}
    recipe, overrides = load_recipe(args.recipe), parse_overrides(args.set)
    for arm in args.arms:
        for seed in args.seeds:
            path = Path(args.out) / run_dir_name(arm, seed) / "summary.json"
            if path.exists():
                # a folder trained with other settings than the arm's today would be tabulated under a wrong name
                check_same_run(path.parent, arm_config(arm, seed, recipe, overrides, args.threads))
                summary = json.loads(path.read_text())  # the engine's summary holds final_train_loss
                results.setdefault(arm, {})[seed] = summary
    ref = results.get(args.reference, {})
    rows = []
    for arm in args.arms:
        runs = results.get(arm, {})
        accs = [100 * r["final_test_acc"] for r in runs.values()]
        if not accs:
            continue
        losses = [r["final_train_loss"] for r in runs.values() if r["final_train_loss"] is not None]
        row: dict[str, Any] = {"arm": arm, "settings": arm_settings(arm, {}), "seeds": sorted(runs),
                               "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                               "train_loss": statistics.mean(losses) if losses else None}
        paired = sorted(set(runs) & set(ref))
        if arm != args.reference and len(paired) >= 2:
            stats = paired_stats([100 * (runs[s]["final_test_acc"] - ref[s]["final_test_acc"]) for s in paired])
            (low, high), mean = stats["ci"], stats["diff"]
            row.update(paired=len(paired), diff=mean, diff_se=stats["se"], ci=(low, high),
                       verdict="within noise" if low <= 0 <= high else ("better" if mean > 0 else "worse"))
        rows.append(row)
    lines = [f"| arm | seeds | final acc (%) | train loss | Δ vs {args.reference} (paired) | 95% CI | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['train_loss']:.3f}" if r["train_loss"] is not None else "-"
        if "diff" in r:
            delta = f"{r['diff']:+.2f} ± {r['diff_se']:.2f}"
            ci = f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]"
            verdict = r["verdict"]
        else:
            delta, ci, verdict = "-", "-", "reference" if r["arm"] == args.reference else "-"
        lines.append(f"| {r['arm']} | {len(r['seeds'])} | {r['mean']:.2f} ± {r['std']:.2f} | {loss} | {delta} | {ci} "
                     f"| {verdict} |")
    command = "python benchmarks/fixnorm_vs_wd.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines) + (f"\n\nRecipe `{args.recipe}` with {args.set or 'no overrides'}; Δ is the mean "
                               f"paired difference ± its standard error.\n\nCommand: `{command}`\n")
    print(text)
    result = {"recipe": args.recipe, "overrides": args.set, "reference": args.reference, "rows": rows,
              "command": command, "machine": _common.machine_info(torch.device("cpu"))}
    if args.name:
        _common.atomic_write_json(os.path.join(_common.RESULTS_DIR, f"{args.name}.json"), result)
        _common.atomic_write_text(os.path.join(_common.RESULTS_DIR, f"{args.name}.md"),
                                  f"# {args.name}\n\n{text}")
    return result


def column_table(args: argparse.Namespace, result: dict[str, Any],
                 columns: list[tuple[str, str, str, str]]) -> str:
    """Columns read from each run's metrics.csv, averaged over seeds: ``(title, column, "mean"|"last", format)``,
    plus seconds per epoch and its ratio to the reference arm (same processes, interleaved: the ratio holds).
    Adds the values to ``result["rows"]``; returns the Markdown table."""
    def read(run_dir: Path, column: str, how: str) -> float | None:
        with (run_dir / "metrics.csv").open() as f:
            values = [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
        return (statistics.mean(values) if how == "mean" else values[-1]) if values else None

    columns = columns + [("s / epoch", "seconds", "mean", ".1f")]
    for row in result["rows"]:
        for title, column, how, _ in columns:
            values = [read(Path(args.out) / run_dir_name(row["arm"], s), column, how) for s in row["seeds"]]
            values = [v for v in values if v is not None]
            row[column] = statistics.mean(values) if values else None
    reference = next((r for r in result["rows"] if r["arm"] == args.reference), None)
    lines = ["| arm | " + " | ".join(c[0] for c in columns) + " | × reference |",
             "|---|" + "---|" * (len(columns) + 1)]
    for row in result["rows"]:
        ratio = (row["seconds"] / reference["seconds"] if reference and reference.get("seconds") and row["seconds"]
                 else None)
        row["cost_ratio"] = ratio
        cells = ["-" if row[c[1]] is None else format(row[c[1]], c[3]) for c in columns]
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + f" | {'-' if ratio is None else format(ratio, '.2f')} |")
    return "\n".join(lines)


def save_with_columns(args: argparse.Namespace, result: dict[str, Any], text: str, script: str, note: str) -> None:
    """Append the column table to the accuracy table ``table`` wrote, with ``script``'s own command line."""
    if not args.name:
        return
    path = os.path.join(_common.RESULTS_DIR, f"{args.name}.md")
    with open(path) as f:
        accuracy = f.read()
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    accuracy = accuracy.replace("python benchmarks/fixnorm_vs_wd.py " + " ".join(sys.argv[1:]), command)
    _common.atomic_write_text(path, accuracy + "\n" + text + "\n\n" + note + "\n")
    _common.atomic_write_json(os.path.join(_common.RESULTS_DIR, f"{args.name}.json"),
                              {**result, "command": command, "machine": _common.machine_info(torch.device("cpu"))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fmnist-tune")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for every arm (key=value)")
    parser.add_argument("--arms", nargs="+", default=["sgd", "fixnorm"],
                        help=f"named arms ({', '.join(ARMS)}), or name:key=value,... for a variant")
    parser.add_argument("--seeds", nargs="+", default=["0-15"], help="seeds, e.g. 0-15 or 0 1 2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only read finished runs and print the table")
    parser.add_argument("--reference", default="sgd")
    parser.add_argument("--name", default=None, help="write benchmarks/results/<name>.json and .md")
    args = parser.parse_args()
    args.seeds = parse_seeds(args.seeds)
    register_peers()
    if args.table:
        table(args)
        return
    run_all(args, load_recipe(args.recipe), parse_overrides(args.set))


if __name__ == "__main__":
    main()
