"""Training configuration: one dataclass, built-in recipes by name, YAML files, and `key=value` overrides."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import FixNormError
from ..settings import coerce


@dataclass
class TrainConfig:
    """Everything a run needs; saved with the run as ``config.yaml``."""

    # what to train
    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    train_subset: int | None = None
    # >0: train on this many labelled images per class, drawn from the seed (labelled_subset); the whole training
    # set stays available unlabelled to a method's train step (RunState.unlabelled_images): semi-supervised runs
    labels_per_class: int = 0
    holdout: int = 0                 # >0: evaluate on the last `holdout` training images instead of the test set
    image_size: int = 224            # ImageFolder datasets only
    workers: int | None = None       # ImageFolder DataLoader workers (default: from the CPU count)
    # how long, how much
    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 1000
    # method and optimizer
    method: str = "fixnorm"
    # {method name: {setting: value}}: each method's settings dataclass (FixNorm's: methods/fixnorm_method.py);
    # FixNorm's may also be given at the top level (METHOD_SETTING_SHORTCUTS)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    base: str = "sgd"                # the base optimizer of fixnorm, lawn, ...: sgd, adam, adamw, rmsprop
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8                # adam/rmsprop epsilon
    alpha: float = 0.9               # rmsprop smoothing constant (TF's "decay")
    weight_decay: float = 5e-4       # for the weight-decay baselines; FixNorm replaces it
    # schedule
    schedule: str = "cosine"         # cosine, step, exponential, constant
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=list)  # epochs, for "step"
    gamma: float = 0.1               # factor per milestone ("step") or per decay_epochs ("exponential")
    decay_epochs: float = 1.0        # "exponential": lr *= gamma every decay_epochs
    min_lr_ratio: float = 0.0        # cosine floor, as a fraction of lr
    # regularisation and augmentation
    label_smoothing: float = 0.0
    augment: str = "crop_flip"       # none, crop, crop_flip
    crop_padding: int = 4
    cutout: int = 0
    eval_flip: bool = False          # test-time flip: evaluate on the mean logits of each image and its mirror
    # precise BN: before each evaluation, re-estimate every BatchNorm's running statistics in place on this many
    # training images (un-augmented: the first ones held in memory, or ones spread over a streamed ImageFolder tree),
    # for every method alike; 0 is off (running statistics as trained). auto: PRECISE_BN_IMAGES (decided with the
    # config, so config.yaml records the number). Why: docs/fixnorm.md, fixnorm/bn_statistics.py
    precise_bn: int | str = "auto"
    ema_decay: float | None = None
    # the BatchNorm statistics the EMA model is evaluated with: "averaged" (the EMA of the student's buffers, as
    # AveragedModel and timm's ModelEmaV2 keep them) or "recomputed" (re-estimated on a copy on the precise_bn images
    # before each evaluation; the EMA itself is left as it averages). auto: recomputed where precise_bn is on and an
    # EMA is kept, averaged otherwise. Why: docs/eman.md ("Which statistics the EMA model is scored with")
    ema_bn: str = "auto"
    # with ema_decay: also evaluate the EMA weights with the student's BN buffers and with BN statistics
    # re-estimated on 2,000 training images, each epoch (columns ema/*; train/hooks.py EmaHook, docs/eman.md)
    ema_bn_check: bool = False
    grad_clip: float | None = None
    # diagnostics (fixnorm.diagnostics): effective LR, angles, norms, logit scale, margins, flip rate
    diagnostics: bool = False
    diagnostics_every: int = 25      # steps between angle / gradient-norm measurements
    probe_size: int = 1024           # training images whose margins and predictions are followed
    # rank and curvature (fixnorm.spectra), every this many epochs; 0 is off
    rank_every: int = 0              # numerical and effective rank of every weight matrix (cheap)
    curvature_every: int = 0         # top Hessian eigenvalue per weight on a probe batch (20 HVPs per weight)
    curvature_probe: int = 256       # images in the curvature probe
    # speed and reproducibility
    # fp32, bf16, fp16 (fp16 needs a GPU), or auto: bf16 where the device computes it natively, fp32 elsewhere,
    # decided when the config is made (native_precision), so config.yaml records the precision the run trained in
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"             # auto, cpu, cuda
    threads: int | None = None
    seed: int = 0
    checkpoint_every: int = 1        # epochs
    # also save the state after these optimizer steps, as step-<k>.pt in the run folder (init_from takes that
    # file): the rewinding points of lottery-ticket studies (step 0 is the initialisation)
    save_at_steps: list[int] = field(default_factory=list)
    # start from another run's weights: a run folder (its last.pt) or a checkpoint file; model state only (the
    # optimizer, schedule and step count start fresh). Phases of multi-phase studies (fine-tuning) are such runs.
    init_from: str | None = None
    # the seed of the model's initial weights (None: seed; the data order always follows seed): a fresh draw for a
    # run that must not start from the same initialisation as its seed's other runs (lottery tickets' "reinit")
    init_seed: int | None = None
    # train with these weights held at zero: a mask file (fixnorm.train.masks, written by `fixnorm prune`); the
    # masked weights are zeroed at the start and kept at zero after every optimizer step, whatever the method
    mask_from: str | None = None
    # train with blocks of weights unified (one |value| per block, signs kept) or pruned: a unify file
    # (fixnorm.train.unified_blocks, written by `fixnorm unify`); the starting weights are projected onto it and the
    # blocks held after every optimizer step, whatever the method
    unify_from: str | None = None
    # with unify_from: each unified block keeps one trainable magnitude (signs fixed) instead of a fixed value
    unify_magnitudes: bool = False
    # begin as if this many optimizer steps had been taken (open_lth's rewinding): the schedule, the data order and
    # the epoch count continue from step k, and the run trains the remaining epochs x steps per epoch - k steps
    start_step: int = 0

    def validate(self) -> TrainConfig:
        choices = {"schedule": ("cosine", "step", "exponential", "constant"), "augment": ("none", "crop", "crop_flip"),
                   "precision": ("fp32", "bf16", "fp16", "auto"), "device": ("auto", "cpu", "cuda"),
                   "base": ("sgd", "adam", "adamw", "rmsprop"), "ema_bn": ("auto", "averaged", "recomputed")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise FixNormError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        positive = ("epochs", "batch_size", "eval_batch_size", "lr", "checkpoint_every", "diagnostics_every")
        for key in positive:
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise FixNormError(f"{key} must be a positive number, got {value!r}")
        if isinstance(self.labels_per_class, bool) or not isinstance(self.labels_per_class, int) \
                or self.labels_per_class < 0:
            raise FixNormError(f"labels_per_class must be a whole number >= 0 (0: every label), got "
                               f"{self.labels_per_class!r}")
        if not (isinstance(self.holdout, int) and self.holdout >= 0):
            raise FixNormError(f"holdout must be a whole number of images >= 0, got {self.holdout!r}")
        from ..methods import get_method, list_methods, method_settings  # late: the methods import this module
        unknown = sorted(set(self.method_kwargs) - set(list_methods()))
        if unknown:
            raise FixNormError(f"method_kwargs has settings for unknown method(s) {unknown}; "
                               f"write them as method_kwargs.<method>.<setting>, methods: {list_methods()}")
        for name in self.method_kwargs:  # a wrong key, type or value fails here, not when the method is built
            method = get_method(name)
            if method.settings is not None:
                read = method_settings(self, name, method.settings)
                if method.decide is not None:
                    method.decide(self, read)
        if not isinstance(self.ema_bn_check, bool):
            raise FixNormError(f"ema_bn_check must be true or false, got {self.ema_bn_check!r}")
        if self.ema_bn_check and not self.ema_decay:
            raise FixNormError("ema_bn_check evaluates the EMA model three ways, so it needs one: set ema_decay "
                               "(e.g. 0.999)")
        if self.precise_bn != "auto" and (isinstance(self.precise_bn, bool) or not isinstance(self.precise_bn, int)
                                          or self.precise_bn < 0):
            raise FixNormError(f"precise_bn must be auto or a whole number of training images >= 0 (0: off), got "
                               f"{self.precise_bn!r}")
        if self.rank_every < 0 or self.curvature_every < 0 or self.curvature_probe < 1:
            raise FixNormError("rank_every and curvature_every are epochs (0: off) and curvature_probe images (>= 1)")
        if any(step < 0 for step in self.save_at_steps):
            raise FixNormError(f"save_at_steps must be optimizer steps >= 0, got {self.save_at_steps}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise FixNormError(f"start_step must be a whole number of optimizer steps >= 0, got {self.start_step!r}")
        if self.mask_from is not None and not str(self.mask_from).strip():
            raise FixNormError("mask_from must be the path of a mask file (or null for no mask)")
        if self.unify_from is not None and not str(self.unify_from).strip():
            raise FixNormError("unify_from must be the path of a unify file (or null for none)")
        if self.unify_magnitudes and self.unify_from is None:
            raise FixNormError("unify_magnitudes trains the magnitudes of unified blocks, so it needs unify_from "
                               "(a unify file written by `fixnorm unify`)")
        if self.schedule == "step" and not self.milestones:
            raise FixNormError("schedule 'step' needs milestones (epochs), e.g. --set milestones=[60,120,160]")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# datasets decoded from disk by DataLoader workers (train/data_source.py), not held as tensors
STREAMING = ("imagefolder", "imagenet")
# training images precise_bn=auto re-estimates BatchNorm statistics on (the EMA check's 2,000)
PRECISE_BN_IMAGES = 2000

# The time-to-94% recipes share everything but the network, its length and the EMA.
_SPEEDRUN: dict[str, Any] = dict(model="resnet20", dataset="fashion_mnist", epochs=15, batch_size=128, lr=0.1,
                                 weight_decay=5e-4, schedule="cosine", augment="crop_flip", crop_padding=2,
                                 label_smoothing=0.1, eval_flip=True, precision="auto", channels_last=True)
_SPEEDRUN_FAST: dict[str, Any] = dict(_SPEEDRUN, model="fast_cnn", epochs=24)

# Built-in recipes: the README's default, and GPU recipes with the settings of the published baselines.
RECIPES: dict[str, dict[str, Any]] = {
    # a few minutes on 2 CPU cores: ResNet-20, bf16 autocast where the CPU has it (else fp32), channels_last
    "fmnist-resnet20": dict(model="resnet20", dataset="fashion_mnist", epochs=3, batch_size=128, lr=0.1,
                            weight_decay=5e-4, schedule="cosine", augment="crop", crop_padding=2,
                            precision="auto", channels_last=True),
    # time to 94% test accuracy on 2 CPU cores (benchmarks/time_to_accuracy.py): the README job's ResNet-20 for 15
    # epochs with flips in training and at test time and label smoothing; about 8 minutes
    "fmnist-speedrun": _SPEEDRUN,
    # the same recipe on fast_cnn (three conv-pool-conv blocks, half ResNet-20's epoch time): 24 epochs, chosen on a
    # seed-0 probe where both methods reached 94.0% only at epoch 20 (docs/fixnorm.md, "Time to 94%")
    "fmnist-speedrun-fast": _SPEEDRUN_FAST,
    # the fastest to 94% here (stop 46; stops 52-53, today's defaults: both methods 9 of 9 timed seeds, mean epoch
    # about 19.6 and 266-269 s on 2 CPU cores, one run of 18 over 300 s): fmnist-speedrun-fast with each block's first
    # conv pooled before its BN and ReLU (an epoch about 15% faster) and scored by an EMA of the weights (about a
    # one-epoch horizon)
    "fmnist-speedrun-pooled-ema": dict(_SPEEDRUN_FAST, model_kwargs={"pool_first": True}, ema_decay=0.998),
    # one epoch of the small CNN, under a minute: the defaults ablation (benchmarks/defaults_ablation.py)
    "fmnist-small-cnn": dict(model="small_cnn", dataset="fashion_mnist", epochs=1, batch_size=128, lr=0.2,
                             weight_decay=5e-4, schedule="cosine", augment="crop", crop_padding=2),
    # one tuning trial, about 15 s on 2 CPU cores: small CNN, 15k training images for 3 epochs, evaluated on a
    # holdout of 5000 training images (the test set stays unseen); benchmarks/tuning_efficiency.py
    "fmnist-tune": dict(model="small_cnn", dataset="fashion_mnist", train_subset=15000, holdout=5000, epochs=3,
                        batch_size=64, lr=0.1, weight_decay=5e-4, schedule="cosine", augment="crop", crop_padding=2,
                        precision="auto", channels_last=True, checkpoint_every=1),
    # LAWN's setting: Adam at a large batch; held classifier norm after a 1-epoch free warm-up (docs/lawn.md)
    "fmnist-lawn-adam": dict(model="small_cnn", dataset="fashion_mnist", epochs=3, batch_size=1024, method="lawn",
                             base="adam", lr=3e-3, weight_decay=0.0, warmup_epochs=0.5, schedule="cosine",
                             augment="crop", crop_padding=2, method_kwargs={"lawn": {"warmup_epochs": 1}}),
    # Powerpropagation, alpha 2, before magnitude pruning (docs/powerprop.md, benchmarks/powerprop_sparsity.py)
    "fmnist-powerprop": dict(model="small_cnn", dataset="fashion_mnist", epochs=2, batch_size=128, lr=0.2,
                             weight_decay=5e-4, schedule="cosine", augment="crop", crop_padding=2,
                             method="powerprop", method_kwargs={"powerprop": {"alpha": 2.0}}),
    # MimicNorm on the reference code's CIFAR schedule (SGD 0.1, wd 5e-4, 2 warm-up epochs, /10 at 80, 110, 135)
    "cifar100-resnet56-mimicnorm": dict(model="resnet56", dataset="cifar100", epochs=150, batch_size=128, lr=0.1,
                                        nesterov=False, weight_decay=5e-4, schedule="step",
                                        milestones=[80, 110, 135], gamma=0.1, warmup_epochs=2,
                                        augment="crop_flip", method="mimicnorm"),
    # FixMatch on 400 labels (40 per class) and the whole training set unlabelled, FixMatch's CIFAR settings at CPU
    # scale: B=64, mu=3 (method_kwargs.fixmatch), SGD 0.03 Nesterov, wd 5e-4, cosine; an epoch is a pass of the unlabelled
    # stream (938 steps), so 3 epochs are FixMatch's ~3,000 steps at CPU scale (docs/eman.md)
    "fmnist-fixmatch": dict(model="small_cnn", dataset="fashion_mnist", labels_per_class=40, epochs=3, batch_size=64,
                            method="fixmatch", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4,
                            schedule="cosine", augment="crop_flip", crop_padding=4),
    # a smoke test: a small CNN on 2000 images, seconds
    "fmnist-smoke": dict(model="small_cnn", model_kwargs={"width": 8}, dataset="fashion_mnist", train_subset=2000,
                         epochs=2, batch_size=100, lr=0.1, augment="crop", crop_padding=2,
                         # 40 steps: FixNorm's free phase scaled down with the run (100 steps would outlast it)
                         method_kwargs={"fixnorm": {"free_steps": 10}}),
    # He et al. 2016: ResNet-56 on CIFAR-10, SGD 0.1, momentum 0.9, wd 1e-4, batch 128, /10 at epochs 82 and 123 of 164
    "cifar10-resnet56": dict(model="resnet56", dataset="cifar10", epochs=164, batch_size=128, lr=0.1, nesterov=False,
                             weight_decay=1e-4, schedule="step", milestones=[82, 123], gamma=0.1, augment="crop_flip"),
    # Zagoruyko & Komodakis 2016: WRN-28-10 on CIFAR-100, SGD Nesterov 0.1, wd 5e-4, /5 at 60, 120, 160 of 200
    "cifar100-wrn28-10": dict(model="wrn28_10", dataset="cifar100", epochs=200, batch_size=128, lr=0.1,
                              weight_decay=5e-4, schedule="step", milestones=[60, 120, 160], gamma=0.2,
                              augment="crop_flip", precision="auto", channels_last=True),
    # Tan & Le 2019: EfficientNet-B0, RMSprop (decay 0.9, momentum 0.9, eps 1e-3), lr 0.016 per 256 images,
    # 5 warm-up epochs, x0.97 every 2.4 epochs, wd 1e-5, BN momentum 0.99 (0.01 here), dropout 0.2,
    # stochastic depth 0.2, EMA 0.9999, label smoothing 0.1, 350 epochs
    "imagenet-efficientnet-b0": dict(model="efficientnet_b0", model_kwargs={"bn_momentum": 0.01},
                                     dataset="imagenet", epochs=350, batch_size=256, method="rmsprop", base="rmsprop",
                                     lr=0.016, momentum=0.9, alpha=0.9, eps=1e-3, weight_decay=1e-5,
                                     schedule="exponential", gamma=0.97, decay_epochs=2.4, warmup_epochs=5,
                                     label_smoothing=0.1, ema_decay=0.9999, precision="auto", channels_last=True),
    # Sandler et al. 2018: MobileNetV2, RMSprop (decay 0.9, momentum 0.9), lr 0.045 x0.98 per epoch, wd 4e-5
    "imagenet-mobilenetv2": dict(model="mobilenetv2", dataset="imagenet", epochs=300, batch_size=256,
                                 method="rmsprop", base="rmsprop", lr=0.045, momentum=0.9, alpha=0.9, eps=1e-3,
                                 weight_decay=4e-5, schedule="exponential", gamma=0.98, decay_epochs=1.0,
                                 label_smoothing=0.1, precision="auto", channels_last=True),
}


def load_recipe(name_or_path: str | Path | None) -> dict[str, Any]:
    """A built-in recipe by name, or a YAML file of TrainConfig fields."""
    if name_or_path is None:
        return {}
    if str(name_or_path) in RECIPES:
        return dict(RECIPES[str(name_or_path)])
    path = Path(name_or_path)
    if not path.is_file():
        raise FixNormError(f"no recipe {str(name_or_path)!r}: give a built-in name ({', '.join(RECIPES)}) "
                           "or a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FixNormError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise FixNormError(f"recipe {path} must be a mapping of settings, got {type(data).__name__}")
    return dict(data)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.05", "milestones=[60,120]"]`` -> typed values (YAML syntax for the value)."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FixNormError(f"override {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise FixNormError(f"override {item!r}: cannot read the value ({exc})") from exc
        # a dotted key sets one entry of a mapping: method_kwargs.lawn.warmup_epochs=1
        *parents, leaf = key.strip().split(".")
        target = result
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise FixNormError(f"override {item!r} conflicts with an earlier override of {part!r}")
        target[leaf] = parsed
    return result


def _deep_merge(base: Any, update: Any) -> Any:
    if isinstance(base, Mapping) and isinstance(update, Mapping):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _deep_merge(merged.get(key), value)
        return merged
    return update


# FixNorm's settings live in method_kwargs.fixnorm (its dataclass, methods/fixnorm_method.py); these keys are also
# accepted at the top level of a recipe, a --set and the CLI shortcuts (--fc-norm, --free-steps, --lr-power), as
# they were before the settings moved, and configs saved then hold them there.
METHOD_SETTING_SHORTCUTS: dict[str, str] = {key: "fixnorm" for key in (
    "fc_norm", "fc_scale", "granularity", "target_norm", "fc_granularity", "others", "others_weight_decay",
    "free_steps", "angular_update", "lr_power", "schedule_end", "angle_power", "norm_scale", "norm_drift", "equilibrium_wd",
    "drift_follows_lr", "drift_signal", "norm_replay", "norm_replay_roles", "fc_free_steps", "warmup_count",
    "nonfinite", "fc_max_step", "joint")}

# Settings added after runs already existed, with the value that reproduces how those runs trained: a config saved
# without the key is read with this value, not with today's default (resuming an old run must not change it).
SETTINGS_BEFORE_THEY_EXISTED: dict[str, dict[str, Any]] = {
    "fixnorm": {
        "free_steps": 0,     # before the free phase, norms were held from construction
        "lr_power": 1.0,     # before the square-root schedule law, the schedule was the scale-invariant weights' own
        "schedule_end": 0.0,  # before it, the square-root law applied to the whole schedule, whatever its end
        "norm_drift": None,  # before drifting norms, the norms taken after the free phase stayed
        "drift_follows_lr": False,  # before it, the drift's time constant was fixed and the lr's law was lr_power's
        "drift_signal": "gradient",  # before "auto" (stop 50) and before the setting existed, the gradient law
        "equilibrium_wd": None,  # before the equilibrium ceiling, the norms taken after the free phase were not capped
        "fc_free_steps": "free_steps",  # before the classifier's own free phase, it was held from free_steps on
        "fc_max_step": None,  # before the classifier's step cap, its steps were the base optimizer's
        "joint": "free",  # before joint groups were measured, the weights scale-invariant only together were free
        "warmup_count": True,  # before "auto", the free phases were counted through a warm-up over any base (and
                               # before that not at all: a run saved inside its free phase then, resumed, counts it)
    },
}


def _with_shortcuts_moved(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A settings layer with top-level method settings moved to ``method_kwargs.<method>`` (they win there)."""
    moved = {k: v for k, v in layer.items() if k not in METHOD_SETTING_SHORTCUTS}
    for key, method in METHOD_SETTING_SHORTCUTS.items():
        if key in layer:
            kwargs = dict(moved.get("method_kwargs") or {})
            if not isinstance(kwargs.get(method, {}), Mapping):
                raise FixNormError(f"method_kwargs.{method} must be a mapping of settings, got {kwargs[method]!r}")
            kwargs[method] = {**(kwargs.get(method) or {}), key: layer[key]}
            moved["method_kwargs"] = kwargs
    return moved


