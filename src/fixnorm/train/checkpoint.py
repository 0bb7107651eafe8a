"""Checkpoints written atomically and read without unpickling code (weights_only=True)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import FixNormError

FORMAT = "fixnorm-checkpoint"


def _atomic_write(path: Path, write: Any) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files that writes in ``folder`` left when the process was killed before the rename."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    _atomic_write(Path(path), lambda handle: torch.save({"format": FORMAT, "version": 1, **state}, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FixNormError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, tampered or foreign files all land here
        raise FixNormError(f"checkpoint {path} cannot be read safely: it is truncated, corrupt, or holds more than "
                           f"tensors and plain data ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FixNormError(f"{path} is not a fixnorm checkpoint")
    return state


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
