"""A-FAN against its baseline: clean accuracy, the size of the feature perturbations, and the cost per epoch.

Arms (overrides of one recipe, paired seeds): ``sgd`` (the baseline), ``afan-aug`` (augmentation only: one point
at full strength, no mix), ``afan`` (four points, mix on the last two: the full method), ``afan-frozen`` (the
extra forwards leave BN statistics alone), ``afan-abs`` (step size 0.5/255 in absolute units, as released),
and under FixNorm: ``fixnorm`` and ``afan-fixnorm``. Runs are reused and resumed like ``fixnorm_vs_wd.py``
(same ``--shard``/``--table`` options); the table adds the mean L-infinity and L2 size of ``h_a - h``, the
features' RMS and seconds per epoch relative to the reference arm (run side by side, so the ratio holds):

    python benchmarks/afan.py --recipe fmnist-tune --arms sgd afan-aug afan --seeds 0-7 --out runs/afan --shard 0/2 &
    python benchmarks/afan.py ... --shard 1/2 &
    python benchmarks/afan.py ... --table --name afan_fmnist_tune
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixnorm_vs_wd as arms_runner  # noqa: E402


ARMS: dict[str, dict[str, Any]] = {
    "sgd": {"method": "sgd"},
    "afan-aug": {"method": "afan", "method_kwargs": {"afan": {"strengths": [1.0], "mixed": [False]}}},
    "afan": {"method": "afan"},
    "afan-frozen": {"method": "afan", "method_kwargs": {"afan": {"bn_mode": "frozen"}}},
    "afan-abs": {"method": "afan", "method_kwargs": {"afan": {"step_unit": "absolute"}}},
    "fixnorm": {"method": "fixnorm"},
    "afan-fixnorm": {"method": "afan", "method_kwargs": {"afan": {"optimizer": "fixnorm"}}},
}


_accuracy_table = arms_runner.table


def table(args: Any) -> None:
    result = _accuracy_table(args)  # accuracy: mean ± std and the paired difference to the reference
    text = arms_runner.column_table(args, result, [
        ("mean ‖h_a − h‖∞", "afan/linf", "mean", ".4f"), ("mean ‖h_a − h‖₂", "afan/l2", "mean", ".3f"),
        ("feature RMS", "afan/feature_rms", "mean", ".3f")])
    print(text)
    arms_runner.save_with_columns(args, result, text, "afan.py", "Sizes are per-sample norms averaged over batches "
                                  "and epochs; seconds per epoch averaged over epochs and seeds, the arms run "
                                  "interleaved by the same processes.")


if __name__ == "__main__":
    arms_runner.ARMS.clear()
    arms_runner.ARMS.update(ARMS)
    arms_runner.table = table  # the shared main runs or tabulates; the table adds A-FAN's columns
    arms_runner.main()
