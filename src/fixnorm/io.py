"""Files written atomically: a temp file in the same folder, fsync, rename. A kill leaves the old file or the new.
And the one safe reader of our tagged tensor files (masks, unify files, norm traces).

A leaf module (standard library and fixnorm.errors; torch only inside the reader), so that checkpoints, records,
reports, benchmarks and the core's files share one writer and one reader.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import FixNormError


def atomic_write(path: Path, write: Any) -> None:
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


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def load_tagged_state(path: str | Path, fmt: str, key: str, *, kind: str, setting: str,
                      writer: str) -> dict[str, Any]:
    """A file of ours tagged ``{"format": fmt, key: {...}}``, read without unpickling code (``weights_only``); a
    missing, truncated, tampered or foreign file is a FixNormError naming the setting and what writes such files."""
    import torch  # only this reader needs it: reports and benchmarks use this module without loading torch

    path = Path(path)
    if not path.is_file():
        raise FixNormError(f"{setting}={str(path)!r}: no such file; give a {kind} file written by {writer}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files all land here
        raise FixNormError(f"{kind} file {path} cannot be read safely ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("format") != fmt or not isinstance(state.get(key), dict):
        raise FixNormError(f"{path} is not a fixnorm {kind} file (format {fmt!r})")
    return state
