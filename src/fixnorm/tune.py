"""Tuners: FixNorm's few-trial coordinate search, and Optuna samplers (TPE, random, grid) as baselines.

Every tuner searches a 2-D lattice in log space: (learning rate, classifier norm) for FixNorm,
(learning rate, weight decay) for the weight-decay baselines. A lattice point is a pair of integer
indices; its values are ``center * ratio**index`` on each axis. The study stores the values themselves
(log-scale floats named ``lr``, ``fc_norm`` / ``weight_decay``), so ``study.best_params``, the
dashboard's plots and parameter importances speak the user's units; the search maps them back to
lattice points.

FixNorm's search rests on the paper's two mechanisms: with the scale-invariant weights at fixed
norms, the learning rate alone sets their effective learning rate, and the classifier norm alone
sets the logit scale, so the two axes are close to independent and accuracy is unimodal along
each. A coordinate search then suffices: a line search over log lr at the starting classifier
norm, a line search over log classifier norm at the best lr, then both again with half the step.
Each line search evaluates the centre and one step either side, extends past an edge while the
edge keeps winning, and returns the best point. For SGD + weight decay the two axes are coupled
(the effective learning rate at equilibrium goes as sqrt(lr * wd)), which is why it gets a
generic sampler instead.

Trials live in an Optuna study: SQLite by default, any RDB URL for workers on many machines, or a
journal file (``journal:PATH``, or a path ending ``.log`` / ``.jsonl``) for workers on one machine
or a shared file system. The search is a pure function of the completed trials, so a worker killed
and started again, or several workers sharing a study, continue it without repeating a completed
point. ``CoordinateSampler`` offers the same search to a user's own ``study.optimize``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import FixNormError, NonFiniteError
from .run_folder import RunFolder

try:  # the sampler classes subclass Optuna's; without the tune extra they exist but refuse to start
    from optuna.samplers import BaseSampler as _BaseSampler
except ImportError:  # pragma: no cover - optuna is in the test extra
    _BaseSampler = object  # type: ignore[assignment,misc]

Point = tuple[int, int]
TUNERS = ("coordinate", "tpe", "random", "grid")
# which settings each method's tuning searches, besides the learning rate
SECOND_AXIS = {"fixnorm": "fc_norm", "sgd": "weight_decay", "adamw": "weight_decay", "rmsprop": "weight_decay"}


@dataclass(frozen=True)
class Axis:
    """One log-spaced axis: values ``center * ratio**i`` for ``low <= i <= high``."""

    name: str
    center: float
    ratio: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (self.center > 0 and math.isfinite(self.center)):
            raise FixNormError(f"axis {self.name}: the centre must be a positive number, got {self.center!r}")
        if not self.ratio > 1:
            raise FixNormError(f"axis {self.name}: the ratio between neighbouring points must be > 1")
        if not self.low <= 0 <= self.high:
            raise FixNormError(f"axis {self.name}: the range [{self.low}, {self.high}] must contain the centre (0)")

    def value(self, index: int) -> float:
        return float(self.center * self.ratio ** index)

    def nearest(self, value: float) -> int:
        """The index of the lattice point nearest to ``value`` in log space, clipped to the axis."""
        k = round(math.log(value / self.center) / math.log(self.ratio)) if value > 0 else self.low
        return min(max(k, self.low), self.high)

    def index_of(self, value: float) -> int | None:
        """The index whose value is ``value`` (up to float round-off), or None off the lattice."""
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            return None
        k = self.nearest(value)
        return k if math.isclose(self.value(k), value, rel_tol=1e-9) else None

    def bounds(self) -> tuple[float, float]:
        """The range trials are suggested over: the lattice's ends widened by half a step.

        Widened so that a sampler drawing log-uniformly and moving to the nearest point gives every
        point the same cell, the end points included (as ``suggest_int`` over the indices did).
        """
        half = math.sqrt(self.ratio)
        return self.value(self.low) / half, self.value(self.high) * half

    @classmethod
    def spanning(cls, name: str, center: float, low: float, high: float, ratio: float = math.sqrt(2)) -> Axis:
        """An axis from ``low`` to ``high`` (clipped to lattice points) through ``center``."""
        if not 0 < low <= center <= high:
            raise FixNormError(f"{name}: need 0 < low <= centre <= high, got {low}, {center}, {high}")
        lo = math.ceil(math.log(low / center, ratio) - 1e-9)
        hi = math.floor(math.log(high / center, ratio) + 1e-9)
        return cls(name, center, ratio, lo, hi)


@dataclass(frozen=True)
class SearchSpace:
    axes: tuple[Axis, Axis]

    def values(self, point: Point) -> dict[str, float]:
        return {axis.name: axis.value(i) for axis, i in zip(self.axes, point)}

    def contains(self, point: Point) -> bool:
        return all(axis.low <= i <= axis.high for axis, i in zip(self.axes, point))

    def grid(self) -> list[Point]:
        a, b = self.axes
        return [(i, j) for i in range(a.low, a.high + 1) for j in range(b.low, b.high + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {"axes": [asdict(axis) for axis in self.axes]}

    def point_of(self, params: Mapping[str, Any]) -> Point | None:
        """The lattice point of a trial's params (real values), or None when they are not on the lattice.

        Studies written before the params were values hold ``<axis>_index`` integers; those are read too.
        """
        point = []
        for axis in self.axes:
            if axis.name in params:
                index = axis.index_of(params[axis.name])
            elif f"{axis.name}_index" in params:
                index = int(params[f"{axis.name}_index"])
            else:
                return None
            if index is None or not axis.low <= index <= axis.high:
                return None
            point.append(index)
        return (point[0], point[1])

    def snap(self, name: str, value: Any) -> Any:
        """``value`` moved to the nearest lattice value of axis ``name`` (other names unchanged)."""
        for axis in self.axes:
            if axis.name == name:
                return axis.value(axis.nearest(float(value)))
        return value

    def distributions(self) -> dict[str, Any]:
        """Optuna's distribution per axis: log-scale floats over ``Axis.bounds()``."""
        optuna = _optuna()
        return {a.name: optuna.distributions.FloatDistribution(*a.bounds(), log=True) for a in self.axes}

    def suggest(self, trial: Any) -> dict[str, float]:
        """Ask an Optuna trial for this space's values (what an objective using ``CoordinateSampler`` calls)."""
        return {a.name: trial.suggest_float(a.name, *a.bounds(), log=True) for a in self.axes}


