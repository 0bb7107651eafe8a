"""timm's optimizer factory: the call it makes (param groups + keywords), and the real registry where timm imports."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixnorm
from fixnorm import FixNormError
from fixnorm.integrations import register_timm, timm_optimizer


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5))
    return model, torch.randn(8, 3, 8, 8)


def timm_groups(model, weight_decay=0.0):
    """The groups timm's param_groups_weight_decay builds: 1-D parameters without decay, the rest with it."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def train_steps(opt, model, batch, steps=3):
    y = torch.arange(len(batch)) % 5
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(batch), y).backward()
        opt.step()


def test_the_call_timm_makes_builds_fixnorm_and_holds_the_norms():
    model, batch = model_and_batch()
    norm0 = float(model[0].weight.norm())
    # what create_optimizer_v2(model, "fixnorm", lr=0.1, model=model, example_inputs=batch) hands the class
    opt = timm_optimizer(timm_groups(model), lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=True, model=model,
                         example_inputs=batch, free_steps=0)  # held from the first step: 3 steps are checked
    assert isinstance(opt, fixnorm.FixNorm) and opt.param_groups[0]["momentum"] == 0.9
    train_steps(opt, model, batch)
    assert float(model[0].weight.norm()) == pytest.approx(norm0, rel=1e-5)
    # an Adam base: timm's default momentum and our nesterov are dropped, betas go through
    model, batch = model_and_batch()
    adam = timm_optimizer(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, betas=(0.8, 0.9),
                          base=torch.optim.Adam, model=model, example_inputs=batch)
    assert adam.param_groups[0]["betas"] == (0.8, 0.9)
    train_steps(adam, model, batch)


def test_what_timm_cannot_hand_fixnorm_is_a_clear_error():
    model, batch = model_and_batch()
    with pytest.raises(FixNormError, match="model=model"):
        timm_optimizer(timm_groups(model), lr=0.1)
    with pytest.raises(FixNormError, match="weight_decay"):
        timm_optimizer(timm_groups(model, 1e-4), lr=0.1, model=model, example_inputs=batch)
    with pytest.raises(FixNormError, match="layer_decay"):
        timm_optimizer([{"params": list(model.parameters()), "lr_scale": 0.5}], lr=0.1, model=model,
                       example_inputs=batch)
    with pytest.raises(FixNormError, match="exactly the model's trainable parameters"):
        timm_optimizer([{"params": list(model[0].parameters())}], lr=0.1, model=model, example_inputs=batch)
    # the run's length travels as one more keyword: a run inside the free phase is refused at the factory
    with pytest.raises(FixNormError, match="takes 50 optimizer steps"):
        timm_optimizer(timm_groups(model), lr=0.1, model=model, example_inputs=batch, total_steps=50)


def test_create_optimizer_v2_builds_fixnorm_by_name():
    """Only where timm imports (it needs a torchvision built for the installed torch)."""
    timm_optim = pytest.importorskip("timm.optim")
    register_timm()
    model, batch = model_and_batch()
    norm0 = float(model[0].weight.norm())
    opt = timm_optim.create_optimizer_v2(model, "fixnorm", lr=0.1, model=model, example_inputs=batch)
    assert isinstance(opt, fixnorm.FixNorm) and opt.param_groups[0]["nesterov"] is True
    train_steps(opt, model, batch)
    assert float(model[0].weight.norm()) == pytest.approx(norm0, rel=1e-5)
    adamw = timm_optim.create_optimizer_v2(model, "fixnorm", lr=1e-3, base=torch.optim.AdamW, model=model,
                                           example_inputs=batch)
    assert isinstance(adamw.base, torch.optim.AdamW)
