"""What precise BN costs: re-estimating BatchNorm statistics against a training step and an evaluation, side by side.

For each recipe one engine is built (its model, data and optimizer as a run would have them) and three things are
timed in interleaved rounds: ``Trainer.recompute_bn_statistics()`` (``precise_bn`` images, un-augmented, forward
only), one training step on a batch of the recipe's size (forward, backward, optimizer step) and the test-set
evaluation. The cost per epoch is the re-estimate over ``steps_per_epoch`` training steps; the engine pays it once
an epoch, before the evaluation.

    python benchmarks/precise_bn_cost.py [--recipes fmnist-resnet20 fmnist-speedrun-fast fmnist-tune] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import (RESULTS_DIR, add_timing_arguments, atomic_write_json, atomic_write_text,  # noqa: E402
                     command_line, interleaved_rounds, machine_info, markdown_table, median)

import torch  # noqa: E402

from fixnorm.train import Trainer, load_recipe, make_config  # noqa: E402

TARGET = 0.03  # at most 3% of a training epoch


def measure(recipe: str, rounds: int, repeat: int, threads: int) -> dict[str, float]:
    cfg = make_config(load_recipe(recipe), {"threads": threads})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        batch = next(iter(trainer.data.train_batches(0)))

        def train_step() -> None:
            trainer.model.train()
            x = trainer.prepare_batch(batch[0])
            with trainer.autocast():
                loss, _ = trainer.step_loss(x, batch[1])
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()

        samples = interleaved_rounds({"train_step": train_step, "precise_bn": trainer.recompute_bn_statistics,
                                      "evaluation": lambda: trainer.evaluate(trainer.model)},
                                     rounds, repeat, torch.device("cpu"), warmup=1)
        step, recompute, evaluation = (median(samples[k]) for k in ("train_step", "precise_bn", "evaluation"))
        epoch = step * trainer.steps_per_epoch
        return {"images": cfg.precise_bn, "train_step_s": step, "steps_per_epoch": trainer.steps_per_epoch,
                "precise_bn_s": recompute, "evaluation_s": evaluation, "epoch_estimate_s": epoch,
                "share_of_epoch": recompute / epoch, "share_of_evaluation": recompute / evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["fmnist-resnet20", "fmnist-speedrun-fast", "fmnist-tune"])
    add_timing_arguments(parser, rounds=5, repeat=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, rows = {}, []
    for recipe in args.recipes:
        r = results[recipe] = measure(recipe, args.rounds, args.repeat, args.threads)
        verdict = "PASS" if r["share_of_epoch"] <= TARGET else "FAIL"
        print(f"{recipe}.train_step_s: {r['train_step_s']:.4f}")
        print(f"{recipe}.precise_bn_s: {r['precise_bn_s']:.3f} ({r['images']} images)")
        print(f"{recipe}.evaluation_s: {r['evaluation_s']:.3f}")
        print(f"{recipe}.precise_bn_over_epoch: {r['share_of_epoch']:.4f} {verdict} (target <= {TARGET})")
        rows.append([recipe, r["images"], f"{r['precise_bn_s']:.2f}", f"{r['evaluation_s']:.2f}",
                     f"{r['train_step_s'] * 1e3:.1f}", r["steps_per_epoch"], f"{r['epoch_estimate_s']:.1f}",
                     f"{100 * r['share_of_epoch']:.2f}%", verdict])
    if args.no_write:
        return
    out = Path(RESULTS_DIR) / "precise_bn_cost"
    atomic_write_json(out.with_suffix(".json"), {"meta": {**machine_info(torch.device("cpu")),
                                                          "command": command_line(), "args": vars(args)},
                                                 "results": results, "target": TARGET})
    table = markdown_table(["recipe", "images", "precise BN (s)", "evaluation (s)", "training step (ms)",
                            "steps per epoch", "epoch of steps (s)", "precise BN / epoch", f"<= {TARGET:.0%}"],
                           rows)
    atomic_write_text(out.with_suffix(".md"), f"# Precise BN: cost per epoch\n\nCommand: `{command_line()}`\n\n"
                      f"Medians of {args.rounds} interleaved rounds, {args.threads} threads.\n\n{table}\n")


if __name__ == "__main__":
    main()