# -- FixNorm's coordinate search: a pure function of the results so far --------------------------------
def coordinate_search_next(space: SearchSpace, results: Mapping[Point, float],
                           steps: Sequence[int] = (4, 2)) -> list[Point]:
    """The points the search needs evaluated next (all are independent), or [] once it has finished.

    ``steps`` are lattice steps; each is used for a line search over axis 0 (lr), then axis 1.
    """
    return _replay(space, results, steps)[0]


def coordinate_search_best(space: SearchSpace, results: Mapping[Point, float], steps: Sequence[int] = (4, 2)) -> Point:
    """Where the coordinate search ends (or stands): the centre its last finished line search chose."""
    return _replay(space, results, steps)[1]


def _replay(space: SearchSpace, results: Mapping[Point, float], steps: Sequence[int]) -> tuple[list[Point], Point]:
    """Run the search over the known results: (the points it waits for, the centre it has reached)."""
    center: Point = (0, 0)
    for step in steps:
        for axis in (0, 1):
            outcome = _line_search(space, results, center, axis, step)
            if isinstance(outcome, list):
                return outcome, center
            center = outcome
    return [], center


def _line_search(space: SearchSpace, results: Mapping[Point, float], center: Point, axis: int,
                 step: int) -> Point | list[Point]:
    def at(k: int) -> Point:
        return (k, center[1]) if axis == 0 else (center[0], k)

    k0 = center[axis]
    low, high = space.axes[axis].low, space.axes[axis].high
    lo, hi = max(k0 - step, low), min(k0 + step, high)
    # a step that would leave the lattice is shortened to the bound (when the bound is a new point)
    line = sorted({lo, k0, hi})
    missing = [at(k) for k in line if at(k) not in results]
    if missing:
        return missing
    while True:
        best = max(line, key=lambda k: (results[at(k)], -abs(k - k0)))
        if best == line[0] and best > low:
            nxt = max(best - step, low)
        elif best == line[-1] and best < high:
            nxt = min(best + step, high)
        else:
            return at(best)
        if at(nxt) not in results:
            return [at(nxt)]
        line = sorted(set(line) | {nxt})


