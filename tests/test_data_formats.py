"""CIFAR (binary and python layouts), ImageFolder streaming, cutout, synthetic data and the dataset registry.

Every dataset here is generated in tmp_path in the official on-disk format, a
few images per file, so the tests need no download and run in seconds.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixnorm.data import (
    DATASETS,
    SeededShardSampler,
    cutout,
    load_cifar,
    load_dataset,
    synthetic_dataset,
)
from fixnorm.errors import FixNormError

PER_FILE = 3  # images per batch file


# --------------------------------------------------------------------------- CIFAR writers


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING), as the official files were written by Python 2."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    """A protocol-2 pickle like the official batches: Python 2 strings, numpy 1.x module names."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_cifar(root: Path, name: str, layout: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write every file of one layout ("bin", "py2", "py3") under root; return {split: (rows (N, 3072), labels)}."""
    ten = name == "cifar10"
    classes = 10 if ten else 100
    if ten:
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        files = {"train": ["train"], "test": ["test"]}
    binary = layout == "bin"
    folder = root / {
        ("cifar10", False): "cifar-10-batches-py",
        ("cifar10", True): "cifar-10-batches-bin",
        ("cifar100", False): "cifar-100-python",
        ("cifar100", True): "cifar-100-binary",
    }[(name, binary)]
    folder.mkdir(parents=True)
    expected = {}
    seed = 0
    for split, names in files.items():
        all_rows, all_labels = [], []
        for fname in names:
            seed += 1
            rng = np.random.default_rng(seed)
            rows = _rows(PER_FILE, seed)
            fine = rng.integers(0, classes, PER_FILE)
            coarse = fine // 5
            if binary:
                if ten:
                    payload = b"".join(bytes([int(l)]) + r.tobytes() for l, r in zip(fine, rows))
                else:
                    payload = b"".join(bytes([int(c), int(l)]) + r.tobytes() for c, l, r in zip(coarse, fine, rows))
                (folder / f"{fname}.bin").write_bytes(payload)
            else:
                batch = {b"batch_label": f"batch {fname}".encode(), b"data": rows,
                         b"filenames": [f"img_{i}.png".encode() for i in range(PER_FILE)]}
                if ten:
                    batch[b"labels"] = [int(l) for l in fine]
                else:
                    batch[b"fine_labels"] = [int(l) for l in fine]
                    batch[b"coarse_labels"] = [int(c) for c in coarse]
                if layout == "py2":  # byte-for-byte the kind of pickle the official files are
                    (folder / fname).write_bytes(_py2_pickle(batch))
                else:  # re-pickled by Python 3 and numpy 2
                    with open(folder / fname, "wb") as f:
                        pickle.dump(batch, f, protocol=4)
            all_rows.append(rows)
            all_labels.append(fine)
        expected[split] = (np.concatenate(all_rows), np.concatenate(all_labels))
    return expected


@pytest.mark.parametrize("layout", ["py2", "py3", "bin"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path, name, layout):
    expected = _write_cifar(tmp_path, name, layout)
    inner = next(tmp_path.iterdir())
    for split in ("train", "test"):
        rows, labels = expected[split]
        for data_dir in (tmp_path, inner):  # the parent folder or the extracted folder itself
            images, got_labels = load_cifar(data_dir, name, split)
            assert images.dtype == torch.uint8 and got_labels.dtype == torch.int64
            assert images.shape == (len(rows), 3, 32, 32)
            # each row is the R plane, then G, then B, each row-major 32 x 32
            for c in range(3):
                assert np.array_equal(images[:, c].numpy(), rows[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32))
            assert got_labels.tolist() == labels.tolist()
    assert len(expected["train"][0]) == (5 if name == "cifar10" else 1) * PER_FILE


def test_cifar_via_registry(tmp_path):
    _write_cifar(tmp_path, "cifar100", "bin")
    images, labels, info = load_dataset("cifar100", tmp_path, "test")
    assert images.shape == (PER_FILE, 3, 32, 32) and labels.shape == (PER_FILE,)
    assert (info.num_classes, info.in_channels, info.image_size) == (100, 3, 32)
    assert info.mean == (0.5071, 0.4865, 0.4409) and info.std == (0.2673, 0.2564, 0.2762)
    with pytest.raises(FixNormError, match="data_dir"):
        load_dataset("cifar10")


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("attack", ["system", "eval", "hidden_in_dict"])
def test_malicious_pickle_is_refused_without_running(tmp_path, attack):
    _write_cifar(tmp_path, "cifar10", "py2")
    target = tmp_path / "pwned"
    command = f"echo pwned > {target}"
    if attack == "system":
        payload = _Evil(os.system, command)
    elif attack == "eval":
        payload = _Evil(builtins.eval, f"__import__('os').system({command!r})")
    else:  # a genuine-looking batch whose labels smuggle the call
        payload = {b"data": _rows(2, 0), b"labels": _Evil(os.system, command)}
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    victim.write_bytes(_py2_pickle(payload))
    with pytest.raises(FixNormError, match="refusing") as err:
        load_cifar(tmp_path, "cifar10", "train")
    assert str(victim) in str(err.value)
    assert ("eval" if attack == "eval" else "system") in str(err.value)  # names the refused global
    assert not target.exists()


def test_truncated_binary_names_the_file(tmp_path):
    _write_cifar(tmp_path, "cifar10", "bin")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(FixNormError, match="truncated") as err:
        load_cifar(tmp_path, "cifar10", "train")
    assert str(path) in str(err.value)


def test_truncated_pickle_names_the_file(tmp_path):
    _write_cifar(tmp_path, "cifar100", "py2")
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FixNormError, match="corrupt or truncated") as err:
        load_cifar(tmp_path, "cifar100", "test")
    assert str(path) in str(err.value)


