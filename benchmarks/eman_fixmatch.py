"""EMAN against the other FixMatch teachers (issue 12): who labels the weak view, and does it make a better student?

Arms are teachers of recipe ``fmnist-fixmatch`` (400 labels, small CNN; ``--set model=resnet20`` for the ResNet):
``none`` (the student labels, FixMatch's baseline), ``ema`` (parameter EMA, batch statistics), ``eman`` (parameters
and BN statistics averaged, eval mode), and under FixNorm ``eman_renorm`` (EMAN with the teacher put back at
FixNorm's norms) beside ``eman-fixnorm`` and ``none-fixnorm``, its FixNorm references. Runs live in
``OUT/<arm>-s<seed>`` and are reused when finished, resumed when interrupted (``fixnorm_vs_wd.py``'s runner, with
its ``--shard i/n``); ``--table`` reads finished runs only:

    python benchmarks/eman_fixmatch.py --steps-per-run --out runs/eman_fixmatch     # step time -> hours per run
    python benchmarks/eman_fixmatch.py --seeds 0-2 --out runs/eman_fixmatch --shard 0/2 &
    python benchmarks/eman_fixmatch.py --seeds 0-2 --out runs/eman_fixmatch --shard 1/2 &
    python benchmarks/eman_fixmatch.py --seeds 0-2 --out runs/eman_fixmatch --table --name eman_fixmatch_small_cnn

The table: final student and teacher test accuracy (mean ± std over seeds; ``none``'s teacher is its student), the
paired difference of each arm's teacher and student to ``none`` (± standard error, 95% t-interval), and the last
epoch's pseudo-label accuracy and mask rate on the unlabelled stream. A PNG shows teacher accuracy, pseudo-label
accuracy and mask rate per epoch (mean over seeds, min-max band), from each run's metrics.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import fixnorm_vs_wd as arms_runner  # noqa: E402

import torch  # noqa: E402

from fixnorm.run_folder import RunFolder  # noqa: E402
from fixnorm.train import Trainer  # noqa: E402
from fixnorm.train.config import load_recipe, make_config, parse_overrides  # noqa: E402
from fixnorm.train.engine import check_same_run  # noqa: E402


def _teacher(teacher: str, optimizer: str = "sgd") -> dict[str, Any]:
    return {"method": "fixmatch", "method_kwargs": {"fixmatch": {"teacher": teacher, "optimizer": optimizer}}}


ARMS: dict[str, dict[str, Any]] = {
    "none": _teacher("none"),
    "ema": _teacher("ema"),
    "eman": _teacher("eman"),
    "eman_renorm": _teacher("eman_renorm", "fixnorm"),
    "eman-fixnorm": _teacher("eman", "fixnorm"),    # does the renorm matter? the same teacher without it
    "none-fixnorm": _teacher("none", "fixnorm"),    # FixNorm's own FixMatch baseline
}
DEFAULT_ARMS = ["none", "ema", "eman", "eman_renorm"]
TEACHER_ACC, PSEUDO_ACC, MASK_RATE = "fixmatch/teacher_test_acc", "fixmatch/pseudo_label_acc", "fixmatch/mask_rate"


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv of a run as numbers per epoch; a run without a teacher gets its student's accuracy as teacher's."""
    with (run_dir / "metrics.csv").open() as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    for row in rows:
        row.setdefault(TEACHER_ACC, row["test_acc"])
    return rows


paired = arms_runner.paired_stats  # mean paired difference, its standard error and 95% t-interval


def _mean_std(values: list[float]) -> str:
    """Mean ± std over seeds; one seed is its value alone (no spread to show, not a spread of zero)."""
    if len(values) < 2:
        return f"{statistics.mean(values):.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _delta(values: dict[int, float], reference: dict[int, float]) -> tuple[str, dict[str, Any] | None]:
    seeds = sorted(set(values) & set(reference))
    if len(seeds) < 2:
        return "-", None
    stats = paired([values[s] - reference[s] for s in seeds])
    return (f"{stats['diff']:+.2f} ± {stats['se']:.2f} [{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}]",
            {**stats, "seeds": seeds})


