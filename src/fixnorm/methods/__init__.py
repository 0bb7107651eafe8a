"""Training methods by name. A method builds the optimizer, may transform the model, and may add engine hooks.

Adding a method is one file here plus ``register_method``; the engine never branches on a method's name. A
method's settings are a dataclass beside its code (defaults there), read from ``method_kwargs.<name>``.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from ..errors import FixNormError
from ..settings import read_settings

if TYPE_CHECKING:
    from ..train.config import TrainConfig
    from ..hooks import Hook


def _same_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    return model


def _no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> list[Hook]:
    return []


Setup = Callable[[nn.Module, "TrainConfig", torch.Tensor], "tuple[torch.optim.Optimizer, list[Hook]]"]


@dataclass(frozen=True)
class Method:
    """How a training method plugs into the engine.

    ``setup(model, cfg, example) -> (optimizer, hooks)`` is the one call that builds a run's optimizer and
    the hooks that go with it (so objects they share need no side channel). Methods without hooks may give
    ``build_optimizer`` instead (and an optional ``hooks``). ``prepare_model`` transforms the model first.
    ``settings`` is the method's settings dataclass: read with ``method_settings``, and written out in full
    (defaults included) into every run's saved config, so a resumed run never trains with newer defaults;
    ``uses(cfg)`` names the methods it builds on (A-FAN's optimizer), whose settings are written out too.
    ``decide(cfg, settings) -> settings`` makes concrete the ``auto`` settings the rest of the config decides (FixNorm's
    ``schedule_end`` from the schedule), so the saved config records what the run trains with.
    """

    name: str
    description: str
    build_optimizer: Callable[[nn.Module, "TrainConfig", torch.Tensor], torch.optim.Optimizer] | None = None
    prepare_model: Callable[[nn.Module, "TrainConfig"], nn.Module] = field(default=_same_model)
    hooks: Callable[[nn.Module, torch.optim.Optimizer, "TrainConfig"], list[Any]] = field(default=_no_hooks)
    setup: Setup | None = None
    settings: type | None = None
    uses: Callable[["TrainConfig"], list[str]] | None = None  # other methods it builds on (their settings too)
    decide: Callable[["TrainConfig", Any], Any] | None = None  # autos the config decides, made concrete

    def __post_init__(self) -> None:
        if (self.setup is None) == (self.build_optimizer is None):
            raise FixNormError(f"method {self.name!r} needs exactly one of setup= or build_optimizer=")

    def build(self, model: nn.Module, cfg: TrainConfig,
              example: torch.Tensor) -> tuple[torch.optim.Optimizer, list[Hook]]:
        """The run's optimizer and the method's hooks, in one call."""
        if self.setup is not None:
            optimizer, hooks = self.setup(model, cfg, example)
            return optimizer, list(hooks)
        assert self.build_optimizer is not None
        optimizer = self.build_optimizer(model, cfg, example)
        return optimizer, list(self.hooks(model, optimizer, cfg))


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise FixNormError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise FixNormError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


S = TypeVar("S")


def method_settings(cfg: TrainConfig, name: str, settings: type[S]) -> S:
    """The settings of method ``name``: the dataclass ``settings`` from ``cfg.method_kwargs[name]`` over its
    defaults; unknown keys and wrong types are errors.

    Keyed by method so that one config can carry the settings of several methods (``fixnorm compare``).
    """
    return read_settings(settings, cfg.method_kwargs.get(name), f"method_kwargs.{name}")


def with_method_settings(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the settings of its method (and of those it builds on) written out in full, defaults included,
    checked: what a run saves."""
    kwargs, todo, done = dict(cfg.method_kwargs), [cfg.method], set()
    while todo:
        method = get_method(todo.pop())
        if method.name in done:
            continue
        done.add(method.name)
        if method.settings is not None:
            settings = method_settings(cfg, method.name, method.settings)
            if method.decide is not None:
                settings = method.decide(cfg, settings)
            kwargs[method.name] = dataclasses.asdict(settings)
        if method.uses is not None:
            todo += method.uses(cfg)
    return dataclasses.replace(cfg, method_kwargs=kwargs)


from . import baselines, fixnorm_method  # noqa: E402,F401  (registers the built-in methods)
from . import lawn  # noqa: E402,F401
from . import powerprop  # noqa: E402,F401
from . import mimicnorm  # noqa: E402,F401
from . import afan  # noqa: E402,F401
from . import pathprox  # noqa: E402,F401
from . import sal  # noqa: E402,F401
from . import fixmatch  # noqa: E402,F401
from . import admm  # noqa: E402,F401