def test_out_of_range_label_is_rejected(tmp_path):
    _write_cifar(tmp_path, "cifar10", "bin")
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(bytes([10]) + path.read_bytes()[1:])
    with pytest.raises(FixNormError, match="test_batch.bin"):
        load_cifar(tmp_path, "cifar10", "test")


def test_missing_files_are_named(tmp_path):
    _write_cifar(tmp_path, "cifar10", "py2")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FixNormError, match="data_batch_3") as err:
        load_cifar(tmp_path, "cifar10", "train")
    assert "data_batch_1" not in str(err.value)
    assert "cs.toronto.edu/~kriz/cifar.html" in str(err.value)
    load_cifar(tmp_path, "cifar10", "test")  # the test split is still complete

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FixNormError, match="cifar-100-python") as err:
        load_cifar(empty, "cifar100", "train")
    assert "cifar-100-binary" in str(err.value) and str(empty) in str(err.value)


# --------------------------------------------------------------------------- ImageFolder


@pytest.fixture
def image_root(tmp_path):
    """3 classes, 8 images of mixed sizes and formats, plus files that must be ignored."""
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    sizes = {"ant": [(40, 30), (30, 50), (33, 33)], "bee": [(64, 48), (20, 60)], "cow": [(50, 50), (45, 31), (31, 45)]}
    rng = np.random.default_rng(0)
    for cls, dims in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(dims):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(root / cls / f"{i}.{'jpg' if i == 2 else 'png'}")
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    return root


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_imagefolder_classes_and_shapes(image_root):
    from fixnorm.data import ImageFolderDataset, imagefolder_loader

    ds = ImageFolderDataset(image_root)
    assert ds.classes == ["ant", "bee", "cow"]
    assert ds.targets == [0, 0, 0, 1, 1, 2, 2, 2]
    x, y = ds[1]
    assert x.shape == (3, 50, 30) and x.dtype == torch.uint8 and y == 0

    train = _batches(imagefolder_loader(image_root, 3, train=True, image_size=16, num_workers=0))
    assert len(train) == 2  # 8 images, drop_last for training
    for xb, yb in train:
        assert xb.shape == (3, 3, 16, 16) and xb.dtype == torch.uint8 and yb.dtype == torch.int64

    evaluation = _batches(imagefolder_loader(image_root, 3, train=False, image_size=16, num_workers=0))
    assert [xb.shape[0] for xb, _ in evaluation] == [3, 3, 2]
    assert torch.cat([yb for _, yb in evaluation]).tolist() == ds.targets  # in order, every image once
    assert evaluation[0][0].shape[1:] == (3, 16, 16)


