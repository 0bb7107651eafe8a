"""Issue 14's FixNorm tie-in: is the lottery-ticket correlation R_p(θ_0, θ_T) set by the effective learning rate?

Liu et al. (ICML 2021) tie winning tickets to a small learning rate: the final weights stay correlated with the
initial ones. Behind BatchNorm what moves a scale-invariant weight is lr / ‖w‖², not lr. FixNorm holds ‖w‖ at
``norm_scale`` times its initial norm (``free_steps=0``: from step 0), so it moves that effective learning rate
without touching the lr the classifier and the BN parameters see. If the effective learning rate is what matters,
R_p falls as lr / norm_scale² rises at a fixed lr, and two runs with the same lr / norm_scale² at different lrs
have about the same R_p.

Each arm is a dense run of the pruning study's recipe (``fixnorm prune``'s dense phase: ``step-0.pt`` saved),
reused when finished and resumed when interrupted; R_p is measured over every conv and linear weight at
p = 0.1 … 0.5, as the study does:

    python benchmarks/prune_fixnorm_correlation.py --seeds 0 1 --out runs/prune_fixnorm --shard 0/2 &
    python benchmarks/prune_fixnorm_correlation.py --seeds 0 1 --out runs/prune_fixnorm --shard 1/2 &
    python benchmarks/prune_fixnorm_correlation.py --seeds 0 1 --out runs/prune_fixnorm --table \\
        --name prune_fixnorm_correlation
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from fixnorm_vs_wd import parse_seeds  # noqa: E402

from fixnorm.io import write_json_atomic, write_text_atomic  # noqa: E402
from fixnorm.run_folder import RunFolder  # noqa: E402
from fixnorm.train.config import load_recipe, make_config, parse_overrides  # noqa: E402
from fixnorm.train.prune import DENSE_P, _weights_and_steps  # noqa: E402
from fixnorm.train.study import mean_std, model_state, train_phase  # noqa: E402
from fixnorm.compress import weight_correlation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The pruning study's small-CNN recipe (docs/compression.md, "Measured").
STUDY = ["epochs=6", "schedule=step", "milestones=[3.2,4.8]", "gamma=0.1"]
ARMS = ["sgd", "fixnorm:free_steps=0,norm_scale=0.316", "fixnorm:free_steps=0,norm_scale=1",
        "fixnorm:free_steps=0,norm_scale=3.16"]


def arm_settings(arm: str) -> dict[str, Any]:
    """``method`` or ``method:key=value,...``."""
    method, _, spec = arm.partition(":")
    return {"method": method, **(parse_overrides(spec.split(",")) if spec else {})}


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm.replace(':', '_').replace(',', '_').replace('=', '')}-lr{lr:g}-s{seed}"


def jobs(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    return [(arm, lr, seed) for seed in args.seeds for lr in args.lrs for arm in args.arms]


def settings_of(args: argparse.Namespace, arm: str, lr: float, seed: int) -> dict[str, Any]:
    return {**load_recipe(args.recipe), **parse_overrides(STUDY + args.set), **arm_settings(arm),
            "lr": lr, "seed": seed, "threads": args.threads, "save_at_steps": [0]}


def correlations(args: argparse.Namespace, arm: str, lr: float, seed: int) -> dict[str, Any]:
    """The finished run's final accuracy and R_p(θ_0, θ_T) over every conv and linear weight."""
    cfg = make_config(settings_of(args, arm, lr, seed))
    folder = RunFolder(Path(args.out) / run_name(arm, lr, seed))
    names = _weights_and_steps(cfg, prune_first_conv=True)[0]
    first, final = model_state(folder.at_step(0)), model_state(folder.last)
    summary = folder.read_summary()
    return {"arm": arm, "lr": lr, "seed": seed, "final_test_acc": summary["final_test_acc"],
            "r_p": {str(p): weight_correlation(first, final, p, names=names) for p in DENSE_P}}


def effective_lr(arm: str, lr: float) -> float | None:
    """lr / norm_scale² for a FixNorm arm held from step 0 (relative to its initial norms); None otherwise."""
    settings = arm_settings(arm)
    if settings["method"] != "fixnorm" or settings.get("free_steps", None) != 0:
        return None
    return lr / float(settings.get("norm_scale", 1.0)) ** 2


def table(args: argparse.Namespace) -> None:
    runs = [correlations(args, arm, lr, seed) for arm, lr, seed in jobs(args)]
    rows, lines = [], []
    for lr in args.lrs:
        for arm in args.arms:
            mine = [r for r in runs if (r["arm"], r["lr"]) == (arm, lr)]
            acc = [100 * r["final_test_acc"] for r in mine]
            r_p = {p: [r["r_p"][str(p)] for r in mine] for p in DENSE_P}
            eff = effective_lr(arm, lr)
            rows.append({"arm": arm, "lr": lr, "effective_lr": eff, "seeds": [r["seed"] for r in mine],
                         "accuracy": acc, "r_p": {str(p): v for p, v in r_p.items()}})
            lines.append([arm, f"{lr:g}", "-" if eff is None else f"{eff:.3g}",
                          "{:.2f} ± {:.2f}".format(*mean_std(acc))]
                         + ["{:.3f} ± {:.3f}".format(*mean_std(v)) for v in r_p.values()])
    headers = ["arm", "lr", "lr / norm_scale²", "dense accuracy (%)"] + [f"R_{p:g}(θ_0, θ_T)" for p in DENSE_P]
    text = "\n".join([f"Command: `{_common.command_line()}`", "",
                      f"Recipe {args.recipe} with {' '.join(STUDY + args.set)}; seeds {args.seeds}; mean ± std over "
                      "seeds. R_p ≈ p means no correlation with the initialisation.", "",
                      _common.markdown_table(headers, lines)])
    print(text)
    result = {"command": _common.command_line(), "recipe": args.recipe, "study": STUDY + args.set, "rows": rows,
              "runs": runs}
    if args.name:
        write_json_atomic(RESULTS / f"{args.name}.json", result)
        write_text_atomic(RESULTS / f"{args.name}.md", text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fmnist-tune")
    parser.add_argument("--set", nargs="*", default=[], help="more recipe overrides (key=value)")
    parser.add_argument("--arms", nargs="+", default=ARMS, help="method or method:key=value,...")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--seeds", nargs="+", default=["0-1"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="i/n: train every n-th run starting at i")
    parser.add_argument("--table", action="store_true", help="only read finished runs")
    parser.add_argument("--name", default=None, help="write benchmarks/results/<name>.{md,json}")
    args = parser.parse_args()
    args.seeds = parse_seeds(args.seeds)
    if args.table:
        table(args)
        return
    shard, shards = _common.parse_shard(args.shard)
    for index, (arm, lr, seed) in enumerate(jobs(args)):
        if index % shards == shard:
            cfg = make_config(settings_of(args, arm, lr, seed))
            summary = train_phase(Path(args.out), run_name(arm, lr, seed), cfg)
            print(f"{arm} lr {lr:g} seed {seed}: {100 * summary['final_test_acc']:.2f}", flush=True)


if __name__ == "__main__":
    main()
