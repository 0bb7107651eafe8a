"""Shared helpers for the benchmarks: timing, statistics, machine info, atomic result files.

Only the standard library and torch; every benchmark script puts this folder on
``sys.path`` itself, so ``python benchmarks/<name>.py`` works from the repository root.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from fixnorm.io import write_json_atomic as atomic_write_json  # noqa: F401
from fixnorm.io import write_text_atomic as atomic_write_text  # noqa: F401

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# -- devices and timing -----------------------------------------------------------------------
def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` (this process runs every n-th job from the k-th) as ``(k, n)``; a clear exit on anything else."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be K/N, e.g. 0/2; got {text!r}") from None
    if not 0 <= k < n:
        raise SystemExit(f"--shard K/N needs 0 <= K < N, got {text}")
    return k, n


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a clear error when CUDA is asked for but not there."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available in this torch build / machine")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work; a no-op on CPU (nothing is asynchronous there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def no_gc() -> Any:
    """Keep Python's cyclic GC from pausing inside a timed block (it would hit one variant at random)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_block(fn: Callable[[], Any], repeat: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over ``repeat`` back-to-back calls (synchronised on CUDA only)."""
    synchronize(device)
    with no_gc():
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        synchronize(device)
        t1 = time.perf_counter()
    return (t1 - t0) / repeat


class SectionTimer:
    """Times a section inside a timed block without adding host syncs: CUDA events on CUDA, perf_counter on CPU.

    ``start()`` / ``stop(token)`` around the section; ``take()`` (after the block's final
    synchronize) returns the seconds of every section since the last ``take()``.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: list[Any] = []

    def start(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token: Any) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open.append((token, ev))
        else:
            self._open.append((token, time.perf_counter()))

    def take(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) / 1e3 for a, b in self._open]
        else:
            out = [b - a for a, b in self._open]
        self._open = []
        return out


def interleaved_rounds(variants: Mapping[str, Callable[[], Any]], rounds: int, repeat: int,
                       device: torch.device, warmup: int = 2) -> dict[str, list[float]]:
    """Time every variant once per round, rotating the order each round; returns seconds/call samples.

    Interleaving means a slow spell of the machine (another process, thermal, ...) lands
    on all variants alike; rotating the order cancels "who runs first after whom" effects.
    ``warmup`` untimed blocks of each variant run first.
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(time_block(variants[name], repeat, device))
    return samples


def add_timing_arguments(parser: argparse.ArgumentParser, rounds: int, repeat: int, threads: int = 2) -> None:
    """The flags every side-by-side timing benchmark takes: rounds, calls per timed block, threads, --no-write."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--repeat", type=int, default=repeat, help="calls per timed block")
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")


# -- statistics ----------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios num[i] / den[i] (samples taken in the same round)."""
    return [a / b for a, b in zip(num, den)]


# -- machine and command ---------------------------------------------------------------------------
def command_line() -> str:
    """The command as it was typed (as near as argv lets us): ``python benchmarks/x.py --flag``."""
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (other processes competing for the cores skew CPU timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_at_start": load_average(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# -- result files ----------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
