"""Micro-structured weight unification (Lin et al., arXiv 2106.08301), one-shot or with ADMM, as runs of the one engine.

Per seed a dense run of the recipe (T epochs). Per block shape and (unify share u, prune share p), per mode, at equal
total epochs after the dense run (docs/compression.md, part B):

- ``oneshot``: the exact projection Π of the dense final weights (a unify file), then T epochs of retraining from
  them with the blocks held (``init_from`` the dense run, ``unify_from`` the file);
- ``admm``: A epochs of method ``admm`` from the dense weights (its W-steps by the recipe's method), the exact
  projection of its final weights, then T - A epochs of retraining with the blocks held.

Every retraining run is evaluated before its first step (its starting weights are the projected ones: the accuracy
right after projection) and after its last. The folders live in ``OUT`` (``dense-s<seed>``, ``admm-<tag>-s<seed>``,
``retrain-<mode>-<tag>-s<seed>``, ``unify/<mode>-<tag>-s<seed>.pt``): a finished run is reused and an interrupted
one resumed, unify files are written once, so a killed study picks up where it stopped. ``unify.json`` and
``unify.md`` hold the table, with bits per weight (:func:`fixnorm.compress.storage_bits`).
"""
from __future__ import annotations

import csv
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..compress import BLOCK_SHAPES, block_dims, prunable_weights, storage_bits, unify_assignment
from ..errors import FixNormError
from ..io import write_json_atomic, write_text_atomic
from ..methods.admm import ADMMSettings
from ..run_folder import RunFolder
from .config import TrainConfig, make_config
from .engine import Trainer
from .study import Callbacks, mean_std, model_state, recipe_model, train_phase
from .unified_blocks import UnifiedLayer, load_unify_file, save_unify_file

MODES = ("oneshot", "admm")
RETRAIN = ("fixed", "magnitude")
SET_BY_THE_STUDY = ("init_from", "mask_from", "unify_from", "unify_magnitudes", "start_step", "init_seed")
SET_FOR_ADMM = ("optimizer", "block", "ratio", "prune_ratio", "first_conv")
VALUE_BITS = 32


