"""Plots and a Markdown summary from run directories' records alone (metrics.csv, config.yaml, summary.json).

``make_report(run_dirs, out_dir)`` writes ``curves.png`` (accuracy and loss), and, for runs trained
with ``diagnostics=true``, ``effective_lr.png``, ``norms.png``, ``classifier.png`` (classifier norm
and logit scale) and ``boundary.png`` (flip rate, near-boundary fraction, margins), plus
``report.md``. Several runs are overlaid, one colour per run.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .errors import FixNormError
from .io import write_text_atomic
from .run_folder import RunFolder


@dataclass
class RunRecords:
    """One run's records, read back from its directory."""

    path: Path
    label: str
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, float]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) where the column has a value."""
        xs, ys = [], []
        for row in self.rows:
            value = row.get(key)
            if value is not None and not math.isnan(value):
                xs.append(row["epoch"])
                ys.append(value)
        return xs, ys

    def layers(self, quantity: str, role: str = "invariant") -> list[str]:
        """Column prefixes ``diag/<role>/<parameter>`` that have a ``/<quantity>`` column."""
        keys = self.rows[0].keys() if self.rows else []
        return [k[:-len(quantity) - 1] for k in keys if k.startswith(f"diag/{role}/") and k.endswith("/" + quantity)]

    @property
    def has_diagnostics(self) -> bool:
        return bool(self.rows) and any(k.startswith("diag/") for k in self.rows[0])


def read_run(path: str | Path) -> RunRecords:
    """Read a run directory; a directory without metrics.csv is an error naming what is there."""
    path = Path(path)
    folder = RunFolder(path)
    metrics = folder.metrics
    if not metrics.is_file():
        raise FixNormError(f"{path} is not a run directory with records: no metrics.csv "
                           f"(found: {', '.join(sorted(p.name for p in path.iterdir())) if path.is_dir() else 'nothing'})")
    rows = []
    with metrics.open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value) if value not in (None, "") else math.nan
                except ValueError:
                    row[key] = math.nan
            rows.append(row)
    config = folder.read_config() or {}
    summary = folder.read_summary() if folder.finished else {}
    method = (config or {}).get("method")
    label = path.name if method and method in path.name else f"{path.name} ({method or '?'})"
    return RunRecords(path=path, label=label, config=config or {}, summary=summary, rows=rows)


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write the plots and ``report.md`` for ``run_dirs`` into ``out_dir``; returns the Markdown file."""
    if not run_dirs:
        raise FixNormError("report needs at least one run directory")
    plt = _pyplot()
    runs = [read_run(p) for p in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figures: list[tuple[str, str]] = []

    def save(fig: Any, name: str, caption: str) -> None:
        _save_png(fig, out / name, dpi=110)
        figures.append((name, caption))

    # accuracy and loss
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        for key, style, what in (("test_acc", "-", "eval"), ("train_acc", "--", "train")):
            xs, ys = run.series(key)
            ax_acc.plot(xs, [100 * y for y in ys], style, color=c, marker=".", label=f"{run.label} {what}")
        for key, style, what in (("test_loss", "-", "eval"), ("train_loss", "--", "train")):
            xs, ys = run.series(key)
            ax_loss.plot(xs, ys, style, color=c, marker=".", label=f"{run.label} {what}")
    _style(ax_acc, "Accuracy", "accuracy (%)")
    _style(ax_loss, "Cross-entropy loss", "loss (nats per image)")
    save(fig, "curves.png", "Accuracy and loss per epoch (solid: evaluation set, dashed: training, augmented)")

    diag = [(i, r) for i, r in enumerate(runs) if r.has_diagnostics]
    if diag:
        for quantity, name, title, unit in (("eff_lr", "effective_lr.png", "Effective learning rate per layer",
                                             "lr / ||w||^p (p = 2 SGD, 1 adaptive)"),
                                            ("norm", "norms.png", "Weight norm per layer", "||w|| (L2)"),
                                            ("angle", "angles.png", "Angular update per step",
                                             "radians per step (mean of measured steps)")):
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            for i, run in diag:
                c = colors[i % len(colors)]
                layers = run.layers(quantity)
                for j, layer in enumerate(layers):
                    xs, ys = run.series(f"{layer}/{quantity}")
                    ax.plot(xs, ys, color=c, alpha=0.35 if len(diag) > 1 else 0.6, lw=1,
                            label=f"{run.label}: {len(layers)} scale-invariant layers" if j == 0 else None)
            ax.set_yscale("log")
            _style(ax, title + " (scale-invariant weights)", unit)
            save(fig, name, f"{title}: one thin line per scale-invariant layer, one colour per run")

        fig, (ax_fc, ax_logit) = plt.subplots(1, 2, figsize=(11, 4))
        for i, run in diag:
            c = colors[i % len(colors)]
            ax_fc.plot(*run.series("diag/classifier_norm"), color=c, marker=".", label=run.label)
            ax_logit.plot(*run.series("diag/logit_norm"), color=c, marker=".", label=run.label)
        _style(ax_fc, "Classifier weight norm", "||W_fc|| (L2)")
        _style(ax_logit, "Logit scale on the training probe", "mean ||z|| (logits)")
        save(fig, "classifier.png", "The classifier's norm and the logit scale it sets")

        fig, (ax_flip, ax_margin) = plt.subplots(1, 2, figsize=(11, 4))
        for i, run in diag:
            c = colors[i % len(colors)]
            xs, ys = run.series("diag/flip_rate")
            ax_flip.plot(xs, [100 * y for y in ys], color=c, marker=".", label=f"{run.label} flip rate")
            xs, ys = run.series("diag/near_boundary")
            ax_flip.plot(xs, [100 * y for y in ys], "--", color=c, label=f"{run.label} |margin| < 1")
            xs, p50 = run.series("diag/margin_p50")
            _, p10 = run.series("diag/margin_p10")
            _, p90 = run.series("diag/margin_p90")
            ax_margin.plot(xs, p50, color=c, marker=".", label=f"{run.label} median")
            if len(p10) == len(xs) == len(p90):
                ax_margin.fill_between(xs, p10, p90, color=c, alpha=0.15, label=f"{run.label} 10-90%")
        _style(ax_flip, "Cross-boundary signal on the training probe", "% of probe images")
        _style(ax_margin, "Margin z_y - max_other z (training probe)", "logits")
        save(fig, "boundary.png", "Flip rate: probe images whose prediction changed since the last epoch; "
                                  "margins: how far they sit from a decision boundary")

    ranked = [(i, r) for i, r in enumerate(runs) if r.rows and any(k.startswith("rank/") for k in r.rows[-1])]
    curved = [(i, r) for i, r in enumerate(runs) if r.rows and any(k.startswith("curvature/") for k in r.rows[-1])]
    if ranked or curved:
        fig, (ax_rank, ax_curv) = plt.subplots(1, 2, figsize=(11, 4))
        for i, run in ranked:
            ax_rank.plot(*run.series("rank/effective_fraction"), color=colors[i % len(colors)], marker=".",
                         label=run.label)
        for i, run in curved:
            ax_curv.plot(*run.series("curvature/top_max"), color=colors[i % len(colors)], marker=".", label=run.label)
        _style(ax_rank, "Effective rank of the weights", "mean over layers of effective rank / max")
        _style(ax_curv, "Top Hessian eigenvalue (largest layer)", "eigenvalue")
        save(fig, "spectra.png", "Rank (rank_every) and curvature (curvature_every) of the weights, per epoch")

    markdown = _markdown(runs, figures)
    path = out / "report.md"
    write_text_atomic(path, markdown)
    return path


def _style(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7)


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def _markdown(runs: list[RunRecords], figures: list[tuple[str, str]]) -> str:
    lines = ["# fixnorm report", "", "| run | method | model | epochs | final eval acc (%) | best (%) | s / epoch | "
             "classifier norm | logit scale | flip rate (%) | eff. LR geomean (first -> last) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        last = run.rows[-1] if run.rows else {}
        first = run.rows[0] if run.rows else {}
        eff = (f"{first.get('diag/eff_lr_geomean', math.nan):.2e} -> {last.get('diag/eff_lr_geomean', math.nan):.2e}"
               if "diag/eff_lr_geomean" in last else "-")
        seconds = [r["seconds"] for r in run.rows if "seconds" in r]
        lines.append(f"| {run.path.name} | {run.config.get('method', '?')} | {run.config.get('model', '?')} | "
                     f"{len(run.rows)} | {_fmt(last.get('test_acc'), 100)} | "
                     f"{_fmt(max((r.get('test_acc', math.nan) for r in run.rows), default=None), 100)} | "
                     f"{_fmt(sum(seconds) / len(seconds) if seconds else None, 1, 1)} | "
                     f"{_fmt(last.get('diag/classifier_norm'))} | {_fmt(last.get('diag/logit_norm'))} | "
                     f"{_fmt(last.get('diag/flip_rate'), 100, 1)} | {eff} |")
    evaluated = {run.summary.get("evaluated_on") for run in runs if run.summary.get("evaluated_on")}
    if evaluated:
        lines += ["", f"Evaluation set: {', '.join(sorted(evaluated))}."]
    if not any(r.has_diagnostics for r in runs):
        lines += ["", "No run was trained with `diagnostics=true`: only the accuracy and loss curves are drawn."]
    lines += [""]
    for name, caption in figures:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def plot_best_so_far(curves: dict[str, Sequence[float]], path: str | Path, *,
                     references: dict[str, float] | None = None, title: str | None = None) -> Path:
    """Best accuracy so far against trials, one line per tuner; ``references`` draws dotted levels (grid bests)."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [v for c in curves.values() for v in c if math.isfinite(v)]
    for label, curve in curves.items():
        xs = list(range(1, len(curve) + 1))
        ax.plot(xs, [100 * v for v in curve], marker="o" if len(curve) <= 20 else None, ms=3, label=label)
    for label, level in (references or {}).items():
        ax.axhline(100 * level, ls=":", lw=1, color="gray")
        ax.text(1, 100 * level, f" {label}", va="bottom", fontsize=8, color="gray")
        finite.append(level)
    if finite:
        top = max(finite)
        low = sorted(finite)[len(finite) // 10] if len(finite) > 10 else min(finite)
        ax.set_ylim(100 * min(low, top - 0.01) - 0.5, 100 * top + 0.5)
    ax.set_xlabel("trials")
    ax.set_ylabel("best accuracy so far (%)")
    ax.set_title(title or "Best accuracy so far against trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_png(fig, path, dpi=120)
    return path


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FixNormError("plots need matplotlib: pip install 'fixnorm[report]'") from exc
    return plt


def _save_png(fig: Any, path: Path, dpi: int) -> None:
    """Write the figure atomically (temp file, then rename) and free it."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    _pyplot().close(fig)
    tmp.replace(path)
