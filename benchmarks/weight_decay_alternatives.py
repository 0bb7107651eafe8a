"""Weight decay and what can replace it, side by side: SGD + WD, FixNorm, LAWN, SAL, PathProx.

Arms (overrides of one recipe, paired seeds), each at its method's defaults: ``sgd``, ``fixnorm``, ``lawn``,
``sal``, ``pathprox``. Runs are reused and resumed like ``fixnorm_vs_wd.py`` (same ``--shard``/``--table``
options). Pass ``--set rank_every=N curvature_every=N`` (N = the recipe's epochs) to measure the final weights'
effective rank and the top Hessian eigenvalue; the table then adds them, with the final train loss and the cost
per epoch relative to the reference:

    python benchmarks/weight_decay_alternatives.py --recipe fmnist-tune --set rank_every=3 curvature_every=3 \\
        --seeds 0-7 --out runs/wd_alt --shard 0/2 &
    python benchmarks/weight_decay_alternatives.py ... --shard 1/2 &
    python benchmarks/weight_decay_alternatives.py ... --table --name weight_decay_alternatives_fmnist_tune
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixnorm_vs_wd as arms_runner  # noqa: E402

ARMS: dict[str, dict[str, Any]] = {
    "sgd": {"method": "sgd"},
    "fixnorm": {"method": "fixnorm"},
    "lawn": {"method": "lawn"},
    "sal": {"method": "sal"},
    "pathprox": {"method": "pathprox"},
}

_accuracy_table = arms_runner.table


def table(args: Any) -> None:
    result = _accuracy_table(args)
    text = arms_runner.column_table(args, result, [
        ("effective rank / max", "rank/effective_fraction", "last", ".4f"),
        ("top curvature (largest layer)", "curvature/top_max", "last", ".3g"),
        ("final train loss", "train_loss", "last", ".3f")])
    print(text)
    arms_runner.save_with_columns(args, result, text, "weight_decay_alternatives.py",
                                  "Rank and curvature of the final weights (`fixnorm.spectra`), means over seeds; "
                                  "seconds per epoch averaged over epochs and seeds, the arms run interleaved.")


if __name__ == "__main__":
    arms_runner.ARMS.clear()
    arms_runner.ARMS.update(ARMS)
    arms_runner.table = table
    arms_runner.main()
