"""Reader for CIFAR-10 and CIFAR-100 in either official on-disk layout.

Both the "binary version" (fixed-size records) and the "python version"
(pickled dicts) are read strictly: a truncated record, a wrong array shape or an
out-of-range label raises `FixNormError` naming the file, so a half-extracted
archive never turns silently into a wrong dataset.

The python version is a pickle, and a pickle can run arbitrary code when it is
loaded; a file a user was handed must not get that chance. It is therefore read
with `_SafeUnpickler`, which resolves only the few numpy globals an ndarray needs
and refuses everything else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fixnorm.errors import FixNormError

try:  # numpy >= 2 moved the module; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_PIXELS = 3 * 32 * 32

# Per variant: folder and file names of both official layouts, and how labels are stored.
_LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "title": "CIFAR-10",
        "label_bytes": 1,
        "num_classes": 10,
        "bin_dir": "cifar-10-batches-bin",
        "py_dir": "cifar-10-batches-py",
        "bin_files": {
            "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
            "test": ["test_batch.bin"],
        },
        "py_files": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "py_label_key": b"labels",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "label_bytes": 2,  # coarse label, then fine label; the fine one is the 100-class target
        "num_classes": 100,
        "bin_dir": "cifar-100-binary",
        "py_dir": "cifar-100-python",
        "bin_files": {"train": ["train.bin"], "test": ["test.bin"]},
        "py_files": {"train": ["train"], "test": ["test"]},
        "py_label_key": b"fine_labels",
    },
}

# The only globals an ndarray pickle (protocol 2, as the official files use) refers to.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else, so a hostile file cannot run code."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the official files were written by Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise FixNormError(
                f"refusing to load {self._path}: its pickle asks for the global {module}.{name}, "
                "which a CIFAR batch never needs (only numpy arrays are allowed); the file is not a "
                f"genuine CIFAR python batch, so do not use it. Get the dataset from {CIFAR_URL}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise FixNormError(f"refusing to load {self._path}: it uses pickle persistent ids; not a CIFAR batch")


def _safe_unpickle(path: Path) -> Any:
    """Load one pickle through `_SafeUnpickler`, turning every decoding failure into a `FixNormError`."""
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, path).load()
    except FixNormError:
        raise
    except OSError as e:
        raise FixNormError(f"cannot read CIFAR file {path} ({e}); check its permissions") from e
    except Exception as e:  # UnpicklingError, EOFError, and whatever a malformed opcode stream provokes
        raise FixNormError(
            f"CIFAR python batch {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            f"download and extract it again from {CIFAR_URL}"
        ) from e


def _check_labels(labels: torch.Tensor, num_classes: int, path: Path) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise FixNormError(
            f"{path} has labels in [{int(labels.min())}, {int(labels.max())}]; expected 0..{num_classes - 1}. "
            "It belongs to another dataset or is corrupt"
        )


def _read_binary(path: Path, label_bytes: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse fixed-size records: `label_bytes` label bytes (the last one is the target), then R, G, B planes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FixNormError(f"cannot read CIFAR file {path} ({e}); check its permissions") from e
    record = label_bytes + _PIXELS
    if not data or len(data) % record:
        raise FixNormError(
            f"CIFAR binary file {path} is truncated or not a CIFAR file: {len(data)} bytes is not a "
            f"positive multiple of the {record}-byte record; download and extract it again from {CIFAR_URL}"
        )
    rows = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].long()
    _check_labels(labels, num_classes, path)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).contiguous()
    return images, labels


def _read_python(path: Path, label_key: bytes, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one pickled batch dict: b'data' is (N, 3072) uint8 with R, G, B planes per row."""
    batch = _safe_unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise FixNormError(
            f"{path} is not a CIFAR python batch: expected a dict with b'data' and {label_key!r}, got {keys}"
        )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FixNormError(f"{path}: b'data' must be a uint8 array of shape (N, {_PIXELS}), got {desc}")
    try:
        labels = torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64))
    except (TypeError, ValueError, OverflowError) as e:
        raise FixNormError(f"{path}: {label_key!r} is not a list of integer labels ({e})") from e
    if labels.dim() != 1 or labels.shape[0] != data.shape[0]:
        raise FixNormError(
            f"{path} holds {data.shape[0]} images but {label_key!r} has shape {tuple(labels.shape)}; it is corrupt"
        )
    _check_labels(labels, num_classes, path)
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32)
    return images, labels


def _locate(data_dir: Path, layout: dict[str, Any], split: str) -> tuple[str, list[Path]]:
    """Find a complete set of batch files, preferring the python layout, in `data_dir` or its dataset folder."""
    partial: list[tuple[Path, list[str]]] = []
    for kind in ("py", "bin"):
        names = layout[f"{kind}_files"][split]
        for folder in (data_dir / layout[f"{kind}_dir"], data_dir):
            paths = [folder / n for n in names]
            missing = [n for n, p in zip(names, paths) if not p.is_file()]
            if not missing:
                return kind, paths
            if len(missing) < len(names):
                partial.append((folder, missing))
    title = layout["title"]
    if partial:  # some files of one layout are there: name exactly what is missing
        folder, missing = partial[0]
        what = f"{', '.join(missing)} missing in {folder}"
    else:
        expected = " or ".join(
            f"{layout[f'{k}_dir']}/{{{','.join(layout[f'{k}_files'][split])}}}" for k in ("py", "bin")
        )
        what = f"no {title} {split} files in {data_dir}; expected {expected}"
    raise FixNormError(
        f"{title} {split} set incomplete: {what}. Download the python or binary version from {CIFAR_URL} "
        "(Alex Krizhevsky's CIFAR page), extract it, and pass the folder holding it (or the extracted "
        "folder itself) as data_dir; fixnorm never downloads"
    )


def load_cifar(
    data_dir: str | Path, name: str = "cifar10", split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10/100 split as (uint8 images (N,3,32,32) in RGB order, int64 labels (N,)).

    `data_dir` is either the folder holding the extracted `cifar-10-batches-py`,
    `cifar-10-batches-bin`, `cifar-100-python` or `cifar-100-binary` folder, or
    that folder itself. CIFAR-100 labels are the 100 fine classes.
    """
    if name not in _LAYOUTS:
        raise FixNormError(f"unknown CIFAR variant {name!r}; use one of {sorted(_LAYOUTS)}")
    if split not in ("train", "test"):
        raise FixNormError(f"unknown CIFAR split {split!r}; use 'train' or 'test'")
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise FixNormError(
            f"CIFAR data_dir {directory} is not a directory; download the dataset from {CIFAR_URL}, "
            "extract it and pass the folder that holds it"
        )
    layout = _LAYOUTS[name]
    kind, paths = _locate(directory, layout, split)
    if kind == "bin":
        parts = [_read_binary(p, layout["label_bytes"], layout["num_classes"]) for p in paths]
    else:
        parts = [_read_python(p, layout["py_label_key"], layout["num_classes"]) for p in paths]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
