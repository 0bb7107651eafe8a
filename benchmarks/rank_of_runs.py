"""Does FixNorm, which has no weight decay, keep weight decay's low-rank bias? Ranks of finished runs' final weights.

Reads ``<runs>/<arm>-s<seed>/last.pt`` (runs of ``fixnorm_vs_wd.py`` or ``afan.py``), and per run the mean over
weight matrices (ndim >= 2, conv weights as out x rest) of the effective rank divided by its maximum min(m, n),
and of the numerical rank (singular values above 1e-3 of the largest) divided by the same; then per arm the mean ±
std over seeds and the paired difference to ``--reference`` with its standard error and 95% t-interval:

    python benchmarks/rank_of_runs.py --runs runs/vs_wd_tune --arms sgd fixnorm --seeds 0-15 --name rank_tune

Both ranks are scale-free, so weight decay's smaller norms do not enter: only the shape of each spectrum.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from fixnorm_vs_wd import parse_seeds, t975  # noqa: E402

import torch  # noqa: E402

from fixnorm.spectra import as_matrix, effective_rank, numerical_rank  # noqa: E402
from fixnorm.train.checkpoint import load_checkpoint  # noqa: E402


def run_ranks(run_dir: Path) -> dict[str, float]:
    model = load_checkpoint(run_dir / "last.pt")["model"]
    effective, numerical = [], []
    for name, value in model.items():
        if not name.endswith("weight") or value.ndim < 2:
            continue
        size = min(as_matrix(value).shape)
        effective.append(effective_rank(value) / size)
        numerical.append(numerical_rank(value) / size)
    return {"effective": statistics.mean(effective), "numerical": statistics.mean(numerical)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", default=["0-15"])
    parser.add_argument("--reference", default="sgd")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    results = {arm: {s: run_ranks(Path(args.runs) / f"{arm}-s{s}") for s in seeds
                     if (Path(args.runs) / f"{arm}-s{s}" / "summary.json").exists()} for arm in args.arms}
    ref = results.get(args.reference, {})
    lines = [f"| arm | seeds | effective rank / max | numerical rank / max | Δ effective vs {args.reference} | 95% CI |",
             "|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        if not runs:
            continue
        eff = [r["effective"] for r in runs.values()]
        num = [r["numerical"] for r in runs.values()]
        row = (f"| {arm} | {len(runs)} | {statistics.mean(eff):.4f} ± {0.0 if len(eff) < 2 else statistics.stdev(eff):.4f}"
               f" | {statistics.mean(num):.4f} ± {0.0 if len(num) < 2 else statistics.stdev(num):.4f} |")
        paired = sorted(set(runs) & set(ref))
        if arm != args.reference and len(paired) >= 2:
            diffs = [runs[s]["effective"] - ref[s]["effective"] for s in paired]
            mean, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
            half = t975(len(diffs) - 1) * se
            row += f" {mean:+.4f} ± {se:.4f} | [{mean - half:+.4f}, {mean + half:+.4f}] |"
        else:
            row += " - | - |"
        lines.append(row)
    command = "python benchmarks/rank_of_runs.py " + " ".join(sys.argv[1:])
    text = "\n".join(lines) + f"\n\nMeans over weight matrices of each run's final weights.\n\nCommand: `{command}`\n"
    print(text)
    if args.name:
        _common.atomic_write_text(os.path.join(_common.RESULTS_DIR, f"{args.name}.md"), f"# {args.name}\n\n{text}")
        _common.atomic_write_json(os.path.join(_common.RESULTS_DIR, f"{args.name}.json"),
                                  {"command": command, "results": {a: {str(s): v for s, v in r.items()}
                                                                   for a, r in results.items()},
                                   "machine": _common.machine_info(torch.device("cpu"))})


if __name__ == "__main__":
    main()
