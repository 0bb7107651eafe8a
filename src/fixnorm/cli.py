"""`fixnorm ...` sub-commands (also `python -m fixnorm`). The library never prints; this module does."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .compress import BLOCK_SHAPES
from .errors import FixNormError

# flags that are shortcuts for --set KEY=VALUE
_SHORTCUTS = {"method": str, "model": str, "dataset": str, "data_dir": str, "epochs": int, "lr": float,
              "fc_norm": float, "free_steps": int, "lr_power": float, "seed": int, "batch_size": int, "train_subset": int,
              "precision": str}


class _Progress:
    """A tqdm bar per epoch on a terminal (or when asked); nothing between epoch lines otherwise."""

    def __init__(self, enabled: bool, label: str = ""):
        self.enabled, self.label, self.bar = enabled, label, None

    def step(self, epoch: int, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{self.label}epoch {epoch + 1}", unit="step", leave=False,
                            file=sys.stderr)
        self.bar.update(1)
        if step == total:
            self.bar.close()
            self.bar = None


def _epoch_line(cfg_epochs: int, label: str = "") -> Any:
    def show(r: dict[str, Any]) -> None:
        extra = f"  ema acc {100 * r['ema_test_acc']:.2f}%" if "ema_test_acc" in r else ""
        print(f"{label}epoch {r['epoch']}/{cfg_epochs}  train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:.2f}%"
              f"  test loss {r['test_loss']:.4f} acc {100 * r['test_acc']:.2f}%{extra}  lr {r['lr']:.4g}"
              f"  {r['seconds']:.1f} s  {r['images_per_second']:.0f} img/s", flush=True)
    return show


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from .train.config import load_recipe, parse_overrides

    settings = load_recipe(args.recipe)
    settings.update(parse_overrides(args.set or []))
    for key in _SHORTCUTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, make_config

    if args.resume:
        run_dir, cfg = Path(args.resume), None
    else:
        settings = _settings(args)
        cfg = make_config(settings)
        run_dir = Path(args.run_dir or Path("runs") / f"{args.recipe or 'custom'}-{cfg.method}-s{cfg.seed}-"
                       f"{time.strftime('%Y%m%d-%H%M%S')}")
    progress = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), on_step=progress.step)  # type: ignore[arg-type]
    if not args.quiet:
        trainer.on_epoch = _epoch_line(trainer.cfg.epochs)
        if args.resume:
            print(f"resuming {run_dir} after epoch {trainer.start_epoch}")
    summary = trainer.fit()
    if trainer.dist.is_main:
        print(f"final test accuracy: {summary['final_test_acc']:.4f}")
        print(f"best test accuracy: {summary['best_test_acc']:.4f}")
        if not args.quiet:
            print(f"run directory: {run_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .train.compare import comparison_table, run_comparison

    settings = _settings(args)
    out = Path(args.out or Path("runs") / f"compare-{args.recipe or 'custom'}")

    def callbacks(method: str, seed: int) -> dict[str, Any]:
        if args.quiet:
            return {}
        label = f"[{method} seed {seed}] "
        epochs = int(settings.get("epochs", 3))
        return {"on_step": _Progress(sys.stderr.isatty(), label).step, "on_epoch": _epoch_line(epochs, label)}

    result = run_comparison(settings, args.methods, args.seeds, out, make_callbacks=callbacks)
    print(comparison_table(result["rows"], result["settings"]))
    if not args.quiet:
        print(f"written: {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .train.prune import pruning_table, run_pruning

    settings = _settings(args)
    out = Path(args.out or Path("runs") / f"prune-{args.recipe or 'custom'}")
    lrs = args.lrs or [float(settings.get("lr", 0.1))]

    def callbacks(name: str) -> dict[str, Any]:
        if args.quiet:
            return {}
        label = f"[{name}] "
        epochs = int(settings.get("epochs", 3))
        return {"on_step": _Progress(sys.stderr.isatty(), label).step, "on_epoch": _epoch_line(epochs, label)}

    result = run_pruning(settings, sparsities=args.sparsity, arms=args.arms, seeds=args.seeds, lrs=lrs, out_dir=out,
                         rewind_step=args.rewind_step, scope=args.scope, prune_first_conv=args.prune_first_conv,
                         rounds=args.rounds, make_callbacks=callbacks)
    print(pruning_table(result))
    if result["no_plot"]:
        print(f"no plot: {result['no_plot']}")
    if not args.quiet:
        print(f"written: {out / 'prune.md'}, {out / 'prune.json'}" + "".join(f", {p}" for p in result["plots"]))
    return 0


def cmd_unify(args: argparse.Namespace) -> int:
    from .train.unify import run_unification, unification_table

    settings = _settings(args)
    out = Path(args.out or Path("runs") / f"unify-{args.recipe or 'custom'}")

    def callbacks(name: str) -> dict[str, Any]:
        if args.quiet:
            return {}
        label = f"[{name}] "
        phase_epochs: Any = "-" if not name.startswith("dense") else settings.get("epochs", "-")
        return {"on_step": _Progress(sys.stderr.isatty(), label).step, "on_epoch": _epoch_line(phase_epochs, label)}

    result = run_unification(settings, blocks=args.block, ratios=args.ratio, prune_ratios=args.prune_ratio,
                             modes=args.mode, seeds=args.seeds, out_dir=out, admm_epochs=args.admm_epochs,
                             retrain=args.retrain, unify_first_conv=args.unify_first_conv, make_callbacks=callbacks)
    print(unification_table(result))
    if not args.quiet:
        print(f"written: {out / 'unify.md'}, {out / 'unify.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    out = Path(args.out or (Path(args.run_dirs[0]) / "report" if len(args.run_dirs) == 1 else "runs/report"))
    path = make_report(args.run_dirs, out)
    print(path.read_text())
    print(f"written: {path} and its plots in {out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .report import plot_best_so_far
    from .train.checkpoint import write_json_atomic, write_text_atomic
    from .tune import Tuner, search_space, training_objective

    settings = _settings(args)
    method = args.method or settings.get("method", "fixnorm")
    settings["method"] = method
    sampler = args.sampler or ("coordinate" if method == "fixnorm" else "tpe")
    out = Path(args.out or Path("runs") / f"tune-{args.recipe or 'custom'}-{method}-{sampler}")
    space = search_space(settings, lr_range=args.lr_range, second_range=args.second_range, ratio=args.ratio,
                         axes=args.axes)
    if not args.quiet:
        print("search space: " + "; ".join(f"{a.name} {a.value(a.low):.3g} .. {a.value(a.high):.3g} "
                                          f"({a.high - a.low + 1} points, start {a.center:.3g})" for a in space.axes))
    objective = training_objective(settings, out / "runs")

    def show(trial: dict[str, Any]) -> None:
        if args.quiet:
            return
        values = ", ".join(f"{a.name}={trial[a.name]:.4g}" for a in space.axes)
        score = f"{trial['value']:.4f}" if trial["value"] is not None else trial["state"]
        print(f"trial {trial['number']}: {values} -> {score} ({trial['seconds'] or 0:.0f} s)", flush=True)

    tuner = Tuner(space, objective, tuner=sampler, n_trials=args.trials, out_dir=out, storage=args.storage,
                  study_name=args.study or f"{method}-{sampler}", seed=args.tuner_seed, settings=settings,
                  pruner=args.pruner)
    result = tuner.run(on_trial=show)
    names = [a.name for a in space.axes]
    lines = ["| trial | state | " + " | ".join(names) + " | accuracy | seconds |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for t in result.trials:
        value = f"{t['value']:.4f}" if t["value"] is not None else "-"
        lines.append(f"| {t['number']} | {t['state']} | " + " | ".join(f"{t[n]:.4g}" for n in names) +
                     f" | {value} | {t['seconds'] or 0:.0f} |")
    table = "\n".join(lines)
    write_text_atomic(out / "trials.md", table + "\n")
    write_json_atomic(out / "tune.json", {"method": method, "tuner": sampler, "space": space.to_dict(),
                                          "settings": settings, "trials": result.trials, "best": result.best,
                                          "recommended": result.recommended,
                                          "finished": result.finished})
    written = [out / "trials.md", out / "tune.json"]
    if result.trials:
        try:
            plot_best_so_far({f"{sampler} ({method})": result.best_so_far()}, out / "best_so_far.png")
            written.append(out / "best_so_far.png")
        except FixNormError as exc:
            print(f"no plot: {exc}")
    print(table)
    if result.best is not None:
        best = ", ".join(f"{n}={result.best[n]:.4g}" for n in names)
        print(f"best: {best} -> {result.best['value']:.4f} (trial {result.best['number']})")
    if result.recommended is not None:
        rec = result.recommended
        values = ", ".join(f"{n}={rec[n]:.4g}" for n in names)
        how = ("the best trial: no axis has an evaluated neighbour on each side" if len(rec["trials"]) == 1 else
               f"parabola through trials {', '.join(map(str, rec['trials']))} in log space"
               + ("" if rec["evaluated"] else "; this point was not trained"))
        print(f"recommended: {values} ({how})")
    if not args.quiet:
        print(f"written: {', '.join(map(str, written))}; study in {args.storage or out / 'study.db'}")
    return 0


def cmd_roles(args: argparse.Namespace) -> int:
    from .models import create_model
    from .optim import FixNorm

    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    x = torch.randn(args.batch, args.in_channels, args.size, args.size)
    opt = FixNorm(model, x, lr=0.1, granularity=args.granularity, fc_norm=args.fc_norm, joint=args.joint)
    print(opt.roles.table() if args.why else opt.plan.table())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .methods import get_method, list_methods
    from .models import list_models
    from .train.config import RECIPES

    print("methods:")
    for name in list_methods():
        print(f"  {name:10s} {get_method(name).description}")
    print("models: " + ", ".join(list_models()))
    print("recipes: " + ", ".join(RECIPES))
    return 0


def _add_run_options(p: argparse.ArgumentParser, recipe: str = "fmnist-resnet20") -> None:
    p.add_argument("--recipe", default=recipe, help="built-in recipe name or YAML file "
                   f"(default: {recipe}; `fixnorm list` shows them)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting (YAML value), repeatable")
    for key, kind in _SHORTCUTS.items():
        if key != "method":
            p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None)
    p.add_argument("--quiet", action="store_true", help="print only the final result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixnorm", description="Train without weight decay by fixing weight norms.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run from a recipe; --resume RUN_DIR continues a run")
    _add_run_options(train)
    train.add_argument("--method", default=None, help="a method from `fixnorm list` (default: the recipe's)")
    train.add_argument("--run-dir", default=None, help="where the run is written (default: runs/<recipe>-...)")
    train.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from last.pt")
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="run methods x seeds on one recipe and print a comparison table")
    _add_run_options(compare)
    compare.add_argument("--methods", nargs="+", default=["sgd", "fixnorm"])
    compare.add_argument("--seeds", nargs="+", type=int, default=[0])
    compare.add_argument("--out", default=None, help="folder for the runs and the table (reruns reuse finished runs)")
    compare.set_defaults(func=cmd_compare)

    prune = sub.add_parser("prune", help="pruning & fine-tuning versus lottery tickets: dense runs, masks, arms")
    _add_run_options(prune)
    prune.add_argument("--method", default=None, help="the method of every phase (default: the recipe's)")
    prune.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.8, 0.9],
                       help="fractions of the masked weights pruned, each in (0, 1)")
    prune.add_argument("--arms", nargs="+", default=["finetune", "ticket", "rewind", "reinit"],
                       help="finetune (from the final weights), ticket (from the initialisation), rewind (from "
                       "step K, schedule resumed there), reinit (from a fresh initialisation)")
    prune.add_argument("--seeds", nargs="+", type=int, default=[0])
    prune.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates (default: the recipe's)")
    prune.add_argument("--rewind-step", type=int, default=None, help="K of the rewind arm (default: one epoch)")
    prune.add_argument("--scope", choices=["layer", "global"], default="layer",
                       help="prune each layer at the rate (the paper's) or all layers together (open_lth's)")
    prune.add_argument("--prune-first-conv", action="store_true", help="prune the first conv too (default: dense)")
    prune.add_argument("--rounds", type=int, default=1,
                       help="1: one-shot masks; N > 1: iterative, N rounds at one rate per round, nested masks, "
                            "each round retrained T epochs (from θ_0 for ticket/rewind/reinit, continued for finetune)")
    prune.add_argument("--out", default=None, help="folder for the runs, masks and table (reruns reuse them)")
    prune.set_defaults(func=cmd_prune)

    unify = sub.add_parser("unify", help="micro-structured weight unification: dense run, one-shot projection or "
                           "ADMM, retraining with the blocks held")
    _add_run_options(unify)
    unify.add_argument("--method", default=None, help="the method of every phase, ADMM's W-steps included "
                       "(default: the recipe's)")
    unify.add_argument("--block", nargs="+", default=["2x2"], choices=list(BLOCK_SHAPES),
                       help="block shapes of the (out, in*kh*kw) matrix; kernel = 1 x kh*kw")
    unify.add_argument("--ratio", nargs="+", type=float, default=[0.5, 0.75, 0.9],
                       help="shares of each layer's blocks unified, each in [0, 1)")
    unify.add_argument("--prune-ratio", nargs="+", type=float, default=[0.0],
                       help="shares of each layer's blocks pruned, each in [0, 1) (combined with every --ratio)")
    unify.add_argument("--mode", nargs="+", default=["oneshot", "admm"], choices=["oneshot", "admm"],
                       help="oneshot: project the dense weights, retrain; admm: ADMM, project, retrain (equal epochs)")
    unify.add_argument("--seeds", nargs="+", type=int, default=[0])
    unify.add_argument("--admm-epochs", type=int, default=None, help="ADMM's share of the epochs (default: half)")
    unify.add_argument("--retrain", choices=["fixed", "magnitude"], default="fixed",
                       help="unified blocks fixed, or one trainable magnitude per block (signs fixed)")
    unify.add_argument("--unify-first-conv", action="store_true", help="constrain the first conv too "
                       "(default: dense)")
    unify.add_argument("--out", default=None, help="folder for the runs, unify files and table (reruns reuse them)")
    unify.set_defaults(func=cmd_unify)

    roles = sub.add_parser("roles", help="print FixNorm's plan (or, with --why, the role analysis) for a model")
    roles.add_argument("--model", default="resnet20")
    roles.add_argument("--num-classes", type=int, default=10)
    roles.add_argument("--in-channels", type=int, default=3)
    roles.add_argument("--size", type=int, default=32, help="example input height and width")
    roles.add_argument("--batch", type=int, default=2)
    roles.add_argument("--granularity", default="tensor", choices=["tensor", "filter"])
    roles.add_argument("--fc-norm", type=float, default=None)
    roles.add_argument("--why", action="store_true", help="show the measured role and reason per parameter")
    roles.add_argument("--joint", default="auto", choices=["auto", "free", "hold"],
                       help="the weights scale-invariant only together: hold their joint norms ('auto': where the "
                            "joint rule applies) or leave them free")
    roles.set_defaults(func=cmd_roles)

    report = sub.add_parser("report", help="plots and a Markdown summary from run directories (overlaid)")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default=None, help="folder for report.md and the PNGs "
                        "(default: RUN_DIR/report for one run, runs/report for several)")
    report.set_defaults(func=cmd_report)

    tune = sub.add_parser("tune", help="tune lr and the classifier norm (fixnorm) or weight decay (baselines)")
    _add_run_options(tune, recipe="fmnist-tune")
    tune.add_argument("--method", default=None, help="fixnorm (lr x classifier norm) or sgd/adamw/rmsprop "
                      "(lr x weight decay); default: the recipe's")
    tune.add_argument("--sampler", choices=["coordinate", "tpe", "random", "grid"], default=None,
                      help="coordinate: FixNorm's few-trial search (default for fixnorm); tpe (default otherwise), "
                      "random, grid: Optuna samplers")
    tune.add_argument("--trials", type=int, default=12, help="budget of finished trials, shared by all workers")
    tune.add_argument("--out", default=None, help="folder for the study, the trial runs and the results")
    tune.add_argument("--storage", default=None, help="Optuna storage: a database URL, e.g. "
                      "postgresql://user:pw@host/db for workers on several machines, or a journal file "
                      "(journal:PATH, or a path ending .log or .jsonl) for workers on one machine "
                      "(default: SQLite OUT/study.db)")
    tune.add_argument("--study", default=None, help="study name in the storage (default: METHOD-SAMPLER)")
    tune.add_argument("--pruner", choices=["none", "median", "halving"], default="none",
                      help="stop poor trials early (Optuna samplers only)")
    tune.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                      help="default: the recipe's lr / 16 .. x 16")
    tune.add_argument("--second-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                      help="range of the first axis after the lr: fc_scale (default 1/4 .. 4; fc_norm initial / 4 "
                           ".. x 16 with free_steps=0), norm_scale (default 1/2 .. 2 under SGD, 1/4 .. 4 under "
                           "Adam-like bases) or weight decay (default wd / 30 .. x 30)")
    tune.add_argument("--axes", nargs="+", default=None, metavar="NAME",
                      help="the settings searched besides the lr, in this order (after the lr, unless lr is "
                           "listed elsewhere): for fixnorm any of fc_scale (the default; norm_scale where the "
                           "classifier is left free, as over Adam), norm_scale; for the baselines weight_decay")
    tune.add_argument("--ratio", type=float, default=2 ** 0.5, help="factor between neighbouring lattice points")
    tune.add_argument("--tuner-seed", type=int, default=0)
    tune.set_defaults(func=cmd_tune)

    listing = sub.add_parser("list", help="list methods, models and recipes")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FixNormError as exc:
        print(f"fixnorm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
