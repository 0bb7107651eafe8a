"""Checkpoints written atomically and read without unpickling code (weights_only=True)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FixNormError
from ..io import atomic_write, write_json_atomic, write_text_atomic  # noqa: F401  (re-exported)

FORMAT = "fixnorm-checkpoint"


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files that writes in ``folder`` left when the process was killed before the rename."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda handle: torch.save({"format": FORMAT, "version": 1, **state}, handle))


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
