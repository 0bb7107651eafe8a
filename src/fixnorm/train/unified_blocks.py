"""Unify files and runs that retrain with blocks unified or pruned (``unify_from``), the part-B analogue of masks.py.

A unify file holds, per weight name, a block shape and a tile-grid assignment (FREE, UNIFIED, PRUNED; see
:mod:`fixnorm.compress`), written atomically by whoever chose it (``fixnorm unify``, with the exact projection). A
run with ``unify_from`` projects its starting weights (after ``init_from``, before the method analyses the model):
unified blocks to ``mean|b| * sign(b)``, pruned blocks to zero. Then, whatever optimizer the method builds:

- held entries (pruned blocks; unified blocks too, unless ``unify_magnitudes``) get zero gradients as they are
  computed, and the :class:`HoldBlocks` rule writes their values back after every step (weight decay or a norm
  rule may have moved them): they are bitwise their starting values;
- with ``unify_magnitudes`` each unified block keeps one trainable magnitude a (w = a * s, signs s fixed): its
  gradient becomes ``s_i * sum_j s_j g_j``, the gradient of a, so SGD (momentum, weight decay) and Adam update the
  block exactly as they would a parameter a, keeping every |w| of the block equal; after each step a < 0 is set to 0
  (signs fixed).

The rule's tensors (held mask, values, signs) ride in the optimizer state, so a resumed run continues bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress import FREE, PRUNED, UNIFIED, Block, block_dims, block_sums, expand_blocks, project_blocks, tile_grid
from ..errors import FixNormError
from ..io import atomic_write, load_tagged_state
from ..rules import Attachment, DeviceFlags, Rule, attach
from .masks import parameters_named_by

FORMAT = "fixnorm-unify"


@dataclass(frozen=True)
class UnifiedLayer:
    """One weight's blocks: their shape and the tile-grid assignment (int8 FREE / UNIFIED / PRUNED)."""

    dims: Block
    assignment: torch.Tensor


def save_unify_file(path: str | Path, layers: Mapping[str, UnifiedLayer], **about: Any) -> None:
    """Write ``layers`` atomically; ``about`` records how they were chosen (plain values)."""
    if not layers or not all(isinstance(v, UnifiedLayer) for v in layers.values()):
        raise FixNormError("a unify file needs a non-empty mapping of weight name -> UnifiedLayer")
    state = {"format": FORMAT, "version": 1, "about": dict(about),
             "layers": {n: {"block": list(v.dims), "assignment": v.assignment.detach().to(torch.int8).cpu().clone()}
                        for n, v in layers.items()}}
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_unify_file(path: str | Path) -> tuple[dict[str, UnifiedLayer], dict[str, Any]]:
    """The layers of a file :func:`save_unify_file` wrote and its ``about`` (read without unpickling code)."""
    state = load_tagged_state(path, FORMAT, "layers", kind="unify", setting="unify_from",
                              writer="`fixnorm unify` (fixnorm.train.unified_blocks.save_unify_file)")
    layers = {}
    for name, entry in state["layers"].items():
        block = entry.get("block") if isinstance(entry, dict) else None
        assignment = entry.get("assignment") if isinstance(entry, dict) else None
        if not (isinstance(block, list) and len(block) == 2 and isinstance(assignment, torch.Tensor)):
            raise FixNormError(f"{path}: the entry of {name!r} is not a block shape and an assignment tensor")
        layers[name] = UnifiedLayer((int(block[0]), int(block[1])), assignment)
    return layers, dict(state.get("about") or {})


def checked_layers(layers: Mapping[str, UnifiedLayer], model: nn.Module,
                   source: str = "the unify file") -> dict[str, UnifiedLayer]:
    """``layers`` if each names a parameter of ``model`` and its assignment fits that parameter's tile grid."""
    params = parameters_named_by(layers, model, source, "layers")
    wrong = []
    for name, layer in layers.items():
        shape = params[name].shape
        dims = block_dims(layer.dims, shape)
        a = layer.assignment
        if a.dtype != torch.int8 or tuple(a.shape) != tile_grid(shape, dims) or not bool(
                ((a == FREE) | (a == UNIFIED) | (a == PRUNED)).all()):
            wrong.append(f"{name}: {a.dtype} {tuple(a.shape)}, expected int8 codes 0/1/2 on the "
                         f"{tile_grid(shape, dims)} grid of {dims[0]}x{dims[1]} blocks of {tuple(shape)}")
    if wrong:
        raise FixNormError(f"{source} does not fit this model ({'; '.join(wrong[:4])})")
    return {n: layers[n] for n in params if n in layers}  # in model order


@torch.no_grad()
def project_layers_(model: nn.Module, layers: Mapping[str, UnifiedLayer]) -> None:
    """Unified blocks to ``mean|b| * sign(b)``, pruned blocks to zero, in place: the projected starting weights."""
    params = dict(model.named_parameters())
    for name, layer in layers.items():
        params[name].copy_(project_blocks(params[name], layer.dims, layer.assignment))


