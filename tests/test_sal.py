"""SAL against its definitions: the multiplier update, the penalty of a satisfied constraint, and that violations
shrink over training on a toy problem; the method on the engine."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixnorm import FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.methods.sal import NormConstraints, SALSettings
from fixnorm.train import Trainer, load_recipe, make_config, train
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


def test_multipliers_follow_dual_ascent_and_the_penalty_its_formula():
    a, b = nn.Parameter(torch.full((2, 2), 1.0)), nn.Parameter(torch.full((3, 1), 1.0))  # |a|^2 = 4, |b|^2 = 3
    c = NormConstraints([a, b], torch.tensor([2.0, 6.0]), rho=0.5)  # g = 4/2 - 1 = 1 (violated), 3/6 - 1 = -1/2
    assert torch.allclose(c.values(), torch.tensor([1.0, -0.5]))
    assert float(c.penalty().detach()) == pytest.approx(0.5 / 2 * 1.0 ** 2)  # only the violated one, mu = 0
    violation = c.dual_step()
    assert torch.allclose(c.mu, torch.tensor([0.5, 0.0])) and float(violation) == 1.0  # max(0, 0 + rho g)
    c.mu = torch.tensor([0.5, 0.4])
    c.dual_step()
    assert torch.allclose(c.mu, torch.tensor([1.0, 0.15]))  # 0.5 + 0.5 * 1, max(0, 0.4 - 0.25)
    # (rho/2)[max(0, g + mu/rho)^2 - (mu/rho)^2] per constraint
    expected = 0.25 * ((1 + 2.0) ** 2 - 2.0 ** 2) + 0.25 * (max(0.0, -0.5 + 0.3) ** 2 - 0.3 ** 2)
    assert float(c.penalty().detach()) == pytest.approx(expected)
    with pytest.raises(FixNormError, match="positive"):
        NormConstraints([a], torch.tensor([0.0]), rho=1.0)


def test_a_satisfied_constraint_leaves_the_loss_and_its_gradient_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    c = NormConstraints([layer.weight], layer.weight.detach().pow(2).sum()[None] * 4, rho=2.0)  # bound 2x the norm
    ce = F.cross_entropy(layer(x), y)
    assert float(c.penalty().detach()) == 0.0
    (g_plain,) = torch.autograd.grad(ce, layer.weight, retain_graph=True)
    (g_sal,) = torch.autograd.grad(ce + c.penalty(), layer.weight)
    assert torch.equal(g_plain, g_sal)


def test_violations_shrink_over_training_on_a_toy_problem():
    """Separable data: cross-entropy alone grows the weights without end; the constraint pulls them back."""
    torch.manual_seed(1)
    x = torch.randn(128, 6)
    y = (x[:, 0] > 0).long()
    free, bounded = nn.Linear(6, 2), nn.Linear(6, 2)
    bounded.load_state_dict(free.state_dict())
    bound = free.weight.detach().pow(2).sum()[None]
    c = NormConstraints([bounded.weight], bound, rho=1.0)
    opt_free = torch.optim.SGD(free.parameters(), lr=0.1)
    opt_bounded = torch.optim.SGD(bounded.parameters(), lr=0.1)  # (at lr 0.5 with rho 1 the norm oscillates)
    violations = []
    for step in range(3000):
        for model, opt, extra in ((free, opt_free, None), (bounded, opt_bounded, c)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y) + (extra.penalty() if extra is not None else 0)
            loss.backward()
            opt.step()
        violations.append(float(c.dual_step()))
    free_g = float(free.weight.detach().pow(2).sum() / bound - 1)
    assert free_g > 1  # unconstrained: the norm keeps growing
    early = max(violations[:300])
    assert early > 0.01 and sum(violations[-500:]) / 500 < 0.01 * early
    assert float(c.mu) > 0 and abs(float(c.values().detach())) < 1e-3  # active: held at the bound by mu > 0


@needs_fmnist
def test_method_trains_records_and_resumes_bit_for_bit(tmp_path):
    cfg = make_config(load_recipe("fmnist-smoke"), {"method": "sal", "train_subset": 600, "holdout": 500, "threads": 1})
    straight = train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "resumed", epoch=1)
    assert Trainer(None, tmp_path / "resumed", resume=True).fit()["final_test_acc"] == straight["final_test_acc"]
    trainer = Trainer(cfg, tmp_path / "fresh")
    assert all(g.get("weight_decay", 0) == 0 for g in trainer.optimizer.param_groups)
    assert cfg.method_kwargs.get("sal") is None and trainer.cfg.method_kwargs["sal"]["rho"] == SALSettings().rho
    with pytest.raises(FixNormError, match="method_kwargs.sal"):
        make_config(cfg.to_dict(), {"method_kwargs": {"sal": {"rho": 0}}})
