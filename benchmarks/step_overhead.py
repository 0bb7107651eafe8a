#!/usr/bin/env python
"""What FixNorm costs per step, next to SGD + weight decay and next to SGDP.

Measured side by side in one run: the variants are interleaved in rounds (the order
rotating each round) and medians are taken, so machine noise hits all of them alike.

For a ResNet-20 (CIFAR-sized, batch 128 at 32x32) and a ResNet-50 (ImageNet model;
by default batch 8 at 112x112 so that one CPU training step stays well under 2 s):

1. optimizer step alone: ``FixNorm(SGD, momentum=0.9, nesterov=False, foreach=True).step()``
   versus ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4, foreach=True).step()`` with
   the usual groups (no decay on parameters with ndim <= 1). The gradients of one
   backward pass are kept and ``step()`` is called many times;
2. the whole training step (zero_grad + forward + cross-entropy + backward + step);
3. FixNorm's step versus an SGDP step (Heo et al., ICLR 2021, "AdamP: Slowing down the
   slowdown for momentum optimizers on scale-invariant weights"), reproduced below from
   the reference implementation (clovaai/AdamP, adamp/sgdp.py): a Python loop over the
   parameters with a per-channel / per-layer cosine test and projection.

Prints ``name: value`` lines, a PASS/FAIL line per target (the exit status stays 0: this
is a measurement), and writes ``benchmarks/results/step_overhead.{json,md}`` (``--quick``
writes ``step_overhead.quick.{json,md}`` so a smoke test never replaces a full result).

    python benchmarks/step_overhead.py            # full run, a few minutes on 2 CPU cores
    python benchmarks/step_overhead.py --quick    # smoke test, well under a minute
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.optimizer import Optimizer  # noqa: E402

import fixnorm  # noqa: E402
from fixnorm.models import create_model  # noqa: E402

from _common import (RESULTS_DIR, SectionTimer, atomic_write_json, atomic_write_text,  # noqa: E402
                     command_line, interleaved_rounds, load_average, machine_info, markdown_table, median,
                     paired_ratios, quantile, resolve_device)

LR = 0.01          # timing does not depend on it; small so hundreds of steps on a fixed gradient stay finite
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
SEED = 0

VARIANTS = ("fixnorm", "fixnorm_fixed", "sgd_wd", "sgdp")
VARIANT_LABELS = {
    "fixnorm": "FixNorm(SGD, momentum 0.9, foreach), defaults: drifting norms",
    "fixnorm_fixed": "FixNorm, fixed norms (norm_drift=None)",
    "sgd_wd": "SGD(momentum 0.9, wd 5e-4 on ndim>1, foreach)",
    "sgdp": "SGDP (reference algorithm, per-parameter loop)",
}

# rounds = interleaved samples per variant (the medians are over these);
# repeat = back-to-back calls timed as one sample.
MODELS: dict[str, dict[str, Any]] = {
    "resnet20": {"num_classes": 10, "batch": 128, "size": 32,
                 "full": {"step_rounds": 61, "step_repeat": 50, "train_rounds": 61, "train_repeat": 2},
                 "quick": {"step_rounds": 7, "step_repeat": 10, "train_rounds": 5, "train_repeat": 1}},
    "resnet50": {"num_classes": 1000, "batch": 8, "size": 112,
                 "note": "ImageNet ResNet-50 (1000 classes) at batch {batch}, {size}x{size} inputs instead of "
                         "224x224, so one training step stays under ~2 s on 2 CPU cores",
                 "full": {"step_rounds": 41, "step_repeat": 8, "train_rounds": 81, "train_repeat": 2},
                 "quick": {"step_rounds": 5, "step_repeat": 2, "train_rounds": 5, "train_repeat": 1}},
}

# what is measured: phase -> label, ratio -> label
PHASES = {
    "optimizer_step": "optimizer step alone (kept gradients, step() in a loop)",
    "train_step": "training step (zero_grad + forward + loss + backward + step)",
    "optimizer_step_in_training": "optimizer step inside the training loop (step() timed alone)",
}
RATIOS = {
    "optimizer_step_ratio": "FixNorm / SGD+WD, optimizer step alone",
    "train_step_ratio": "FixNorm / SGD+WD, training step",
    "vs_sgdp_ratio": "FixNorm / SGDP, optimizer step alone",
    "train_step_vs_sgdp_ratio": "FixNorm / SGDP, training step",
    "optimizer_step_in_training_ratio": "FixNorm / SGD+WD, optimizer step inside the training loop",
    "vs_sgdp_in_training_ratio": "FixNorm / SGDP, optimizer step inside the training loop",
    "drift_step_ratio": "drifting / fixed norms, optimizer step alone",
    "drift_in_training_ratio": "drifting / fixed norms, optimizer step inside the training loop",
}

# (metric suffix, comparison, threshold) -- from the issue
TARGETS = (
    ("train_step_ratio", "<=", 1.01),
    ("optimizer_step_ratio", "<=", 1.05),
    ("vs_sgdp_ratio", "<", 1.0),
)


# -- SGDP, as in the reference implementation -----------------------------------------------------
class SGDP(Optimizer):
    """SGDP step reproduced from clovaai/AdamP ``adamp/sgdp.py`` (MIT, NAVER Corp.).

    Per parameter: momentum (or Nesterov) buffer; for weights with ndim > 1 the cosine
    similarity between gradient and weight, per channel and then per layer; if its
    largest |value| is below ``delta / sqrt(dim)`` the update loses its radial component
    and weight decay is scaled by ``wd_ratio``. The Python loop over parameters, the
    ``.data`` accesses and the host-side comparison of ``cosine_sim.max()`` are kept as
    they are: they are part of what a user of SGDP pays.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)
        super().__init__(params, defaults)

    @staticmethod
    def _channel_view(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)

    @staticmethod
    def _layer_view(x: torch.Tensor) -> torch.Tensor:
        return x.view(1, -1)

    @staticmethod
    def _cosine_similarity(x: torch.Tensor, y: torch.Tensor, eps: float,
                           view_func: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = view_func(x)
        y = view_func(y)
        return F.cosine_similarity(x, y, dim=1, eps=eps).abs_()

    def _projection(self, p: torch.Tensor, grad: torch.Tensor, perturb: torch.Tensor, delta: float,
                    wd_ratio: float, eps: float) -> tuple[torch.Tensor, float]:
        wd = 1.0
        expand_size = [-1] + [1] * (len(p.shape) - 1)
        for view_func in (self._channel_view, self._layer_view):
            cosine_sim = self._cosine_similarity(grad, p.data, eps, view_func)
            if cosine_sim.max() < delta / math.sqrt(view_func(p.data).size(1)):
                p_n = p.data / view_func(p.data).norm(dim=1).view(expand_size).add_(eps)
                perturb -= p_n * view_func(p_n * perturb).sum(dim=1).view(expand_size)
                wd = wd_ratio
                return perturb, wd
        return perturb, wd

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            dampening = group["dampening"]
            nesterov = group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                state = self.state[p]
                if len(state) == 0:
                    state["momentum"] = torch.zeros_like(p.data)
                buf = state["momentum"]
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                if nesterov:
                    d_p = grad + momentum * buf
                else:
                    d_p = buf
                wd_ratio = 1.0
                if len(p.shape) > 1:
                    d_p, wd_ratio = self._projection(p, grad, d_p, group["delta"], group["wd_ratio"],
                                                     group["eps"])
                if group["weight_decay"] > 0:
                    p.data.mul_(1 - group["lr"] * group["weight_decay"] * wd_ratio / (1 - momentum))
                p.data.add_(d_p, alpha=-group["lr"])
        return loss


# -- the variants -----------------------------------------------------------------------------------
def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The usual recipe: weight decay on weights, none on biases and norm parameters (ndim <= 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(kind: str, model: nn.Module, roles: fixnorm.Roles) -> torch.optim.Optimizer:
    if kind == "fixnorm":
        # free_steps=1: from the second step on every step drifts and projects, the steady state after the free
        # phase (what a run pays for nearly all its steps); with 100 free steps the first timed steps would not
        return fixnorm.FixNorm(model, None, base=torch.optim.SGD, roles=roles, lr=LR, momentum=MOMENTUM,
                               nesterov=False, foreach=True, free_steps=1)
    if kind == "fixnorm_fixed":
        return fixnorm.FixNorm(model, None, base=torch.optim.SGD, roles=roles, lr=LR, momentum=MOMENTUM,
                               nesterov=False, foreach=True, free_steps=0, norm_drift=None)
    if kind == "sgd_wd":
        return torch.optim.SGD(decay_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, nesterov=False,
                               foreach=True)
    if kind == "sgdp":
        return SGDP(decay_groups(model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, nesterov=False)
    raise ValueError(kind)


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median and quartiles in ms, per variant."""
    return {k: {"median_ms": median(v) * 1e3, "p25_ms": quantile(v, 0.25) * 1e3,
                "p75_ms": quantile(v, 0.75) * 1e3, "n": len(v)} for k, v in samples.items()}


def ratio_stats(samples: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """Ratio of medians (the reported number) and the quartiles of the per-round paired ratios."""
    paired = paired_ratios(samples[num], samples[den])
    return {"ratio_of_medians": median(samples[num]) / median(samples[den]),
            "paired_median": median(paired), "paired_p25": quantile(paired, 0.25),
            "paired_p75": quantile(paired, 0.75)}


def bench_model(name: str, spec: dict[str, Any], plan: dict[str, int], device: torch.device,
                profile: bool) -> dict[str, Any]:
    torch.manual_seed(SEED)
    base_model = create_model(name, num_classes=spec["num_classes"], in_channels=3).to(device)
    base_model.train()
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], generator=gen).to(device)
    y = torch.randint(0, spec["num_classes"], (spec["batch"],), generator=gen).to(device)
    n_params = sum(p.numel() for p in base_model.parameters())
    t0 = time.perf_counter()
    roles = fixnorm.analyze(base_model, x[: min(4, spec["batch"])])
    analyze_s = time.perf_counter() - t0
    print(f"# {name}: {n_params / 1e6:.2f}M params, batch {spec['batch']} x 3x{spec['size']}x{spec['size']}, "
          f"{spec['num_classes']} classes, device {device}; roles analysed in {analyze_s:.1f} s", flush=True)
    spec["note"] = spec.get("note", "").format(**spec)
    if spec["note"]:
        print(f"# {name}: {spec['note']}", flush=True)

    def loss_of(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    # 1 + 3: optimizer step alone, on the kept gradients of one backward pass
    models = {k: copy.deepcopy(base_model) for k in VARIANTS}
    opts = {k: make_optimizer(k, models[k], roles) for k in VARIANTS}
    for k in VARIANTS:
        models[k].zero_grad(set_to_none=True)
        loss_of(models[k]).backward()
    t0 = time.perf_counter()
    step_samples = interleaved_rounds({k: opts[k].step for k in VARIANTS}, plan["step_rounds"],
                                      plan["step_repeat"], device)
    step_s = time.perf_counter() - t0
    print(f"# {name}: optimizer-step phase done in {step_s:.0f} s", flush=True)
    profiles = {}
    if profile:
        profiles = {k: profile_step(opts[k].step, device) for k in ("fixnorm", "sgd_wd")}
    del models, opts
    gc.collect()

    # 2: the whole training step, on fresh copies
    models = {k: copy.deepcopy(base_model) for k in VARIANTS}
    opts = {k: make_optimizer(k, models[k], roles) for k in VARIANTS}

    # the optimizer step inside the training loop, timed on its own (no extra syncs): the same
    # step() call, but with the allocator and caches in the state that forward/backward leave
    timers = {k: SectionTimer(device) for k in VARIANTS}

    def train_step(model: nn.Module, opt: torch.optim.Optimizer, timer: SectionTimer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss_of(model).backward()
            token = timer.start()
            opt.step()
            timer.stop(token)
        return run

    t0 = time.perf_counter()
    train_samples = interleaved_rounds({k: train_step(models[k], opts[k], timers[k]) for k in VARIANTS},
                                       plan["train_rounds"], plan["train_repeat"], device)
    train_s = time.perf_counter() - t0
    print(f"# {name}: training-step phase done in {train_s:.0f} s", flush=True)
    # every call, warm-up included, was recorded: keep the last rounds * repeat (the timed ones)
    n_timed = plan["train_rounds"] * plan["train_repeat"]
    insitu_samples = {k: timers[k].take()[-n_timed:] for k in VARIANTS}
    for k in ("fixnorm", "fixnorm_fixed"):
        opts[k].check()  # any deferred non-finite flag would make the timings meaningless
    del models, opts
    gc.collect()

    return {
        "config": {"params_M": round(n_params / 1e6, 3), "batch": spec["batch"],
                   "input": [3, spec["size"], spec["size"]], "num_classes": spec["num_classes"], **plan,
                   "analyze_s": round(analyze_s, 2), "step_phase_s": round(step_s, 1),
                   "train_phase_s": round(train_s, 1), "note": spec.get("note", "")},
        "optimizer_step": summarize(step_samples),
        "train_step": summarize(train_samples),
        "optimizer_step_in_training": summarize(insitu_samples),
        "ratios": {
            "optimizer_step_in_training_ratio": ratio_stats(insitu_samples, "fixnorm", "sgd_wd"),
            "vs_sgdp_in_training_ratio": ratio_stats(insitu_samples, "fixnorm", "sgdp"),
            "optimizer_step_ratio": ratio_stats(step_samples, "fixnorm", "sgd_wd"),
            "train_step_ratio": ratio_stats(train_samples, "fixnorm", "sgd_wd"),
            "vs_sgdp_ratio": ratio_stats(step_samples, "fixnorm", "sgdp"),
            "train_step_vs_sgdp_ratio": ratio_stats(train_samples, "fixnorm", "sgdp"),
            "drift_step_ratio": ratio_stats(step_samples, "fixnorm", "fixnorm_fixed"),
            "drift_in_training_ratio": ratio_stats(insitu_samples, "fixnorm", "fixnorm_fixed"),
        },
        "profiles": profiles,
    }


def profile_step(step: Callable[[], Any], device: torch.device, calls: int = 20) -> str:
    """torch.profiler table (top ops by self time) of ``calls`` optimizer steps."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    if device.type != "cuda":
        return averages.table(sort_by="self_cpu_time_total", row_limit=18)
    try:
        return averages.table(sort_by="self_device_time_total", row_limit=18)
    except (AttributeError, KeyError, ValueError):  # older torch names it after CUDA
        return averages.table(sort_by="self_cuda_time_total", row_limit=18)


# -- report -----------------------------------------------------------------------------------------
def check(value: float, op: str, threshold: float) -> bool:
    return value <= threshold if op == "<=" else value < threshold


def build_report(results: dict[str, dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    metrics: dict[str, float] = {}
    for name, r in results.items():
        for ratio in RATIOS:
            metrics[f"{name}.{ratio}"] = round(r["ratios"][ratio]["ratio_of_medians"], 4)
        for phase in PHASES:
            for k in VARIANTS:
                metrics[f"{name}.{phase}_ms.{k}"] = round(r[phase][k]["median_ms"], 4)
        for phase in ("optimizer_step", "optimizer_step_in_training"):
            metrics[f"{name}.{phase}_overhead_ms"] = round(
                r[phase]["fixnorm"]["median_ms"] - r[phase]["sgd_wd"]["median_ms"], 4)
    targets = []
    for name in results:
        for suffix, op, threshold in TARGETS:
            value = metrics[f"{name}.{suffix}"]
            targets.append({"metric": f"{name}.{suffix}", "op": op, "threshold": threshold, "value": value,
                            "pass": check(value, op, threshold)})
    return metrics, targets


def markdown(results: dict[str, dict[str, Any]], metrics: dict[str, float], targets: list[dict[str, Any]],
             info: dict[str, Any], command: str, quick: bool) -> str:
    out = ["# FixNorm step overhead" + (" (quick smoke run; not a measurement to quote)" if quick else ""), "",
           f"`{command}` on {info['date']}: torch {info['torch']}, {info['cpu_count']} CPUs "
           f"({info['torch_num_threads']} torch threads), device `{info['device']}`"
           + (f" ({info['device_name']})" if "device_name" in info else "") + ".", "",
           "Variants interleaved in rounds (order rotated each round); medians over rounds. "
           "*Optimizer step alone* = `step()` called in a loop on the kept gradients of one backward pass; "
           "*training step* = zero_grad + forward + cross-entropy + backward + step; *optimizer step inside "
           "the training loop* = the `step()` call of each training step, timed on its own. The two optimizer-step "
           "numbers can differ: in a tight `step()` loop nothing else allocates, so temporaries (SGD's weight decay "
           "makes a fresh copy of every gradient) go to and from the OS each call, while in training they reuse "
           "memory that forward/backward freed.", ""]
    out += [f"- `{name}`: {r['config']['params_M']}M parameters. {r['config']['note']}".rstrip(". ") + "."
            for name, r in results.items()] + [""]
    rows = []
    for name, r in results.items():
        c = r["config"]
        shape = f"batch {c['batch']} x {'x'.join(map(str, c['input']))}"
        for phase, label in PHASES.items():
            s = r[phase]
            rows.append([name, shape, label] + [f"{s[k]['median_ms']:.3f} ({s[k]['p25_ms']:.3f}-{s[k]['p75_ms']:.3f})"
                                                for k in VARIANTS])
    out += ["## Medians in ms (interquartile range)", "",
            markdown_table(["model", "input", "what"] + [VARIANT_LABELS[k] for k in VARIANTS], rows), ""]
    rows = []
    for name, r in results.items():
        for ratio, label in RATIOS.items():
            st = r["ratios"][ratio]
            rows.append([f"`{name}.{ratio}`", label, f"{st['ratio_of_medians']:.4f}",
                         f"{st['paired_median']:.4f} ({st['paired_p25']:.4f}-{st['paired_p75']:.4f})"])
    out += ["## Ratios", "",
            markdown_table(["metric", "what", "ratio of medians", "per-round paired ratio: median (IQR)"], rows),
            ""]
    rows = [[f"`{t['metric']}`", f"{t['op']} {t['threshold']}", f"{t['value']:.4f}", "PASS" if t["pass"] else "FAIL"]
            for t in targets]
    out += ["## Targets", "", markdown_table(["metric", "target", "value", "result"], rows), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds: a smoke test (~1 min); writes *.quick.*")
    ap.add_argument("--repeats", type=int, default=None, metavar="N",
                    help="interleaved rounds per measurement (default: 41-61 full, 5-7 quick)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    ap.add_argument("--models", default="resnet20,resnet50", help="comma-separated subset of resnet20,resnet50")
    ap.add_argument("--resnet50-batch", type=int, default=MODELS["resnet50"]["batch"])
    ap.add_argument("--resnet50-size", type=int, default=MODELS["resnet50"]["size"],
                    help="input height/width for the ResNet-50 (default 112, so a CPU step stays < 2 s)")
    ap.add_argument("--profile", action="store_true",
                    help="also print a torch.profiler table of FixNorm's and SGD's optimizer step")
    ap.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        ap.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    command = command_line()
    info = machine_info(device)
    print(f"# {command}")
    print(f"# torch {info['torch']}, {info['cpu_count']} CPUs, {info['torch_num_threads']} torch threads, "
          f"device {device}" + (f" ({info['device_name']})" if "device_name" in info else ""))
    if info["loadavg_at_start"] and info["loadavg_at_start"][0] > (os.cpu_count() or 1):
        print(f"# warning: 1-minute load average {info['loadavg_at_start'][0]} > {os.cpu_count()} CPUs: other "
              "processes compete for the cores, expect noisy timings")
    print("# variants: " + "; ".join(f"{k} = {VARIANT_LABELS[k]}" for k in VARIANTS), flush=True)

    started = time.perf_counter()
    results = {}
    for name in names:
        spec = dict(MODELS[name])
        if name == "resnet50":
            spec["batch"], spec["size"] = args.resnet50_batch, args.resnet50_size
        plan = dict(spec["quick" if args.quick else "full"])
        if args.repeats is not None:
            plan["step_rounds"] = plan["train_rounds"] = args.repeats
        results[name] = bench_model(name, spec, plan, device, args.profile)
    elapsed = time.perf_counter() - started
    info["loadavg_at_end"] = load_average()

    metrics, targets = build_report(results)
    for key, value in metrics.items():
        print(f"{key}: {value}")
    for name, r in results.items():
        for ratio in RATIOS:
            st = r["ratios"][ratio]
            print(f"{name}.{ratio}.paired_iqr: {st['paired_p25']:.4f}..{st['paired_p75']:.4f}")
    for t in targets:
        print(f"{'PASS' if t['pass'] else 'FAIL'}: {t['metric']} {t['op']} {t['threshold']} "
              f"(measured {t['value']:.4f})")
    print(f"# total {elapsed:.0f} s; load average at start {info['loadavg_at_start']}, at end {info['loadavg_at_end']}")
    for name, r in results.items():
        slowest = max(r["train_step"][k]["median_ms"] for k in VARIANTS)
        if device.type == "cpu" and slowest > 2000:
            print(f"# note: a {name} training step took {slowest / 1e3:.1f} s here (> 2 s); consider a smaller "
                  "input (--resnet50-size / --resnet50-batch)")
    for name, r in results.items():
        for k, table in r["profiles"].items():
            print(f"\n# profile: {name} {k} optimizer step x20\n{table}")

    if not args.no_write:
        stem = "step_overhead.quick" if args.quick else "step_overhead"
        payload = {
            "benchmark": "step_overhead",
            "command": command,
            "quick": args.quick,
            "machine": info,
            "settings": {"lr": LR, "momentum": MOMENTUM, "nesterov": False, "weight_decay": WEIGHT_DECAY,
                         "variants": VARIANT_LABELS, "total_s": round(elapsed, 1),
                         "statistic": "median over interleaved rounds; ratio = median(FixNorm) / median(baseline)"},
            "metrics": metrics,
            "targets": targets,
            "details": {n: {k: v for k, v in r.items() if k != "profiles"} for n, r in results.items()},
        }
        json_path = os.path.join(RESULTS_DIR, stem + ".json")
        md_path = os.path.join(RESULTS_DIR, stem + ".md")
        atomic_write_json(json_path, payload)
        atomic_write_text(md_path, markdown(results, metrics, targets, info, command, args.quick) + "\n")
        print(f"# wrote {os.path.relpath(json_path)} and {os.path.relpath(md_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
