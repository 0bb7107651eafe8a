"""FixMatch's strong augmentation, batched on the data's device: RandAugment with random magnitudes plus cutout.

Every op works on a float NCHW batch of pixels in [0, 1] (the stored uint8 images / 255: the engine normalises
afterwards), with one magnitude ``level`` in [0, 1] per image, mapped to the ranges of the FixMatch paper's
RandAugment table (Sohn et al. 2020, Table 12). Ops follow PIL's definitions (what the reference code calls):
nearest-neighbour resampling and black fill for the geometric ops, which share one batched ``affine_grid``.
Each image takes ``num_ops`` ops drawn uniformly from the pool (with replacement); all randomness comes from the
generator passed in.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fixnorm.data.augment import cutout, random_crop_flip
from fixnorm.errors import FixNormError

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ENHANCE_RANGE = (0.05, 0.95)   # brightness, contrast, sharpness factors (1 would be the image itself)
POSTERIZE_BITS = (4, 8)        # bits kept
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3            # fraction of the image's side


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def _factor(level: torch.Tensor) -> torch.Tensor:
    low, high = ENHANCE_RANGE
    return _per_image(low + (high - low) * level)


def _signed(level: torch.Tensor, largest: float) -> torch.Tensor:
    """A level in [0, 1] -> a value in [-largest, largest] (the sign is part of the random magnitude)."""
    return (2 * level - 1) * largest


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor·(x - degenerate)``, clipped to the pixel range."""
    return (degenerate + factor * (x - degenerate)).clamp_(0.0, 1.0)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> integer levels 0..255 (PIL's uint8 values)."""
    return (x * 255).round_().clamp_(0, 255).long()


# -- the ops: (pixels in [0, 1], level per image in [0, 1]) -> pixels in [0, 1] ----------------------------
def identity(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return x


def autocontrast(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Each channel of each image stretched so that its minimum goes to 0 and its maximum to 1 (flat ones kept)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    flat = span <= 0
    return torch.where(flat, x, (x - low) / torch.where(flat, torch.ones_like(span), span))


def brightness(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Blend with black: ``factor·x``."""
    return _blend(torch.zeros_like(x), x, _factor(level))


def grey_mean(x: torch.Tensor) -> torch.Tensor:
    """Each image's mean grey level (ITU-R 601 luma for RGB, as PIL's "L"; the channel mean otherwise)."""
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
        grey = (x * weights).sum(1, keepdim=True)
    else:
        grey = x.mean(1, keepdim=True)
    return grey.mean(dim=(2, 3), keepdim=True)


def contrast(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey: ``mean + factor·(x - mean)``."""
    return _blend(grey_mean(x).expand_as(x), x, _factor(level))


def equalize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel of each image, on the 256 uint8 levels, as PIL's ``ImageOps.equalize``."""
    n, c, h, w = x.shape
    q = _levels(x).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last_level = 255 - (hist.flip(1) > 0).long().argmax(1)          # the highest level present
    last_count = hist.gather(1, last_level[:, None])[:, 0]
    step = (h * w - last_count) // 255                                 # PIL: pixels per output level
    safe = step.clamp(min=1)[:, None]
    lut = (hist.cumsum(1) + safe // 2) // safe
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp_(0, 255)
    out = torch.where((step > 0)[:, None], lut.gather(1, q), q)      # one level (or nearly): unchanged
    return (out.to(x.dtype) / 255).reshape(n, c, h, w)


def posterize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits of every uint8 value (4..8 bits)."""
    low, high = POSTERIZE_BITS
    bits = (low + (high - low) * level).round().long()
    mask = (256 - (1 << (8 - bits))).reshape(-1, 1, 1, 1)
    return (_levels(x) & mask).to(x.dtype) / 255


def sharpness(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's smoothed image (kernel [[1,1,1],[1,5,1],[1,1,1]]/13 inside, the border unchanged)."""
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(smooth, x, _factor(level))


def solarize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Invert every pixel at or above the threshold ``level`` (in [0, 1]): ``1 - x``."""
    return torch.where(x >= _per_image(level), 1 - x, x)


# -- geometric ops: each gives the pixel-space map from output to input coordinates (about the centre) -------
def _matrices(level: torch.Tensor, kind: str, height: int, width: int) -> torch.Tensor:
    """(N, 2, 3) maps (u, v, 1) -> (u_in, v_in), with u right and v down, in pixels from the image's centre."""
    n = level.shape[0]
    a = torch.zeros(n, 2, 3, dtype=level.dtype, device=level.device)
    a[:, 0, 0] = a[:, 1, 1] = 1
    if kind == "rotate":  # the content turns counter-clockwise on screen by the angle (PIL's rotate)
        angle = _signed(level, MAX_ROTATE_DEGREES) * (math.pi / 180)
        cos, sin = angle.cos(), angle.sin()
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = cos, -sin, sin, cos
    elif kind == "shear_x":  # output (u, v) takes input (u + s·v, v)
        a[:, 0, 1] = _signed(level, MAX_SHEAR)
    elif kind == "shear_y":
        a[:, 1, 0] = _signed(level, MAX_SHEAR)
    elif kind == "translate_x":  # the content moves right by d pixels: output u takes input u - d
        a[:, 0, 2] = -(_signed(level, MAX_TRANSLATE) * width).round()
    elif kind == "translate_y":
        a[:, 1, 2] = -(_signed(level, MAX_TRANSLATE) * height).round()
    else:
        raise FixNormError(f"unknown geometric op {kind!r}")
    return a


def warp(x: torch.Tensor, pixel_maps: torch.Tensor) -> torch.Tensor:
    """``x`` resampled through per-image pixel-space maps (output -> input), nearest neighbour, black outside.

    One batched ``affine_grid``: the map is conjugated into the normalised coordinates of ``align_corners=False``
    (pixel centres at ``(2i + 1)/size - 1``), so an integer translation moves pixel centres onto pixel centres.
    """
    n, _, h, w = x.shape
    scale = torch.tensor([w / 2, h / 2], dtype=x.dtype, device=x.device)
    theta = pixel_maps.to(x.dtype).clone()
    theta[:, :, :2] = theta[:, :, :2] * scale[None, None, :] / scale[None, :, None]
    theta[:, :, 2] = theta[:, :, 2] / scale[None, :]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _geometric(kind: str) -> Op:
    def op(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return warp(x, _matrices(level.to(x.dtype), kind, x.shape[2], x.shape[3]))

    op.__name__ = kind
    return op


rotate, shear_x, shear_y = _geometric("rotate"), _geometric("shear_x"), _geometric("shear_y")
translate_x, translate_y = _geometric("translate_x"), _geometric("translate_y")

COLOUR_OPS: dict[str, Op] = {"identity": identity, "autocontrast": autocontrast, "brightness": brightness,
                             "contrast": contrast, "equalize": equalize, "posterize": posterize,
                             "sharpness": sharpness, "solarize": solarize}
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS: tuple[str, ...] = tuple(sorted([*COLOUR_OPS, *GEOMETRIC_OPS]))  # the pool, in a fixed order


def _draw(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
          high: int | None = None) -> torch.Tensor:
    """Uniform [0, 1) floats (or integers below ``high``) drawn on the generator's device, moved to ``device``."""
    where = generator.device if generator is not None else device
    if high is None:
        return torch.rand(shape, generator=generator, device=where).to(device)
    return torch.randint(high, shape, generator=generator, device=where).to(device)


def apply_ops(x: torch.Tensor, op_index: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Image i of float ``x`` through op ``OPS[op_index[i]]`` at ``level[i]``; no host sync, one warp.

    Every colour op runs on the whole batch and each image keeps its own op's result (cheap next to the model);
    the geometric ops share one ``affine_grid`` whose identity rows leave the other images as they are.
    """
    out = x
    for name, op in COLOUR_OPS.items():
        if name != "identity":
            out = torch.where(_per_image(op_index == OPS.index(name)), op(x, level), out)
    n, _, h, w = x.shape
    maps = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    maps[:, 0, 0] = maps[:, 1, 1] = 1
    geometric = torch.zeros(n, dtype=torch.bool, device=x.device)
    for name in GEOMETRIC_OPS:
        chosen = op_index == OPS.index(name)
        maps = torch.where(chosen[:, None, None], _matrices(level.to(x.dtype), name, h, w), maps)
        geometric |= chosen
    return torch.where(_per_image(geometric), warp(x, maps), out)


def rand_augment(x: torch.Tensor, num_ops: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandAugment with random magnitudes (FixMatch's variant): ``num_ops`` ops per image, one after the other.

    ``x``: uint8 NCHW (stored images; returned as uint8, rounded once at the end) or float NCHW in [0, 1].
    """
    if x.dim() != 4:
        raise FixNormError(f"rand_augment needs an NCHW batch, got shape {tuple(x.shape)}")
    if num_ops < 0:
        raise FixNormError(f"num_ops must be >= 0, got {num_ops}")
    stored = x.dtype == torch.uint8
    out = x.float() / 255 if stored else x
    n = x.shape[0]
    for _ in range(num_ops):
        op_index = _draw((n,), generator, x.device, high=len(OPS))
        level = _draw((n,), generator, x.device)
        out = apply_ops(out, op_index, level)
    return (out * 255).round_().clamp_(0, 255).to(torch.uint8) if stored else out


def strong_augment(x: torch.Tensor, *, padding: int, flip: bool, num_ops: int = 2, cutout_size: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """FixMatch's strong view: the weak crop (and flip), ``num_ops`` RandAugment ops, cutout (default half the side)."""
    x = random_crop_flip(x, padding=padding, flip=flip, generator=generator)
    x = rand_augment(x, num_ops, generator=generator)
    size = min(x.shape[2], x.shape[3]) // 2 if cutout_size is None else cutout_size
    return cutout(x, size, generator=generator)
