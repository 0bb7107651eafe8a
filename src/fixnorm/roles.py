"""Which part each parameter plays: scale-invariant, classifier, or other.

A weight is *scale-invariant* when multiplying it by a positive factor leaves the
model's train-mode output unchanged (as the norm layers' eps goes to 0); it is
*filter*-invariant when every slice along dim 0 may take its own factor. The
answer here is measured, not guessed from layer types: the model is copied to
float64 at a generic point (every parameter perturbed, so a zero-initialised bias
cannot hide a dependence), the eps of every norm layer is shrunk, and weights are
scaled by random factors while the output is compared.

To keep this to a handful of forward passes, one backward pass first computes,
for every weight, the output's derivative along the weight's own direction (per
filter and for the whole tensor). Scale invariance makes it zero; a value above
``rtol`` (relative to the output; invariant weights measure 1e-8 or less) proves
that a weight is not invariant, with no scaling test. The remaining weights are
scaled all at once; if that changes the output, they are tested in groups of the
same module at every depth (``blocks.*.se.reduce.weight``) and a failing group is
bisected. EfficientNet-B0 went from 181 forward passes to 5, ResNet-50 stays at 5.

The *classifier* is found from the autograd graph: the weights of the last
layer(s) on every path to the output. It is a classifier only when it is not
scale-invariant (a final linear followed by a BatchNorm on the logits is not).

The *final homogeneous sub-network* (LAWN, Gupta et al. 2021) is also read from the
graph: the weights after the last normalisation or non-homogeneous op, such that
the output is positively homogeneous in them (scaling them all by c scales the
output by c**k, biases set to zero). See ``_final_homogeneous``.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import FixNormError

ROLE_FILTER = "filter"
ROLE_TENSOR = "tensor"
ROLE_CLASSIFIER = "classifier"
ROLE_OTHER = "other"
ROLES = (ROLE_FILTER, ROLE_TENSOR, ROLE_CLASSIFIER, ROLE_OTHER)

# autograd nodes that only re-shape or re-type a tensor: looking through them from a
# consuming op finds the weight it consumes (``x @ W.t()``, autocast copies, ...).
_PASS_THROUGH_NODES = (
    "TBackward", "TransposeBackward", "PermuteBackward", "ViewBackward", "ReshapeAliasBackward",
    "UnsafeViewBackward", "ExpandBackward", "ToCopyBackward", "UnsqueezeBackward",
    "SqueezeBackward", "CloneBackward", "AliasBackward", "SliceBackward", "SelectBackward",
)


@dataclass
class Roles:
    """The measured role of every parameter of a model.

    ``scale_invariant`` maps a parameter name to ``"filter"`` or ``"tensor"``;
    ``classifier`` lists the final-layer weights that are not scale-invariant;
    ``reasons`` says why for every parameter, and ``table()`` prints it all.
    ``final_homogeneous`` lists the weights (ndim >= 2) of the final homogeneous
    sub-network, the ones LAWN holds at fixed norms (empty when there is none).
    ``joint`` lists groups of weights that are not scale-invariant alone but jointly: scaling
    all of a group by one factor leaves the output unchanged (in a pre-activation ResNet, the
    convs that write a stage's residual stream, which the next BatchNorm reads). Their role
    stays "other"; FixNorm's ``joint`` option holds each group's joint norm.
    """

    scale_invariant: dict[str, str]
    classifier: list[str]
    shapes: dict[str, tuple[int, ...]]
    reasons: dict[str, str]
    final_layer: list[str] = field(default_factory=list)
    final_homogeneous: list[str] = field(default_factory=list)
    joint: list[list[str]] = field(default_factory=list)

    def role(self, name: str) -> str:
        if name in self.scale_invariant:
            return self.scale_invariant[name]
        if name in self.classifier:
            return ROLE_CLASSIFIER
        return ROLE_OTHER

    def table(self) -> str:
        rows = [("parameter", "shape", "role", "why")]
        for name, shape in self.shapes.items():
            rows.append((name, "x".join(map(str, shape)) or "scalar", self.role(name), self.reasons[name]))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 3)
        lines.append("final homogeneous sub-network: " + (", ".join(self.final_homogeneous) or "none"))
        lines.append("jointly scale-invariant groups: " + ("; ".join(
            f"{i + 1}: " + ", ".join(group) for i, group in enumerate(self.joint)) or "none"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"scale_invariant": dict(self.scale_invariant), "classifier": list(self.classifier),
                "final_layer": list(self.final_layer), "final_homogeneous": list(self.final_homogeneous),
                "joint": [list(g) for g in self.joint], "shapes": {k: list(v) for k, v in self.shapes.items()},
                "reasons": dict(self.reasons)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Roles:
        return cls(scale_invariant=dict(data["scale_invariant"]), classifier=list(data["classifier"]),
                   shapes={k: tuple(v) for k, v in data["shapes"].items()},
                   reasons=dict(data["reasons"]), final_layer=list(data.get("final_layer", [])),
                   final_homogeneous=list(data.get("final_homogeneous", [])),
                   joint=[list(g) for g in data.get("joint", [])])  # roles saved before joint groups: none


def analyze(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any],
    *,
    overrides: Mapping[str, str] | None = None,
    rtol: float = 1e-4,
    seed: int = 0,
    joint: bool = False,
) -> Roles:
    """Measure the role of every parameter of ``model`` on ``model(*example_inputs)``, or on
    ``model(**example_inputs)`` for a mapping (a Hugging Face batch: ``input_ids``, ``attention_mask``, ...).

    ``overrides`` maps a glob pattern over parameter names (``"head.*"``) to a role
    (``"filter"``, ``"tensor"``, ``"classifier"`` or ``"other"``) and wins over the
    measurement; a pattern that matches nothing is an error. ``rtol`` is the relative
    output change (float64, eps shrunk) under which a scaling counts as invariant.
    The model itself is not modified: the analysis runs on a float64 copy.
    ``joint=True`` also finds the groups of weights that are scale-invariant only together
    (``Roles.joint``); it costs one backward pass per weight left over plus four, so it is asked for
    by FixNorm's ``joint="hold"`` only (and ``fixnorm roles --joint``).

    Wrappers (DDP, DataParallel, Lightning Fabric's module, ``torch.compile``) are looked through to the
    module that computes; the names in the result are still the ones ``model.named_parameters()`` gives.
    A model whose forward cannot run in float64 (it casts its input to bf16, say) is analysed in its own
    dtype instead, with ``rtol`` raised to suit that dtype; every reason then says so.
    """
    if not isinstance(model, nn.Module):
        raise FixNormError(f"analyze() needs an nn.Module, got {type(model).__name__}")
    inputs = ExampleInputs.of(example_inputs)
    target = unwrap(model)
    named = dict(target.named_parameters())
    if not named:
        raise FixNormError("the model has no parameters to analyse")
    refuse_lazy_parameters(named)
    overrides = dict(overrides or {})
    for pattern, role in overrides.items():
        if role not in ROLES:
            raise FixNormError(f"unknown role {role!r} for override {pattern!r}; choose one of {ROLES}")

    work = _analysis_copy(target, torch.float64)
    inputs64 = inputs.to_float64()
    note = ""
    try:
        probe = _Probe(work, inputs64, seed)
    except FixNormError as float64_error:
        cause = str(float64_error.__cause__ or float64_error).splitlines()[0][:80]
        try:  # a forward that casts its input down (x.to(torch.bfloat16)): keep those casts in float64
            probe = _Probe(work, inputs64, seed, keep_float64=True)
            note = (" [float64 analysis with the forward's own casts to lower precision kept in float64: "
                    f"as written it failed on a float64 copy ({cause})]")
        except FixNormError as kept_error:
            # the forward needs its own dtype: measure in that dtype, at that dtype's precision
            cause = str(kept_error.__cause__ or kept_error).splitlines()[0][:80]
            work = _analysis_copy(target, None)
            try:
                probe = _Probe(work, inputs, seed)
            except FixNormError:
                raise float64_error from None
            dtype = _lowest_precision(work, probe.reference_dtype)
            rtol = max(rtol, _dtype_rtol(dtype))
            note = (f" [analysed in {str(dtype).replace('torch.', '')}, the model's own dtype, tolerance {rtol:.1e}: "
                    f"its forward failed on a float64 copy ({cause}); an effect below the tolerance cannot be seen]")
    work_params = dict(work.named_parameters())
    used, final = probe.trace_graph(work_params)

    shapes = {n: tuple(p.shape) for n, p in named.items()}
    reasons: dict[str, str] = {}
    invariant: dict[str, str] = {}
    for name, p in named.items():
        if name not in used:
            reasons[name] = "not used by the forward pass on the example input"
        elif p.ndim < 2:
            reasons[name] = "ndim < 2 (bias, norm affine or scale): not analysed"
    candidates = [n for n in named if n in used and named[n].ndim >= 2]

    tester = _GroupTester(probe, work_params, rtol, seed)
    # proofs of non-invariance from one backward pass (float64 only: in low precision it is noise)
    screen = probe.radial_derivatives(work_params, candidates) if probe.inputs is inputs64 else {}
    filter_proof = {n: v[0] for n, v in screen.items() if v[0] > rtol}
    tensor_proof = {n: v[1] for n, v in screen.items() if v[1] > rtol}
    # final-layer weights are the likely non-invariant ones: test them alone first so
    # the large group of the remaining weights usually passes in one forward pass.
    finals = [n for n in candidates if n in final and n not in filter_proof]
    rest = [n for n in candidates if n not in final and n not in filter_proof]
    accepted_filter, rejected = {}, {}
    for name in finals:
        a, r = tester.bisect([name], per_filter=True)
        accepted_filter.update(a)
        rejected.update(r)
    a, r = tester.search(rest, per_filter=True)
    accepted_filter.update(a)
    rejected.update(r)
    accepted_tensor, rejected_tensor = tester.search(
        [n for n in candidates if (n in rejected or n in filter_proof) and n not in tensor_proof], per_filter=False)

    def evidence(name: str, measured: dict[str, float], proof: dict[str, float]) -> str:
        if name in measured:
            return f"rel. change {measured[name]:.1e}"
        return f"derivative along the weight {proof[name]:.1e} of the output"

    for name in candidates:
        if name in accepted_filter:
            invariant[name] = ROLE_FILTER
            reasons[name] = f"output unchanged when each filter is scaled (max rel. change {accepted_filter[name]:.1e})"
        elif name in accepted_tensor:
            invariant[name] = ROLE_TENSOR
            reasons[name] = (f"output unchanged when the whole tensor is scaled (max rel. change "
                             f"{accepted_tensor[name]:.1e}); per-filter scaling changes it "
                             f"({evidence(name, rejected, filter_proof)})")
        else:
            reasons[name] = ("not scale-invariant: scaling changes the output "
                             f"({evidence(name, rejected_tensor, tensor_proof)})")
    classifier = []
    for name in candidates:
        if name in final and name not in invariant:
            classifier.append(name)
            reasons[name] = "final layer, " + reasons[name]
        elif name in final:
            reasons[name] = "final layer, " + reasons[name]

    joint_groups: list[list[str]] = []
    if joint and probe.inputs is inputs64:  # the null-space test needs float64 derivatives
        loose = [n for n in candidates if n not in invariant and n not in classifier]
        for number, (group, dev) in enumerate(_joint_groups(probe, tester, work_params, loose), start=1):
            joint_groups.append(group)
            for name in group:
                reasons[name] += (f"; jointly scale-invariant with the {len(group) - 1} other weight(s) of group "
                                  f"{number} (all scaled by one factor: rel. change {dev:.1e})")
    if note:
        for name in candidates:
            reasons[name] += note
    roles = Roles(scale_invariant=invariant, classifier=classifier, shapes=shapes, reasons=reasons,
                  final_layer=[n for n in candidates if n in final],
                  final_homogeneous=[n for n in named if n in probe.final_homogeneous], joint=joint_groups)
    if target is not model:
        roles = _renamed(roles, target, model)
    return apply_overrides(roles, overrides)


# wrappers that hold the computing module under an attribute: DDP, DataParallel, torch.compile's
# OptimizedModule, Lightning Fabric's _FabricModule (its forward casts inputs and enters autocast)
_WRAPPERS = (("DistributedDataParallel", "module"), ("DataParallel", "module"), ("OptimizedModule", "_orig_mod"),
             ("_FabricModule", "_forward_module"))


def unwrap(model: nn.Module) -> nn.Module:
    """The module that computes inside DDP, DataParallel, Lightning Fabric and ``torch.compile`` wrappers.

    Matched by class name, so neither Lightning nor a process group is needed to look through them.
    """
    while True:
        for cls_name, attr in _WRAPPERS:
            inner = getattr(model, attr, None) if type(model).__name__ == cls_name else None
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def _renamed(roles: Roles, inner: nn.Module, outer: nn.Module) -> Roles:
    """``roles`` measured on ``inner`` under the names ``outer.named_parameters()`` gives the same tensors."""
    outer_names = {id(p): n for n, p in outer.named_parameters()}
    rename = {n: outer_names.get(id(p), n) for n, p in inner.named_parameters()}
    shapes = {rename[n]: shape for n, shape in roles.shapes.items()}
    reasons = {rename[n]: why for n, why in roles.reasons.items()}
    for name, param in outer.named_parameters():  # a wrapper's own parameters (rare) take no part in the forward
        if name not in shapes:
            shapes[name], reasons[name] = tuple(param.shape), "belongs to the wrapper, not to the wrapped model"
    return Roles(scale_invariant={rename[n]: r for n, r in roles.scale_invariant.items()},
                 classifier=[rename[n] for n in roles.classifier], shapes=shapes, reasons=reasons,
                 final_layer=[rename[n] for n in roles.final_layer],
                 final_homogeneous=[rename[n] for n in roles.final_homogeneous])


def _lowest_precision(model: nn.Module, output_dtype: torch.dtype) -> torch.dtype:
    """The floating dtype with the largest epsilon among the model's parameters and its output."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} | {output_dtype}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _dtype_rtol(dtype: torch.dtype) -> float:
    """The relative output change that rounding alone can cause in ``dtype``: four times its epsilon.

    Measured in bfloat16 (and float16) by scaling one weight at a time: scale-invariant weights of
    ResNet-20 and of the small models in tests/test_roles.py change the output by at most 2.2 eps;
    weights that matter mostly by 10 to 500 eps, but a conv bias before ReLU + BN by 3.3 eps and a
    squeeze-excite gate by 0.5 eps (bf16). So the margin is kept small: a weight whose effect drowns
    in rounding is misread as invariant either way, and a deep model's rounding (EfficientNet-B0: up to
    200 eps) makes invariant weights read as "other", which only leaves them unconstrained.
    """
    return 4 * torch.finfo(dtype).eps


class _KeepFloat64(TorchFunctionMode):
    """While active, a float64 tensor that the code casts to a lower-precision float stays float64.

    Lets the float64 analysis run models that cast their input (``x.to(torch.bfloat16)``, ``x.half()``)
    without losing its precision; autocast already leaves float64 alone.
    """

    _LOWER = (torch.float32, torch.float16, torch.bfloat16)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        this = args[0] if args else None
        if isinstance(this, torch.Tensor) and this.dtype == torch.float64:
            if func in (torch.Tensor.bfloat16, torch.Tensor.half, torch.Tensor.float):
                return this
            if func in (torch.Tensor.to, torch.Tensor.type):
                args = tuple(torch.float64 if a in self._LOWER or a in _LOWER_NAMES else
                             (a.device if isinstance(a, torch.Tensor) and a.dtype in self._LOWER else a)
                             for a in args)
                if kwargs.get("dtype") in self._LOWER:
                    kwargs["dtype"] = torch.float64
            if func is torch.Tensor.type_as and isinstance(args[1], torch.Tensor) and args[1].dtype in self._LOWER:
                return this
        return func(*args, **kwargs)


_LOWER_NAMES = ("torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor", "torch.float32", "torch.float16",
                "torch.bfloat16")


def apply_overrides(roles: Roles, overrides: Mapping[str, str]) -> Roles:
    """Return ``roles`` with every parameter matching a pattern forced to its role."""
    roles = copy.deepcopy(roles)
    for pattern, role in overrides.items():
        if role not in ROLES:
            raise FixNormError(f"unknown role {role!r} for override {pattern!r}; choose one of {ROLES}")
        matched = [n for n in roles.shapes if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise FixNormError(f"override pattern {pattern!r} matches no parameter; names look like "
                               f"{list(roles.shapes)[:4]}")
        if role in (ROLE_FILTER, ROLE_TENSOR, ROLE_CLASSIFIER):
            # "head.*" -> classifier means the head's weights; its bias stays as it is
            matched = [n for n in matched if len(roles.shapes[n]) >= 2]
            if not matched:
                raise FixNormError(f"override {pattern!r} gives the role {role!r}, which needs a weight with "
                                   "ndim >= 2, but it matches only 1-D parameters")
        for name in matched:
            roles.scale_invariant.pop(name, None)
            if name in roles.classifier:
                roles.classifier.remove(name)
            if role in (ROLE_FILTER, ROLE_TENSOR):
                roles.scale_invariant[name] = role
            elif role == ROLE_CLASSIFIER:
                roles.classifier.append(name)
            roles.reasons[name] = f"override {pattern!r} -> {role} (measured: {roles.reasons[name]})"
        # a group is jointly invariant only as a whole: an override on any member leaves the rest alone
        roles.joint = [group for group in roles.joint if not set(group) & set(matched)]
    return roles


def refuse_lazy_parameters(named: Mapping[str, torch.Tensor]) -> None:
    """A lazy module's parameters have no shape or values until its first forward: nothing to measure or hold."""
    lazy = [n for n, p in named.items() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise FixNormError(f"parameter(s) {lazy[:6]} are not initialised yet (a Lazy module): run the model once "
                           "on a batch, model(example), before building the optimizer")


@dataclass(frozen=True)
class ExampleInputs:
    """A batch the model is called on: ``model(*args, **kwargs)``."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any]

    @staticmethod
    def of(example_inputs: Any) -> ExampleInputs:
        """A tensor, a non-empty tuple or list of tensors (positional), or a mapping of keyword inputs."""
        if isinstance(example_inputs, torch.Tensor):
            return ExampleInputs((example_inputs,), {})
        if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
                isinstance(x, torch.Tensor) for x in example_inputs):
            return ExampleInputs(tuple(example_inputs), {})
        if isinstance(example_inputs, Mapping) and any(isinstance(v, torch.Tensor) for v in example_inputs.values()):
            if not all(isinstance(k, str) for k in example_inputs):
                raise FixNormError("example_inputs as a mapping must have string keys (forward's argument names)")
            return ExampleInputs((), dict(example_inputs))
        raise FixNormError("example_inputs must be a tensor or a non-empty tuple of tensors passed as "
                           "model(*example_inputs), or a mapping with at least one tensor passed as "
                           f"model(**example_inputs); got {type(example_inputs).__name__}")

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *(v for v in self.kwargs.values() if isinstance(v, torch.Tensor))]

    def to_float64(self) -> ExampleInputs:
        """Floating-point tensors in float64; integer ones (token ids, masks) and non-tensors as they are."""
        def wide(x: Any) -> Any:
            return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        return ExampleInputs(tuple(wide(x) for x in self.args), {k: wide(v) for k, v in self.kwargs.items()})

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def call_text(self) -> str:
        return "model(**example_inputs)" if self.kwargs else "model(*example_inputs)"


def _analysis_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A train-mode copy in ``dtype`` (None: as it is) with every norm eps shrunk (invariance is meant as eps -> 0)."""
    try:
        work = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any failure here is the user's model
        raise FixNormError(f"could not copy the model for analysis ({exc}); pass roles= to skip it") from exc
    work = (work.to(dtype) if dtype is not None else work).train()
    for module in work.modules():
        eps = getattr(module, "eps", None)
        if isinstance(eps, float) and eps > 0:
            module.eps = min(eps, 1e-12)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            module.sparse = False  # the same output; the analysis reshapes gradients, which sparse ones refuse
    for p in work.parameters():
        p.requires_grad_(p.is_floating_point())
    return work


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, Iterable) and not isinstance(out, (str, bytes)):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


class _Probe:
    """Runs the float64 copy with identical randomness and buffers on every call."""

    def __init__(self, model: nn.Module, inputs: ExampleInputs, seed: int, keep_float64: bool = False):
        self.model, self.inputs, self.seed, self.keep_float64 = model, inputs, seed, keep_float64
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}
        self.devices = sorted({x.device.index for x in inputs.tensors() if x.device.type == "cuda"})
        with torch.no_grad():
            self.perturb()
            self.reference = self.forward_vector()
        if self.reference.numel() == 0:
            raise FixNormError("the model returned no floating-point tensor for the example input")
        if not torch.isfinite(self.reference).all():
            raise FixNormError("the model's output on the example input is not finite (a BatchNorm over a "
                               "single value? use a batch of at least 2 with spatial size > 1)")
        self.reference_dtype = self.reference_raw_dtype
        self.scale = float(self.reference.abs().max()) or 1.0
        self.final_homogeneous: set[str] = set()  # filled by trace_graph

    def perturb(self) -> None:
        """Move every parameter to a generic point so no zero or symmetric value hides a dependence."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        for p in self.model.parameters():
            if p.is_floating_point():
                rms = float(p.double().pow(2).mean().sqrt()) if p.numel() else 0.0
                wide = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32  # randn in bf16 rounds
                noise = torch.randn(p.shape, generator=gen, dtype=wide).to(p.device)
                p.add_((noise * (0.2 * rms + 0.05)).to(p.dtype))

    def run(self) -> Any:
        for n, b in self.model.named_buffers():
            b.copy_(self.buffers[n])
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            try:
                with _KeepFloat64() if self.keep_float64 else contextlib.nullcontext():
                    return self.inputs.call(self.model)
            except Exception as exc:  # noqa: BLE001 - report the user's model error with context
                raise FixNormError(f"{self.inputs.call_text()} failed during analysis: {exc}") from exc

    def forward_vector(self) -> torch.Tensor:
        outs = _flatten_outputs(self.run())
        if not outs:
            return torch.zeros(0)
        self.reference_raw_dtype = max((o.dtype for o in outs), key=lambda d: torch.finfo(d).eps)
        return torch.cat([o.reshape(-1).double() for o in outs])  # compared in float64 whatever the model's dtype

    def deviation(self) -> float:
        with torch.no_grad():
            out = self.forward_vector()
        if out.shape != self.reference.shape:
            return math.inf
        diff = (out - self.reference).abs().max()
        return float(diff) / self.scale if torch.isfinite(diff) else math.inf

    def radial_derivatives(self, params: dict[str, torch.Tensor], names: list[str]) -> dict[str, tuple[float, float]]:
        """Per weight: the output's derivative along each filter's own direction (the largest) and the tensor's.

        One backward pass of a random projection ``r . y``; each derivative is divided by ``|r| * max|y|``
        so it reads as a relative output change per unit of log-scale. Exactly 0 for invariant weights.
        """
        gen = torch.Generator().manual_seed(self.seed + 3)
        with torch.enable_grad():
            outs = _flatten_outputs(self.run())
            vector = torch.cat([o.reshape(-1).double() for o in outs])
            r = torch.randn(vector.shape, generator=gen, dtype=torch.float64).to(vector.device)
            tensors = [params[n] for n in names]
            grads = torch.autograd.grad((vector * r).sum(), tensors, allow_unused=True) if vector.requires_grad \
                else [None] * len(tensors)
        norm = float(r.norm()) * self.scale
        result = {}
        for name, p, g in zip(names, tensors, grads):
            if g is None:
                result[name] = (0.0, 0.0)
                continue
            per_filter = (p.detach() * g).double().reshape(p.shape[0], -1).sum(1)
            result[name] = (float(per_filter.abs().max()) / norm, float(per_filter.sum().abs()) / norm)
        return result

    def signed_radial_derivatives(self, params: dict[str, torch.Tensor], names: list[str],
                                  probes: int) -> torch.Tensor:
        """``(len(names), probes)``: ``<w, d(r_k . y)/dw>`` for random projections ``r_k``, one backward each.

        By Euler's theorem the rows of a set of weights whose common scaling leaves the output unchanged sum to
        zero for every ``r_k``; relative to ``max|y|`` like :meth:`radial_derivatives`."""
        gen = torch.Generator().manual_seed(self.seed + 4)
        tensors = [params[n] for n in names]
        out = torch.zeros(len(names), probes, dtype=torch.float64)
        with torch.enable_grad():
            vector = torch.cat([o.reshape(-1).double() for o in _flatten_outputs(self.run())])
            if not vector.requires_grad:
                return out
            for k in range(probes):
                r = torch.randn(vector.shape, generator=gen, dtype=torch.float64).to(vector.device)
                grads = torch.autograd.grad((vector * r).sum(), tensors, allow_unused=True, retain_graph=True)
                for i, (p, g) in enumerate(zip(tensors, grads)):
                    if g is not None:
                        out[i, k] = float((p.detach() * g).double().sum()) / (float(r.norm()) * self.scale)
        return out

    def trace_graph(self, params: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
        """Names of parameters the output depends on, and of the final-layer weights."""
        by_id = {id(p): n for n, p in params.items()}
        module_outputs: dict[Any, list[str]] = {}

        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            # by identity, not by the module's path: a tied weight (``head.weight = emb.weight``) has one name in
            # named_parameters(), the first module's
            weights = [by_id[id(v)] for v in module._parameters.values()
                       if v is not None and v.ndim >= 2 and id(v) in by_id]
            for t in _flatten_outputs(out):
                if t.grad_fn is not None:
                    module_outputs.setdefault(t.grad_fn, []).extend(weights)

        handles = []
        for module in self.model.modules():
            # a layer's output stands for its weights only where nothing else computes it: a module with children
            # (the model itself with a cls_token or pos_embed, a block with a bias table) returns what its children
            # computed, so its own weights are found where an op consumes them (_consumed_weights), not at its output
            if next(module.children(), None) is not None:
                continue
            if any(v is not None and v.ndim >= 2 for v in module._parameters.values()):
                handles.append(module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                outs = _flatten_outputs(self.run())
        finally:
            for h in handles:
                h.remove()
        roots = [o.grad_fn for o in outs if o.grad_fn is not None]
        used = _reachable_params(roots, by_id)
        final = _final_weights(roots, by_id, module_outputs)
        self.final_homogeneous = _final_homogeneous(roots, params)
        return used, {n for n in final if params[n].ndim >= 2}


def _children(node: Any) -> list[Any]:
    return [c for c, _ in getattr(node, "next_functions", ()) if c is not None]


def _walk(roots: list[Any], visit: Callable[[Any], bool]) -> None:
    """Depth-first over the autograd graph; ``visit(node)`` returns whether to go on past the node."""
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if visit(node):
            stack.extend(_children(node))


def _reachable_params(roots: list[Any], by_id: dict[int, str]) -> set[str]:
    used: set[str] = set()

    def visit(node: Any) -> bool:
        var = getattr(node, "variable", None)
        if var is not None and id(var) in by_id:
            used.add(by_id[id(var)])
        return True

    _walk(roots, visit)
    return used


def _consumed_weights(node: Any, by_id: dict[int, str]) -> list[str]:
    """Weights (ndim >= 2) a node consumes directly, looking through reshapes and casts."""
    found, stack = [], _children(node)
    while stack:
        child = stack.pop()
        var = getattr(child, "variable", None)
        if var is not None:
            if id(var) in by_id and var.ndim >= 2:
                found.append(by_id[id(var)])
        elif type(child).__name__.rstrip("0123456789") in _PASS_THROUGH_NODES:
            stack.extend(_children(child))
    return found


def _final_weights(roots: list[Any], by_id: dict[int, str], module_outputs: dict[Any, list[str]]) -> set[str]:
    """Walk back from the outputs and stop at the first weight-bearing op on every path."""
    final: set[str] = set()

    def visit(node: Any) -> bool:
        weights = module_outputs.get(node) or _consumed_weights(node, by_id)
        if weights:
            final.update(weights)
            return False
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) in by_id and var.ndim >= 2:
                final.add(by_id[id(var)])
            return False
        return True

    _walk(roots, visit)
    return final


# -- the final homogeneous sub-network (LAWN) ---------------------------------------------------
# Explicit allow-lists: an autograd node not named here stops the walk (the sub-network ends after it).
# Positively homogeneous of degree 1 in their one tensor input (ReLU(c x) = c ReLU(x) for c > 0):
_HOMOGENEOUS_UNARY_NODES = _PASS_THROUGH_NODES + (
    "ReluBackward", "LeakyReluBackward", "NegBackward", "NativeDropoutBackward", "MeanBackward", "SumBackward",
    "MaxPool1DWithIndicesBackward", "MaxPool2DWithIndicesBackward", "MaxPool3DWithIndicesBackward",
    "AvgPool2DBackward", "AvgPool3DBackward", "AdaptiveAvgPool2DBackward", "AdaptiveAvgPool3DBackward",
    "AdaptiveMaxPool2DBackward", "AdaptiveMaxPool3DBackward", "IndexBackward", "RepeatBackward", "FlipBackward",
    "SplitBackward", "SplitWithSizesBackward", "UnbindBackward", "UnsafeSplitBackward", "NarrowBackward",
)
# sums: homogeneous when every summand has the same degree (a 1-D parameter, a bias, counts as zero)
_SUM_NODES = ("AddBackward", "SubBackward", "CatBackward", "StackBackward")
# multilinear in their operands: the degrees add up; a weight operand adds 1
_PRODUCT_NODES = ("MulBackward", "MmBackward", "BmmBackward", "MvBackward", "DotBackward")
# (summand index, product indices): addmm(bias, x, W^T) and convolution(x, W, bias)
_AFFINE_NODES = {"AddmmBackward": (0, (1, 2)), "BaddbmmBackward": (0, (1, 2)), "AddmvBackward": (0, (1, 2)),
                 "ConvolutionBackward": (2, (0, 1))}


def _node_kind(node: Any) -> str:
    return type(node).__name__.rstrip("0123456789")


def _final_homogeneous(roots: list[Any], params: dict[str, torch.Tensor]) -> set[str]:
    """Weights (ndim >= 2) of the final homogeneous sub-network, walking back from the outputs.

    Every node gets a degree k and a set of weights S such that its value is positively
    homogeneous of degree k in S (biases at zero), given the values where the walk stopped:
    a normalisation, a non-homogeneous op (sigmoid, SiLU, GELU, ReLU6, softmax, division by
    a tensor, ...) or any node not on the allow-lists above. A node whose inputs disagree on
    the degree (``x + W2 relu(W1 x)`` without a norm), or whose stopped values depend on S
    (a squeeze-excite gate computed from its own input, a weight shared with the body),
    becomes a stop itself: the sub-network is only what lies after it.
    """
    bit = {id(p): 1 << i for i, p in enumerate(params.values())}
    names = list(params)
    ndims = {id(p): p.ndim for p in params.values()}
    reach_memo: dict[Any, int] = {}

    def reach(start: Any) -> int:
        """Bitmask of the parameters ``start``'s value depends on."""
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in reach_memo:
                continue
            children = _children(node)
            if not expanded:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in reach_memo)
                continue
            var = getattr(node, "variable", None)
            mask = bit.get(id(var), 0) if var is not None else 0
            for c in children:
                mask |= reach_memo[c]
            reach_memo[node] = mask
        return reach_memo[start]

    # a result is ("leaf", var) for a parameter seen through reshapes and casts, or
    # ("h", degree or None (a zero-able bias: any degree), weights mask, mask of the parameters the stops read)
    CONST = ("h", 0, 0, 0)

    def stop(node: Any) -> tuple:
        return ("h", 0, 0, reach(node))

    def as_factor(r: tuple) -> tuple:
        if r[0] == "leaf":
            var = r[1]
            return ("h", 1, bit[id(var)], 0) if ndims[id(var)] >= 2 else CONST
        return ("h", r[1] or 0, r[2], r[3])

    def as_summand(r: tuple) -> tuple:
        if r[0] == "leaf":
            return ("h", None, 0, 0) if ndims[id(r[1])] < 2 else CONST
        return r

    def as_value(r: tuple) -> tuple:
        return CONST if r[0] == "leaf" else r

    def checked(node: Any, degree: int | None, weights: int, tainted: int) -> tuple:
        return stop(node) if weights & tainted else ("h", degree, weights, tainted)

    def combine_sum(node: Any, parts: list[tuple]) -> tuple:
        degrees = {p[1] for p in parts if p[1] is not None}
        if len(degrees) > 1:
            return stop(node)
        weights = tainted = 0
        for p in parts:
            weights, tainted = weights | p[2], tainted | p[3]
        return checked(node, degrees.pop() if degrees else None, weights, tainted)

    def combine_product(node: Any, parts: list[tuple]) -> tuple:
        weights = tainted = degree = 0
        for p in parts:
            degree, weights, tainted = degree + (p[1] or 0), weights | p[2], tainted | p[3]
        return checked(node, degree, weights, tainted)

    memo: dict[Any, tuple] = {}

    def inputs(node: Any) -> list[Any]:
        return [c for c, _ in getattr(node, "next_functions", ())]

    def result(child: Any) -> tuple:
        return CONST if child is None else memo[child]

    def evaluate(node: Any) -> tuple:
        kind = _node_kind(node)
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: a parameter, or an input that requires grad (a constant here)
            return ("leaf", var) if id(var) in bit else CONST
        args = inputs(node)
        if kind in _AFFINE_NODES:
            summand, factors = _AFFINE_NODES[kind]
            if len(args) <= max(summand, *factors):
                return stop(node)
            product = combine_product(node, [as_factor(result(args[i])) for i in factors])
            return combine_sum(node, [product, as_summand(result(args[summand]))])
        if kind in _PRODUCT_NODES:
            return combine_product(node, [as_factor(result(c)) for c in args])
        if kind in _SUM_NODES:
            return combine_sum(node, [as_summand(result(c)) for c in args])
        if kind == "DivBackward" and len(args) == 2 and args[1] is None and args[0] is not None:
            return as_value(result(args[0]))  # division by a constant
        if kind in _HOMOGENEOUS_UNARY_NODES and len([c for c in args if c is not None]) == 1:
            child = result(next(c for c in args if c is not None))
            return child if kind in _PASS_THROUGH_NODES else as_value(child)
        return stop(node)

    def walks_into(node: Any) -> bool:
        kind = _node_kind(node)
        return (kind in _AFFINE_NODES or kind in _PRODUCT_NODES or kind in _SUM_NODES or kind == "DivBackward"
                or kind in _HOMOGENEOUS_UNARY_NODES)

    stack = [(r, False) for r in roots]
    while stack:
        node, expanded = stack.pop()
        if node in memo:
            continue
        if not expanded and walks_into(node):
            stack.append((node, True))
            stack.extend((c, False) for c in inputs(node) if c is not None and c not in memo)
            continue
        memo[node] = evaluate(node)
    tops = [as_value(memo[r]) for r in roots]
    weights = tainted = 0
    for top in tops:
        weights, tainted = weights | top[2], tainted | top[3]
    if len({top[1] for top in tops if top[1] is not None}) > 1 or weights & tainted:
        return set()  # several outputs of different degrees, or outputs that read each other's sub-network
    return {names[i] for i in range(len(names)) if weights >> i & 1 and params[names[i]].ndim >= 2}


def _joint_groups(probe: _Probe, tester: _GroupTester, params: dict[str, torch.Tensor],
                  names: list[str]) -> list[tuple[list[str], float]]:
    """The smallest groups of ``names`` (weights not scale-invariant alone) that are jointly scale-invariant.

    The radial derivatives of a jointly invariant group sum to zero for every output projection, so the
    groups' indicator vectors span the left null space of the derivative matrix (one column per random
    projection, a few more columns than weights). Weights of one minimal group have equal rows in any basis of
    that space, weights of none have zero rows: the groups are read off the rows, and each is then checked by
    scaling it by one common factor. A weight whose derivative also ties it to weights outside a group
    (two linear maps in a row) blurs the rows; that group then fails the check and stays free.
    """
    if len(names) < 2:
        return []
    derivatives = probe.signed_radial_derivatives(params, names, probes=len(names) + 4)
    if not bool(torch.isfinite(derivatives).all()) or float(derivatives.abs().max()) == 0:
        return []
    left, singular, _ = torch.linalg.svd(derivatives, full_matrices=True)
    small = torch.ones(len(names), dtype=torch.bool)  # rows past the rank have singular value 0
    small[: len(singular)] = singular <= 1e-8 * singular[0]
    basis = left[:, small]
    if basis.shape[1] == 0:
        return []
    rows = basis / basis.norm(dim=1).max()
    members = [i for i in range(len(names)) if float(rows[i].norm()) > 1e-6]
    found: list[tuple[list[str], float]] = []
    while members:
        first = members[0]
        same = [i for i in members if float((rows[i] - rows[first]).norm()) <= 1e-6]
        members = [i for i in members if i not in same]
        group = [names[i] for i in same]
        if len(group) < 2:
            continue
        dev = tester.joint_deviation(group)
        if dev <= tester.rtol:
            found.append((group, dev))
    return found


def _module_groups(names: list[str]) -> list[list[str]]:
    """Names grouped by their path with every index replaced: ``features.3.se.reduce.weight`` -> ``features.*.se...``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"(^|\.)\d+(?=\.)", r"\1*", name), []).append(name)
    return list(groups.values())


class _GroupTester:
    """Scales groups of weights by random positive factors and bisects failing groups."""

    def __init__(self, probe: _Probe, params: dict[str, torch.Tensor], rtol: float, seed: int):
        self.probe, self.params, self.rtol = probe, params, rtol
        self.gen = torch.Generator().manual_seed(seed + 2)

    def deviation(self, names: list[str], per_filter: bool) -> float:
        saved = {n: self.params[n].detach().clone() for n in names}
        try:
            with torch.no_grad():
                for n in names:
                    p = self.params[n]
                    shape = (p.shape[0],) + (1,) * (p.ndim - 1) if per_filter else (1,)
                    # log-uniform factors in [1/4, 4]: far from 1, so a dependence shows clearly
                    log_f = (torch.rand(shape, generator=self.gen, dtype=torch.float64) * 2 - 1) * math.log(4)
                    p.mul_(log_f.exp().to(p.device))
            return self.probe.deviation()
        finally:
            with torch.no_grad():
                for n in names:
                    self.params[n].copy_(saved[n])

    def joint_deviation(self, names: list[str]) -> float:
        """The output change when every weight of ``names`` is scaled by one common factor (worst of 1/3 and 3)."""
        saved = {n: self.params[n].detach().clone() for n in names}
        worst = 0.0
        try:
            for factor in (1 / 3, 3.0):
                with torch.no_grad():
                    for n in names:
                        self.params[n].copy_(saved[n] * factor)
                worst = max(worst, self.probe.deviation())
            return worst
        finally:
            with torch.no_grad():
                for n in names:
                    self.params[n].copy_(saved[n])

    def search(self, names: list[str], per_filter: bool) -> tuple[dict[str, float], dict[str, float]]:
        """All names scaled at once; if that fails, each module group (``_module_groups``), bisecting failures.

        Weights of one module repeated at every depth (every block's SE convs) mostly share their role, so
        a group passes or fails as a whole and the bisection stays inside the groups that hold failures.
        """
        if not names:
            return {}, {}
        dev = self.deviation(names, per_filter)
        if dev <= self.rtol:
            return {n: dev for n in names}, {}
        groups = _module_groups(names)
        if len(groups) == 1:
            return self.bisect(names, per_filter, known=dev)
        accepted: dict[str, float] = {}
        rejected: dict[str, float] = {}
        for group in groups:
            a, r = self.bisect(group, per_filter)
            accepted.update(a)
            rejected.update(r)
        return accepted, rejected

    def bisect(self, names: list[str], per_filter: bool,
               known: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """(accepted name -> deviation of its passing group, rejected name -> its own deviation).

        ``known``: the deviation of ``names`` as a whole, when already measured.
        """
        accepted: dict[str, float] = {}
        rejected: dict[str, float] = {}
        stack = [names]
        while stack:
            group = stack.pop()
            dev = known if known is not None and group is names else self.deviation(group, per_filter)
            if dev <= self.rtol:
                accepted.update({n: dev for n in group})
            elif len(group) == 1:
                rejected[group[0]] = dev
            elif len(group) <= 3:
                stack.extend([n] for n in group)
            else:
                half = len(group) // 2
                stack.extend([group[:half], group[half:]])
        return accepted, rejected
