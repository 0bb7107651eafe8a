"""The training objective of a trial (one engine run per lattice point) and the search space from a recipe."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import FixNormError

from .lattice import SECOND_AXIS, Axis, SearchSpace, _optuna
from .worker import Objective


def run_key(values: Mapping[str, float]) -> str:
    """A run directory name from the searched values: ``lr=0.1,fc_norm=4``."""
    return ",".join(f"{k}={v:.6g}" for k, v in values.items())


def training_objective(settings: Mapping[str, Any], runs_dir: str | Path,
                       on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Objective:
    """Train ``settings`` + the trial's values with the engine; the final evaluation accuracy is the value.

    A finished run directory is reused and an interrupted one resumed, so a killed trial loses at most
    the epoch in progress. Evaluate on a holdout (``holdout=N``) to keep the test set out of tuning.
    """
    from ..train.config import make_config
    from ..train.engine import train_or_reuse

    def objective(values: dict[str, float], trial: Any) -> float:
        run_dir = Path(runs_dir) / run_key(values)
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
def _fixnorm_settings(settings: Mapping[str, Any]) -> Any:
    from ..methods.fixnorm_method import fixnorm_settings
    from ..train.config import make_config

    return fixnorm_settings(make_config(settings))


def _no_classifier_axis(settings: Mapping[str, Any], fixnorm: Any) -> str | None:
    """Why the recipe's FixNorm settings give the classifier no norm to tune along an axis (None: they do)."""
    from ..methods.baselines import base_optimizer
    from ..optim import classifier_free_steps
    from ..train.config import make_config

    if fixnorm.fc_free_steps is None:
        return "the recipe leaves the classifier free (fc_free_steps=None), so it has no norm to tune"
    base, _ = base_optimizer(make_config(settings))
    if (fixnorm.fc_free_steps == "auto" and fixnorm.fc_norm is None
            and classifier_free_steps("auto", fixnorm.free_steps, base, None, 1.0) is None):
        return (f"over {base.__name__} fc_free_steps='auto' leaves the classifier free at fc_scale 1 and holds it "
                "at every other scale, so a classifier axis would change rule within it")
    return None


def initial_classifier_norm(settings: Mapping[str, Any]) -> float:
    """The classifier's norm at initialisation for these settings (FixNorm's default fc_norm), measured."""
    import torch

    from ..data import normalize
    from ..methods import get_method
    from ..models import create_model
    from ..roles import analyze
    from ..train.config import make_config
    from ..train.data_source import make_data
    from ..train.distributed import DistInfo

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
                 second_range: Sequence[float] | None = None, ratio: float = math.sqrt(2),
                 axes: Sequence[str] | None = None) -> SearchSpace:
    """The lattice ``fixnorm tune`` searches: lr x the method's other settings (``axes``, searched in that order).

    Centred on the recipe's lr and on the method's default settings; the lr from lr / 16 to x 16
    (``lr_range``). ``axes`` are the other settings (default ``SECOND_AXIS[method]``; ``second_range`` is the
    first one's range), searched after the lr unless ``"lr"`` is among them at another place:

    - ``weight_decay`` (baselines): / 30 .. x 30 around the recipe's.
    - ``fc_scale`` (FixNorm with a free phase, the default): the classifier's norm relative to the one the
      free phase chose, 1/4 .. 4. With ``free_steps=0`` or an ``fc_norm`` in the recipe it becomes ``fc_norm``
      itself, initial / 4 .. x 16. Refused where the recipe leaves the classifier free (``fc_free_steps=None``, or
      ``"auto"`` over an Adam-like base without ``fc_norm``, which holds it only at fc_scale != 1: the axis would
      change rule within it); there ``norm_scale`` is the default.
    - ``norm_scale`` (FixNorm): the scale-invariant weights held at this multiple of the norms training chose,
      spaced so that each step moves their effective lr by the lr axis's own factor: ``sqrt(ratio)`` over
      1/2 .. 2 under SGD (lr / norm²), ``ratio`` over 1/4 .. 4 under Adam-like bases (lr / norm). After a free
      phase the norms grow with the lr, so the lr alone barely moves the effective lr of those weights; this
      axis does.
    """
    method = settings.get("method", "fixnorm")
    if method not in SECOND_AXIS:
        raise FixNormError(f"tuning knows methods {sorted(SECOND_AXIS)}, not {method!r}")
    fixnorm = _fixnorm_settings(settings) if method == "fixnorm" else None
    default = SECOND_AXIS[method]
    if fixnorm is not None and _no_classifier_axis(settings, fixnorm):
        default = "norm_scale"  # a free classifier has no norm to tune: the effective lr of the held weights
    names = list(axes) if axes is not None else [default]
    if "lr" not in names:
        names.insert(0, "lr")
    allowed = ("lr", "fc_scale", "fc_norm", "norm_scale") if method == "fixnorm" else ("lr", "weight_decay")
    unknown = [n for n in names if n not in allowed]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        raise FixNormError(f"method {method!r} tunes the lr and some of {list(allowed[1:])} (each once), "
                           f"not {[n for n in names if n != 'lr'] or 'the lr alone'}")
    lr = float(settings.get("lr", 0.1))
    lo, hi = lr_range or (lr / 16, lr * 16)
    built, given = [], second_range  # second_range belongs to the first axis that is not the lr
    for name in names:
        if name == "lr":
            built.append(Axis.spanning("lr", min(max(lr, lo), hi), lo, hi, ratio))
        else:
            built.append(_other_axis(name, settings, fixnorm, given, ratio))
            given = None
    return SearchSpace(tuple(built))