def run_unification(settings: Mapping[str, Any], *, blocks: Sequence[str], ratios: Sequence[float],
                    modes: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
                    prune_ratios: Sequence[float] = (0.0,), admm_epochs: int | None = None, retrain: str = "fixed",
                    unify_first_conv: bool = False, make_callbacks: Callbacks | None = None) -> dict[str, Any]:
    """Dense runs, projections, ADMM and retraining for every (seed, block, shares, mode); returns (and writes) the
    table and every run."""
    blocks, ratios, prune_ratios, modes, seeds = list(blocks), list(ratios), list(prune_ratios), list(modes), list(seeds)
    shares = [(u, p) for u in ratios for p in prune_ratios if u or p]
    _check_study(settings, blocks, ratios, prune_ratios, shares, modes, seeds, retrain)
    out, base = Path(out_dir), make_config(settings)
    total = base.epochs
    if admm_epochs is None:
        admm_epochs = max(1, total // 2)
    if "admm" in modes and not (isinstance(admm_epochs, int) and 1 <= admm_epochs < total):
        raise FixNormError(f"--admm-epochs must be in 1 .. {total - 1} (ADMM plus retraining take the recipe's "
                           f"{total} epochs, as the one-shot retraining), got {admm_epochs!r}; raise --epochs")
    model, _ = recipe_model(base)
    shapes = {n: tuple(w.shape) for n, w in prunable_weights(model).items()}
    constrained = list(prunable_weights(model, exclude_first_conv=not unify_first_conv))
    suffix = "-mag" if retrain == "magnitude" else ""

    dense_runs, runs = [], []
    for seed in seeds:
        dense_name = f"dense-s{seed}"
        summary = train_phase(out, dense_name, make_config(settings, {"seed": seed}), make_callbacks)
        dense = RunFolder(out / dense_name)
        dense_runs.append({"seed": seed, "run_dir": str(dense.path), "final_test_acc": summary["final_test_acc"]})
        for block in blocks:
            for ratio, prune_ratio in shares:
                tag = f"b{block}-u{ratio:g}-p{prune_ratio:g}"
                for mode in modes:
                    source, epochs, residual, admm_acc = dense.last, total, None, None
                    if mode == "admm":
                        admm = {"optimizer": base.method, "block": block, "ratio": ratio, "prune_ratio": prune_ratio,
                                "first_conv": unify_first_conv}
                        name = f"admm-{tag}-s{seed}"
                        admm_summary = train_phase(out, name, make_config(settings, {
                            "seed": seed, "method": "admm", "epochs": admm_epochs, "init_from": str(dense.last.resolve()),
                            "method_kwargs": {"admm": admm}}), make_callbacks)
                        source, epochs = RunFolder(out / name).last, total - admm_epochs
                        residual, admm_acc = _last_record(RunFolder(out / name), "admm/residual_max"), \
                            admm_summary["final_test_acc"]
                    how = {"mode": mode, "block": block, "ratio": ratio, "prune_ratio": prune_ratio,
                           "first_conv": unify_first_conv}
                    unify_file = out / "unify" / f"{mode}-{tag}-s{seed}.pt"
                    final = model_state(source)
                    layers = _unify_once(unify_file, {n: final[n] for n in constrained}, how, source)
                    cfg = make_config(settings, {"seed": seed, "epochs": epochs, "init_from": str(source.resolve()),
                                                 "unify_from": str(unify_file.resolve()),
                                                 "unify_magnitudes": retrain == "magnitude"})
                    projected = start_accuracy(cfg)
                    name = f"retrain-{mode}{suffix}-{tag}-s{seed}"
                    summary = train_phase(out, name, cfg, make_callbacks)
                    runs.append({"seed": seed, "mode": mode, "block": block, "ratio": ratio,
                                 "prune_ratio": prune_ratio, "run_dir": str(out / name), "epochs": epochs,
                                 "admm_test_acc": admm_acc, "admm_residual_max": residual,
                                 "projected_test_acc": projected, "final_test_acc": summary["final_test_acc"],
                                 "bits_per_weight": bits_per_weight(layers, shapes)})
    rows = [_row(m, b, u, p, [r for r in runs if (r["mode"], r["block"], r["ratio"], r["prune_ratio"]) == (m, b, u, p)])
            for b in blocks for u, p in shares for m in modes]
    final = mean_std([r["final_test_acc"] for r in dense_runs])
    result = {"settings": dict(settings), "blocks": blocks, "shares": shares, "modes": modes, "seeds": seeds,
              "epochs": total, "admm_epochs": admm_epochs if "admm" in modes else None, "retrain": retrain,
              "constrained_weights": constrained, "dense": {"runs": len(dense_runs), "final_mean": final[0],
                                                            "final_std": final[1]},
              "rows": rows, "dense_runs": dense_runs, "runs": runs}
    write_json_atomic(out / "unify.json", result)
    write_text_atomic(out / "unify.md", unification_table(result) + "\n")
    return result


def _check_study(settings: Mapping[str, Any], blocks: list[str], ratios: list[float], prune_ratios: list[float],
                 shares: list[tuple[float, float]], modes: list[str], seeds: list[int], retrain: str) -> None:
    if not blocks or len(set(blocks)) != len(blocks):
        raise FixNormError(f"blocks must be distinct shapes such as {', '.join(BLOCK_SHAPES)}; got {blocks}")
    for block in blocks:
        block_dims(block, (4, 4, 3, 3))
    for name, values in (("ratios", ratios), ("prune ratios", prune_ratios)):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1]
        if not values or bad or len(set(values)) != len(values):
            raise FixNormError(f"{name} must be distinct shares of blocks in [0, 1), got {values}")
    if not shares or any(u + p > 1 for u, p in shares):
        raise FixNormError(f"each (ratio, prune ratio) must share out at most every block and not be (0, 0): "
                           f"got ratios {ratios}, prune ratios {prune_ratios}")
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise FixNormError(f"modes must be distinct ones of {MODES}; got {modes}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise FixNormError(f"seeds must be distinct whole numbers, got {seeds}")
    if retrain not in RETRAIN:
        raise FixNormError(f"retrain must be one of {RETRAIN}, got {retrain!r}")
    taken = [k for k in SET_BY_THE_STUDY if k in settings]
    if taken:
        raise FixNormError(f"{taken} are set per phase by the unification study; leave them out")
    if settings.get("method") == "admm":
        raise FixNormError("the recipe's method takes every step (dense, ADMM's W-steps, retraining); the study adds "
                           "admm itself: give another --method")
    admm = (settings.get("method_kwargs") or {}).get("admm") or {}
    fixed = [k for k in SET_FOR_ADMM if k in admm]
    if fixed:
        raise FixNormError(f"method_kwargs.admm.{fixed} are set by the study (--block, --ratio, --prune-ratio, "
                           "--method, --unify-first-conv); leave them out (rho, rho_growth, tolerance, every_steps "
                           "may be set)")
    ADMMSettings(**{k: v for k, v in admm.items() if k in ADMMSettings.__dataclass_fields__})  # errors now


def _unify_once(path: Path, weights: Mapping[str, torch.Tensor], how: Mapping[str, Any],
                source: Path) -> dict[str, UnifiedLayer]:
    """The layers of ``path``, chosen by the exact projection of ``weights`` and written the first time; a file made
    otherwise is an error, not a silent mix of two studies."""
    if not path.is_file():
        layers = {n: UnifiedLayer(block_dims(how["block"], w.shape),
                                  unify_assignment(w, how["block"], how["ratio"], how["prune_ratio"]))
                  for n, w in weights.items()}
        save_unify_file(path, layers, **how, source=str(source))
    layers, about = load_unify_file(path)
    if {k: about.get(k) for k in how} != dict(how) or set(layers) != set(weights):
        raise FixNormError(f"{path} was made with {about} for {sorted(layers)[:4]}, not {dict(how)}: this folder "
                           "holds another study's files and runs; give another --out")
    return layers


def start_accuracy(cfg: TrainConfig) -> float:
    """The test accuracy of the weights a run starts from (``init_from``, projected by ``unify_from``), before any
    step: the engine builds the run in a scratch folder and evaluates it as it evaluates every epoch (with precise BN,
    statistics re-estimated for the projected weights first)."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(cfg, Path(scratch) / "start")
        try:
            trainer.recompute_bn_statistics()  # precise BN, when the run has it
            return trainer.evaluate(trainer.model)[1]
        finally:
            if trainer.tensorboard is not None:
                trainer.tensorboard.close()


def bits_per_weight(layers: Mapping[str, UnifiedLayer], shapes: Mapping[str, tuple[int, ...]]) -> float:
    """Bits per conv/linear weight of the model: :func:`storage_bits` for the unified layers, 32 for the others."""
    bits = sum(storage_bits(shape, layers[n].dims, layers[n].assignment, value_bits=VALUE_BITS) if n in layers
               else VALUE_BITS * torch.Size(shape).numel() for n, shape in shapes.items())
    return bits / sum(torch.Size(shape).numel() for shape in shapes.values())


def _last_record(folder: RunFolder, column: str) -> float | None:
    with open(folder.metrics, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return float(rows[-1][column]) if rows and rows[-1].get(column) not in (None, "") else None


def _row(mode: str, block: str, ratio: float, prune_ratio: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    projected = mean_std([r["projected_test_acc"] for r in runs])
    final = mean_std([r["final_test_acc"] for r in runs])
    residuals = [r["admm_residual_max"] for r in runs if r["admm_residual_max"] is not None]
    return {"mode": mode, "block": block, "ratio": ratio, "prune_ratio": prune_ratio, "runs": len(runs),
            "epochs": runs[0]["epochs"], "projected_mean": projected[0], "projected_std": projected[1],
            "final_mean": final[0], "final_std": final[1], "bits_per_weight": runs[0]["bits_per_weight"],
            "admm_residual_max": max(residuals) if residuals else None}


def unification_table(result: Mapping[str, Any]) -> str:
    """The study as Markdown: the dense runs, then every (block, shares, mode)."""
    d = result["dense"]
    lines = [f"Dense ({result['epochs']} epochs, {d['runs']} run(s)): {100 * d['final_mean']:.2f} ± "
             f"{100 * d['final_std']:.2f} % test accuracy, {VALUE_BITS} bits per weight.", "",
             "| mode | block | unified | pruned | runs | retraining epochs | after projection (%) | "
             "after retraining (%) | bits/weight | ADMM max ‖W−Z‖/‖W‖ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        residual = "-" if r["admm_residual_max"] is None else f"{r['admm_residual_max']:.2e}"
        epochs = (f"{result['admm_epochs']} ADMM + {r['epochs']}" if r["mode"] == "admm" else str(r["epochs"]))
        lines.append(f"| {r['mode']} | {r['block']} | {r['ratio']:g} | {r['prune_ratio']:g} | {r['runs']} | "
                     f"{epochs} | {100 * r['projected_mean']:.2f} ± {100 * r['projected_std']:.2f} | "
                     f"{100 * r['final_mean']:.2f} ± {100 * r['final_std']:.2f} | {r['bits_per_weight']:.3f} | "
                     f"{residual} |")
    shown = ", ".join(f"{k}={v}" for k, v in result["settings"].items() if k != "seed")
    return "\n".join(lines) + (
        f"\n\nSettings: {shown}. Blocks chosen by the exact projection of the dense (one-shot) or ADMM final weights; "
        f"retraining holds unified blocks {'with one trainable magnitude each' if result['retrain'] == 'magnitude' else 'fixed'} "
        f"and pruned blocks at zero. Constrained: {len(result['constrained_weights'])} conv/linear weights "
        f"(bits per weight over all of them, the others at {VALUE_BITS}). Mean ± std over seeds {result['seeds']}.")
