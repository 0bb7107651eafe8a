#!/usr/bin/env python
"""Which parameters lose accuracy at a large learning rate? Train one arm with some parameters slowed or capped.

At lr 0.8 on ResNet-20 both SGD + WD and FixNorm end 2-3 points below their lr-0.1 results, and FixNorm trails
SGD + WD there. Three kinds of parameters train at the full lr under both methods: the scale-invariant
convolutions (whose effective lr each method sets through their norms), the BatchNorm scales and shifts, and the
classifier. This probe trains an arm of ``fixnorm_vs_wd.py`` with one kind changed and everything else as it was, so
a recovery names the kind that loses:

- ``--factor F``: that kind trains at F times the lr (optionally only on ``--steps A-B``). A hook multiplies its
  gradients by F before the optimizer's step; with SGD (momentum, Nesterov or not, no dampening) that is exactly
  F times the lr, the update being linear in the gradient. Where the group decays its weights the hook adds
  ``(F - 1) * wd * w`` too, so the decay term is scaled with it.
- ``--cap C``: each step of that kind is shortened to at most C times the weight's norm before the step (after
  the optimizer's step and its projection; FixNorm's own ``fc_max_step`` caps before the projection). This is how
  the probe runs the cap under SGD + WD, which has no such option.

    python benchmarks/lr_role_probe.py --recipe fmnist-resnet20 --set lr=0.8 diagnostics=true \\
        --arm sgd --kind classifier --factor 0.125 --seeds 0-2 --out runs/r20_lr08 --shard 0/2

Run folders are ``fixnorm_vs_wd.py``'s names with ``+slow_<kind>x<F>[_steps<A-B>]`` or ``+cap_<kind><C>`` appended,
next to the reference arms; each run's final accuracy is printed, and its metrics.csv holds the diagnostics.
"""
from __future__ import annotations

import argparse
import glob
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts src/ on the path when run from a checkout)
import fixnorm_vs_wd  # noqa: E402

from fixnorm.constraints import shorten_step_  # noqa: E402
from fixnorm.hooks import Hook, RunState  # noqa: E402
from fixnorm.run_folder import RunFolder  # noqa: E402
from fixnorm.train.config import load_recipe, parse_overrides  # noqa: E402
from fixnorm.train.engine import Trainer, check_same_run  # noqa: E402

KINDS = ("norm_affine", "classifier")


def chosen_parameters(model: nn.Module, kind: str) -> list[nn.Parameter]:
    """``norm_affine``: every parameter with fewer than 2 dims outside the classifier (BatchNorm scales and shifts,
    biases); ``classifier``: the last ``nn.Linear``'s weight and bias."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SystemExit("the model has no nn.Linear: no classifier to pick")
    classifier = {id(p) for p in linears[-1].parameters()}
    if kind == "classifier":
        return [p for p in model.parameters() if id(p) in classifier]
    return [p for p in model.parameters() if p.ndim < 2 and id(p) not in classifier]


class ScaledLr(Hook):
    """Trains ``params`` at ``factor`` times their group's lr (gradient and decay term scaled before the step)."""

    def __init__(self, params: list[nn.Parameter], factor: float, steps: range | None = None) -> None:
        self.ids = {id(p) for p in params}
        self.factor = factor
        self.steps = steps  # the optimizer steps (0-based) it acts on; None: all

    @torch.no_grad()
    def before_step(self, run: RunState) -> None:
        if self.steps is not None and run.global_step not in self.steps:
            return
        for group in run.optimizer.param_groups:
            decay = group.get("weight_decay", 0.0)
            for p in group["params"]:
                if id(p) in self.ids and p.grad is not None:
                    p.grad.mul_(self.factor)
                    if decay:
                        p.grad.add_(p, alpha=(self.factor - 1) * decay)


class CappedStep(Hook):
    """Caps each of ``params``' change per step at ``cap`` times its norm before the step (a trust region): the
    step's direction is kept, its length shortened; momentum buffers are left as the optimizer wrote them."""

    def __init__(self, params: list[nn.Parameter], cap: float) -> None:
        self.params, self.cap = params, cap
        self.before: list[torch.Tensor] = []
        self.capped = 0

    @torch.no_grad()
    def before_step(self, run: RunState) -> None:
        self.before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self, run: RunState) -> None:
        for p, old in zip(self.params, self.before):
            self.capped += int(shorten_step_(p, old, self.cap))  # FixNorm's own kernel, here after any projection

    def on_epoch_end(self, run: RunState, record: dict) -> None:
        record["probe/capped_steps"] = self.capped


