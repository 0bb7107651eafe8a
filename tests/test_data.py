"""IDX reading, Fashion-MNIST loading and batched augmentation."""

import gzip
import struct
from pathlib import Path

import pytest
import torch

from fixnorm.data import (
    DEFAULT_FASHION_MNIST_DIR,
    iterate_batches,
    load_fashion_mnist,
    normalize,
    random_crop_flip,
)
from fixnorm.data.idx import read_idx, write_idx
from fixnorm.errors import FixNormError


def _fake_split(directory: Path, prefix: str, n: int, gz: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    ext = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    x = torch.arange(2 * 3 * 5, dtype=torch.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / name, x)
    assert torch.equal(read_idx(tmp_path / name), x)


def test_idx_header_is_big_endian(tmp_path):
    raw = struct.pack(">HBBII", 0, 8, 2, 2, 3) + bytes(range(6))
    (tmp_path / "m").write_bytes(raw)
    assert read_idx(tmp_path / "m").tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cut", [1, 7])  # lose data bytes, or cut into the header
def test_truncated_file_names_the_file(tmp_path, gz, cut):
    raw = struct.pack(">HBBII", 0, 8, 2, 2, 3) + bytes(range(6))
    path = tmp_path / ("t.idx.gz" if gz else "t.idx")
    data = raw[:-cut] if cut == 1 else raw[:cut]
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(FixNormError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_trailing_garbage_is_rejected(tmp_path):
    path = tmp_path / "g.idx"
    path.write_bytes(struct.pack(">HBBI", 0, 8, 1, 3) + b"\x01\x02\x03\x04")
    with pytest.raises(FixNormError, match="corrupt") as err:
        read_idx(path)
    assert "g.idx" in str(err.value)


def test_broken_gzip_stream_is_rejected(tmp_path):
    raw = gzip.compress(struct.pack(">HBBI", 0, 8, 1, 1000) + bytes(1000))
    path = tmp_path / "b.idx.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FixNormError, match="b.idx.gz"):
        read_idx(path)


@pytest.mark.parametrize("header", [b"\x08\x03\x08\x03", b"\x00\x00\x0d\x01"])  # bad magic, float dtype
def test_bad_magic_or_dtype(tmp_path, header):
    path = tmp_path / "x.idx"
    path.write_bytes(header + struct.pack(">I", 1) + b"\x00" * 4)
    with pytest.raises(FixNormError, match="x.idx"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_load_fashion_mnist_from_directory(tmp_path, gz):
    images, labels = _fake_split(tmp_path, "t10k", 7, gz)
    x, y = load_fashion_mnist(tmp_path, split="test")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and torch.equal(y, labels.long())
    assert torch.equal(x[:, 0], images)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FixNormError) as err:
        load_fashion_mnist(tmp_path, split="train")
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_count_mismatch_and_bad_split(tmp_path):
    _fake_split(tmp_path, "train", 5, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(FixNormError, match="5 images but"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(FixNormError, match="split"):
        load_fashion_mnist(tmp_path, split="validation")


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_fashion_mnist(split=split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert int(y.min()) == 0 and int(y.max()) == 9
        assert torch.bincount(y).tolist() == [n // 10] * 10  # the splits are balanced


def _batch(n=16, c=3, h=8, w=10, dtype=torch.uint8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, h, w), generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_keeps_shape_and_dtype(dtype):
    x = _batch(dtype=dtype)
    out = random_crop_flip(x, padding=4)
    assert out.shape == x.shape and out.dtype == dtype


def test_crop_is_deterministic_for_a_seeded_generator():
    x = _batch()
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_padding_no_flip_is_identity():
    x = _batch()
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


def test_crop_matches_reference_and_flip_is_mirror():
    """Each output is a padded window, mirrored or not; both cases occur, and crops differ per sample."""
    x = _batch(n=64)
    p = 2
    out = random_crop_flip(x, padding=p, flip=True, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    found_flip, found_plain, offsets = False, False, set()
    for i in range(x.shape[0]):
        matches = []
        for dy in range(2 * p + 1):
            for dx in range(2 * p + 1):
                crop = padded[i, :, dy : dy + h, dx : dx + w]
                if torch.equal(out[i], crop):
                    matches.append((dy, dx, False))
                if torch.equal(out[i], crop.flip(-1)):
                    matches.append((dy, dx, True))
        assert matches, f"sample {i} is not a (flipped) crop of its padded input"
        dy, dx, flipped = matches[0]
        found_flip |= flipped
        found_plain |= not flipped
        offsets.add((dy, dx))
    assert found_flip and found_plain
    assert len(offsets) > 1


def test_crops_differ_within_a_batch():
    """One image repeated: per-sample offsets must give different outputs."""
    x = _batch(n=1).expand(32, -1, -1, -1)
    out = random_crop_flip(x, padding=3, flip=False, generator=torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1


def test_normalize_and_batches():
    x = torch.full((4, 1, 2, 2), 255, dtype=torch.uint8)
    z = normalize(x, mean=(0.5,), std=(0.25,))
    assert z.dtype == torch.float32 and torch.allclose(z, torch.full_like(z, 2.0))
    y = torch.arange(10)
    imgs = torch.arange(10).reshape(10, 1, 1, 1)
    seen = torch.cat([b for _, b in iterate_batches(imgs, y, 3, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    assert len(list(iterate_batches(imgs, y, 3, shuffle=False, drop_last=True))) == 3