def table(args: argparse.Namespace) -> dict[str, Any]:
    """Read the finished runs; print and (with ``--name``) save the table, the JSON and the PNG."""
    runs: dict[str, dict[int, list[dict[str, float]]]] = {}
    recipe, overrides = load_recipe(args.recipe), parse_overrides(args.set)
    for arm in args.arms:
        for seed in args.seeds:
            run_dir = Path(args.out) / arms_runner.run_dir_name(arm, seed)
            if RunFolder(run_dir).finished:  # trained with the arm's settings, or an error (never a wrong label)
                check_same_run(run_dir, arms_runner.arm_config(arm, seed, recipe, overrides, args.threads))
                runs.setdefault(arm, {})[seed] = read_metrics(run_dir)
    committed = []  # (arm, seed, file): runs no longer on this machine, read from a committed result's records
    for path in args.committed:
        saved = json.loads(Path(path).read_text())
        if saved["recipe"] != args.recipe or list(saved["overrides"]) != list(args.set):
            raise SystemExit(f"{path} was made with --recipe {saved['recipe']} --set {saved['overrides']}, not "
                             f"--recipe {args.recipe} --set {args.set}: its runs are another benchmark's")
        for arm in args.arms:
            for seed in args.seeds:
                rows = saved["curves"].get(arm, {}).get(str(seed))
                if rows and seed not in runs.get(arm, {}):
                    runs.setdefault(arm, {})[seed] = rows
                    committed.append((arm, seed, path))
    if not runs:
        raise SystemExit(f"no finished runs under {args.out} for arms {args.arms} and seeds {args.seeds}")
    final = {arm: {key: {s: 100 * rows[-1][key] for s, rows in by_seed.items() if key in rows[-1]}
                   for key in ("test_acc", TEACHER_ACC, PSEUDO_ACC, MASK_RATE)} for arm, by_seed in runs.items()}
    reference = final.get(args.reference)
    lines = [f"| arm | seeds | student acc (%) | teacher acc (%) | Δ teacher vs {args.reference} (paired, ± se, 95% CI) "
             f"| Δ student vs {args.reference} | pseudo-label acc (%) | mask rate (%) |", "|---|" + "---|" * 7]
    rows = []
    for arm in args.arms:
        if arm not in final:
            continue
        f = final[arm]
        row: dict[str, Any] = {"arm": arm, "settings": arms_runner.arm_settings(arm, {}), "seeds": sorted(runs[arm]),
                               **{f"final {k}": v for k, v in f.items()}}
        cells = [arm, str(len(runs[arm]))]
        cells += [_mean_std(list(f[k].values())) if f[k] else "-" for k in ("test_acc", TEACHER_ACC)]
        for key, name in ((TEACHER_ACC, "delta_teacher"), ("test_acc", "delta_student")):
            text, stats = ("reference", None) if arm == args.reference or reference is None else _delta(
                f[key], reference[key])
            cells.append(text)
            row[name] = stats
        cells += [_mean_std(list(f[k].values())) if f[k] else "-" for k in (PSEUDO_ACC, MASK_RATE)]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    command = _common.command_line()
    text = "\n".join(lines) + (
        f"\n\nRecipe `{args.recipe}` with {args.set or 'no overrides'}; final epoch. `none`'s teacher is its "
        f"student. Pseudo-label accuracy is over every unlabelled image of the last epoch, mask rate the share above "
        f"the threshold. Δ: mean paired difference over seeds ± its standard error [95% t-interval].\n\n"
        f"Command: `{command}`\n")
    if committed:
        text += ("\nRead from committed results (their per-epoch records; the runs are no longer on this machine): "
                 + "; ".join(f"`{arm}` seed {seed} from `{path}`" for arm, seed, path in committed) + ".\n")
    plot = Path(args.plot) if args.plot else (Path(_common.RESULTS_DIR) / f"{args.name}.png" if args.name
                                              else Path(args.out) / "eman_fixmatch.png")
    plot_curves(runs, plot)
    text += f"\nCurves: `{plot}`\n"
    print(text)
    result = {"recipe": args.recipe, "overrides": args.set, "reference": args.reference, "rows": rows,
              "curves": {arm: {s: rs for s, rs in by_seed.items()} for arm, by_seed in runs.items()},
              "plot": str(plot), "command": command, "machine": _common.machine_info(torch.device("cpu"))}
    if args.name:
        _common.atomic_write_json(os.path.join(_common.RESULTS_DIR, f"{args.name}.json"), result)
        _common.atomic_write_text(os.path.join(_common.RESULTS_DIR, f"{args.name}.md"), f"# {args.name}\n\n{text}")
    return result


