"""Batched augmentation and batching that run on whatever device the data lives on.

Everything here works on whole NCHW batches at once, so a GPU-resident dataset
never goes through a per-image Python loop or a CPU data loader.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from fixnorm.errors import FixNormError


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor)."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=gen_device).to(device)


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, one draw per sample.

    Pads once, then gathers every sample's window with advanced indexing; the
    result has the same shape and dtype as `x` and is reproducible for a seeded generator.
    """
    if x.dim() != 4:
        raise FixNormError(f"random_crop_flip needs an NCHW batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise FixNormError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    dy = _randint(2 * padding + 1, n, generator, dev)
    dx = _randint(2 * padding + 1, n, generator, dev)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=dev)  # (N, W)
    if flip:
        flipped = _randint(2, n, generator, dev).bool()
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one size x size square per sample, centred anywhere and clipped at the borders (DeVries & Taylor).

    The centres are drawn once for the whole batch and turned into a broadcast
    row/column mask, so there is no per-image loop; all channels are zeroed and
    the result is reproducible for a seeded generator. `size=0` returns a copy of `x`.
    """
    if x.dim() != 4:
        raise FixNormError(f"cutout needs an NCHW batch, got shape {tuple(x.shape)}")
    if size < 0:
        raise FixNormError(f"cutout size must be >= 0, got {size}")
    if size == 0:
        return x.clone()
    n, _, h, w = x.shape
    dev = x.device
    top = _randint(h, n, generator, dev) - size // 2  # square spans [top, top + size) before clipping
    left = _randint(w, n, generator, dev) - size // 2
    rows = torch.arange(h, device=dev)[None, :] - top[:, None]  # (N, H) offset into the square
    cols = torch.arange(w, device=dev)[None, :] - left[:, None]  # (N, W)
    in_rows = (rows >= 0) & (rows < size)
    in_cols = (cols >= 0) & (cols < size)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    return x.masked_fill(mask, 0)


def normalize(
    x_uint8: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]
) -> torch.Tensor:
    """Map uint8 pixels to float, scaled to [0, 1] and standardised per channel."""
    x = x_uint8.float().div_(255.0) if x_uint8.dtype == torch.uint8 else x_uint8.float()
    shape = (1, -1, 1, 1) if x.dim() == 4 else (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    if bool((s <= 0).any()):
        raise FixNormError(f"std must be positive, got {std}")
    return (x - m) / s


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) minibatches from tensors already on the device, like a TensorDataset loader."""
    if images.shape[0] != labels.shape[0]:
        raise FixNormError(f"{images.shape[0]} images but {labels.shape[0]} labels; they must match")
    if batch_size < 1:
        raise FixNormError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    if shuffle:
        gen_device = generator.device if generator is not None else images.device
        order = torch.randperm(n, generator=generator, device=gen_device).to(images.device)
    else:
        order = torch.arange(n, device=images.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]
