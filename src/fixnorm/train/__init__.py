"""The training engine: one loop, configs and recipes, checkpoints, distributed set-up, hooks."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RECIPES, TrainConfig, load_recipe, make_config, parse_overrides
from ..schedule import lr_factor
from .engine import Trainer, train
from .hooks import EmaHook, Hook

__all__ = ["RECIPES", "EmaHook", "Hook", "TrainConfig", "Trainer", "load_checkpoint", "load_recipe", "lr_factor",
           "make_config", "parse_overrides", "save_checkpoint", "train"]
