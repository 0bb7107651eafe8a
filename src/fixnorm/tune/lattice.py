"""The lattice every tuner searches, and FixNorm's coordinate search on it: pure functions of the results."""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import FixNormError

Point = tuple[int, ...]  # one lattice index per axis
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

    def index_of(self, value: float, rel_tol: float = 1e-9) -> int | None:
        """The index whose value is ``value`` (up to float round-off, or ``rel_tol`` for values written rounded),
        or None off the lattice."""
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            return None
        k = self.nearest(value)
        return k if math.isclose(self.value(k), value, rel_tol=rel_tol) else None

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
    """The product of one or more axes; a point is a tuple of indices, one per axis, in this order.

    The coordinate search moves along the axes in this order, so the first should be the one that matters most.
    """

    axes: tuple[Axis, ...]

    def __post_init__(self) -> None:
        names = [axis.name for axis in self.axes]
        if not names:
            raise FixNormError("a search space needs at least one axis")
        if len(set(names)) != len(names):
            raise FixNormError(f"axis names must be distinct, got {names}")

    def values(self, point: Point) -> dict[str, float]:
        return {axis.name: axis.value(i) for axis, i in zip(self.axes, point)}

    def contains(self, point: Point) -> bool:
        return all(axis.low <= i <= axis.high for axis, i in zip(self.axes, point))

    def grid(self) -> list[Point]:
        return list(itertools.product(*(range(axis.low, axis.high + 1) for axis in self.axes)))

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
        return tuple(point)

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

    ``steps`` are lattice steps; each is used for a line search over axis 0 (lr), then axis 1, and so on.
    """
    return _replay(space, results, steps)[0]


def coordinate_search_best(space: SearchSpace, results: Mapping[Point, float], steps: Sequence[int] = (4, 2)) -> Point:
    """Where the coordinate search ends (or stands): the centre its last finished line search chose."""
    return _replay(space, results, steps)[1]


def _replay(space: SearchSpace, results: Mapping[Point, float], steps: Sequence[int]) -> tuple[list[Point], Point]:
    """Run the search over the known results: (the points it waits for, the centre it has reached)."""
    center: Point = (0,) * len(space.axes)
    for step in steps:
        for axis in range(len(space.axes)):
            outcome = _line_search(space, results, center, axis, step)
            if isinstance(outcome, list):
                return outcome, center
            center = outcome
    return [], center


def _line_search(space: SearchSpace, results: Mapping[Point, float], center: Point, axis: int,
                 step: int) -> Point | list[Point]:
    def at(k: int) -> Point:
        return center[:axis] + (k,) + center[axis + 1:]

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


def fitted_point(space: SearchSpace, results: Mapping[Point, float], point: Point) -> tuple[Point, list[Point]]:
    """``point`` moved, axis by axis, to the vertex of the parabola through it and its evaluated neighbours.

    Why: a trial's accuracy carries noise about as large as the differences between neighbouring lattice
    points, so the single best trial is partly the luckiest one. Along each axis, when ``point`` is
    bracketed (an evaluated point below and above it on the same line, neither better), the accuracy is
    fitted by a parabola in log space through the three (Brent's parabolic step) and the vertex, rounded to
    the nearest lattice index, is taken. The vertex always lies inside the bracket and, for equally spaced
    neighbours, within half a spacing of ``point``: the fit moves a pick between its neighbours, never past
    them. Axes where ``point`` is not bracketed keep its index. Returns (the fitted point, the points used).
    """
    fitted, used = list(point), {point}
    for axis in range(len(space.axes)):
        def rest(p: Point) -> Point:
            return p[:axis] + p[axis + 1:]

        line = {p[axis]: v for p, v in results.items() if rest(p) == rest(point)}
        k0 = point[axis]
        if k0 not in line:
            raise FixNormError(f"fitted_point needs {point} among the evaluated points")
        below, above = [k for k in line if k < k0], [k for k in line if k > k0]
        if not below or not above:
            continue
        a, b = max(below), min(above)
        ya, y0, yb = line[a], line[k0], line[b]
        if y0 < max(ya, yb):
            continue  # not a bracketed maximum: the fit would extrapolate
        den = (k0 - a) * (y0 - yb) + (b - k0) * (y0 - ya)
        if den == 0:
            continue  # three equal values: no curvature to fit
        vertex = k0 - 0.5 * ((k0 - a) ** 2 * (y0 - yb) - (b - k0) ** 2 * (y0 - ya)) / den
        # the nearest index; exactly half way goes to the index nearer the evaluated point
        index = math.floor(vertex + 0.5) if vertex < k0 else math.ceil(vertex - 0.5)
        fitted[axis] = min(max(index, a), b)
        used.update({point[:axis] + (a,) + point[axis + 1:], point[:axis] + (b,) + point[axis + 1:]})
    return tuple(fitted), sorted(used)


def _coordinate_choice(space: SearchSpace, results: Mapping[Point, float], busy: set[Point | None],
                       steps: Sequence[int]) -> Point | str:
    """The next point to start: a pending point no running trial holds, "wait" when all are held, or "finished"."""
    pending = coordinate_search_next(space, results, steps)
    if not pending:
        return "finished"
    free = [p for p in pending if p not in busy]
    return free[0] if free else "wait"


# the system attribute where CoordinateSampler records the point it gave a trial (other workers read it)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise FixNormError("tuning needs Optuna: pip install 'fixnorm[tune]'") from exc
    return optuna
