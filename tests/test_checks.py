"""The warning for a base optimizer that normalises weights itself, checked against what the real optimizer does."""
import copy
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


class PreLNBlockNet(nn.Module):
    """A pre-LN transformer's shape in miniature: a LayerNorm before each linear map, none after, so no weight but
    the classifier is anything FixNorm can hold."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.norm1, self.fc1 = nn.LayerNorm(width), nn.Linear(width, width)
        self.norm2, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc1(torch.relu(self.norm1(x)))
        x = x + self.fc2(torch.relu(self.norm2(x)))
        return self.head(x)


def adam_steps(model, opt, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_model_fixnorm_cannot_hold_is_warned_about_and_trains_as_the_base_without_decay():
    """The warning's claim, observed: where no weight is scale-invariant, FixNorm over Adam is Adam without weight
    decay, bit for bit; ``free_weights`` counts exactly the weights the plan leaves with nothing on their norm."""
    from fixnorm import FixNorm
    from fixnorm.checks import free_weights

    torch.manual_seed(0)
    model = PreLNBlockNet()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"controls no norm for 93% of this model's weight elements \(embed.weight, "
                                         r"fc1.weight, fc2.weight\).*Adam without weight decay"):
        opt = FixNorm(model, torch.randn(16, 8), base=torch.optim.Adam, lr=1e-2)
    share, names = free_weights(opt.plan, {n for n, _ in model.named_parameters()})
    assert names == ["embed.weight", "fc1.weight", "fc2.weight"]
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.ndim >= 2}
    assert share == pytest.approx(sum(sizes[n] for n in names) / sum(sizes.values()))
    adam_steps(model, opt)
    adam_steps(reference, torch.optim.Adam(reference.parameters(), lr=1e-2))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_weights_fixnorm_holds_or_decays_are_not_warned_about():
    from fixnorm import FixNorm

    torch.manual_seed(0)
    held = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FixNorm(held, torch.randn(4, 3, 8, 8), lr=0.1, momentum=0.9)  # every conv held, the classifier its own role
        FixNorm(PreLNBlockNet(), torch.randn(16, 8), base=torch.optim.Adam, lr=1e-2, others="decay",
                others_weight_decay=0.01)  # the free weights decayed, as the warning suggests