def test_imagefolder_is_deterministic_for_a_seed(image_root):
    from fixnorm.data import imagefolder_loader

    def epochs(seed, workers):
        loader = imagefolder_loader(image_root, 4, train=True, image_size=12, num_workers=workers, seed=seed)
        return [torch.cat([xb.flatten() for xb, _ in loader]) for _ in range(2)]

    a, b = epochs(0, 0), epochs(0, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # a new permutation and new crops every epoch
    assert not torch.equal(a[0], epochs(1, 0)[0])
    with_workers = epochs(0, 2)  # per-sample seeds travel with the index, so workers do not matter
    assert all(torch.equal(x, y) for x, y in zip(a, with_workers))


@pytest.mark.parametrize("train", [False, True])
def test_imagefolder_sharding_covers_each_file_once(image_root, train):
    from fixnorm.data import imagefolder_loader

    world = 3
    seen = []
    for rank in range(world):
        loader = imagefolder_loader(
            image_root, 2, train=train, image_size=8, num_workers=0, rank=rank, world_size=world, drop_last=False
        )
        shard = [i for i, _ in loader.sampler]
        assert sum(xb.shape[0] for xb, _ in loader) == len(shard) == len(loader.sampler)
        seen.append(shard)
    flat = sorted(i for shard in seen for i in shard)
    if train:  # even shards: 8 files over 3 ranks -> 2 dropped this epoch, the rest once each
        assert {len(s) for s in seen} == {2} and len(set(flat)) == 6
    else:
        assert flat == list(range(8))


def test_sampler_shards_one_shared_permutation():
    shards = [list(SeededShardSampler(10, rank=r, world_size=4, seed=3)) for r in range(4)]
    assert sorted(i for s in shards for i, _ in s) == list(range(10))
    seeds = [seed for s in shards for _, seed in s]
    assert len(set(seeds)) == 10
    with pytest.raises(FixNormError, match="rank"):
        SeededShardSampler(10, rank=4, world_size=4)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(image_root, damage):
    from fixnorm.data import imagefolder_loader

    bad = image_root / "bee" / "bad.png"
    if damage == "garbage":
        bad.write_bytes(b"this is not a png at all")
    else:
        good = (image_root / "bee" / "0.png").read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    loader = imagefolder_loader(image_root, 4, train=False, image_size=8, num_workers=0)
    with pytest.raises(FixNormError, match="cannot decode") as err:
        list(loader)
    assert str(bad) in str(err.value)


def test_imagefolder_layout_errors(tmp_path):
    pytest.importorskip("PIL")
    from fixnorm.data import ImageFolderDataset

    with pytest.raises(FixNormError, match="not a directory"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(FixNormError, match="no class sub-folders") as err:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FixNormError, match="holds no images") as err:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path / "empty_class") in str(err.value)


def test_missing_pillow_says_how_to_install(tmp_path, monkeypatch):
    from fixnorm.data import ImageFolderDataset

    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail
    with pytest.raises(FixNormError, match="pip install pillow"):
        ImageFolderDataset(tmp_path)


# --------------------------------------------------------------------------- cutout, synthetic, registry


@pytest.mark.parametrize("size", [1, 4, 7, 50])
def test_cutout_zeroes_at_most_one_square(size):
    x = torch.full((64, 3, 20, 24), 7, dtype=torch.uint8)
    out = cutout(x, size, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # every channel zeroed alike
    area = zero[:, 0].flatten(1).sum(1)
    assert bool((area >= 1).all()) and bool((area <= size * size).all())
    rows, cols = zero[:, 0].any(2).sum(1), zero[:, 0].any(1).sum(1)
    assert torch.equal(rows * cols, area)  # a (clipped) rectangle, not scattered pixels
    assert bool((rows <= size).all()) and bool((cols <= size).all())
    assert bool((out[~zero] == 7).all())


def test_cutout_determinism_and_identity():
    x = torch.rand(16, 3, 12, 12)
    a = cutout(x, 5, generator=torch.Generator().manual_seed(1))
    b = cutout(x, 5, generator=torch.Generator().manual_seed(1))
    c = cutout(x, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = cutout(x, 0)
    assert torch.equal(same, x) and same is not x
    with pytest.raises(FixNormError, match="NCHW"):
        cutout(x[0], 3)
    with pytest.raises(FixNormError, match=">= 0"):
        cutout(x, -1)


def test_synthetic_is_deterministic():
    x1, y1 = synthetic_dataset(50, (3, 8, 8), num_classes=4, seed=5)
    x2, y2 = synthetic_dataset(50, (3, 8, 8), num_classes=4, seed=5)
    x3, _ = synthetic_dataset(50, (3, 8, 8), num_classes=4, seed=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.dtype == torch.uint8 and x1.shape == (50, 3, 8, 8)
    assert y1.dtype == torch.int64 and 0 <= int(y1.min()) and int(y1.max()) < 4
    with pytest.raises(FixNormError, match="image_shape"):
        synthetic_dataset(4, (8, 8))


def test_registry_synthetic_and_unknown_names():
    x, y, info = load_dataset("synthetic", split="test")
    assert x.shape == (1000, 3, 32, 32) and y.shape == (1000,)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    assert info.mean == (0.5,) * 3 and info.std == (0.25,) * 3
    assert load_dataset("synthetic")[0].shape[0] == 5000
    assert set(DATASETS) == {"fashion_mnist", "cifar10", "cifar100", "synthetic"}
    with pytest.raises(FixNormError, match="imagenet") as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS)
