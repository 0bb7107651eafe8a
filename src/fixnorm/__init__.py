"""fixnorm: train without weight decay by controlling weight norms directly.

The flow: ``analyze(model, example_inputs) -> Roles`` -> ``Plan`` (one norm rule per
parameter) -> ``FixNorm`` (any torch.optim optimizer, then the plan applied in place).
"""
from .bn_statistics import recompute_bn_statistics_
from .constraints import Plan, PlanEntry, build_plan
from .eman import eman_update_
from .errors import FixNormError
from .optim import FixNorm, constrained_parameters, from_weight_decay, steps_through_warmup
from .roles import Roles, analyze, apply_overrides

__version__ = "0.1.0"

__all__ = [
    "FixNorm", "FixNormError", "Plan", "PlanEntry", "Roles", "analyze", "apply_overrides", "build_plan",
    "constrained_parameters", "eman_update_", "from_weight_decay", "recompute_bn_statistics_", "steps_through_warmup",
    "__version__",
]
