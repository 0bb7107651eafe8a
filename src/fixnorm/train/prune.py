"""Pruning & fine-tuning versus lottery tickets (Liu et al., ICML 2021), as ordinary runs of the one engine.

Per learning rate and seed: a dense run that saves ``step-0.pt`` (θ_0) and ``step-K.pt`` (θ_K); per sparsity, a mask
file from its final weights θ_T (:func:`fixnorm.compress.magnitude_masks`, one shot); then the arms, each a run with
``mask_from`` (docs/compression.md has the exact definitions):

- ``finetune``: ``init_from`` θ_T, the schedule from its start, T epochs;
- ``ticket``: ``init_from`` θ_0 (BN and every other tensor too), the schedule from its start, T epochs;
- ``rewind``: ``init_from`` θ_K with ``start_step=K`` (open_lth's rewinding): steps K .. T x steps per epoch;
- ``reinit``: a fresh draw (``init_seed = seed + REINIT_SEED_OFFSET``), T epochs.

With ``rounds`` > 1 the masks are iterative (nested, the same rate per round of the weights left, the last round at
the asked sparsity): mask k+1 is taken among mask k's kept weights from the end of a round run trained under mask k.
Two lineages, each the arms' own retraining: ``reset`` (every round run starts from θ_0, Frankle & Carbin's iterative
magnitude pruning) gives the masks of ticket, rewind and reinit; ``continue`` (every round run starts from the previous
round's end, round 0 being θ_T) gives fine-tune's mask and its start, the last round's end. A round's retraining
lasts T epochs like every arm.

Every run gets a fresh optimizer and the seed's data order. The folders live in ``OUT``: a finished run is reused and
an interrupted one resumed (``train_or_reuse``), mask files are written once, so a killed study picks up where it
stopped. ``prune.json`` and ``prune.md`` hold the table, ``accuracy-lr<lr>.png`` the plot per learning rate.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..compress import SCOPES, iterative_sparsity, magnitude_masks, prunable_weights, weight_correlation
from ..errors import FixNormError
from ..io import atomic_write, write_json_atomic, write_text_atomic
from ..run_folder import RunFolder
from .config import TrainConfig, make_config
from .masks import load_mask_file, save_masks
from .study import Callbacks, mean_std, model_state, recipe_model, train_phase

ARMS = ("finetune", "ticket", "rewind", "reinit")
LINEAGE = {"finetune": "continue", "ticket": "reset", "rewind": "reset", "reinit": "reset"}  # whose masks an arm takes
REINIT_SEED_OFFSET = 1_000_003  # a reinit arm's model is drawn from init_seed = seed + this; its data order is seed's
DENSE_P = (0.1, 0.2, 0.3, 0.4, 0.5)  # R_p(θ_0, θ_T) of the dense runs at these p
ARM_P = 0.2  # R_p(start, end) of every arm, over its kept weights
SET_BY_THE_STUDY = ("init_from", "mask_from", "start_step", "init_seed")


def run_pruning(settings: Mapping[str, Any], *, sparsities: Sequence[float], arms: Sequence[str],
                seeds: Sequence[int], lrs: Sequence[float], out_dir: str | Path, rewind_step: int | None = None,
                scope: str = "layer", prune_first_conv: bool = False, rounds: int = 1,
                make_callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Dense runs, masks (one shot, or iterative over ``rounds``) and arms for every (lr, seed, sparsity); returns
    (and writes) the table and every run."""
    sparsities, arms, seeds, lrs = list(sparsities), list(arms), list(seeds), list(lrs)
    _check_study(settings, sparsities, arms, seeds, lrs, scope, rounds)
    out = Path(out_dir)
    base = make_config(settings)
    prunable, masked, steps_per_epoch = _weights_and_steps(base, prune_first_conv)
    total_steps = base.epochs * steps_per_epoch
    asked = rewind_step is not None or "rewind" in arms
    if rewind_step is None:
        rewind_step = min(steps_per_epoch, total_steps // 2)  # the end of the first epoch (of a longer run)
    valid = not isinstance(rewind_step, bool) and isinstance(rewind_step, int) and 0 < rewind_step < total_steps
    if asked and not valid:
        raise FixNormError(f"--rewind-step must be a step in 1 .. {total_steps - 1} ({base.epochs} epochs of "
                           f"{steps_per_epoch} steps), got {rewind_step!r}")

    def train(name: str, cfg: TrainConfig) -> dict[str, Any]:
        return train_phase(out, name, cfg, make_callbacks)

    dense_runs, arm_runs = [], []
    for lr in lrs:
        for seed in seeds:
            name = f"dense-lr{lr:g}-s{seed}"
            saves = sorted({*base.save_at_steps, 0, *([rewind_step] if valid else [])})
            summary = train(name, make_config(settings, {"lr": lr, "seed": seed, "save_at_steps": saves}))
            dense = RunFolder(out / name)
            for step in (0, rewind_step) if "rewind" in arms else (0,):
                if not dense.at_step(step).is_file():
                    raise FixNormError(f"{dense.path} has no step-{step}.pt: it was trained with other save_at_steps; "
                                       "give --rewind-step one of its step-<k>.pt files, or remove the run")
            first, final = model_state(dense.at_step(0)), model_state(dense.last)
            dense_runs.append({"lr": lr, "seed": seed, "run_dir": str(dense.path),
                               "final_test_acc": summary["final_test_acc"],
                               "r_p": {str(p): weight_correlation(first, final, p, names=prunable) for p in DENSE_P}})
            for sparsity in sparsities:
                how = {"scope": scope, "prune_first_conv": prune_first_conv}
                lineages = {}  # lineage -> (mask file and masks of the last round, where fine-tune starts)
                for lineage in sorted({LINEAGE[arm] for arm in arms}):
                    lineages[lineage] = _mask_rounds(
                        out, lineage, train, settings=settings, lr=lr, seed=seed,
                        sparsity=sparsity, rounds=rounds, how=how, masked=masked, dense=dense)
                for arm in arms:
                    mask_file, masks, continued = lineages[LINEAGE[arm]]
                    start, arm_settings = _arm_start(arm, dense, seed, rewind_step, continued)
                    arm_name = f"{arm}-lr{lr:g}-sp{sparsity:g}-s{seed}" + (f"-it{rounds}" if rounds > 1 else "")
                    cfg = make_config(settings, {"lr": lr, "seed": seed, "mask_from": str(mask_file.resolve()),
                                                 "save_at_steps": [start]}, arm_settings)
                    summary = train(arm_name, cfg)
                    folder = RunFolder(out / arm_name)
                    r_p = _kept_correlation(model_state(folder.at_step(start)), model_state(folder.last), masks)
                    arm_runs.append({"lr": lr, "seed": seed, "sparsity": sparsity, "arm": arm,
                                     "run_dir": str(folder.path), "final_test_acc": summary["final_test_acc"],
                                     "r_p_start_end": r_p})
    rows = [_arm_row(lr, s, arm, [r for r in arm_runs if (r["lr"], r["sparsity"], r["arm"]) == (lr, s, arm)])
            for lr in lrs for s in sparsities for arm in arms]
    dense_rows = [_dense_row(lr, [r for r in dense_runs if r["lr"] == lr]) for lr in lrs]
    result = {"settings": dict(settings), "sparsities": sparsities, "arms": arms, "seeds": seeds, "lrs": lrs,
              "rewind_step": rewind_step, "steps_per_epoch": steps_per_epoch, "scope": scope,
              "prune_first_conv": prune_first_conv, "rounds": rounds, "masked_weights": masked, "dense": dense_rows,
              "rows": rows, "dense_runs": dense_runs, "runs": arm_runs, "plots": [], "no_plot": None}
    try:
        result["plots"] = [str(plot_accuracy_vs_sparsity(result, lr, out / f"accuracy-lr{lr:g}.png")) for lr in lrs]
    except FixNormError as exc:  # matplotlib is optional (the report extra)
        result["no_plot"] = str(exc)
    write_json_atomic(out / "prune.json", result)
    write_text_atomic(out / "prune.md", pruning_table(result) + "\n")
    return result


def _check_study(settings: Mapping[str, Any], sparsities: list[float], arms: list[str], seeds: list[int],
                 lrs: list[float], scope: str, rounds: int) -> None:
    bad = [s for s in sparsities if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1]
    if not sparsities or bad:
        raise FixNormError(f"sparsities must be fractions pruned in (0, 1), e.g. 0.5 0.8 0.9; got {bad or 'none'}")
    unknown = [a for a in arms if a not in ARMS]
    if not arms or unknown or len(set(arms)) != len(arms):
        raise FixNormError(f"arms must be distinct ones of {ARMS}; got {arms}" + (f" ({unknown} unknown)" if unknown
                                                                                   else ""))
    if not seeds or len(set(seeds)) != len(seeds):
        raise FixNormError(f"seeds must be distinct whole numbers, got {seeds}")
    if not lrs or any(not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0) for lr in lrs):
        raise FixNormError(f"learning rates must be positive numbers, got {lrs}")
    if scope not in SCOPES:
        raise FixNormError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise FixNormError(f"rounds must be a whole number >= 1 (1: one shot), got {rounds!r}")
    taken = [k for k in SET_BY_THE_STUDY if k in settings]
    if taken:
        raise FixNormError(f"{taken} are set per phase by the pruning study (dense run, arms); leave them out")


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """The sparsity after each of ``rounds`` rounds at one rate per round, ``1 - (1 - s)^(k / rounds)``, the last
    exactly ``sparsity``."""
    rate = 1 - (1 - sparsity) ** (1 / rounds)
    return [iterative_sparsity(rate, k) for k in range(1, rounds)] + [sparsity]