def _coordinate_choice(space: SearchSpace, results: Mapping[Point, float], busy: set[Point | None],
                       steps: Sequence[int]) -> Point | str:
    """The next point to start: a pending point no running trial holds, "wait" when all are held, or "finished"."""
    pending = coordinate_search_next(space, results, steps)
    if not pending:
        return "finished"
    free = [p for p in pending if p not in busy]
    return free[0] if free else "wait"


# the system attribute where CoordinateSampler records the point it gave a trial (other workers read it)
_POINT_ATTR = "fixnorm:point"


def _claimed_point(space: SearchSpace, t: Any) -> Point | None:
    """The point a trial runs or was given: its params, its enqueued params, or CoordinateSampler's record."""
    point = space.point_of({**t.system_attrs.get("fixed_params", {}), **t.params})
    if point is None and _POINT_ATTR in t.system_attrs:
        point = tuple(t.system_attrs[_POINT_ATTR])  # type: ignore[assignment]
    return point


def _completed_results(space: SearchSpace, trials: Sequence[Any], sign: float = 1.0) -> dict[Point, float]:
    """Each lattice point's result over completed trials (the earliest trial on a point counts).

    Trials whose params are not on the lattice (another sampler's, in a shared study) are left out.
    """
    optuna = _optuna()
    results: dict[Point, float] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None:
            point = space.point_of(t.params)
            if point is not None:
                results.setdefault(point, sign * t.value)
    return results


class CoordinateSampler(_BaseSampler):
    """FixNorm's coordinate search as an Optuna sampler, for your own ``study.optimize(objective)``.

    ``study = optuna.create_study(direction="maximize", sampler=CoordinateSampler(space))``; the
    objective asks for the two axes with ``space.suggest(trial)`` (or ``trial.suggest_float`` over any
    range holding the lattice). Each trial gets the next point the search needs; the study stores the
    real values, and is stopped (like ``GridSampler``) once the search has finished, its best point at
    ``coordinate_search_best``. Other parameters come from ``fallback`` (default ``RandomSampler``).

    The search is a replay of the completed trials, so a resumed study continues where it stopped.
    Threads of one process (``n_jobs``) never share a point; processes sharing a study may now and then
    evaluate one twice (the earlier result counts). ``fixnorm tune`` claims points without that race.
    """

    def __init__(self, space: SearchSpace, steps: Sequence[int] = (4, 2), *, fallback: Any = None,
                 seed: int | None = None) -> None:
        optuna = _optuna()
        self.space, self.steps = space, tuple(steps)
        self.fallback = fallback if fallback is not None else optuna.samplers.RandomSampler(seed=seed)
        self._names = {a.name for a in space.axes}
        self._points: dict[int, Point] = {}
        self._lock = threading.Lock()

    def _sign(self, study: Any) -> float:
        optuna = _optuna()
        if len(study.directions) != 1:
            raise FixNormError("CoordinateSampler searches one objective; this study has several")
        return 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0

    def _state(self, study: Any, exclude: int | None = None,
               extra: tuple[Point, float] | None = None) -> tuple[dict[Point, float], set[Point | None]]:
        optuna = _optuna()
        trials = study.get_trials(deepcopy=False)
        results = _completed_results(self.space, trials, self._sign(study))
        if extra is not None:
            results.setdefault(*extra)
        busy = {_claimed_point(self.space, t) for t in trials
                if t.state == optuna.trial.TrialState.RUNNING and t._trial_id != exclude}
        return results, busy

    def before_trial(self, study: Any, trial: Any) -> None:
        with self._lock:  # choosing and recording the point is one step among this process's threads
            fixed = self.space.point_of(trial.system_attrs.get("fixed_params", {}))
            if fixed is not None:
                point = fixed  # an enqueued point: evaluate it as given
            else:
                results, busy = self._state(study, exclude=trial._trial_id)
                choice = _coordinate_choice(self.space, results, busy, self.steps)
                if choice == "finished":
                    point = coordinate_search_best(self.space, results, self.steps)
                elif choice == "wait":  # every pending point is running elsewhere: evaluate one again
                    point = coordinate_search_next(self.space, results, self.steps)[0]
                else:
                    point = choice  # type: ignore[assignment]
            study._storage.set_trial_system_attr(trial._trial_id, _POINT_ATTR, list(point))
            self._points[trial._trial_id] = point
        self.fallback.before_trial(study, trial)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        if param_name not in self._names:
            return self.fallback.sample_independent(study, trial, param_name, param_distribution)
        point = self._points.get(trial._trial_id) or tuple(trial.system_attrs[_POINT_ATTR])
        value = self.space.values(point)[param_name]  # type: ignore[arg-type]
        if not param_distribution._contains(param_distribution.to_internal_repr(value)):
            low, high = next(a for a in self.space.axes if a.name == param_name).bounds()
            raise FixNormError(f"CoordinateSampler needs {param_name!r} suggested over a range holding its lattice "
                               f"({low:.4g} .. {high:.4g}); got {param_distribution}. Use space.suggest(trial)")
        return value

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        optuna = _optuna()
        self.fallback.after_trial(study, trial, state, values)
        point = self._points.pop(trial._trial_id, None)
        extra = None
        if point is not None and state == optuna.trial.TrialState.COMPLETE and values:
            extra = (point, self._sign(study) * values[0])  # this trial is not marked complete yet
        results, _ = self._state(study, exclude=trial._trial_id, extra=extra)
        if not coordinate_search_next(self.space, results, self.steps):
            study.stop()

    def reseed_rng(self) -> None:
        self.fallback.reseed_rng()


