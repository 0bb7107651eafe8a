#!/usr/bin/env python
"""Is a run's test accuracy its weights' or its BatchNorm running statistics'?

An evaluation uses the running statistics BatchNorm accumulated during training (momentum 0.1: about the last 20
batches). When the weights move fast, as at a large effective learning rate early in a run, those statistics lag
the weights and the evaluation can collapse although the weights are sound. This check loads each run's last
checkpoint (``last.pt``, read with ``weights_only=True`` through the engine's resume path, in a temporary copy so the
run folder is untouched) and evaluates it twice on the test set: as saved, and with every BatchNorm's statistics
re-estimated on the first ``--images`` stored training images (``recomputed_on_training_images``, the estimate the
EMA hook's ``ema_bn_check`` uses). A large difference says the lag, not the weights, made the reported number.

    python benchmarks/bn_statistics_check.py runs/mbDiag/fixnorm_diagnosticstrue-s0 runs/mbDiag/sgd_diagnosticstrue-s0
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts src/ on the path when run from a checkout)

from fixnorm.errors import FixNormError  # noqa: E402
from fixnorm.train.engine import Trainer  # noqa: E402
from fixnorm.train.hooks import BN_CHECK_IMAGES, recomputed_on_training_images  # noqa: E402


def check(run_dir: Path, images: int, threads: int) -> dict[str, float]:
    """Epoch, test accuracy as saved and with recomputed BatchNorm statistics, for the run's ``last.pt``."""
    for name in ("last.pt", "config.yaml"):
        if not (run_dir / name).is_file():
            raise FixNormError(f"{run_dir} has no {name}: give a run folder the engine wrote")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        copy.mkdir()
        for name in ("last.pt", "config.yaml"):
            shutil.copy(run_dir / name, copy / name)
        trainer = Trainer(None, copy, resume=True)
        saved_loss, saved_acc = trainer.evaluate(trainer.model)
        fresh_loss, fresh_acc = trainer.evaluate(recomputed_on_training_images(trainer, trainer.model, images))
        stored = trainer.probe_images(images)
        assert stored is not None  # recomputed_on_training_images raised otherwise
        x = stored[0]
        return {"epoch": trainer.start_epoch, "saved_acc": saved_acc, "saved_loss": saved_loss,
                "fresh_acc": fresh_acc, "fresh_loss": fresh_loss, "images": len(x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding last.pt and config.yaml")
    parser.add_argument("--images", type=int, default=BN_CHECK_IMAGES,
                        help="training images to re-estimate the statistics on (the EMA hook's count)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="also write benchmarks/results/<name>.md")
    args = parser.parse_args()
    if args.images < 1:
        raise SystemExit("--images must be at least 1")
    rows = []
    for run in args.runs:
        r = check(run, args.images, args.threads)
        rows.append([f"{run.parent.name}/{run.name}", r["epoch"], f"{100 * r['saved_acc']:.2f}",
                     f"{r['saved_loss']:.3f}", f"{100 * r['fresh_acc']:.2f}", f"{r['fresh_loss']:.3f}", r["images"]])
        print(rows[-1], flush=True)
    text = _common.markdown_table(["run", "epochs trained", "test acc, saved statistics (%)", "test loss",
                                   "test acc, recomputed statistics (%)", "test loss", "images"], rows)
    text += f"\n\nCommand: `{_common.command_line()}`\n"
    print(text)
    if args.name:
        _common.atomic_write_text(str(Path(_common.RESULTS_DIR) / f"{args.name}.md"), f"# {args.name}\n\n{text}")


if __name__ == "__main__":
    main()