def plot_curves(runs: dict[str, dict[int, list[dict[str, float]]]], path: Path) -> None:
    """Teacher accuracy, pseudo-label accuracy and mask rate per epoch: one line per arm (seed mean, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(TEACHER_ACC, "teacher test accuracy (%)"), (PSEUDO_ACC, "pseudo-label accuracy (%)"),
              (MASK_RATE, "mask rate (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (column, title) in zip(axes, panels):
        for arm, by_seed in runs.items():
            epochs = min(len(rows) for rows in by_seed.values())
            values = [[100 * rows[e][column] for rows in by_seed.values() if column in rows[e]] for e in range(epochs)]
            xs = [e + 1 for e, v in enumerate(values) if v]
            values = [v for v in values if v]
            if not values:
                continue
            line, = ax.plot(xs, [statistics.mean(v) for v in values], marker="o", label=arm)
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("epoch (a pass of the unlabelled stream)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Timed(Exception):
    """Raised from the step callback once enough steps are timed."""


def steps_per_run(args: argparse.Namespace, recipe: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Time ``--time-steps`` real steps of each arm (after 3 warm-up steps) and one evaluation; print the expected
    wall time of a run (steps x step time + an evaluation of student and teacher per epoch) and of the benchmark."""
    total = 0.0
    for arm in args.arms:
        cfg = make_config(recipe, overrides, arms_runner.arm_settings(arm, {}),
                          {"seed": args.seeds[0], "threads": args.threads})
        stamps: list[float] = []

        def on_step(epoch: int, step: int, steps: int) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) == args.time_steps + 3:
                raise _Timed

        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp) / "timing", on_step=on_step)
            try:
                trainer.fit()
            except _Timed:
                pass
            if len(stamps) < 5:
                raise SystemExit(f"{arm}: the run has only {len(stamps)} steps; too few to time")
            per_step = (stamps[-1] - stamps[2]) / (len(stamps) - 3)
            start = time.perf_counter()
            trainer.evaluate(trainer.model)
            per_eval = time.perf_counter() - start
        steps = cfg.epochs * trainer.steps_per_epoch
        evals = cfg.epochs * (1 if arm.startswith("none") else 2)
        seconds = steps * per_step + evals * per_eval
        total += seconds * len(args.seeds)
        print(f"{arm}: {steps} steps ({cfg.epochs} epochs x {trainer.steps_per_epoch}) x {per_step * 1e3:.0f} ms "
              f"+ {evals} evaluations x {per_eval:.1f} s = {seconds / 60:.1f} min per run at {args.threads} "
              f"thread(s)", flush=True)
    print(f"all {len(args.arms)} arms x {len(args.seeds)} seeds: {total / 3600:.2f} h in one process "
          f"(shards run side by side divide it, if the cores allow)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fmnist-fixmatch")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides for every arm (key=value), "
                        "e.g. model=resnet20")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help=f"teachers: {', '.join(ARMS)}")
    parser.add_argument("--seeds", nargs="+", default=["0-2"], help="seeds, e.g. 0-2 or 0 1 2")
    parser.add_argument("--out", required=True, help="the runs' folder")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th job starting at i")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", default="none")
    parser.add_argument("--table", action="store_true", help="only read finished runs: table, JSON, PNG")
    parser.add_argument("--committed", nargs="*", default=[], help="with --table: committed result JSONs of this "
                        "benchmark whose per-epoch records stand in for runs no longer on this machine")
    parser.add_argument("--name", default=None, help="write benchmarks/results/<name>.json, .md and .png")
    parser.add_argument("--plot", default=None, help="the PNG's path (default: results/<name>.png or OUT/)")
    parser.add_argument("--steps-per-run", action="store_true",
                        help="time a few steps of each arm and print the expected wall time per run; trains nothing")
    parser.add_argument("--time-steps", type=int, default=10, help="steps timed per arm by --steps-per-run")
    args = parser.parse_args()
    args.seeds = arms_runner.parse_seeds(args.seeds)
    arms_runner.ARMS.clear()
    arms_runner.ARMS.update(ARMS)  # the shared runner's arm_settings and run_all read these
    unknown = [a for a in args.arms if a.partition(":")[0] not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    if args.table:
        table(args)
        return
    recipe, overrides = load_recipe(args.recipe), parse_overrides(args.set)
    if args.steps_per_run:
        steps_per_run(args, recipe, overrides)
        return
    arms_runner.run_all(args, recipe, overrides)


if __name__ == "__main__":
    main()
