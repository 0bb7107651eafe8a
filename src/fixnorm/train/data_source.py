"""Where the engine's batches come from: uint8 tensors on the device, or an ImageFolder tree streamed from disk.

Both hand out augmented uint8 batches for an epoch, this rank's share of the test set, and un-augmented training
images for re-estimating BatchNorm statistics (``statistics_images``); the engine normalises. Every random draw
depends only on (seed, epoch, rank), which makes resuming exact.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import DatasetInfo, cutout, imagefolder_loader, load_dataset, random_crop_flip
from ..data.imagefolder import ResizeCenterCrop, default_num_workers
from ..errors import FixNormError
from .config import STREAMING, TrainConfig
from .distributed import DistInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Batch = tuple[torch.Tensor, torch.Tensor]


def batch_bounds(count: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive batches of ``batch_size`` over ``count`` items; a last batch of one item joins
    the one before (BatchNorm cannot take the statistics of a single value)."""
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [count]))


def labelled_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``per_class`` images of every class, drawn without replacement from ``seed`` alone.

    The same seed gives the same labelled set on every machine and rank (a CPU generator, whatever the device).
    """
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed * 6_007 + 101)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise FixNormError(f"labels_per_class={per_class}, but class {c} has only {len(members)} training images")
        chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


class InMemoryData:
    """A dataset held as uint8 tensors on the device, augmented batch by batch there."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, device: torch.device):
        self.cfg, self.dist, self.device = cfg, dist, device
        train_x, train_y, self.info = load_dataset(cfg.dataset, cfg.data_dir, "train")
        if cfg.holdout:
            # a validation set for tuning: the last `holdout` training images; the test set stays unseen
            if cfg.holdout >= len(train_x):
                raise FixNormError(f"holdout={cfg.holdout} leaves no training images (the set has {len(train_x)})")
            train_x, train_y, test_x, test_y = (train_x[:-cfg.holdout], train_y[:-cfg.holdout],
                                                train_x[-cfg.holdout:], train_y[-cfg.holdout:])
        else:
            test_x, test_y, _ = load_dataset(cfg.dataset, cfg.data_dir, "test")
        if cfg.train_subset:
            train_x, train_y = train_x[: cfg.train_subset], train_y[: cfg.train_subset]
        train_x, train_y = train_x.to(device), train_y.to(device)
        # every training image, labels hidden from training: the unlabelled stream of semi-supervised steps
        self.unlabelled_x, self.unlabelled_y = train_x, train_y
        if cfg.labels_per_class:
            keep = labelled_subset(train_y, cfg.labels_per_class, cfg.seed).to(device)
            train_x, train_y = train_x[keep], train_y[keep]
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = test_x.to(device), test_y.to(device)
        # equal shares: every rank takes as many steps. A semi-supervised epoch is a pass of the unlabelled stream
        # (as many steps as the whole training set gives), the small labelled set cycled through it: with 400 labels
        # an epoch of the labelled set alone would be 7 steps, each followed by a full evaluation
        epoch_images = len(self.unlabelled_x) if cfg.labels_per_class else len(self.train_x)
        self.per_rank = epoch_images // dist.world_size
        if len(self.train_x) < dist.world_size:
            raise FixNormError(f"{len(self.train_x)} training images cannot be shared by {dist.world_size} ranks")
        self.steps_per_epoch = math.ceil(self.per_rank / cfg.batch_size)
        self.train_size = self.per_rank * dist.world_size
        self.test_size = len(self.test_x)

    def example(self) -> torch.Tensor:
        return self.train_x[: min(32, len(self.train_x))]

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        cfg, dist = self.cfg, self.dist
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        passes = math.ceil(self.train_size / len(self.train_x))  # 1 unless a small labelled set is cycled
        order = torch.cat([torch.randperm(len(self.train_x), generator=gen) for _ in range(passes)])
        mine = order[: self.train_size][dist.rank::dist.world_size].to(self.device)
        gen = torch.Generator().manual_seed(cfg.seed * 104_729 + epoch * 31 + dist.rank)
        for step in range(self.steps_per_epoch):
            idx = mine[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = self.train_x[idx]
            if cfg.augment != "none":
                x = random_crop_flip(x, padding=cfg.crop_padding, flip=cfg.augment == "crop_flip", generator=gen)
            if cfg.cutout:
                x = cutout(x, cfg.cutout, generator=gen)
            yield x, self.train_y[idx]

    def statistics_images(self, count: int) -> Iterator[torch.Tensor]:
        """The first ``count`` stored training images (the labelled ones with ``labels_per_class``), un-augmented,
        in batches of the run's batch size (:func:`batch_bounds`)."""
        x = self.train_x[:count]
        for start, end in batch_bounds(len(x), self.cfg.batch_size):
            yield x[start:end]

    def test_batches(self) -> Iterator[Batch]:
        idx = torch.arange(self.dist.rank, self.test_size, self.dist.world_size, device=self.device)
        for i in range(0, len(idx), self.cfg.eval_batch_size):
            batch = idx[i:i + self.cfg.eval_batch_size]
            yield self.test_x[batch], self.test_y[batch]


class ImageFolderData:
    """``data_dir/train`` and ``data_dir/val`` class folders, decoded and augmented by DataLoader workers."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, device: torch.device):
        self.cfg, self.device = cfg, device
        root = Path(cfg.data_dir or "")
        if cfg.data_dir is None or not (root / "train").is_dir() or not (root / "val").is_dir():
            raise FixNormError(f"dataset {cfg.dataset!r} needs --data-dir holding train/ and val/ folders of class "
                               f"sub-folders (ImageNet layout); got {cfg.data_dir!r}")
        if cfg.augment != "crop_flip":
            raise FixNormError("ImageFolder training always uses random-resized crops and flips: set augment=crop_flip")
        if cfg.holdout:
            raise FixNormError("holdout works with in-memory datasets; for an ImageFolder tree, put a validation "
                               "split in its own folder and point data_dir at it")
        if cfg.labels_per_class:
            raise FixNormError("labels_per_class works with in-memory datasets (fashion_mnist, cifar10, ...), not "
                               "with a streamed ImageFolder tree")
        common = dict(image_size=cfg.image_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                      num_workers=cfg.workers, pin_memory=device.type == "cuda")
        self.train_loader = imagefolder_loader(root / "train", cfg.batch_size, train=True, **common)
        self.test_loader = imagefolder_loader(root / "val", cfg.eval_batch_size, train=False, **common)
        classes = self.train_loader.dataset.classes
        if self.test_loader.dataset.classes != classes:
            raise FixNormError(f"train/ and val/ under {root} hold different class folders")
        self.info = DatasetInfo(cfg.dataset, len(classes), 3, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.steps_per_epoch = len(self.train_loader)
        self.train_size = self.steps_per_epoch * cfg.batch_size * dist.world_size
        self.test_size = len(self.test_loader.dataset)

    def example(self) -> torch.Tensor:
        return next(iter(self.test_loader))[0][:32].to(self.device)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        self.train_loader.sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 104_729 + epoch * 31)
        for x, y in self.train_loader:
            x = x.to(self.device, non_blocking=True)
            if self.cfg.cutout:
                x = cutout(x, self.cfg.cutout, generator=gen)
            yield x, y.to(self.device, non_blocking=True)

    def statistics_images(self, count: int) -> Iterator[torch.Tensor]:
        """``count`` training images spread evenly over the tree (every ``len / count``-th file in class order, so
        every class in proportion; the first ``count`` files would be a class or two), decoded with the evaluation
        transform (resize and centre crop: un-augmented, no random draw), in batches of the run's batch size
        (:func:`batch_bounds`). The same images on every rank and every epoch."""
        dataset = copy.copy(self.train_loader.dataset)  # the scanned file list, shared; another transform
        dataset.transform = ResizeCenterCrop(self.cfg.image_size)
        n = min(count, len(dataset))
        picked = [i * len(dataset) // n for i in range(n)]
        batches = [picked[start:end] for start, end in batch_bounds(n, self.cfg.batch_size)]
        workers = default_num_workers() if self.cfg.workers is None else self.cfg.workers
        for x, _ in DataLoader(dataset, batch_sampler=batches, num_workers=workers):
            yield x.to(self.device, non_blocking=True)

    def test_batches(self) -> Iterator[Batch]:
        for x, y in self.test_loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_data(cfg: TrainConfig, dist: DistInfo, device: torch.device) -> InMemoryData | ImageFolderData:
    return (ImageFolderData if cfg.dataset in STREAMING else InMemoryData)(cfg, dist, device)