# Top-level settings a saved run may predate, with the value it ran under.
TOP_LEVEL_SETTINGS_BEFORE_THEY_EXISTED: dict[str, Any] = {
    "precise_bn": 0,  # before precise BN, every evaluation used the running statistics as trained
    "ema_bn": "averaged",  # before it, the EMA model was scored with its averaged buffers
}


def saved_config(saved: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of a saved run (its checkpoint or config.yaml), keys it predates filled as it trained."""
    saved = _with_shortcuts_moved(saved)
    kwargs = saved.get("method_kwargs") or {}
    filled = {method: {k: v for k, v in before.items() if k not in (kwargs.get(method) or {})}
              for method, before in SETTINGS_BEFORE_THEY_EXISTED.items() if saved.get("method") == method}
    earlier = {k: v for k, v in TOP_LEVEL_SETTINGS_BEFORE_THEY_EXISTED.items() if k not in saved}
    return make_config({"method_kwargs": {m: f for m, f in filled.items() if f}}, earlier, saved)


# Settings that change how a run is executed or observed, not the weights it trains: a finished or interrupted run
# is reused under other values of these (another thread count, a larger evaluation batch, diagnostics switched on).
EXECUTION_ONLY_SETTINGS = frozenset({
    "data_dir", "workers", "eval_batch_size", "device", "threads", "compile", "checkpoint_every", "diagnostics",
    "diagnostics_every", "probe_size", "rank_every", "curvature_every", "curvature_probe", "ema_bn_check"})


def settings_that_differ(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """``key: saved -> requested`` for every setting (method settings by their dotted path) in which two configs
    differ, execution-only settings left out: why a run folder cannot stand for the run asked for."""
    def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, Mapping) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value  # a YAML round trip
        return out

    mine, theirs = flat(saved.to_dict()), flat(requested.to_dict())
    keys = sorted(k for k in set(mine) | set(theirs) if k.split(".")[0] not in EXECUTION_ONLY_SETTINGS)
    return [f"{k}: {mine.get(k, 'unset')!r} -> {theirs.get(k, 'unset')!r}" for k in keys
            if k not in mine or k not in theirs or mine[k] != theirs[k]]


def make_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """Merge settings (later layers win) into a validated TrainConfig; unknown keys are errors."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in _with_shortcuts_moved(layer).items():
            if key not in _FIELDS:
                close = [k for k in _FIELDS if k.startswith(key[:3])]
                raise FixNormError(f"unknown setting {key!r}" + (f"; did you mean {close}?" if close else ""))
            merged[key] = _deep_merge(merged[key], value) if key in merged else value
    for key, value in list(merged.items()):
        merged[key] = _coerce(key, value)
    cfg = TrainConfig(**merged).validate()
    return decided(cfg)


def decided(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every ``auto`` that the machine or the dataset decides made concrete (precision, precise_bn,
    ema_bn)."""
    precise_bn = decided_precise_bn(cfg.precise_bn)
    return dataclasses.replace(cfg, precision=decided_precision(cfg.precision, cfg.device), precise_bn=precise_bn,
                               ema_bn=decided_ema_bn(cfg.ema_bn, cfg.ema_decay, precise_bn))


def decided_ema_bn(ema_bn: str, ema_decay: float | None, precise_bn: int) -> str:
    """The statistics the EMA model is scored with: ``auto`` is "recomputed" where an EMA is kept and precise BN is
    on (``precise_bn`` decided), "averaged" otherwise (a run without an EMA records "averaged", as runs saved before
    the setting read). "recomputed" without an EMA or without precise BN is an error: it would score nothing, or
    silently score the averaged buffers."""
    if ema_bn == "auto":
        return "recomputed" if ema_decay and precise_bn > 0 else "averaged"
    if ema_bn == "recomputed" and not ema_decay:
        raise FixNormError("ema_bn=recomputed scores an EMA model: set ema_decay (e.g. 0.999), or ema_bn=auto")
    if ema_bn == "recomputed" and precise_bn == 0:
        raise FixNormError("ema_bn=recomputed re-estimates the EMA model's BatchNorm statistics on the precise_bn "
                           "images, and precise_bn is 0 here: set precise_bn to a number of images, or ema_bn=averaged")
    return ema_bn


def decided_precise_bn(precise_bn: int | str) -> int:
    """The images BatchNorm statistics are re-estimated on before an evaluation: ``auto`` is PRECISE_BN_IMAGES (the
    first ones of a dataset held in memory, ones spread over a streamed ImageFolder tree)."""
    return PRECISE_BN_IMAGES if precise_bn == "auto" else int(precise_bn)


def decided_precision(precision: str, device: str = "auto") -> str:
    """The precision a run trains in: ``auto`` becomes :func:`native_precision` of ``device``, any other is kept.

    The one place ``auto`` is decided: the config (so config.yaml records it), the Trainer (a hand-built config),
    the tuner's study identity and the comparison's label all ask here."""
    return native_precision(device) if precision == "auto" else precision


def native_precision(device: str) -> str:
    """``"bf16"`` where ``device`` (auto, cpu, cuda) computes bfloat16 natively, else ``"fp32"``: precision auto.

    On a CPU whose oneDNN has no bf16 kernels (AVX2 without AVX-512) autocast to bf16 is emulated: a training
    step of fast_cnn, small_cnn and ResNet-20 measured 11-12x slower than in fp32 on such a machine
    (benchmarks/precision_speed.py), so a bf16 recipe would take hours there; fp32 trains fastest on it.
    """
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no bf16 kernels either
        native = False
    return "bf16" if native else "fp32"


def _coerce(key: str, value: Any) -> Any:
    return coerce(key, str(_FIELDS[key].type), value)
