"""Magnitude masks and R_p against their definitions (fixnorm.compress)."""
import pytest
import torch
from torch import nn

from fixnorm import FixNormError
from fixnorm.compress import iterative_sparsity, magnitude_masks, prunable_weights, weight_correlation
from fixnorm.models import create_model
from fixnorm.rules import Mask, attach


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(10, 7, generator=g), "b": torch.randn(4, 3, 3, 3, generator=g) * 3}


def test_layerwise_masks_prune_exactly_the_stated_count_smallest_first():
    w = weights()
    masks = magnitude_masks(w, 0.37, scope="layer")
    for name, weight in w.items():
        pruned = ~masks[name]
        assert int(pruned.sum()) == round(0.37 * weight.numel())
        assert weight.abs()[pruned].max() <= weight.abs()[masks[name]].min()  # every pruned weight is a smallest one


def test_global_masks_prune_the_stated_count_over_all_layers_and_break_ties_by_position():
    w = weights()
    masks = magnitude_masks(w, 0.5, scope="global")
    total = sum(v.numel() for v in w.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)
    kept = torch.cat([w[n].abs().flatten()[masks[n].flatten()] for n in w])
    pruned = torch.cat([w[n].abs().flatten()[~masks[n].flatten()] for n in w])
    assert pruned.max() <= kept.min()
    ties = {"t": torch.ones(2, 4)}  # all equal: the first ones go first, exactly the count, no extra
    assert magnitude_masks(ties, 0.25)["t"].flatten().tolist() == [False, False] + [True] * 6


def test_iterative_masks_are_nested_and_reach_the_compound_sparsity():
    w, rate = weights(1), 0.2
    masks = None
    for k in range(1, 5):
        new = magnitude_masks(w, iterative_sparsity(rate, k), scope="global", previous=masks)
        if masks is not None:
            assert all(not bool((new[n] & ~masks[n]).any()) for n in w)  # nested: nothing pruned comes back
        total = sum(v.numel() for v in w.values())
        assert sum(int(m.sum()) for m in new.values()) == total - round((1 - (1 - rate) ** k) * total)
        masks = new
    with pytest.raises(FixNormError, match="only tighten"):
        magnitude_masks(w, 0.1, scope="global", previous=masks)


def test_the_first_conv_is_left_out_when_asked():
    model = create_model("resnet20", num_classes=10, in_channels=1)
    every = prunable_weights(model)
    without = prunable_weights(model, exclude_first_conv=True)
    assert set(every) - set(without) == {"stem.0.weight"} and "fc.weight" in without


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
                                  lambda ps: torch.optim.Adam(ps, lr=0.01)])
def test_masks_hold_under_any_optimizer(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    named = prunable_weights(model)
    masks = magnitude_masks(named, 0.6, scope="layer")
    optimizer = make(model.parameters())
    attach(optimizer, [Mask(list(named.values()), [masks[n] for n in named], names=list(named))], name="mask")
    for _ in range(20):
        optimizer.zero_grad()
        model(torch.randn(8, 6)).pow(2).sum().backward()
        optimizer.step()
    for name, weight in named.items():
        assert torch.all(weight[~masks[name]] == 0) and torch.all(weight[masks[name]] != 0)


def test_weight_correlation_by_definition():
    w = weights(2)
    for p in (0.1, 0.3, 0.5):
        assert weight_correlation(w, w, p) == 1.0
        assert weight_correlation(w, {k: -v for k, v in w.items()}, p) == 1.0
    g = torch.Generator().manual_seed(3)
    a, b = {"x": torch.randn(100_000, generator=g)}, {"x": torch.randn(100_000, generator=g)}
    for p in (0.1, 0.3, 0.5):
        assert abs(weight_correlation(a, b, p) - p) < 0.01
    # a toy by hand: top-2 of [4, 3, 2, 1] is {0, 1}; of [1, 5, 4, 0] is {1, 2}: overlap 1 of 2
    assert weight_correlation({"t": torch.tensor([4.0, 3, 2, 1])}, {"t": torch.tensor([1.0, 5, 4, 0])}, 0.5) == 0.5
    with pytest.raises(FixNormError, match="p must be"):
        weight_correlation(w, w, 0)