class HoldBlocks(Rule):
    """After every step: held entries back to their values; trainable-magnitude entries kept on their signs.

    ``held`` (bool) and ``values`` are shaped like each parameter; ``signs`` (int8) is +1 / -1 on the entries of a
    block with a trainable magnitude and 0 elsewhere. A magnitude that turned negative is set to zero.
    """

    state_fields = ("held", "values", "signs")

    def __init__(self, params: list[torch.Tensor], held: list[torch.Tensor], values: list[torch.Tensor],
                 signs: list[torch.Tensor], *, names: list[str]) -> None:
        self.params, self.names = list(params), list(names)
        if not self.params or not len(held) == len(values) == len(signs) == len(self.params) == len(self.names):
            raise FixNormError("HoldBlocks needs a held mask, values and signs (and a name) per parameter")
        self.held = [self._fit(t, p, n, "held", torch.bool) for t, p, n in zip(held, self.params, self.names)]
        self.values = [self._fit(t, p, n, "values", p.dtype) for t, p, n in zip(values, self.params, self.names)]
        self.signs = [self._fit(t, p, n, "signs", torch.int8) for t, p, n in zip(signs, self.params, self.names)]
        self.has_magnitudes = [bool((s != 0).any()) for s in self.signs]  # the gradient hook's fast path

    @staticmethod
    def _fit(tensor: Any, p: torch.Tensor, name: str, what: str, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.shape != p.shape:
            raise FixNormError(f"the {what} of {name!r} must be a {dtype} tensor of shape {tuple(p.shape)}")
        return tensor.to(p.device).clone()

    @torch.no_grad()
    def _apply(self) -> None:
        for i, p in enumerate(self.params):
            if self.held[i].device != p.device:  # the model moved after attach
                self.held[i], self.values[i], self.signs[i] = (t.to(p.device) for t in
                                                               (self.held[i], self.values[i], self.signs[i]))
            p.copy_(torch.where(self.held[i], self.values[i], p))
            if self.has_magnitudes[i]:
                p.copy_(torch.where(self.signs[i] * p < 0, torch.zeros_like(p), p))

    def on_attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._apply()

    def apply_(self, step: int, flags: DeviceFlags) -> None:
        self._apply()

    def param_state(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {"held": h.clone(), "values": v.clone(), "signs": s.clone()}
                for i, (h, v, s) in enumerate(zip(self.held, self.values, self.signs))}

    def load_param_state(self, entries: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        if set(entries) != set(range(len(self.params))) or not all(set(self.state_fields) <= set(e)
                                                                    for e in entries.values()):
            raise FixNormError("the saved unified blocks do not match this rule's parameters")
        for i, (p, n) in enumerate(zip(self.params, self.names)):
            self.held[i] = self._fit(entries[i]["held"], p, n, "held", torch.bool)
            self.values[i] = self._fit(entries[i]["values"], p, n, "values", p.dtype)
            self.signs[i] = self._fit(entries[i]["signs"], p, n, "signs", torch.int8)
        self.has_magnitudes = [bool((s != 0).any()) for s in self.signs]


def attach_unified(model: nn.Module, optimizer: torch.optim.Optimizer, layers: Mapping[str, UnifiedLayer], *,
                   trainable_magnitudes: bool = False) -> Attachment:
    """Retrain ``model`` (already projected) with ``layers`` held: the :class:`HoldBlocks` rule after every step of
    ``optimizer`` (attached as ``unify``) and each gradient shaped as it is computed (module docstring)."""
    params = dict(model.named_parameters())
    names = list(layers)
    held, values, signs = [], [], []
    for name in names:
        p, layer = params[name], layers[name]
        kind = expand_blocks(layer.assignment.to(p.device), p.shape, layer.dims)
        magnitude = (kind == UNIFIED) if trainable_magnitudes else torch.zeros_like(kind, dtype=torch.bool)
        held.append((kind == PRUNED) | ((kind == UNIFIED) & ~magnitude))
        values.append(torch.where(held[-1], p.detach(), torch.zeros_like(p)))
        signs.append(torch.where(magnitude, torch.where(p.detach() >= 0, 1, -1), 0).to(torch.int8))
    rule = HoldBlocks([params[n] for n in names], held, values, signs, names=names)
    attachment = attach(optimizer, [rule], name="unify", names={params[n]: n for n in names})
    for i, name in enumerate(names):  # the rule's tensors, read at each backward: a resumed run's, on their device
        dims = layers[name].dims
        params[name].register_hook(lambda grad, i=i, dims=dims: _shaped_gradient(grad, rule, i, dims))
    return attachment


def _shaped_gradient(grad: torch.Tensor, rule: HoldBlocks, i: int, dims: Block) -> torch.Tensor:
    """Zero on held entries; ``s_i * sum_j s_j g_j`` over a trainable-magnitude block (the gradient of its a)."""
    held, signs = rule.held[i].to(grad.device), rule.signs[i].to(grad.device)
    shaped = torch.where(held, torch.zeros_like(grad), grad)
    if not rule.has_magnitudes[i]:
        return shaped
    s = signs.to(grad.dtype)
    return torch.where(signs != 0, s * block_sums(s * grad, dims), shaped)
