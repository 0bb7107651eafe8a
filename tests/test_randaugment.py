"""FixMatch's strong augmentation: each op against its definition on small tensors; the batch, the randomness."""
import numpy as np
import pytest
import torch

from fixnorm import FixNormError
from fixnorm.data import randaugment as ra


def levels(*values):
    return torch.tensor(values, dtype=torch.float32)


def stored(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_the_pool_is_fixmatchs():
    assert set(ra.OPS) == {"identity", "autocontrast", "brightness", "contrast", "equalize", "posterize", "rotate",
                           "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y"}


def test_solarize_inverts_at_and_above_the_threshold():
    x = torch.linspace(0, 1, 11).reshape(1, 1, 1, 11).repeat(2, 1, 1, 1)
    out = ra.solarize(x, levels(0.5, 1.0))
    assert torch.equal(out[0], torch.where(x[0] >= 0.5, 1 - x[0], x[0]))
    assert torch.equal(out[1, ..., :-1], x[1, ..., :-1]) and out[1, ..., -1] == 0  # only 1.0 reaches 1.0


def test_posterize_keeps_the_top_bits():
    x = stored((2, 3, 4, 5))
    out = (ra.posterize(x.float() / 255, levels(0.0, 1.0)) * 255).round().to(torch.uint8)
    assert torch.equal(out[0], x[0] & 0xF0)  # level 0: 4 bits
    assert torch.equal(out[1], x[1])         # level 1: all 8 bits
    middle = (ra.posterize(x[:1].float() / 255, levels(0.5)) * 255).round().to(torch.uint8)
    assert torch.equal(middle[0], x[0] & 0xFC)  # 6 bits


def test_autocontrast_maps_each_channels_min_to_0_and_max_to_1():
    x = torch.rand(3, 2, 5, 5) * 0.5 + 0.2
    x[2, 1] = 0.4  # a flat channel stays as it is
    out = ra.autocontrast(x, levels(0, 0, 0))
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    expected = (x - lo) / (hi - lo)
    torch.testing.assert_close(out[:2], expected[:2])
    torch.testing.assert_close(out[2, 0], expected[2, 0])
    assert torch.equal(out[2, 1], x[2, 1])
    assert torch.allclose(out[:2].amin((2, 3)), torch.zeros(2, 2)) and torch.allclose(out[:2].amax((2, 3)),
                                                                                      torch.ones(2, 2))


def test_equalize_is_pils_and_flattens_the_histogram():
    image_ops = pytest.importorskip("PIL.ImageOps")
    from PIL import Image

    gen = torch.Generator().manual_seed(1)
    skewed = (torch.rand(2, 3, 32, 32, generator=gen) ** 2 * 255).round().to(torch.uint8)  # mostly dark
    out = (ra.equalize(skewed.float() / 255, levels(0, 0)) * 255).round().to(torch.uint8)
    for i in range(2):
        pil = Image.fromarray(skewed[i].permute(1, 2, 0).numpy())
        assert torch.equal(out[i], torch.from_numpy(np.array(image_ops.equalize(pil))).permute(2, 0, 1))
    # roughly flat: the empirical CDF of the result is close to the identity on [0, 1]
    values = out[0, 0].flatten().float() / 255
    grid = torch.linspace(0, 1, 21)
    cdf = (values[None, :] <= grid[:, None]).float().mean(1)
    assert (cdf - grid).abs().max() < 0.06
    before = (skewed[0, 0].flatten().float() / 255 <= grid[:, None]).float().mean(1)
    assert (before - grid).abs().max() > 0.2
    flat = torch.full((1, 1, 4, 4), 0.5)
    assert torch.equal(ra.equalize(flat, levels(0)), (flat * 255).round() / 255)  # one level: unchanged


def test_brightness_contrast_sharpness_blend_with_their_degenerate_images():
    x = torch.rand(2, 3, 6, 6)
    low, high = ra.ENHANCE_RANGE
    torch.testing.assert_close(ra.brightness(x, levels(0, 1)), torch.stack([x[0] * low, x[1] * high]))
    mean = (x * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1).mean((1, 2)).reshape(2, 1, 1, 1)
    factor = torch.tensor([low, high]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(ra.contrast(x, levels(0, 1)), (mean + factor * (x - mean)).clamp(0, 1))
    sharp = ra.sharpness(x, levels(0, 1))
    assert torch.equal(sharp[..., 0, :], x[..., 0, :]) and torch.equal(sharp[..., :, -1], x[..., :, -1])  # border
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = (x[0, 1, 1:4, 1:4] * kernel).sum()  # the smoothed pixel (2, 2) of image 0, channel 1
    torch.testing.assert_close(sharp[0, 1, 2, 2], (smooth + low * (x[0, 1, 2, 2] - smooth)).clamp(0, 1))
    grey = torch.full((1, 1, 5, 5), 0.3)
    for op in (ra.contrast, ra.sharpness):
        torch.testing.assert_close(op(grey, levels(0.2)), grey)  # a flat image is its own degenerate


def translate_level(pixels, size):
    """The level whose translation is ``pixels`` on a side of ``size``."""
    return (pixels / (ra.MAX_TRANSLATE * size) + 1) / 2


def test_an_integer_translation_is_a_roll_with_black_fill():
    x = torch.rand(2, 3, 8, 10)
    right = ra.translate_x(x, levels(translate_level(3, 10), translate_level(-2, 10)))
    expected = torch.roll(x[:1], 3, dims=3)
    expected[..., :3] = 0
    assert torch.equal(right[:1], expected)
    expected = torch.roll(x[1:], -2, dims=3)
    expected[..., -2:] = 0
    assert torch.equal(right[1:], expected)
    down = ra.translate_y(x[:1], levels(translate_level(2, 8)))
    expected = torch.roll(x[:1], 2, dims=2)
    expected[..., :2, :] = 0
    assert torch.equal(down, expected)


def test_rotation_and_shears_at_zero_are_the_identity_and_a_quarter_turn_is_rot90():
    x = torch.rand(3, 2, 7, 9)
    for op in (ra.rotate, ra.shear_x, ra.shear_y, ra.translate_x, ra.translate_y):
        assert torch.equal(op(x, levels(0.5, 0.5, 0.5)), x), op.__name__
    square = torch.rand(2, 1, 6, 6)
    quarter = torch.tensor([[[0.0, -1, 0], [1, 0, 0]]]).repeat(2, 1, 1)  # pixel map of a 90° counter-clockwise turn
    assert torch.equal(ra.warp(square, quarter), torch.rot90(square, 1, dims=(2, 3)))
    turned = ra.rotate(square, levels(1.0, 0.0))  # ±30°: black corners, the centre kept
    assert (turned[:, :, 0, 0] == 0).all() and (turned[:, :, -1, -1] == 0).all()


def test_shears_leave_the_centre_line_and_move_the_rest_along_it():
    x = torch.rand(1, 1, 7, 9)
    sheared = ra.shear_x(x, levels(1.0))  # s = 0.3: row v takes input columns u + 0.3 v
    assert torch.equal(sheared[0, 0, 3], x[0, 0, 3])  # the middle row (v = 0)
    assert torch.equal(sheared[0, 0, 0, 1:-1], x[0, 0, 0, :-2])  # v = -3: 0.9 pixels, rounded to 1, to the right
    sheared = ra.shear_y(x.transpose(2, 3), levels(1.0))
    assert torch.equal(sheared[0, 0, :, 3], x[0, 0, 3])


def test_each_image_gets_its_own_op_in_one_batch():
    x = stored((len(ra.OPS), 3, 9, 9)).float() / 255
    op_index = torch.arange(len(ra.OPS))
    level = torch.linspace(0.1, 0.9, len(ra.OPS))
    out = ra.apply_ops(x, op_index, level)
    for i, name in enumerate(ra.OPS):
        alone = getattr(ra, name)(x[i:i + 1], level[i:i + 1])
        assert torch.equal(out[i:i + 1], alone), name


def test_rand_augment_is_reproducible_and_keeps_the_pixel_range_and_dtype():
    x = stored((16, 3, 10, 10))
    a = ra.rand_augment(x, 2, generator=torch.Generator().manual_seed(3))
    b = ra.rand_augment(x, 2, generator=torch.Generator().manual_seed(3))
    c = ra.rand_augment(x, 2, generator=torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)
    f = ra.rand_augment(x.float() / 255, 2, generator=torch.Generator().manual_seed(3))
    assert f.dtype == torch.float32 and f.min() >= 0 and f.max() <= 1
    assert torch.equal((f * 255).round().to(torch.uint8), a)  # uint8 in: the same ops, rounded once
    assert torch.equal(ra.rand_augment(x, 0), x)
    with pytest.raises(FixNormError, match="NCHW"):
        ra.rand_augment(x[0])


def test_the_strong_view_ends_with_a_cutout_of_half_the_side():
    white = torch.full((64, 1, 12, 12), 255, dtype=torch.uint8)
    out = ra.strong_augment(white, padding=0, flip=False, num_ops=0, generator=torch.Generator().manual_seed(0))
    black = out == 0
    rows, cols = black.any(3).sum(2).flatten(), black.any(2).sum(2).flatten()
    assert (black.sum((1, 2, 3)) == rows * cols).all()  # a rectangle: the square, clipped at the border
    assert rows.max() == 6 and cols.max() == 6 and rows.min() >= 1 and (out[black.logical_not()] == 255).all()
