"""Streaming ImageFolder dataset (class = sub-folder), decoded with Pillow in DataLoader workers.

For datasets too large to hold in memory, ImageNet-style. Two choices make a
seed fix every epoch exactly:

* the sampler hands each index out together with a per-sample augmentation
  seed, so crops and flips do not depend on which worker decodes the image
  (the same seed gives the same batches with 0, 2 or 16 workers);
* every rank draws the same permutation and keeps every `world_size`-th entry,
  so the ranks' shards are disjoint and together cover each file once.

Pillow is optional: it is imported only when an image folder is actually used.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from fixnorm.errors import FixNormError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: transform(pil_rgb_image, generator) -> uint8 CHW tensor; generator is None outside `imagefolder_loader`.
Transform = Callable[[Any, "torch.Generator | None"], torch.Tensor]


def _require_pil() -> Any:
    """Import Pillow on first use, so fixnorm itself never depends on it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise FixNormError(
            "reading an image folder needs Pillow to decode the images, and it is not installed; "
            "pip install pillow"
        ) from e
    return Image


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _to_tensor(img: Any) -> torch.Tensor:
    """PIL RGB image -> contiguous uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class RandomResizedCropFlip:
    """Training transform: random-resized crop to size x size, then a random horizontal flip.

    Follows the usual Inception-style recipe (area fraction uniform in `scale`,
    log-uniform aspect ratio in `ratio`, 10 tries, then a centre crop), drawing
    all randomness from the generator it is given.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        if size < 1:
            raise FixNormError(f"crop size must be >= 1, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise FixNormError(
                f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}"
            )
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """Return the crop as (left, top, crop_width, crop_height) in source pixels."""
        area = width * height
        log_lo, log_hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * _rand(generator))
            aspect = float(np.exp(log_lo + (log_hi - log_lo) * _rand(generator)))
            w = int(round((target * aspect) ** 0.5))
            h = int(round((target / aspect) ** 0.5))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(height - h + 1, (), generator=generator))
                left = int(torch.randint(width - w + 1, (), generator=generator))
                return left, top, w, h
        in_ratio = width / height  # fallback: largest centred crop with a ratio inside the range
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        Image = _require_pil()
        left, top, w, h = self.box(img.width, img.height, generator)
        out = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if self.flip and _rand(generator) < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(out)


class ResizeCenterCrop:
    """Evaluation transform: resize the shorter side to size / crop_fraction, then centre-crop size x size."""

    def __init__(self, size: int, crop_fraction: float = 0.875) -> None:
        if size < 1:
            raise FixNormError(f"crop size must be >= 1, got {size}")
        if not 0 < crop_fraction <= 1:
            raise FixNormError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.size = size
        self.resize_to = int(size / crop_fraction)  # 224 -> 256, the standard ImageNet evaluation

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        Image = _require_pil()
        w, h = img.size
        if w <= h:
            new_w, new_h = self.resize_to, int(self.resize_to * h / w)
        else:
            new_w, new_h = int(self.resize_to * w / h), self.resize_to
        out = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - self.size) / 2)), int(round((new_h - self.size) / 2))
        return _to_tensor(out.crop((left, top, left + self.size, top + self.size)))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_class(class_dir: Path) -> list[str]:
    """All image files under one class folder (recursively, following links), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not _is_hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return found


class ImageFolderDataset(Dataset):
    """`root/<class>/**/<image>` files; class indices follow the sorted sub-folder names.

    Items are (transform(image), class index). An index may also be an
    (index, seed) pair, as `SeededShardSampler` yields: the transform then gets
    a generator seeded with it, which is what makes augmentation reproducible.
    Hidden files and folders (a leading '.') are ignored.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        _require_pil()  # fail now, not inside a worker process
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FixNormError(
                f"image folder root {self.root} is not a directory; pass the folder of class folders"
            )
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not _is_hidden(d.name))
        if not self.classes:
            raise FixNormError(
                f"image folder {self.root} has no class sub-folders; put each class's images in "
                f"its own folder, {self.root}/<class>/<image>"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for cls in self.classes:
            files = _scan_class(self.root / cls)
            if not files:
                raise FixNormError(
                    f"class folder {self.root / cls} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add images or remove the folder, since it would still take a class index"
                )
            self.samples.extend((f, self.class_to_idx[cls]) for f in files)
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Any:
        """Decode sample `index` into an RGB PIL image; undecodable files raise `FixNormError` naming them."""
        Image = _require_pil()
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")  # convert decodes fully, so truncation shows up here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise FixNormError(
                f"cannot decode image {path} ({type(e).__name__}: {e}); delete or replace the file"
            ) from e

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        generator = None
        if isinstance(index, tuple):
            index, seed = index
            generator = torch.Generator().manual_seed(int(seed))
        img = self.load(index)
        x = self.transform(img, generator) if self.transform is not None else _to_tensor(img)
        return x, self.samples[index][1]


class SeededShardSampler(Sampler):
    """Yields (index, augmentation seed) for this rank's shard of one permutation shared by every rank.

    Like `DistributedSampler` but without padding: the shards of all ranks are
    disjoint and together hold every sample once. `even_shards=True` instead
    drops the (fewer than `world_size`) leftover samples of each epoch's
    permutation so all ranks run the same number of steps, which distributed
    training needs. Each `iter()` uses the current epoch and then advances it;
    `set_epoch` sets it explicitly, as with `DistributedSampler`.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        even_shards: bool = False,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise FixNormError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.even_shards = shuffle, seed, even_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stop(self) -> int:
        n = self.num_samples
        return n - n % self.world_size if self.even_shards else n

    def __len__(self) -> int:
        return len(range(self.rank, self._stop(), self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed))
        self.epoch += 1
        n = self.num_samples
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (n,), generator=g)
        mine = slice(self.rank, self._stop(), self.world_size)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


def _seed_worker(worker_id: int) -> None:
    """Seed `random` and numpy from the worker's torch seed, for user transforms that draw from them."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def default_num_workers() -> int:
    """One worker per usable CPU core, at most 8 (decoding rarely scales further per process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _dist_default(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill rank/world_size from torch.distributed when it is initialised, else a single process."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


def imagefolder_loader(
    root: str | Path,
    batch_size: int,
    train: bool,
    image_size: int = 224,
    num_workers: int | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader of (uint8 (B, 3, image_size, image_size), int64 (B,)) batches streamed from `root`.

    train: random-resized crop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip;
    otherwise resize the shorter side to image_size / 0.875 and centre-crop.
    `shuffle` and `drop_last` default to `train`; `num_workers` to
    `default_num_workers()`; rank/world_size to torch.distributed's when it is
    initialised. Call `loader.sampler.set_epoch(e)` to jump to an epoch; for
    training, shards are kept equal across ranks.
    """
    if batch_size < 1:
        raise FixNormError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = _dist_default(rank, world_size)
    workers = default_num_workers() if num_workers is None else num_workers
    if workers < 0:
        raise FixNormError(f"num_workers must be >= 0, got {workers}")
    transform = RandomResizedCropFlip(image_size) if train else ResizeCenterCrop(image_size)
    dataset = ImageFolderDataset(root, transform)
    sampler = SeededShardSampler(
        len(dataset),
        rank=rank,
        world_size=world_size,
        shuffle=train if shuffle is None else shuffle,
        seed=seed,
        even_shards=train,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=train if drop_last is None else drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),  # fixes the workers' base seed
        persistent_workers=workers > 0,  # do not re-fork and re-import every epoch
    )