def _mask_rounds(out: Path, lineage: str, train: Callable[[str, TrainConfig], Any], *, settings: Mapping[str, Any],
                 lr: float, seed: int, sparsity: float, rounds: int, how: Mapping[str, Any], masked: list[str],
                 dense: RunFolder) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """The mask file and masks of the last round of ``lineage`` and the checkpoint fine-tune starts from (the dense
    end, or the end of the last ``continue`` round), training the round runs between masks (reused when finished)."""
    stem = f"lr{lr:g}-s{seed}-sp{sparsity:g}"

    def mask_file(k: int) -> Path:  # one shot keeps the one-shot study's file name
        return out / "masks" / (f"{stem}.pt" if rounds == 1 else f"{stem}-{lineage}-r{k}of{rounds}.pt")

    weights_from, masks = dense.last, None
    for k, target in enumerate(round_sparsities(sparsity, rounds), start=1):
        if k > 1:  # retrain under the last round's masks; this round's come from the end of that run
            start = dense.at_step(0) if lineage == "reset" else weights_from
            name = f"round{k - 1}of{rounds}-{lineage}-{stem}"
            train(name, make_config(settings, {"lr": lr, "seed": seed, "mask_from": str(mask_file(k - 1).resolve()),
                                               "init_from": str(start.resolve()), "save_at_steps": [0]}))
            weights_from = RunFolder(out / name).last
        about = {"sparsity": target, **how}
        if rounds > 1:
            about.update(rounds=rounds, round=k, lineage=lineage)
        masks = _masks_once(mask_file(k), masked, about, source=weights_from, previous=masks)
    return mask_file(rounds), masks, weights_from


