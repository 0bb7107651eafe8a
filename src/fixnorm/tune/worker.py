"""Running trials through Optuna storage: the Tuner (ask/tell), killed-worker detection, heartbeats, the locks
that make study creation and point claiming safe on SQLite, PostgreSQL, MySQL and journal files."""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FixNormError, NonFiniteError

from .lattice import TUNERS, Point, SearchSpace, _coordinate_choice, _optuna, coordinate_search_next, fitted_point
from .samplers import _claimed_point, _completed_results, _OnLattice


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


def _as_trained(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings as this machine trains them: precision auto is decided here (bf16 where native, else fp32),
    so that a worker on a machine without native bf16 cannot join a study whose trials trained in bf16; and the
    images precise BN uses, always, so that a study whose trials were evaluated otherwise (before precise BN: its
    identity lacks the key) is not joined by trials evaluated with it."""
    from ..train.config import TrainConfig, decided_precise_bn, decided_precision  # late: no engine import needed

    out = dict(settings or {})
    if "precision" in out:
        out["precision"] = decided_precision(str(out["precision"]), str(out.get("device", "auto")))
    out["precise_bn"] = decided_precise_bn(out.get("precise_bn", TrainConfig.precise_bn))
    return out

def _identity_changes(stored: Mapping[str, Any], now: Mapping[str, Any], limit: int = 6) -> str:
    """``key: stored -> now`` for each setting that differs (dotted paths), e.g. after a new version's defaults."""
    changes: list[str] = []
    unset = _Unset()

    def walk(old: Any, new: Any, path: str) -> None:
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            for key in sorted(set(old) | set(new), key=str):
                walk(old.get(key, unset), new.get(key, unset), f"{path}.{key}" if path else str(key))
        elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            for index, (a, b) in enumerate(zip(old, new)):
                walk(a, b, f"{path}[{index}]")
        elif old != new:
            changes.append(f"{path}: {old!r} -> {new!r}")

    walk(stored, now, "")
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str) -> bool | None:
    """Whether the worker process is alive; None when it ran on another host (the heartbeat decides then)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


@dataclass
class TuneResult:
    """The finished trials (in order), the best one, and where the records are."""

    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    out_dir: Path
    finished: bool  # the tuner has nothing left to try (coordinate search) or the budget is spent
    # the best trial refined by a parabola through its evaluated neighbours (``lattice.fitted_point``): the
    # values to train with; "trials" are the numbers of the trials the fit used, "evaluated" whether a trial ran there
    recommended: dict[str, Any] | None = None

    def best_so_far(self) -> list[float]:
        curve, best = [], -math.inf
        for t in self.trials:
            if t["value"] is not None:
                best = max(best, t["value"])
            curve.append(best)
        return curve


Objective = Callable[[dict[str, float], Any], float]


class Tuner:
    """One worker on one study; ``run()`` until the budget is spent or the tuner has finished.

    Args:
        space: the lattice to search.
        objective: ``objective(values, trial) -> accuracy`` (higher is better); ``trial`` offers
            ``report(value, step)`` and ``should_prune()`` (Optuna's) and ``heartbeat()``.
        tuner: "coordinate" (FixNorm's search), "tpe", "random" or "grid".
        n_trials: the study's budget of finished trials, shared by all workers.
        storage: an Optuna RDB URL (``postgresql://...``, ``sqlite:///...``), or a journal file
            (``journal:PATH``, or a path ending ``.log`` / ``.jsonl``); default SQLite in ``out_dir/study.db``.
            A journal has no heartbeat: a worker killed on another host leaves its trial running.
        settings: recorded with the study; a study created with other settings is refused.
        pruner: None, "median" or "halving" (Optuna samplers only).
    """

    def __init__(self, space: SearchSpace, objective: Objective, *, tuner: str, n_trials: int, out_dir: str | Path,
                 storage: str | None = None, study_name: str | None = None, seed: int = 0,
                 settings: Mapping[str, Any] | None = None, pruner: str | None = None,
                 steps: Sequence[int] = (4, 2), poll_seconds: float = 2.0, heartbeat_seconds: int = 30) -> None:
        optuna = _optuna()
        if tuner not in TUNERS:
            raise FixNormError(f"unknown tuner {tuner!r}; choose one of {TUNERS}")
        if n_trials < 1:
            raise FixNormError(f"n_trials must be >= 1, got {n_trials}")
        if pruner not in (None, "none", "median", "halving"):
            raise FixNormError(f"unknown pruner {pruner!r}; choose none, median or halving")
        if pruner not in (None, "none") and tuner == "coordinate":
            raise FixNormError("pruning needs a sampler (tpe, random, grid): the coordinate search needs every "
                               "trial's final accuracy")
        self.space, self.objective, self.tuner, self.n_trials = space, objective, tuner, n_trials
        self.steps, self.poll_seconds, self.heartbeat_seconds = tuple(steps), poll_seconds, heartbeat_seconds
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        url = storage or f"sqlite:///{(self.out_dir / 'study.db').resolve()}"
        journal = _journal_path(url)
        if journal is not None:  # not Optuna's own PATH.lock, which its journal backend uses
            journal.parent.mkdir(parents=True, exist_ok=True)
            self.lock_path: Path | None = Path(f"{journal}.fixnorm-lock")
        elif url.startswith("sqlite:///"):
            self.lock_path = Path(url[len("sqlite:///"):] + ".lock")
        else:
            self.lock_path = None
        with self._setup_lock(url):  # workers starting together would race to create the schema and the study
            self.storage = _open_storage(url, heartbeat_seconds)
        samplers = {"tpe": lambda: _OnLattice(optuna.samplers.TPESampler(seed=seed), space),
                    "random": lambda: _OnLattice(optuna.samplers.RandomSampler(seed=seed), space),
                    "grid": lambda: optuna.samplers.GridSampler(self._grid_space(), seed=seed),
                    "coordinate": lambda: optuna.samplers.RandomSampler(seed=seed)}  # every point is enqueued
        pruners = {None: optuna.pruners.NopPruner, "none": optuna.pruners.NopPruner,
                   "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
                   "halving": optuna.pruners.SuccessiveHalvingPruner}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with self._setup_lock(url):
            self.study = optuna.create_study(storage=self.storage, study_name=study_name or f"{tuner}",
                                             direction="maximize", load_if_exists=True, sampler=samplers[tuner](),
                                             pruner=pruners[pruner]())
            # as the storage holds it (a JSON round trip: tuples become lists), so that it compares with what is stored
            identity = json.loads(json.dumps({"tuner": tuner, "space": space.to_dict(),
                                              "settings": _as_trained(settings), "steps": list(self.steps)}))
            stored = self.study.user_attrs.get("identity")
            if stored is None:
                self.study.set_user_attr("identity", identity)
            elif stored != identity:
                raise FixNormError(f"study {self.study.study_name!r} in {url} was created with other settings "
                                   f"({_identity_changes(stored, identity)}); its trials "
                                   "would not be comparable with new ones: use another --study name or --out folder")

    # -- the loop -------------------------------------------------------------------------------
    def run(self, on_trial: Callable[[dict[str, Any]], None] | None = None) -> TuneResult:
        optuna = _optuna()
        while True:
            with self._claim_lock():  # choosing a point and creating its trial is one step among local workers
                self._fail_dead_trials()
                trials = self.study.get_trials(deepcopy=False)
                done = [t for t in trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
                running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
                if len(done) >= self.n_trials:
                    break
                point = self._next_point(done, running)
                if point == "finished":
                    break
                started = None if point == "wait" else self._start_trial(point)
            if point == "wait":
                time.sleep(self.poll_seconds)
                continue
            if started is not None:
                record = self._finish_trial(*started)
                if on_trial is not None:
                    on_trial(record)
        return self.result()

    def _claim_lock(self) -> Any:
        """An exclusive file lock beside a SQLite or journal study (neither has row locks for Optuna's queue)."""
        if self.lock_path is None:
            return contextlib.nullcontext()
        return _FileLock(self.lock_path)

    def _setup_lock(self, url: str) -> Any:
        """Held while the schema and the study are created: a file lock for SQLite, a database lock otherwise.

        Workers started together on a fresh database would each create Optuna's tables and types; on
        PostgreSQL the loser fails with DuplicateObject (optuna/optuna#1092). An advisory lock (PostgreSQL)
        or GET_LOCK (MySQL) serialises the creation across machines; the server drops it if a holder dies.
        """
        if self.lock_path is not None:
            return _FileLock(self.lock_path)
        return _DatabaseLock(url)

    def _next_point(self, done: list[Any], running: list[Any]) -> Point | str:
        if self.tuner == "coordinate":
            results = _completed_results(self.space, done)
            return _coordinate_choice(self.space, results, {self._claimed_point(t) for t in running}, self.steps)
        if self.tuner == "grid" and len(done) + len(running) >= len(self.space.grid()):
            return "wait" if running else "finished"
        if len(done) + len(running) >= self.n_trials:
            return "wait"
        return (0,) * len(self.space.axes)  # placeholder: the sampler chooses in _run_trial

    def _claimed_point(self, t: Any) -> Point | None:
        """The point a trial runs, or was enqueued to run (its params may not be set yet)."""
        return _claimed_point(self.space, t)

    def _duplicate_of(self, trial: Any, point: Point) -> int | None:
        """An earlier trial on the same point (two workers chose it at once): the earlier number wins.

        Each worker enqueues its point before asking, so of two trials on one point the later one's
        check always sees the earlier one.
        """
        optuna = _optuna()
        live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        for t in self.study.get_trials(deepcopy=False, states=live):
            if t.number < trial.number and self._claimed_point(t) == point:
                return t.number
        return None

    def _start_trial(self, point: Point) -> tuple[Any, dict[str, float]] | None:
        """Create the trial for ``point`` (coordinate) or for the sampler's choice; None for a duplicate."""
        optuna = _optuna()
        waiting = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if self.tuner == "coordinate" and point not in {self._claimed_point(t) for t in waiting}:
            self.study.enqueue_trial(self.space.values(point))  # ask() pops the oldest waiting trial
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = self.study.ask()
        if hasattr(self.storage, "record_heartbeat"):  # RDB storages; a journal has no heartbeat
            self.storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", _worker_id())
        point = self.space.point_of(self.space.suggest(trial))
        if point is None:  # an enqueued point off this lattice (a study shared with other code)
            trial.set_user_attr("off_lattice", True)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        if self.tuner == "coordinate" and (earlier := self._duplicate_of(trial, point)) is not None:
            trial.set_user_attr("duplicate_of", earlier)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        values = self.space.values(point)
        trial.set_user_attr("point", list(point))
        for name, value in values.items():
            trial.set_user_attr(name, value)
        return trial, values

    def _finish_trial(self, trial: Any, values: dict[str, float]) -> dict[str, Any]:
        optuna = _optuna()
        start = time.perf_counter()
        try:
            value = float(self.objective(values, _HeartbeatTrial(trial, self.storage, self.heartbeat_seconds)))
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", time.perf_counter() - start)
            return self._record(self.study.tell(trial, state=optuna.trial.TrialState.PRUNED))
        except NonFiniteError as exc:
            # a diverged run is a (bad) result at this point, not a broken study
            trial.set_user_attr("diverged", str(exc)[:500])
            value = 0.0
        except BaseException:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        if not math.isfinite(value):
            trial.set_user_attr("diverged", "the objective returned a non-finite value")
            value = 0.0
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return self._record(self.study.tell(trial, value))

    def _fail_dead_trials(self) -> None:
        """Trials left RUNNING by a killed worker: fail them so their point is tried again (nothing completed is lost)."""
        optuna = _optuna()
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            if worker is not None and _alive(worker) is False:
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                if self.tuner != "coordinate" and "point" in t.user_attrs:
                    self.study.enqueue_trial(self.space.values(tuple(t.user_attrs["point"])))
        with warnings.catch_warnings():  # experimental in Optuna, and meant for Study.optimize: we drive it ourselves
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(self.study)  # other hosts: no heartbeat for 4 intervals

    # -- records ---------------------------------------------------------------------------------
    def _record(self, t: Any) -> dict[str, Any]:
        point = self.space.point_of(t.params)
        values = self.space.values(point) if point is not None else {}
        return {"number": t.number, "state": t.state.name.lower(), **values, "value": t.value,
                "seconds": t.user_attrs.get("seconds"), "worker": t.user_attrs.get("worker"),
                "diverged": t.user_attrs.get("diverged")}

    def result(self) -> TuneResult:
        optuna = _optuna()
        study_trials = self.study.get_trials(deepcopy=False)  # one read of the storage for everything below
        trials = [self._record(t) for t in study_trials
                  if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
        scored = [t for t in trials if t["value"] is not None and t["state"] == "complete"]
        best = max(scored, key=lambda t: t["value"]) if scored else None
        done = _completed_results(self.space, study_trials)
        finished = len(trials) >= self.n_trials
        if self.tuner == "coordinate":
            finished = finished or not coordinate_search_next(self.space, done, self.steps)
        return TuneResult(trials=trials, best=best, out_dir=self.out_dir, finished=finished,
                          recommended=self._recommended(best, scored, done))

    def _recommended(self, best: dict[str, Any] | None, scored: list[dict[str, Any]],
                     done: dict[Point, float]) -> dict[str, Any] | None:
        """The best trial's point refined by ``fitted_point`` over the completed lattice trials (``done``)."""
        point = self.space.point_of(best) if best is not None else None
        if point is None or point not in done:
            return None
        fitted, used = fitted_point(self.space, done, point)
        number_of: dict[Point | None, int] = {}
        for t in sorted(scored, key=lambda t: t["number"]):  # the earliest trial on a point is the one ``done`` holds
            number_of.setdefault(self.space.point_of(t), t["number"])
        return {**self.space.values(fitted), "trials": [number_of[p] for p in used],
                "evaluated": fitted in done}

    def _grid_space(self) -> dict[str, list[float]]:
        return {a.name: [a.value(i) for i in range(a.low, a.high + 1)] for a in self.space.axes}


def _journal_path(url: str) -> Path | None:
    """The journal file a storage string names (``journal:PATH``, or a path ending .log / .jsonl), else None."""
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if not path:
            raise FixNormError("storage 'journal:' needs a file path, e.g. journal:runs/tune/journal.log")
        return Path(path)
    if "://" not in url and url.endswith((".log", ".jsonl")):
        return Path(url)
    return None


def _open_storage(url: str, heartbeat_seconds: int) -> Any:
    """A journal or RDB storage; workers starting together may race to create the schema, so retry a few times."""
    optuna = _optuna()
    journal = _journal_path(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    if "://" not in url:
        raise FixNormError(f"storage {url!r} is neither a database URL (sqlite:///study.db, postgresql://user@host/db) "
                           "nor a journal file (journal:PATH, or a path ending .log or .jsonl)")
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # wait for locks
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_seconds,
                                                  grace_period=4 * heartbeat_seconds)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError,
                sqlalchemy.exc.ProgrammingError):  # a database without a lock we know: the other worker won the race
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


# one 64-bit key for "fixnorm creates an Optuna schema or study"; any constant works if every worker uses it
_SETUP_LOCK_KEY = 0x66786E6F726D01


class _DatabaseLock:
    """A lock held by the database server for one session: pg_advisory_lock, or GET_LOCK on MySQL.

    Other databases get no lock (the retry in ``_open_storage`` remains). The lock is tied to the connection,
    so a killed holder releases it.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Any = None
        self.connection: Any = None

    def __enter__(self) -> _DatabaseLock:
        import sqlalchemy

        dialect = self.url.split(":", 1)[0].split("+", 1)[0]
        statements = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
                      "mysql": ("SELECT GET_LOCK(:key, 600)", "SELECT RELEASE_LOCK(:key)")}
        if dialect not in statements:
            return self
        self.lock_sql, self.unlock_sql = statements[dialect]
        self.key: Any = _SETUP_LOCK_KEY if dialect == "postgresql" else f"fixnorm-{_SETUP_LOCK_KEY}"
        self.engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        self.connection = self.engine.connect()
        self.connection.execute(sqlalchemy.text(self.lock_sql), {"key": self.key})
        self.connection.commit()  # a session-level lock outlives the transaction; keep none open meanwhile
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.connection is None:
            return
        import sqlalchemy

        try:
            self.connection.execute(sqlalchemy.text(self.unlock_sql), {"key": self.key})
            self.connection.commit()
        finally:
            self.connection.close()  # closing the session releases the lock in any case
            self.engine.dispose()


class _FileLock:
    """``fcntl.flock`` on a file: released by the kernel even when the holder is SIGKILLed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _FileLock:
        import fcntl

        self.handle = open(self.path, "a+")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class _HeartbeatTrial:
    """The Optuna trial handed to objectives, recording a heartbeat at most every ``seconds``."""

    def __init__(self, trial: Any, storage: Any, seconds: int) -> None:
        self.trial, self.storage, self.seconds, self.last = trial, storage, seconds, time.monotonic()

    def heartbeat(self) -> None:
        if hasattr(self.storage, "record_heartbeat") and time.monotonic() - self.last >= self.seconds:
            self.storage.record_heartbeat(self.trial._trial_id)
            self.last = time.monotonic()

    def report(self, value: float, step: int) -> None:
        self.trial.report(value, step)

    def should_prune(self) -> bool:
        return self.trial.should_prune()

    @property
    def number(self) -> int:
        return self.trial.number
