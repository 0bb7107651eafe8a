"""Reader for the IDX format used by MNIST and Fashion-MNIST.

The files are read strictly: a bad magic number, an unsupported dtype or a
payload whose length does not match the header raises `FixNormError`, so a
half-downloaded file never turns silently into a wrong dataset.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import torch

from fixnorm.errors import FixNormError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_UINT8 = 0x08
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "install them with `apt-get install dataset-fashion-mnist` (Debian) "
    "or pass a directory holding the four Fashion-MNIST IDX files"
)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise FixNormError(f"IDX file {path} is corrupt or truncated ({e}); download it again") from e


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (plain or gzipped) into a uint8 tensor shaped as its header says."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise FixNormError(f"IDX file {path} is truncated: {len(data)} bytes, no complete header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise FixNormError(f"{path} is not an IDX file (bad magic {data[:4].hex()}); check the path")
    if dtype != _UINT8:
        raise FixNormError(f"IDX file {path} has dtype code 0x{dtype:02x}; only uint8 (0x08) is supported")
    if ndim == 0:
        raise FixNormError(f"IDX file {path} declares 0 dimensions; it is corrupt")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FixNormError(f"IDX file {path} is truncated inside its header; download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "corrupt (trailing bytes)"
        raise FixNormError(
            f"IDX file {path} is {what}: header {tuple(dims)} needs {expected} data bytes, "
            f"found {got}; download it again"
        )
    if expected == 0:  # frombuffer rejects empty buffers
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def write_idx(path: str | Path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as IDX (gzipped when `path` ends in .gz); handy for tests and exports."""
    path = Path(path)
    if tensor.dtype != torch.uint8 or tensor.dim() == 0:
        raise FixNormError("write_idx needs a uint8 tensor with at least one dimension")
    payload = struct.pack(f">HBB{tensor.dim()}I", 0, _UINT8, tensor.dim(), *tensor.shape)
    payload += tensor.contiguous().cpu().numpy().tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find(directory: Path, name: str) -> Path | None:
    """Accept `name` or `name.gz` (and the reverse), as distributions ship either."""
    stem = name[:-3] if name.endswith(".gz") else name
    for candidate in (stem, stem + ".gz"):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def load_fashion_mnist(
    data_dir: str | Path | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as (uint8 images (N,1,28,28), int64 labels (N,))."""
    if split not in _SPLIT_FILES:
        raise FixNormError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(_SPLIT_FILES)}")
    directory = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    names = _SPLIT_FILES[split]
    found = {name: _find(directory, name) for name in names}
    missing = [f"{name}(.gz)" for name, p in found.items() if p is None]
    if missing:
        raise FixNormError(
            f"Fashion-MNIST {split} files missing in {directory}: {', '.join(missing)}; {_HOW_TO_GET}"
        )
    image_path, label_path = (found[n] for n in names)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3:
        raise FixNormError(f"{image_path} has shape {tuple(images.shape)}; expected (N, H, W) images")
    if labels.dim() != 1:
        raise FixNormError(f"{label_path} has shape {tuple(labels.shape)}; expected (N,) labels")
    if images.shape[0] != labels.shape[0]:
        raise FixNormError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; the files come from different releases or are corrupt"
        )
    if labels.numel() and int(labels.max()) > 9:
        raise FixNormError(f"{label_path} has label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    return images.unsqueeze(1), labels.long()