def probe_table(out: Path, arms: list[str], seeds: list[int], name: str | None) -> str:
    """Every probe folder of ``arms`` under ``out``, paired with the plain arm's run of the same seed."""
    def final(run_dir: Path) -> float | None:
        path = run_dir / "summary.json"
        return 100 * json.loads(path.read_text())["final_test_acc"] if path.exists() else None

    lines = ["| arm | change | seeds | final acc (%) | plain arm, same seeds | Δ (paired) | 95% CI |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        suffixes = sorted({d.name.split("+", 1)[1] for seed in seeds
                           for d in out.glob(f"{glob.escape(fixnorm_vs_wd.run_dir_name(arm, seed))}+*")})
        plain = {s: final(out / fixnorm_vs_wd.run_dir_name(arm, s)) for s in seeds}
        found = [v for v in plain.values() if v is not None]
        if not found:
            raise SystemExit(f"no finished run of the plain arm {arm!r} in {out} for seeds {seeds}")
        spread = f" ± {statistics.stdev(found):.2f}" if len(found) > 1 else ""
        lines.append(f"| {arm} | none | {len(found)} | {statistics.mean(found):.2f}{spread} | | | |")
        for suffix in suffixes:
            runs = {s: final(out / f"{fixnorm_vs_wd.run_dir_name(arm, s)}+{suffix}") for s in seeds}
            paired = [s for s in seeds if runs[s] is not None and plain[s] is not None]
            if not paired:
                continue
            accs = [runs[s] for s in paired]
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            row = (f"| {arm} | {suffix} | {len(paired)} ({', '.join(map(str, paired))}) | "
                   f"{statistics.mean(accs):.2f}{spread} | {statistics.mean(plain[s] for s in paired):.2f} | ")
            if len(paired) >= 2:
                stats = fixnorm_vs_wd.paired_stats([runs[s] - plain[s] for s in paired])
                row += f"{stats['diff']:+.2f} ± {stats['se']:.2f} | [{stats['ci'][0]:+.2f}, {stats['ci'][1]:+.2f}] |"
            else:
                row += f"{accs[0] - plain[paired[0]]:+.2f} (one seed) | - |"
            lines.append(row)
    command = "python benchmarks/lr_role_probe.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines) + f"\n\nΔ: the mean paired difference to the plain arm ± its standard error.\n\n" \
                              f"Command: `{command}`\n"
    print(text)
    if name:
        _common.atomic_write_text(str(Path(_common.RESULTS_DIR) / f"{name}.md"), f"# {name}\n\n{text}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fmnist-resnet20")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides (key=value)")
    parser.add_argument("--arm", nargs="+", required=True,
                        help="an arm of fixnorm_vs_wd.py, e.g. sgd or 'fixnorm:x=y' (several with --table)")
    parser.add_argument("--table", action="store_true", help="only tabulate the probe runs found in --out")
    parser.add_argument("--name", default=None, help="with --table: write benchmarks/results/<name>.md")
    parser.add_argument("--kind", choices=KINDS, help="which parameters: " + ", ".join(KINDS))
    parser.add_argument("--factor", type=float, default=None, help="train them at this multiple of the lr")
    parser.add_argument("--cap", type=float, default=None,
                        help="instead: cap their change per step at this multiple of their norm")
    parser.add_argument("--steps", default=None,
                        help="only optimizer steps A-B (0-based, B excluded; A- for A to the end), e.g. 0-100")
    parser.add_argument("--seeds", nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.table:
        probe_table(Path(args.out), args.arm, fixnorm_vs_wd.parse_seeds(args.seeds), args.name)
        return
    if len(args.arm) != 1 or args.kind is None:
        raise SystemExit("training takes one --arm and a --kind")
    args.arm = args.arm[0]
    if (args.factor is None) == (args.cap is None):
        raise SystemExit("give one of --factor and --cap")
    if not (args.factor or args.cap) > 0:
        raise SystemExit("--factor and --cap must be positive")

    steps = None
    if args.steps:
        start, _, stop = args.steps.partition("-")
        if not start.isdigit() or not (stop.isdigit() or stop == ""):
            raise SystemExit(f"--steps takes A-B or A- (optimizer steps, 0-based), got {args.steps!r}")
        steps = range(int(start), int(stop) if stop else 2 ** 62)
    recipe, overrides = load_recipe(args.recipe), parse_overrides(args.set)
    shard, shards = _common.parse_shard(args.shard)
    for index, seed in enumerate(fixnorm_vs_wd.parse_seeds(args.seeds)):
        if index % shards != shard:
            continue
        name = (f"{fixnorm_vs_wd.run_dir_name(args.arm, seed)}+slow_{args.kind}x{args.factor:g}" if args.factor
                else f"{fixnorm_vs_wd.run_dir_name(args.arm, seed)}+cap_{args.kind}{args.cap:g}")
        if args.steps:
            name += f"_steps{args.steps}"
        run_dir = Path(args.out) / name
        cfg = fixnorm_vs_wd.arm_config(args.arm, seed, recipe, overrides, args.threads)
        if RunFolder(run_dir).finished:
            check_same_run(run_dir, cfg)  # a folder trained with other settings is not this run
            print(f"{name}: done already", flush=True)
            continue
        if run_dir.exists():  # the hook is added after the model is built, so a killed run starts over
            shutil.rmtree(run_dir)
        trainer = Trainer(cfg, run_dir)
        # first: the diagnostics hook (last) must see the gradients the step uses
        params = chosen_parameters(trainer.model, args.kind)
        trainer.hooks.insert(0, ScaledLr(params, args.factor, steps) if args.factor else CappedStep(params, args.cap))
        summary = trainer.fit()
        print(f"{name}: final {100 * summary['final_test_acc']:.2f}", flush=True)


if __name__ == "__main__":
    main()