def _masks_once(path: Path, names: Sequence[str], how: Mapping[str, Any], source: Path,
                previous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The masks of ``path``, computed from the ``names`` weights of checkpoint ``source`` (nested in ``previous``)
    and written (atomically) the first time; a file made otherwise (another scope, sparsity, round or first-conv
    choice) is an error, not a silent mix of two studies."""
    if not path.is_file():
        weights = model_state(source)
        masks = magnitude_masks({n: weights[n] for n in names}, how["sparsity"], scope=how["scope"],
                                previous=previous)
        save_masks(path, masks, **how, source=str(source))
    masks, about = load_mask_file(path)
    if {k: about.get(k) for k in how} != dict(how):
        raise FixNormError(f"{path} was made with {about}, not {dict(how)}: this folder holds another study's masks "
                           "and arms; give another --out")
    return masks


def _arm_start(arm: str, dense: RunFolder, seed: int, rewind_step: int,
               continued: Path) -> tuple[int, dict[str, Any]]:
    """The step an arm starts at and the settings that make it that arm (fine-tune from ``continued``: θ_T, or the
    end of the last iterative round)."""
    if arm == "finetune":
        return 0, {"init_from": str(continued.resolve())}
    if arm == "ticket":
        return 0, {"init_from": str(dense.at_step(0).resolve())}
    if arm == "rewind":
        return rewind_step, {"init_from": str(dense.at_step(rewind_step).resolve()), "start_step": rewind_step}
    return 0, {"init_seed": seed + REINIT_SEED_OFFSET}


def _weights_and_steps(cfg: TrainConfig, prune_first_conv: bool) -> tuple[list[str], list[str], int]:
    """The conv and linear weights of the recipe's model as its method trains it (all; those pruned: the first conv
    left out unless asked), and the steps per epoch."""
    model, steps_per_epoch = recipe_model(cfg)
    return (list(prunable_weights(model)), list(prunable_weights(model, exclude_first_conv=not prune_first_conv)),
            steps_per_epoch)



def _kept_correlation(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                      masks: Mapping[str, torch.Tensor]) -> float:
    """R_p(start, end) among the kept weights only (pruned zeros would count as a shared top position)."""
    return weight_correlation({n: start[n][m] for n, m in masks.items()}, {n: end[n][m] for n, m in masks.items()},
                              ARM_P)


def _arm_row(lr: float, sparsity: float, arm: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    final = mean_std([r["final_test_acc"] for r in runs])
    return {"lr": lr, "sparsity": sparsity, "arm": arm, "runs": len(runs), "final_mean": final[0],
            "final_std": final[1], "r_p_start_end": statistics.mean(r["r_p_start_end"] for r in runs)}


def _dense_row(lr: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    final = mean_std([r["final_test_acc"] for r in runs])
    return {"lr": lr, "runs": len(runs), "final_mean": final[0], "final_std": final[1],
            "r_p": {str(p): statistics.mean(r["r_p"][str(p)] for r in runs) for p in DENSE_P}}


def pruning_table(result: Mapping[str, Any]) -> str:
    """The study as Markdown: the dense runs with R_p(θ_0, θ_T), then every (lr, sparsity, arm)."""
    p_cols = " | ".join(f"R_{p}(θ_0, θ_T)" for p in DENSE_P)
    lines = [f"| lr | runs | dense final test acc (%) | {p_cols} |", "|---|---|---|" + "---|" * len(DENSE_P)]
    for d in result["dense"]:
        values = " | ".join(f"{d['r_p'][str(p)]:.3f}" for p in DENSE_P)
        lines.append(f"| {d['lr']:g} | {d['runs']} | {100 * d['final_mean']:.2f} ± {100 * d['final_std']:.2f} | "
                     f"{values} |")
    lines += ["", f"| lr | sparsity | arm | runs | final test acc (%) | R_{ARM_P}(start, end) |",
              "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['lr']:g} | {r['sparsity']:g} | {r['arm']} | {r['runs']} | "
                     f"{100 * r['final_mean']:.2f} ± {100 * r['final_std']:.2f} | {r['r_p_start_end']:.3f} |")
    shown = ", ".join(f"{k}={v}" for k, v in result["settings"].items() if k not in ("lr", "seed"))  # per row
    return "\n".join(lines) + (
        f"\n\nSettings: {shown}. Masks: {result['scope']}-wise magnitude, {_how_masks(result)} "
        f"({'first conv pruned too' if result['prune_first_conv'] else 'first conv left dense'}); rewind at "
        f"step {result['rewind_step']} ({result['steps_per_epoch']} steps per epoch). Mean ± std over seeds "
        f"{result['seeds']}; R_p is a mean over seeds, the arms' over their kept weights.")


def _how_masks(result: Mapping[str, Any]) -> str:
    rounds = result.get("rounds", 1)
    if rounds == 1:
        return "one shot, from the dense run's final weights"
    return (f"iterative, {rounds} rounds at one rate per round (ticket, rewind, reinit: each round retrained from "
            f"θ_0; fine-tune: from the previous round's end, and started from the last one's)")


def plot_accuracy_vs_sparsity(result: Mapping[str, Any], lr: float, path: str | Path) -> Path:
    """Final test accuracy against sparsity at one learning rate, a line per arm (± std), the dense run dotted."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FixNormError("plots need matplotlib: pip install 'fixnorm[report]'") from exc
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in result["arms"]:
        rows = [r for r in result["rows"] if r["lr"] == lr and r["arm"] == arm]
        ax.errorbar([100 * r["sparsity"] for r in rows], [100 * r["final_mean"] for r in rows],
                    yerr=[100 * r["final_std"] for r in rows], marker="o", ms=4, capsize=3, label=arm)
    dense = next(d for d in result["dense"] if d["lr"] == lr)
    ax.axhline(100 * dense["final_mean"], ls=":", color="gray", label="dense")
    ax.set_xlabel("sparsity (% of the masked weights pruned)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"Pruning arms at lr {lr:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)
    return path