def _other_axis(name: str, settings: Mapping[str, Any], fixnorm: Any, given: Sequence[float] | None,
                ratio: float) -> Axis:
    """One non-lr axis of ``search_space`` (its docstring gives each axis's centre and range)."""
    if name in ("fc_scale", "fc_norm"):
        problem = _no_classifier_axis(settings, fixnorm)
        if problem:
            raise FixNormError(f"{problem}: tune --axes norm_scale (the default here), or hold the classifier at "
                               "every point (fc_free_steps='free_steps' or a number of steps, or an fc_norm)")
        if fixnorm.fc_norm is None and fixnorm.free_steps > 0:
            lo, hi = given or (0.25, 4.0)
            return Axis.spanning("fc_scale", min(max(1.0, lo), hi), lo, hi, ratio)
        center = fixnorm.fc_norm or initial_classifier_norm(settings)
        lo, hi = given or (center / 4, center * 16)
        return Axis.spanning("fc_norm", min(max(center, lo), hi), lo, hi, ratio)
    if name == "norm_scale":
        if fixnorm.target_norm is not None:
            raise FixNormError("norm_scale scales the norms training chose; with a numeric target tune the target "
                               "instead")
        if fixnorm.angular_update is not None:
            raise FixNormError("norm_scale sets the effective lr through the norm; with angular_update the angle per "
                               "step is fixed and the norm does not matter")
        # one step of this axis moves the held weights' effective lr by the lr axis's factor: lr / norm² under
        # SGD, lr / norm under an Adam-like base (its step's size does not follow the gradient's)
        sgd = settings.get("base", "sgd") == "sgd"
        center = float(fixnorm.norm_scale)
        lo, hi = given or ((center / 2, center * 2) if sgd else (center / 4, center * 4))
        return Axis.spanning("norm_scale", min(max(center, lo), hi), lo, hi, math.sqrt(ratio) if sgd else ratio)
    center = float(settings.get("weight_decay", 5e-4))
    if center <= 0:
        raise FixNormError("weight-decay tuning needs a positive weight_decay in the recipe as its centre")
    lo, hi = given or (center / 30, center * 30)
    return Axis.spanning("weight_decay", min(max(center, lo), hi), lo, hi, ratio)
