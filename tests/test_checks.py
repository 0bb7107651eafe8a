"""The warning for a base optimizer that normalises weights itself, checked against what the real optimizer does."""
import warnings

import pytest
import torch
from torch import nn

from fixnorm.checks import base_normalizes_weights, warn_if_base_normalizes


def neuron_norms_after_a_step(opt_cls, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    opt = opt_cls(model.parameters(), lr=0.01, **options)
    model(torch.randn(8, 5)).square().mean().backward()
    opt.step()
    return opt, model[0].weight.detach().norm(dim=1)


def test_nero_normalises_and_is_named_only_when_it_does():
    nero = pytest.importorskip("pytorch_optimizer").Nero
    opt, norms = neuron_norms_after_a_step(nero)  # constraints=True by default
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # what the warning claims, observed
    assert "Nero projects every neuron" in base_normalizes_weights(opt)
    assert base_normalizes_weights(nero) is not None  # the class with its defaults
    with pytest.warns(UserWarning, match="constraints=False"):
        assert warn_if_base_normalizes(opt)

    opt, norms = neuron_norms_after_a_step(nero, constraints=False)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    assert base_normalizes_weights(opt) is None and base_normalizes_weights(nero, {"constraints": False}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_base_normalizes(opt)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop])
def test_torch_optimizers_leave_norms_alone_and_get_no_warning(cls):
    opt, norms = neuron_norms_after_a_step(cls)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_base_normalizes(opt) and not warn_if_base_normalizes(cls)
