"""Several methods x seeds on one recipe, through the same engine; a Markdown table and a JSON file of every run.

Each run lives in ``OUT/<method>-s<seed>``: a finished run (summary.json) is reused and an interrupted one
(last.pt) is resumed, so a killed comparison picks up where it stopped; a folder trained with other settings is an
error (``train_or_reuse``).
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import write_json_atomic, write_text_atomic
from ..run_folder import RunFolder
from .config import decided_ema_bn, decided_precise_bn, decided_precision, make_config
from .engine import train_or_reuse


def run_comparison(settings: Mapping[str, Any], methods: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
                   *, make_callbacks: Callable[[str, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    out = Path(out_dir)
    runs = []
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}-s{seed}"
            callbacks = {} if RunFolder(run_dir).finished or not make_callbacks else make_callbacks(method, seed)
            summary = train_or_reuse(make_config(settings, {"method": method, "seed": seed}), run_dir, **callbacks)
            runs.append({"method": method, "seed": seed, "run_dir": str(run_dir), **summary})
    rows = [_aggregate(method, [r for r in runs if r["method"] == method]) for method in methods]
    if settings.get("precision") == "auto":  # say what this machine trained in, as each run's config.yaml does
        settings = {**settings, "precision": f"auto ({decided_precision('auto', settings.get('device', 'auto'))})"}
    images = decided_precise_bn(settings.get("precise_bn", "auto"))
    if settings.get("precise_bn", "auto") == "auto":  # and how it evaluated: a table read later must say so
        settings = {**settings, "precise_bn": f"auto ({images} images)"}
    if settings.get("ema_decay") and settings.get("ema_bn", "auto") == "auto":  # and how it scored the EMA
        settings = {**settings, "ema_bn": f"auto ({decided_ema_bn('auto', settings['ema_decay'], images)})"}
    result = {"settings": dict(settings), "methods": list(methods), "seeds": list(seeds), "rows": rows, "runs": runs}
    write_json_atomic(out / "compare.json", result)
    write_text_atomic(out / "compare.md", comparison_table(rows, settings) + "\n")
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _aggregate(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    final = _mean_std([r["final_test_acc"] for r in runs])
    best = _mean_std([r["best_test_acc"] for r in runs])
    epoch_time = _mean_std([r["seconds_per_epoch"] for r in runs])
    return {"method": method, "runs": len(runs), "final_mean": final[0], "final_std": final[1],
            "best_mean": best[0], "best_std": best[1], "seconds_per_epoch": epoch_time[0]}


def comparison_table(rows: list[dict[str, Any]], settings: Mapping[str, Any]) -> str:
    lines = ["| method | runs | final test acc (%) | best test acc (%) | s / epoch |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['runs']} | {100 * r['final_mean']:.2f} ± {100 * r['final_std']:.2f} | "
                     f"{100 * r['best_mean']:.2f} ± {100 * r['best_std']:.2f} | {r['seconds_per_epoch']:.1f} |")
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return "\n".join(lines) + f"\n\nSettings: {shown}. Mean ± std over seeds."
