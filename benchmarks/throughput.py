#!/usr/bin/env python
"""Engine throughput next to a minimal hand-written loop, Fashion-MNIST epoch time, augmentation cost.

Side by side in one run: the engine's ``Trainer.train_epoch`` and a plain loop that does the same work
(same model, FixNorm(SGD), batched crop augmentation, normalisation, autocast, channels_last, LR
schedule) are interleaved in rounds on the same subset of Fashion-MNIST; medians are compared.

    python benchmarks/throughput.py            # recipe fmnist-resnet20 (bf16, channels_last)
    python benchmarks/throughput.py --quick    # smoke test
Targets (issue 3): engine / hand-loop images/s >= 0.95; a ResNet-20 Fashion-MNIST epoch <= 60 s here.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fixnorm import FixNorm  # noqa: E402
from fixnorm.data import load_dataset, normalize, random_crop_flip  # noqa: E402
from fixnorm.models import create_model  # noqa: E402
from fixnorm.train import Trainer, load_recipe, lr_factor, make_config  # noqa: E402

from _common import (RESULTS_DIR, atomic_write_json, atomic_write_text, command_line, interleaved_rounds,  # noqa: E402
                     load_average, machine_info, markdown_table, median, paired_ratios, quantile)

FULL_EPOCH = 60_000


class HandLoop:
    """The least code that trains like the engine: what the engine's overhead is measured against."""

    def __init__(self, cfg, images, labels, info):
        torch.manual_seed(cfg.seed)
        self.cfg, self.images, self.labels, self.info = cfg, images, labels, info
        self.model = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        example = normalize(images[:32], info.mean, info.std)
        self.opt = FixNorm(self.model, example, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        steps = math.ceil(len(images) / cfg.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg, steps))
        self.epoch = 0

    def train_epoch(self) -> None:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(self.epoch)
        order = torch.randperm(len(self.images), generator=gen)
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16"
                    else contextlib.nullcontext())
        self.model.train()
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = random_crop_flip(self.images[idx], padding=cfg.crop_padding, flip=False, generator=gen)
            x = normalize(x, self.info.mean, self.info.std)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), self.labels[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        self.epoch += 1


def augmentation_seconds(cfg, images, info, batches: int) -> float:
    """Seconds to crop and normalise ``batches`` batches (the augmentation's share of an epoch)."""
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for b in range(batches):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = random_crop_flip(images[idx], padding=cfg.crop_padding, flip=False, generator=gen)
        x = normalize(x, info.mean, info.std)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fmnist-resnet20")
    parser.add_argument("--quick", action="store_true", help="a smoke test; writes throughput.quick.*")
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed block (default 16)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 2)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 7)
    recipe = load_recipe(args.recipe)
    cfg = make_config(recipe, {"train_subset": steps * recipe.get("batch_size", 128), "method": "fixnorm",
                               "epochs": 1000})
    load = load_average()
    print(f"# {command_line()}")
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load {load}")
    print(f"# recipe {args.recipe}: {cfg.model}, batch {cfg.batch_size}, {cfg.precision}, "
          f"channels_last={cfg.channels_last}; {steps} steps per timed block, {rounds} rounds")

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        images, labels, info = load_dataset(cfg.dataset, cfg.data_dir, "train")
        hand = HandLoop(cfg, images[: cfg.train_subset], labels[: cfg.train_subset], info)
        engine_epoch = iter(range(10 ** 6))
        samples = interleaved_rounds({"engine": lambda: trainer.train_epoch(next(engine_epoch)),
                                      "hand_loop": hand.train_epoch}, rounds=rounds, repeat=1,
                                     device=torch.device("cpu"), warmup=1)
    images_per_block = cfg.train_subset
    engine_ips = images_per_block / median(samples["engine"])
    hand_ips = images_per_block / median(samples["hand_loop"])
    paired = paired_ratios(samples["hand_loop"], samples["engine"])  # engine img/s over hand-loop img/s
    epoch_seconds = FULL_EPOCH / engine_ips
    aug_batches = 8 if args.quick else 60
    aug = augmentation_seconds(cfg, images, info, aug_batches) * (FULL_EPOCH / cfg.batch_size) / aug_batches
    metrics = {
        "engine_images_per_second": engine_ips,
        "hand_loop_images_per_second": hand_ips,
        "engine_over_hand_loop": engine_ips / hand_ips,
        "engine_over_hand_loop_paired_median": median(paired),
        "engine_over_hand_loop_paired_iqr": [quantile(paired, 0.25), quantile(paired, 0.75)],
        "fmnist_epoch_seconds": epoch_seconds,
        "augmentation_seconds_per_epoch": aug,
        "augmentation_share_of_epoch": aug / epoch_seconds,
    }
    targets = {"engine_over_hand_loop": (">=", 0.95), "fmnist_epoch_seconds": ("<=", 60.0)}
    for name, value in metrics.items():
        print(f"{name}: {value if isinstance(value, list) else round(value, 4)}")
    verdicts = {}
    for name, (op, bound) in targets.items():
        ok = metrics[name] >= bound if op == ">=" else metrics[name] <= bound
        verdicts[name] = "PASS" if ok else "FAIL"
        print(f"target {name} {op} {bound}: {verdicts[name]} ({metrics[name]:.3f})")
    if args.no_write:
        return
    stem = os.path.join(RESULTS_DIR, "throughput" + (".quick" if args.quick else ""))
    info_ = machine_info(torch.device("cpu"))
    atomic_write_json(stem + ".json", {"command": command_line(), "machine": info_, "load_average_at_start": load,
                                       "recipe": args.recipe, "steps_per_block": steps, "rounds": rounds,
                                       "samples_seconds": samples, "metrics": metrics,
                                       "targets": {k: {"op": o, "bound": b, "verdict": verdicts[k]}
                                                   for k, (o, b) in targets.items()}})
    rows = [(k, f"{v:.4g}" if not isinstance(v, list) else f"{v[0]:.3f}-{v[1]:.3f}",
             f"{targets[k][0]} {targets[k][1]}: {verdicts[k]}" if k in targets else "") for k, v in metrics.items()]
    atomic_write_text(stem + ".md", f"# Engine throughput ({args.recipe})\n\n`{command_line()}` on {info_['date']}, "
                      f"torch {torch.__version__}, {os.cpu_count()} CPUs, load at start {load}.\n\n"
                      + markdown_table(["metric", "value", "target"], rows) + "\n")


if __name__ == "__main__":
    main()