class _OnLattice(_BaseSampler):
    """An Optuna sampler whose choices on the axes move to the nearest lattice point (log space).

    Gives TPE and random search the same lattice as the coordinate search while the study keeps real
    values: TPE models the observed log values, so the order of the points is not lost.
    """

    def __init__(self, base: Any, space: SearchSpace) -> None:
        self.base, self.space = base, space

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Mapping[str, Any]) -> dict[str, Any]:
        params = self.base.sample_relative(study, trial, search_space)
        return {k: self.space.snap(k, v) for k, v in params.items()}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        value = self.base.sample_independent(study, trial, param_name, param_distribution)
        return self.space.snap(param_name, value)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Sequence[float] | None) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


# -- running trials through Optuna -----------------------------------------------------------------------
def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise FixNormError("tuning needs Optuna: pip install 'fixnorm[tune]'") from exc
    return optuna


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
            identity = {"tuner": tuner, "space": space.to_dict(), "settings": dict(settings or {}),
                        "steps": list(self.steps)}
            stored = self.study.user_attrs.get("identity")
            if stored is None:
                self.study.set_user_attr("identity", json.loads(json.dumps(identity)))
            elif stored != json.loads(json.dumps(identity)):
                raise FixNormError(f"study {self.study.study_name!r} in {url} was created with other settings; "
                                   "use another --study name or --out folder")

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
        return (0, 0)  # placeholder: the sampler chooses in _run_trial

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
        trials = [self._record(t) for t in self.study.get_trials(deepcopy=False)
                  if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
        scored = [t for t in trials if t["value"] is not None and t["state"] == "complete"]
        best = max(scored, key=lambda t: t["value"]) if scored else None
        finished = len(trials) >= self.n_trials
        if self.tuner == "coordinate":
            done = _completed_results(self.space, self.study.get_trials(deepcopy=False))
            finished = finished or not coordinate_search_next(self.space, done, self.steps)
        return TuneResult(trials=trials, best=best, out_dir=self.out_dir, finished=finished)

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


# -- the training objective --------------------------------------------------------------------------
def run_key(values: Mapping[str, float]) -> str:
    """A run directory name from the searched values: ``lr=0.1,fc_norm=4``."""
    return ",".join(f"{k}={v:.6g}" for k, v in values.items())


def training_objective(settings: Mapping[str, Any], runs_dir: str | Path,
                       on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Objective:
    """Train ``settings`` + the trial's values with the engine; the final evaluation accuracy is the value.

    A finished run directory is reused and an interrupted one resumed, so a killed trial loses at most
    the epoch in progress. Evaluate on a holdout (``holdout=N``) to keep the test set out of tuning.
    """
    from .train.config import make_config
    from .train.engine import train_or_reuse

    def objective(values: dict[str, float], trial: Any) -> float:
        run_dir = Path(runs_dir) / run_key(values)
        if RunFolder(run_dir).finished:
            return float(RunFolder(run_dir).read_summary()["final_test_acc"])
        cfg = make_config(settings, values)
        def epoch_done(record: dict[str, Any]) -> None:
            if on_epoch is not None:
                on_epoch(record)
            if trial is not None:
                trial.report(record["test_acc"], record["epoch"])
                if trial.should_prune():
                    raise _optuna().TrialPruned(f"pruned at epoch {record['epoch']}")

        def step_done(*_: Any) -> None:
            if trial is not None:
                trial.heartbeat()

        summary = train_or_reuse(cfg, run_dir, on_step=step_done, on_epoch=epoch_done)
        return float(summary["final_test_acc"])

    return objective


# -- search spaces from a recipe -----------------------------------------------------------------------
def _free_steps(settings: Mapping[str, Any]) -> int:
    from .train.config import make_config

    return make_config(settings).free_steps

def initial_classifier_norm(settings: Mapping[str, Any]) -> float:
    """The classifier's norm at initialisation for these settings (FixNorm's default fc_norm), measured."""
    import torch

    from .data import normalize
    from .methods import get_method
    from .models import create_model
    from .roles import analyze
    from .train.config import make_config
    from .train.data_source import make_data
    from .train.distributed import DistInfo

    cfg = make_config(settings)
    data = make_data(cfg, DistInfo(), torch.device("cpu"))
    torch.manual_seed(cfg.seed)  # the engine's initial weights
    model = create_model(cfg.model, num_classes=data.info.num_classes, in_channels=data.info.in_channels,
                         **cfg.model_kwargs)
    model = get_method(cfg.method).prepare_model(model, cfg)
    roles = analyze(model, normalize(data.example(), data.info.mean, data.info.std))
    if not roles.classifier:
        raise FixNormError(f"{cfg.model} has no classifier weight to tune the norm of")
    named = dict(model.named_parameters())
    return float(torch.stack([named[n].detach().float().norm() for n in roles.classifier]).norm())


def search_space(settings: Mapping[str, Any], *, lr_range: Sequence[float] | None = None,
                 second_range: Sequence[float] | None = None, ratio: float = math.sqrt(2)) -> SearchSpace:
    """The lattice ``fixnorm tune`` searches: lr x classifier norm (fixnorm) or lr x weight decay.

    Centred on the recipe's lr and on the method's default second setting; default ranges lr / 16 .. x 16,
    weight decay / 30 .. x 30. For FixNorm with a free phase (the default) the classifier axis is
    ``fc_scale``, the classifier norm relative to the one the free phase chose, 1/4 .. 4 around the default
    1; with ``free_steps=0`` or an ``fc_norm`` in the recipe it is ``fc_norm`` itself, initial / 4 .. x 16.
    """
    method = settings.get("method", "fixnorm")
    if method not in SECOND_AXIS:
        raise FixNormError(f"tuning knows methods {sorted(SECOND_AXIS)}, not {method!r}")
    lr = float(settings.get("lr", 0.1))
    lo, hi = lr_range or (lr / 16, lr * 16)
    lr_axis = Axis.spanning("lr", min(max(lr, lo), hi), lo, hi, ratio)
    if method == "fixnorm" and settings.get("fc_norm") is None and _free_steps(settings) > 0:
        lo, hi = second_range or (0.25, 4.0)
        second = Axis.spanning("fc_scale", min(max(1.0, lo), hi), lo, hi, ratio)
    elif method == "fixnorm":
        center = settings.get("fc_norm") or initial_classifier_norm(settings)
        lo, hi = second_range or (center / 4, center * 16)
        second = Axis.spanning("fc_norm", min(max(center, lo), hi), lo, hi, ratio)
    else:
        center = float(settings.get("weight_decay", 5e-4))
        if center <= 0:
            raise FixNormError("weight-decay tuning needs a positive weight_decay in the recipe as its centre")
        lo, hi = second_range or (center / 30, center * 30)
        second = Axis.spanning("weight_decay", min(max(center, lo), hi), lo, hi, ratio)
    return SearchSpace((lr_axis, second))
