"""Optuna samplers on the lattice: FixNorm's coordinate search for a user's own study, and TPE/random/grid moved
onto lattice points."""
from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import FixNormError

try:  # the sampler classes subclass Optuna's; without the tune extra they exist but refuse to start
    from optuna.samplers import BaseSampler as _BaseSampler
except ImportError:  # pragma: no cover - optuna is in the test extra
    _BaseSampler = object  # type: ignore[assignment,misc]

from .lattice import (Point, SearchSpace, _coordinate_choice, _optuna, coordinate_search_best,
                      coordinate_search_next)


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
    objective asks for the axes with ``space.suggest(trial)`` (or ``trial.suggest_float`` over any
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
