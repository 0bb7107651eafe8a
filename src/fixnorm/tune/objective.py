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
    fixnorm = _fixnorm_settings(settings) if method == "fixnorm" else None
    if fixnorm is not None and fixnorm.fc_norm is None and fixnorm.free_steps > 0:
        lo, hi = second_range or (0.25, 4.0)
        second = Axis.spanning("fc_scale", min(max(1.0, lo), hi), lo, hi, ratio)
    elif method == "fixnorm":
        center = fixnorm.fc_norm or initial_classifier_norm(settings)
        lo, hi = second_range or (center / 4, center * 16)
        second = Axis.spanning("fc_norm", min(max(center, lo), hi), lo, hi, ratio)
    else:
        center = float(settings.get("weight_decay", 5e-4))
        if center <= 0:
            raise FixNormError("weight-decay tuning needs a positive weight_decay in the recipe as its centre")
        lo, hi = second_range or (center / 30, center * 30)
        second = Axis.spanning("weight_decay", min(max(center, lo), hi), lo, hi, ratio)
    return SearchSpace((lr_axis, second))
