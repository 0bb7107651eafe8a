"""FixNorm against its definitions: norms held, angle per step, resume bit for bit, torch.optim compatibility."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixnorm
from fixnorm import FixNorm as _FixNorm
from fixnorm import FixNormError, constrained_parameters, from_weight_decay
from fixnorm.models import create_model
from fixnorm.rules import HoldNorms, equilibrium_norms


def FixNorm(*args, free_steps=0, **kwargs):  # noqa: N802
    """Rules from the first step: these tests check holding and turning; the free phase has tests of its own."""
    return _FixNorm(*args, free_steps=free_steps, **kwargs)


def small_net(seed=0, bias=False):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def train(model, opt, data, scheduler=None):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().detach())


BASES = [
    (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {"lr": 0.05}),
    (torch.optim.AdamW, {"lr": 0.05}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9}),
]


@pytest.mark.parametrize("base, kwargs", BASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("granularity", ["tensor", "filter"])
def test_constrained_norms_equal_their_targets_after_training(base, kwargs, granularity):
    model = small_net()
    x = torch.randn(4, 1, 8, 8)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = FixNorm(model, x, base=base, fc_norm=3.0, granularity=granularity, **kwargs)
    train(model, opt, batches(8))
    params = dict(model.named_parameters())
    for name in ("0.weight", "3.weight"):
        p, p0 = params[name], initial[name]
        if granularity == "filter":
            got, want = p.flatten(1).norm(dim=1), p0.flatten(1).norm(dim=1)
        else:
            got, want = p.norm(), p0.norm()
        assert rel_err(got, want) < 1e-6, name
        assert not torch.allclose(p, p0)  # it did move, on the sphere
    assert abs(float(params["8.weight"].detach().norm()) - 3.0) / 3.0 < 1e-6
    # AdamW's default weight_decay=0.01 never reaches the constrained groups
    assert all(g.get("weight_decay", 0.0) == 0.0 for g in opt.param_groups)


def test_classifier_norm_per_class_and_constant_target():
    model = small_net()
    opt = FixNorm(model, torch.randn(4, 1, 8, 8), lr=0.3, fc_norm=2.0, fc_granularity="class", target=5.0,
                  granularity="filter")
    train(model, opt, batches(4))
    fc = model[8].weight
    assert torch.allclose(fc.norm(dim=1), torch.full((4,), 2.0 / 2.0), rtol=1e-6)  # 2 / sqrt(4 classes)
    assert abs(float(fc.norm()) - 2.0) < 2e-6
    conv = model[3].weight
    assert torch.allclose(conv.flatten(1).norm(dim=1), torch.full((8,), 5.0 / math.sqrt(8)), rtol=1e-6)


def tangential(g, w):
    return g - (g * w).sum() / (w * w).sum() * w


def angle_between(a, b):
    """Angle in radians, in float64 with atan2 (arccos of a float32 cosine is useless for small angles)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    along = (a @ b) / b.norm()
    across = (a - along * b / b.norm()).norm()
    return float(torch.atan2(across, along))


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_angle_per_sgd_step_is_lr_over_norm_squared_times_unit_gradient(scale):
    """Plain SGD on a scale-invariant weight of norm r turns it by atan(lr |g_t| / r) = atan(lr/r^2 |g~|)."""
    model = small_net()
    with torch.no_grad():
        model[3].weight.mul_(scale)
    x, y = batches(1)[0]
    opt = FixNorm(model, x, lr=0.2)
    w = model[3].weight
    w0 = w.detach().clone()
    F.cross_entropy(model(x), y).backward()
    g_t = tangential(w.grad, w0)
    r = w0.norm()
    # gradient at unit norm: scale invariance makes the gradient scale as 1/r
    unit_grad = g_t.norm() * r
    opt.step()
    angle = angle_between(w, w0)
    expected = float(torch.atan(0.2 / r ** 2 * unit_grad))
    assert abs(angle - expected) / expected < 1e-4
    assert float(w.grad.flatten() @ w0.flatten()) / float(w.grad.norm() * r) < 1e-4  # the gradient is tangential


def test_effective_lr_scales_as_one_over_norm_squared():
    angles = []
    for scale in (1.0, 2.0):
        model = small_net()
        with torch.no_grad():
            model[3].weight.mul_(scale)
        x, y = batches(1)[0]
        opt = FixNorm(model, x, lr=0.01)
        w0 = model[3].weight.detach().clone()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        w = model[3].weight
        angles.append(angle_between(w, w0))
    assert abs(angles[1] / angles[0] - 0.25) < 2e-3


def save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("base, kwargs", [BASES[0], BASES[2]], ids=["SGD", "Adam"])
def test_resume_is_bit_identical(base, kwargs):
    data = batches(8)
    model = small_net(seed=0)
    opt = FixNorm(model, data[0][0], base=base, fc_norm=2.0, **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    train(model, opt, data[:4], sched)
    checkpoint = save_and_load({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})

    # a fresh model with another init: targets must come from the checkpoint, not from these weights
    resumed = small_net(seed=123)
    opt2 = FixNorm(resumed, data[0][0], base=base, fc_norm=2.0, **kwargs)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=8)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])

    train(model, opt, data[4:], sched)
    train(resumed, opt2, data[4:], sched2)
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_state_dict_without_targets_is_an_error():
    model = small_net()
    opt = FixNorm(model, torch.randn(4, 1, 8, 8), lr=0.1)
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(FixNormError, match="no norm targets"):
        opt.load_state_dict(plain)
    other = FixNorm(small_net(), torch.randn(4, 1, 8, 8), lr=0.1, granularity="filter").state_dict()
    with pytest.raises(FixNormError, match="wrong shape"):
        opt.load_state_dict(other)


def test_lr_schedulers_drive_the_base_optimizer():
    model = small_net()
    opt = FixNorm(model, torch.randn(4, 1, 8, 8), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    train(model, opt, batches(4), sched)
    assert all(abs(g["lr"] - 0.001) < 1e-12 for g in opt.base.param_groups)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    warm.step()
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * 0.2) for g in opt.param_groups)


def test_grad_scaler_steps_and_skips_overflowed_steps():
    model = small_net()
    x, y = batches(1)[0]
    opt = FixNorm(model, x, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # an overflow: GradScaler must skip the step, FixNorm must not raise
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model[3].weight.grad[0, 0, 0, 0] = float("inf")
    after_first = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(after_first, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 7


def test_step_hooks_closure_and_zero_grad():
    model = small_net()
    x, y = batches(1)[0]
    opt = FixNorm(model, x, lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append(float(model[3].weight.norm())))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    target = float(model[3].weight.norm())
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and seen[0] == "pre"
    assert abs(seen[1] - target) / target < 1e-6  # post hooks see the projected weight
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_base_without_parameter_groups_is_a_clear_error():
    with pytest.raises(FixNormError, match="does not accept parameter groups"):
        FixNorm(small_net(), torch.randn(4, 1, 8, 8), base=torch.optim.LBFGS, lr=0.1)


def test_add_param_group_free_and_constrained():
    model = small_net()
    opt = FixNorm(model, torch.randn(4, 1, 8, 8), lr=0.1)
    extra_free = nn.Parameter(torch.randn(3, 3))
    extra_fixed = nn.Parameter(torch.randn(5, 4))
    opt.add_param_group({"params": [extra_free]})
    opt.add_param_group({"params": [extra_fixed], "constraint": "filter", "target_norm": 2.0})
    (extra_free.sum() + (extra_fixed ** 3).sum()).backward()
    opt.step()
    # target_norm is the whole tensor's norm; per filter it is split equally: 2 / sqrt(5) per row
    assert torch.allclose(extra_fixed.norm(dim=1), torch.full((5,), 2.0 / math.sqrt(5)), rtol=1e-6)
    with pytest.raises(FixNormError, match="weight_decay"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "constraint": "tensor",
                             "weight_decay": 1e-4})
    with pytest.raises(FixNormError, match="unknown constraint"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "constraint": "sphere"})


def test_weight_decay_on_constrained_weights_is_an_error():
    model = small_net()
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(FixNormError, match="weight_decay"):
        FixNorm(model, x, lr=0.1, weight_decay=5e-4)
    opt = FixNorm(model, x, lr=0.1)
    opt.param_groups[0]["weight_decay"] = 1e-4
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(FixNormError, match="weight_decay"):
        opt.step()


def test_others_policies():
    x = torch.randn(4, 1, 8, 8)
    model = small_net(bias=False)
    opt = FixNorm(model, x, lr=0.1, others="decay", others_weight_decay=1e-3)
    decayed = [g for g in opt.param_groups if g["role"] == "other"]
    assert decayed and all(g["weight_decay"] == 1e-3 for g in decayed)
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["constraint"])
    with pytest.raises(FixNormError, match="only used with others='decay'"):
        FixNorm(model, x, lr=0.1, others_weight_decay=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"granularity": "row"}, "unknown granularity"),
    ({"fc_granularity": "row"}, "unknown fc_granularity"),
    ({"others": "frozen"}, "unknown others"),
    ({"nonfinite": "ignore"}, "unknown nonfinite"),
    ({"target": -1.0}, "target must be"),
    ({"fc_norm": 0.0}, "fc_norm must be"),
    ({"momentun": 0.9}, "rejected the options"),
    ({"angular_update": 2.0}, "angular_update"),
])
def test_unknown_or_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(FixNormError, match=match):
        FixNorm(small_net(), torch.randn(4, 1, 8, 8), lr=0.1, **kwargs)


def test_bad_constructor_arguments():
    with pytest.raises(FixNormError, match="example_inputs"):
        FixNorm(small_net(), lr=0.1)
    with pytest.raises(FixNormError, match="nn.Module"):
        FixNorm(list(small_net().parameters()), torch.randn(4, 1, 8, 8), lr=0.1)
    with pytest.raises(FixNormError, match="base must be"):
        FixNorm(small_net(), torch.randn(4, 1, 8, 8), base="sgd", lr=0.1)
    roles = fixnorm.analyze(small_net(), torch.randn(4, 1, 8, 8))
    with pytest.raises(FixNormError, match="do not match"):
        FixNorm(nn.Linear(3, 2), roles=roles, lr=0.1)


def test_lazy_module_before_its_first_forward_is_a_clear_error():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.LazyLinear(4))
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(FixNormError, match=r"\['0.weight', '0.bias', '5.weight', '5.bias'\] are not initialised"):
        FixNorm(model, x, lr=0.1)
    model(x)  # the way out the message names
    assert FixNorm(model, x, lr=0.1).roles.role("0.weight") == "filter"


def test_zero_norm_weight_at_construction_is_an_error():
    model = small_net()
    with torch.no_grad():
        model[3].weight[2].zero_()
    with pytest.raises(FixNormError, match="zero or non-finite norm.*filters \\[2\\]"):
        FixNorm(model, torch.randn(4, 1, 8, 8), lr=0.1, granularity="filter")


@pytest.mark.parametrize("name", ["3.weight", "8.bias"])  # a constrained weight, an unconstrained bias
def test_nan_gradient_is_a_clear_error_naming_the_parameter(name):
    model = small_net()
    x, y = batches(1)[0]
    opt = FixNorm(model, x, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    dict(model.named_parameters())[name].grad.view(-1)[0] = float("nan")
    with pytest.raises(FixNormError, match=f"'{name}'.*(non-finite gradient|non-finite norm)"):
        opt.step()


class SparseBag(nn.Module):
    """Embedding rows normalised by a LayerNorm (scale-invariant row by row), trained with sparse gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.ln, self.out = nn.Embedding(20, 8, sparse=True), nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, tokens):
        return self.out(self.ln(self.emb(tokens)).mean(1))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_sparse_gradient_of_a_held_weight_is_refused_before_the_step(nonfinite):
    model, tokens, labels = SparseBag(), torch.randint(0, 20, (8, 5)), torch.randint(0, 4, (8,))
    roles = fixnorm.analyze(model, tokens)  # the analysis itself takes dense gradients
    assert roles.role("emb.weight") == "filter"
    opt = FixNorm(model, tokens, lr=0.1, nonfinite=nonfinite)
    F.cross_entropy(model(tokens), labels).backward()
    before = model.emb.weight.detach().clone()
    with pytest.raises(FixNormError, match=r"\['emb.weight'\] got a sparse gradient.*sparse=False"):
        opt.step()
    assert torch.equal(model.emb.weight, before)  # refused before the base optimizer moved anything
    # the way out the message names: the layer left to the base optimizer, which takes sparse gradients
    with pytest.warns(UserWarning, match="controls no norm"):
        opt = FixNorm(model, roles=fixnorm.analyze(model, tokens, overrides={"emb.weight": "other"}), lr=0.1,
                      nonfinite=nonfinite)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(tokens), labels).backward()
        opt.step()
    assert not torch.equal(model.emb.weight, before)


def test_skip_mode_counts_and_never_makes_a_nan_weight():
    model = small_net()
    x, y = batches(1)[0]
    opt = FixNorm(model, x, lr=0.1, momentum=0.9, nonfinite="skip")
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0, 0, 0] = float("nan")
    opt.step()
    assert opt.skipped_count == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # a weight that became zero is left alone, not divided by zero
    with torch.no_grad():
        model[0].weight.zero_()
    for group in opt.param_groups:
        group["lr"] = 0.0  # the base step leaves the zero weight at zero; the projection must not divide by it
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.skipped_count == 2 and torch.equal(model[0].weight, torch.zeros_like(model[0].weight))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_norm_during_training_raises_in_raise_mode():
    model = small_net()
    x, y = batches(1)[0]
    opt = FixNorm(model, x, lr=0.0)
    with torch.no_grad():
        model[0].weight.zero_()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FixNormError, match="0.weight.*zero or non-finite norm"):
        opt.step()
    assert torch.isfinite(model[0].weight).all()


def test_bf16_weights_keep_their_norm_with_fp32_accumulation():
    model = small_net().to(torch.bfloat16)
    x, y = batches(1)[0]
    opt = FixNorm(model, x.to(torch.bfloat16), lr=0.1, momentum=0.9)
    target = float(opt.norm_targets()["3.weight"])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        opt.step()
    assert opt.norm_targets()["3.weight"].dtype == torch.float32
    assert abs(float(model[3].weight.float().norm()) - target) / target < 1e-2  # bf16 rounding of the weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_never_synchronises_with_the_host_on_cuda():
    model = small_net().cuda()
    x, y = (t.cuda() for t in batches(1)[0])
    opt = FixNorm(model, x, lr=0.1, momentum=0.9)
    assert_last_step_never_synchronises(model, opt, x, y, steps=2)  # the first creates the momentum buffers


def assert_last_step_never_synchronises(model, opt, x, y, steps):
    """Take ``steps`` steps, the last under ``torch.cuda.set_sync_debug_mode("error")``."""
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.cuda.set_sync_debug_mode("error" if step == steps - 1 else "default")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    opt.check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_joint_hold_step_never_synchronises_with_the_host_on_cuda():
    """The joint rule's index tensors are copied once; its projection and drift then stay on the device."""
    from test_roles import TinyPreAct

    torch.manual_seed(0)
    model = TinyPreAct().cuda()
    x, y = (t.cuda() for t in batches(1)[0])
    opt = _FixNorm(model, x, lr=0.1, momentum=0.9, free_steps=1, joint="hold")
    # momentum buffers, the norms taken (a sync, once), the first drift step; then one step under the check
    assert_last_step_never_synchronises(model, opt, x, y, steps=3)


def test_from_weight_decay_matches_the_equilibrium_of_sgd_with_weight_decay():
    """Train SGD+WD to equilibrium, measure its angular update, and compare with the formula and FixNorm."""
    lr, wd, momentum = 0.5, 0.02, 0.9
    settings = from_weight_decay(lr, wd, momentum)
    assert settings["angular_update"] == pytest.approx(math.sqrt(2 * lr * wd / (1 + momentum)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32, affine=False), nn.ReLU(),
                          nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(4096, 16, generator=g), torch.randint(0, 4, (4096,), generator=g)
    sgd = torch.optim.SGD([{"params": [model[0].weight], "weight_decay": wd},
                           {"params": model[3].parameters(), "weight_decay": 0.0}], lr=lr, momentum=momentum)
    angles = []
    for step in range(1500):
        idx = torch.randint(0, 4096, (64,), generator=g)
        w0 = model[0].weight.detach().clone()
        sgd.zero_grad()
        F.cross_entropy(model(xs[idx]), ys[idx]).backward()
        sgd.step()
        if step >= 1000:
            w = model[0].weight.detach()
            angles.append(angle_between(w, w0))
    measured = sum(angles) / len(angles)
    assert measured == pytest.approx(settings["angular_update"], rel=0.05)  # measured here: 0.1026 vs 0.1026

    # FixNorm in angular mode turns by exactly that angle each step
    opt = FixNorm(model, xs[:64], **settings)
    w0 = model[0].weight.detach().clone()
    F.cross_entropy(model(xs[:64]), ys[:64]).backward()
    opt.step()
    w = model[0].weight.detach()
    angle = angle_between(w, w0)
    assert angle == pytest.approx(settings["angular_update"], rel=1e-4)
    assert float(w.norm()) == pytest.approx(float(w0.norm()), rel=1e-6)


def test_angular_update_follows_the_lr_schedule():
    model = small_net()
    x, y = batches(1)[0]
    opt = FixNorm(model, x, lr=0.1, angular_update=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    w0 = model[3].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    w = model[3].weight.detach()
    angle = angle_between(w, w0)
    assert angle == pytest.approx(0.005, rel=1e-4)


@pytest.mark.parametrize("bad", [(0.0, 1e-4, 0.9), (0.1, -1.0, 0.9), (0.1, 1e-4, 1.0)])
def test_from_weight_decay_rejects_bad_values(bad):
    with pytest.raises(FixNormError):
        from_weight_decay(*bad)


def test_plan_table_and_repr_name_every_parameter():
    model = create_model("resnet20", num_classes=10, in_channels=1)
    opt = FixNorm(model, torch.randn(2, 1, 16, 16), lr=0.1, fc_norm=4.0)
    text = repr(opt)
    for name, _ in model.named_parameters():
        assert name in text
    assert "fc_norm=4" in text and "fix norm per tensor" in text
    names = [n for n, _ in constrained_parameters(opt)]
    assert "fc.weight" in names and all(not n.endswith("bias") for n in names)


def test_is_a_torch_optimizer_and_pickles():
    model = small_net()
    opt = FixNorm(model, torch.randn(4, 1, 8, 8), lr=0.1, momentum=0.9)
    assert isinstance(opt, torch.optim.Optimizer)
    copied = copy.deepcopy(opt)
    assert len(copied.param_groups) == len(opt.param_groups)


@pytest.mark.parametrize("granularity", ["tensor", "filter"])
def test_free_phase_follows_the_base_optimizer_then_holds_the_norms_it_reached(granularity):
    """free_steps=k: k plain base steps for "initial" targets (bitwise), then those norms are held (fixed: no
    drift)."""
    data = batches(8)
    model, reference = small_net(seed=0), small_net(seed=0)
    opt = FixNorm(model, data[0][0], granularity=granularity, free_steps=3, norm_drift=None, lr=0.5, momentum=0.9)
    plain = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    train(model, opt, data[:3])
    train(reference, plain, data[:3])
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    params = dict(model.named_parameters())
    def norms(name):  # the classifier (8.weight) is held per tensor unless fc_granularity="class"
        per_filter = granularity == "filter" and name != "8.weight"
        return fixnorm.constraints.filter_norms(params[name]) if per_filter else params[name].norm()

    reached = {n: norms(n) for n in ("0.weight", "3.weight", "8.weight")}
    initial = small_net(seed=0).state_dict()
    assert abs(float(reached["3.weight"].sum()) - float(initial["3.weight"].norm())) > 1e-3  # it did move
    train(model, opt, data[3:])
    for name, value in reached.items():
        now = norms(name)
        torch.testing.assert_close(now, value.reshape(now.shape), rtol=1e-5, atol=0)


def test_free_phase_holds_explicit_targets_from_the_first_step():
    data = batches(4)
    model = small_net()
    opt = FixNorm(model, data[0][0], fc_norm=3.0, free_steps=10, lr=0.5, momentum=0.9)
    train(model, opt, data)
    assert abs(float(model[8].weight.norm()) - 3.0) < 1e-5
    assert any(abs(float(model[i].weight.norm()) - float(small_net()[i].weight.norm())) > 1e-3 for i in (0, 3))


@pytest.mark.parametrize("drift,ceiling,extra", [
    (None, None, {}), (3, None, {}), (3, 3e-2, {}), ("auto", "auto", {"base": torch.optim.Adam, "lr": 0.01}),
    (None, None, {"fc_free_steps": 5}), ("auto", 5e-3, {"drift_follows_lr": True}),
    ("auto", 5e-3, {"drift_signal": "growth"})],
    ids=["fixed", "drifting", "ceiling", "adam-free-classifier", "classifier-later", "weight-decay", "growth"])
def test_resume_inside_and_after_the_free_phase_is_bit_identical(drift, ceiling, extra):
    settings = {"free_steps": 4, "norm_drift": drift, "equilibrium_wd": ceiling, "lr": 0.5, "momentum": 0.9}
    if extra.get("base") is torch.optim.Adam:
        del settings["momentum"]
    settings.update(extra)
    assert_resumes_bit_identically(small_net, settings)


def assert_resumes_bit_identically(make_model, settings, stops=(2, 6)):
    """Train 8 steps; stopped after each of ``stops`` (inside the 4-step free phase and after it), saved and resumed
    into a model initialised otherwise, the run ends bit for bit where the uninterrupted one does."""
    data = batches(8)
    for stop in stops:
        model = make_model(seed=0)
        opt = FixNorm(model, data[0][0], **settings)
        train(model, opt, data[:stop])
        checkpoint = save_and_load({"model": model.state_dict(), "opt": opt.state_dict()})
        resumed = make_model(seed=7)
        opt2 = FixNorm(resumed, data[0][0], **settings)
        resumed.load_state_dict(checkpoint["model"])
        opt2.load_state_dict(checkpoint["opt"])
        train(model, opt, data[stop:])
        train(resumed, opt2, data[stop:])
        for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
            assert torch.equal(a, b), (stop, name)


def test_nan_gradient_during_the_free_phase_is_a_clear_error():
    model = small_net()
    x, y = batches(1)[0]
    opt = FixNorm(model, x, free_steps=5, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(fixnorm.errors.NonFiniteError, match="3.weight"):
        opt.step()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_free_steps_must_be_a_whole_number(bad):
    with pytest.raises(FixNormError, match="free_steps"):
        FixNorm(small_net(), torch.randn(2, 1, 8, 8), free_steps=bad, lr=0.1)


def test_a_run_that_ends_inside_the_free_phase_is_refused_and_a_long_one_warned():
    """A run of k steps with free_steps=k is the base optimizer without weight decay: it is refused, naming the
    setting; a free phase over a quarter of the run is warned about; the classifier's own phase is checked too."""
    model = small_net()
    x, y = batches(1)[0]
    opt = _FixNorm(model, x, lr=0.5, momentum=0.9)  # the defaults: 100 free steps for both roles over SGD
    with pytest.raises(FixNormError, match=r"takes 100 optimizer steps .* free_steps=100: they would never be held"):
        opt.check_horizon(100)
    with pytest.warns(UserWarning, match="covers 99% of this 101-step run"):
        opt.check_horizon(101)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.check_horizon(400)
    # the premise: within the free phase the weights train exactly as the base optimizer's
    reference = copy.deepcopy(model)
    plain = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    data = batches(3)
    train(model, opt, data)
    train(reference, plain, data)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))

    classifier_only = _FixNorm(small_net(), x, free_steps=0, fc_free_steps=50, lr=0.5, momentum=0.9)
    with pytest.raises(FixNormError, match="the classifier.s norm after fc_free_steps=50: it would never be held"):
        classifier_only.check_horizon(50)
    classifier_only.check_horizon(1000)
    # over Adam the classifier stays free ("auto"), and free_steps=0 holds the rest from the first step
    _FixNorm(small_net(), x, base=torch.optim.Adam, free_steps=0, lr=1e-3).check_horizon(1)
    for bad in (0, 2.5, True):
        with pytest.raises(FixNormError, match="total_steps"):
            opt.check_horizon(bad)
    # a factory (timm, the HF Trainer) passes the run's length to the constructor: the same check, at once
    with pytest.raises(FixNormError, match=r"takes 60 optimizer steps .* free_steps=100"):
        _FixNorm(small_net(), x, lr=0.5, momentum=0.9, total_steps=60)
    with pytest.warns(UserWarning, match="covers 50% of this 200-step run"):
        _FixNorm(small_net(), x, lr=0.5, momentum=0.9, total_steps=200)
    with pytest.raises(FixNormError, match="total_steps"):
        _FixNorm(small_net(), x, lr=0.5, momentum=0.9, total_steps=0)


def test_a_free_phase_is_counted_in_full_lr_steps_through_a_linear_warmup():
    """A warm-up step at a fraction of the lr counts as that fraction of a free step: against the definition, and in a
    loop of one's own with a LambdaLR warm-up (the norms are taken at the stretched step, and not before)."""
    def by_definition(k, w):  # the fewest steps whose lr factors min(1, (t + 1) / w) add up to k
        steps, mass = 0, 0.0
        while mass < k - 1e-9:
            mass += min(1.0, (steps + 1) / w) if w else 1.0
            steps += 1
        return steps
    for k in (0, 1, 6, 100):
        for w in (0, 0.5, 1, 2.5, 10, 99, 235, 1000):
            assert fixnorm.steps_through_warmup(k, w) == by_definition(k, w), (k, w)
    assert fixnorm.steps_through_warmup(100, 235) == 217  # fmnist-tune's 1-epoch warm-up
    with pytest.raises(FixNormError, match="warmup_steps"):
        fixnorm.steps_through_warmup(100, -1)

    model, data = small_net(), batches(12)
    reference = copy.deepcopy(model)
    warmup = 10  # 6 full-lr steps: 10 warm-up steps add up to 5.5, the 11th (at the full lr) completes them
    opt = _FixNorm(model, data[0][0], lr=0.5, momentum=0.9, free_steps=6, warmup_steps=warmup,
                   lr_power=1, fc_max_step=None)  # the schedule unbent, no cap: the free steps are plain SGD's
    plain = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / warmup)) for o in (opt, plain)]
    train(model, opt, data[:10], schedules[0])
    train(reference, plain, data[:10], schedules[1])
    assert opt.norm_targets() == {}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    train(model, opt, data[10:11], schedules[0])
    assert set(opt.norm_targets()) == {n for n, _ in constrained_parameters(opt)}
    with pytest.raises(FixNormError, match="takes 11 optimizer steps .* free_steps=6 full-lr steps, 11 steps "
                                           "through the 10-step warm-up"):
        opt.check_horizon(11)
    with pytest.raises(FixNormError, match="before the first step"):
        opt.count_warmup(20)
    opt.count_warmup(warmup)  # the same warm-up again changes nothing


def test_the_warmup_count_is_sgds_law_and_warmup_count_sets_it_over_any_base():
    """'auto' counts the free phase through a warm-up over SGD only (over Adam the count cost accuracy, docs/fixnorm.md):
    over Adam the norms are taken after free_steps steps whatever the warm-up, as without one; True counts over Adam,
    False ignores the warm-up over SGD; anything else is refused."""
    data = batches(12)

    for base, kwargs, counted in ((torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}, True),
                                  (torch.optim.Adam, {"lr": 0.05}, False)):
        for setting, expected in (("auto", counted), (True, True), (False, False)):
            model = small_net()
            opt = _FixNorm(model, data[0][0], base=base, free_steps=6, warmup_steps=10, warmup_count=setting, **kwargs)
            assert opt.warmup_count is expected and opt.warmup_steps == 10
            for steps, batch in enumerate(data, 1):  # bounded: a phase that never ends fails, it does not hang
                train(model, opt, [batch])
                if opt.norm_targets():
                    break
            assert opt.norm_targets(), (base.__name__, setting)
            assert steps == (11 if expected else 6), (base.__name__, setting)  # 10 warm-up steps add up to 5.5
            if not expected:  # a phase ignoring the warm-up is checked as one of free_steps steps
                with pytest.raises(FixNormError, match=r"takes 6 optimizer steps .* free_steps=6: "):
                    opt.check_horizon(6)
    for bad in ("yes", 1, 0, None, 1.0):
        with pytest.raises(FixNormError, match="warmup_count must be 'auto', True or False"):
            _FixNorm(small_net(), data[0][0], free_steps=6, warmup_count=bad, lr=0.5, momentum=0.9)


def test_targets_follow_the_parameters_when_the_model_changes_dtype_after_the_optimizer_is_built():
    """HF Trainer / Fabric build the optimizer first and move the model after; targets must follow, in fp32."""
    model = small_net()
    x = torch.randn(4, 1, 8, 8)
    opt = FixNorm(model, x, fc_norm=2.5, lr=0.5, momentum=0.9)
    initial = float(model[3].weight.norm())
    model.to(torch.float64)
    for xb, yb in batches(4):
        opt.zero_grad()
        F.cross_entropy(model(xb.double()), yb).backward()
        opt.step()
    assert model[3].weight.dtype == torch.float64
    assert abs(float(model[3].weight.norm()) - initial) < 1e-5 and abs(float(model[8].weight.norm()) - 2.5) < 1e-6
    targets = [v for entry in opt.state_dict()["state"].values() for k, v in entry.items() if k == "fixnorm_target"]
    assert targets and all(t.dtype == torch.float32 for t in targets)


def test_state_dict_keeps_targets_in_per_parameter_entries_and_reads_the_version_1_layout():
    data = batches(4)
    model = small_net()
    opt = FixNorm(model, data[0][0], fc_norm=2.0, free_steps=2, norm_drift=None, lr=0.5, momentum=0.9)
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups"}  # before any step: targets only, no empty base entries
    train(model, opt, data[:3])
    state = opt.state_dict()
    assert all(int(e["fixnorm_steps"]) == 3 for e in state["state"].values() if "fixnorm_target" in e)
    assert "fixnorm_target" not in next(iter(opt.state.values()))  # the live state is untouched
    legacy = {k: v for k, v in state.items()}
    legacy["state"] = {i: {k: v for k, v in e.items() if not k.startswith("fixnorm_")}
                       for i, e in state["state"].items()}
    legacy["state"] = {i: e for i, e in legacy["state"].items() if e}
    legacy["fixnorm"] = {"version": 1, "steps": 3, "targets": {i: e["fixnorm_target"] for i, e in state["state"].items()
                                                                if "fixnorm_target" in e}}
    other = FixNorm(small_net(seed=5), data[0][0], fc_norm=2.0, free_steps=2, norm_drift=None, lr=0.5, momentum=0.9)
    other.load_state_dict(legacy)
    again = other.state_dict()
    for i, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, again["state"][i][key]), (i, key)


@pytest.mark.parametrize("base, kwargs", [BASES[0], BASES[2]], ids=["SGD", "Adam"])
def test_distributed_checkpoint_round_trip_keeps_targets_and_continues_bit_identically(tmp_path, base, kwargs):
    """torch.distributed.checkpoint's state-dict API keeps only `state` and `param_groups` (by parameter name)."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, load, save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    data = batches(8)
    model = small_net(seed=0)
    opt = FixNorm(model, data[0][0], fc_norm=2.0, free_steps=2, **kwargs, base=base)
    train(model, opt, data[:4])
    osd = get_optimizer_state_dict(model, opt)
    assert any("fixnorm_target" in entry for entry in osd["state"].values())
    save({"model": model.state_dict(), "optim": osd}, storage_writer=FileSystemWriter(str(tmp_path / "dcp")))

    resumed = small_net(seed=9)
    opt2 = FixNorm(resumed, data[0][0], fc_norm=2.0, free_steps=2, **kwargs, base=base)
    target = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, opt2)}
    load(target, storage_reader=FileSystemReader(str(tmp_path / "dcp")))
    resumed.load_state_dict(target["model"])
    set_optimizer_state_dict(resumed, opt2, target["optim"])
    train(model, opt, data[4:])
    train(resumed, opt2, data[4:])
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_building_over_weights_already_at_their_targets_changes_no_bit():
    """Lightning / HF restore weights before building the optimizer: the construction must not re-project them."""
    model = small_net()
    opt = FixNorm(model, torch.randn(4, 1, 8, 8), fc_norm=2.0, lr=0.5, momentum=0.9)
    train(model, opt, batches(3))
    restored = {k: v.clone() for k, v in model.state_dict().items()}
    FixNorm(model, torch.randn(4, 1, 8, 8), fc_norm=2.0, lr=0.5, momentum=0.9)
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored[key]), key
    FixNorm(model, torch.randn(4, 1, 8, 8), fc_norm=3.0, lr=0.5)  # a new target still moves the weight
    assert abs(float(model[8].weight.norm()) - 3.0) < 1e-6


def test_the_default_free_phase_is_documented_and_used():
    model = small_net()
    opt = _FixNorm(model, torch.randn(4, 1, 8, 8), lr=0.1)
    assert opt.free_steps == fixnorm.optim.DEFAULT_FREE_STEPS > 0
    from fixnorm.methods.fixnorm_method import FixNormSettings
    assert FixNormSettings().free_steps == fixnorm.optim.DEFAULT_FREE_STEPS
    assert opt.param_groups[0]["lr_power"] == fixnorm.optim.DEFAULT_LR_POWER == 0.5  # "auto": the bend, kept
    assert FixNormSettings().lr_power == "auto" and FixNormSettings().drift_follows_lr == "auto"  # the lr: 0.5
    # the default drift: weight decay's norm equation on the measured growth ("auto" over SGD, no joint groups)
    assert FixNormSettings().drift_signal == fixnorm.optim.DEFAULT_DRIFT_SIGNAL == "auto"
    assert opt.drift_signal == "growth" and [r.drift_signal for r in opt._hold_rules() if r.drift_lr] == ["growth"]
    assert not fixnorm.optim.DEFAULT_DRIFT_FOLLOWS_LR  # the gradient law, asked for, does not follow the lr
    gradient = _FixNorm(small_net(), torch.randn(4, 1, 8, 8), lr=0.1, drift_signal="gradient")
    assert not any(r.drift_lr for r in gradient._hold_rules()) and gradient.param_groups[0]["lr_power"] == 0.5
    follows = _FixNorm(small_net(), torch.randn(4, 1, 8, 8), lr=0.1, momentum=0.9, drift_follows_lr=True)
    assert follows.drift_signal == "gradient"  # the gradient law in the lr, as asked
    assert all("lr_power" not in g for g in follows.param_groups)  # "auto" is 1 with it: the scheduler's lr
    # the relaxation time of weight decay 5e-4 at lr 0.1, momentum 0.9: (1 - 0.9) / (4 * 0.1 * 5e-4)
    assert [r.drift_steps for r in follows._hold_rules() if r.drift_lr] == [500]


def test_the_default_norm_drift_applies_only_where_the_norms_come_from_a_free_phase_per_tensor():
    x = torch.randn(4, 1, 8, 8)
    drifts = lambda opt: sorted(r.drift_steps for r in opt._hold_rules() if r.drift_steps)  # noqa: E731
    from fixnorm.methods.fixnorm_method import FixNormSettings
    assert FixNormSettings().norm_drift == "auto"
    # the gradient law's time constant; the default growth law's is weight decay's relaxation time at lr0
    assert drifts(_FixNorm(small_net(), x, lr=0.1, drift_signal="gradient")) == [fixnorm.optim.DEFAULT_NORM_DRIFT]
    assert fixnorm.optim.DEFAULT_NORM_DRIFT == 500
    assert drifts(_FixNorm(small_net(), x, lr=0.1, momentum=0.9)) == [500]  # (1 - 0.9) / (4 * 0.1 * 5e-4)
    for off in ({"free_steps": 0}, {"granularity": "filter"}, {"target": 2.0}, {"norm_drift": None},
                {"angular_update": 0.01}, {"base": torch.optim.Adam}, {"base": torch.optim.RMSprop}):
        assert drifts(_FixNorm(small_net(), x, lr=0.1, **off)) == [], off
    held = [r for r in _FixNorm(small_net(), x, lr=0.1)._hold_rules() if r.drift_steps]
    assert [n for r in held for n in r.names] == ["0.weight", "3.weight"]  # the classifier does not drift
    # asked for explicitly, it drifts over any base (SGD's law, the user's choice)
    assert drifts(_FixNorm(small_net(), x, lr=0.1, base=torch.optim.Adam, norm_drift=50)) == [50]


def test_the_default_equilibrium_ceiling_applies_only_to_drifting_norms_under_sgd():
    """"auto" is weight decay 5e-4's constant lr / (2 wd (1 - momentum)) on the drifting rule; off where SGD's law does
    not hold or the norms do not drift; the classifier is never capped."""
    x = torch.randn(4, 1, 8, 8)
    ceilings = lambda opt: [r.ceiling for r in opt._hold_rules() if r.ceiling is not None]  # noqa: E731
    from fixnorm.methods.fixnorm_method import FixNormSettings
    assert FixNormSettings().equilibrium_wd == "auto" and fixnorm.optim.DEFAULT_EQUILIBRIUM_WD == 5e-4
    assert ceilings(_FixNorm(small_net(), x, lr=0.2, momentum=0.9)) == [pytest.approx(0.2 / (2 * 5e-4 * 0.1))]
    assert ceilings(_FixNorm(small_net(), x, lr=0.2, equilibrium_wd=1e-3)) == [pytest.approx(0.2 / (2 * 1e-3))]
    for off in ({"norm_drift": None}, {"free_steps": 0}, {"base": torch.optim.Adam}, {"dampening": 0.5},
                {"equilibrium_wd": None}):
        assert ceilings(_FixNorm(small_net(), x, lr=0.1, **off)) == [], off


def test_fc_scale_holds_the_classifier_at_a_multiple_of_the_norm_training_chose():
    data = batches(6)
    x = data[0][0]
    # at construction (free_steps=0): twice the initial norm
    model = small_net()
    initial = float(model[8].weight.norm())
    opt = FixNorm(model, x, fc_scale=2.0, lr=0.5, momentum=0.9)
    assert float(model[8].weight.norm()) == pytest.approx(2 * initial, rel=1e-6)
    train(model, opt, data)
    assert float(model[8].weight.norm()) == pytest.approx(2 * initial, rel=1e-5)
    # after a free phase: a multiple of the norm reached at its end (the same run until then)
    plain, scaled = small_net(), small_net()
    opt_plain = FixNorm(plain, x, free_steps=3, lr=0.5, momentum=0.9)
    opt_scaled = FixNorm(scaled, x, free_steps=3, fc_scale=0.5, lr=0.5, momentum=0.9)
    train(plain, opt_plain, data[:3])
    train(scaled, opt_scaled, data[:3])
    reached = float(plain[8].weight.norm())
    assert float(scaled[8].weight.norm()) == pytest.approx(0.5 * reached, rel=1e-6)  # moved at once
    assert float(scaled[3].weight.norm()) == float(plain[3].weight.norm())  # only the classifier is scaled
    train(scaled, opt_scaled, data[3:])
    assert float(scaled[8].weight.norm()) == pytest.approx(0.5 * reached, rel=1e-5)
    with pytest.raises(FixNormError, match="fc_scale"):
        FixNorm(small_net(), x, fc_norm=2.0, fc_scale=2.0, lr=0.1)
    with pytest.raises(FixNormError, match="fc_scale"):
        FixNorm(small_net(), x, fc_scale=0.0, lr=0.1)


def test_norm_scale_multiplies_the_effective_learning_rate_of_the_scale_invariant_weights():
    """At norm_scale c the weights compute the same function and turn by tan(angle) x 1/c² per SGD step."""
    data = batches(5)
    x = data[0][0]
    plain, scaled = small_net(), small_net()
    opt_plain = FixNorm(plain, x, free_steps=3, lr=0.2, momentum=0.0, lr_power=1.0)
    opt_scaled = FixNorm(scaled, x, free_steps=3, norm_scale=0.5, lr=0.2, momentum=0.0, lr_power=1.0)
    train(plain, opt_plain, data[:3])
    train(scaled, opt_scaled, data[:3])
    for i in (0, 3):  # both convs at half the norm reached; the classifier untouched
        assert float(scaled[i].weight.norm()) == pytest.approx(0.5 * float(plain[i].weight.norm()), rel=1e-6)
    assert torch.equal(scaled[8].weight, plain[8].weight)
    with torch.no_grad():  # scale invariance up to BN eps (batch statistics; copies keep the buffers)
        torch.testing.assert_close(copy.deepcopy(scaled)(x), copy.deepcopy(plain)(x), rtol=1e-2, atol=5e-4)  # BN eps
    before = [m[3].weight.detach().clone() for m in (plain, scaled)]
    train(plain, opt_plain, data[3:4])
    train(scaled, opt_scaled, data[3:4])

    def tan_angle(a, b):
        cos = float((a * b).sum() / (a.norm() * b.norm()))
        return math.sqrt(max(0.0, 1 - cos * cos)) / cos

    turned = [tan_angle(w0, m[3].weight.detach()) for w0, m in zip(before, (plain, scaled))]
    assert turned[1] / turned[0] == pytest.approx(4.0, rel=1e-2)
    with pytest.raises(FixNormError, match="norm_scale"):
        FixNorm(small_net(), x, target=1.0, norm_scale=2.0, lr=0.1)
    with pytest.raises(FixNormError, match="norm_scale"):
        FixNorm(small_net(), x, norm_scale=-1.0, lr=0.1)


def bent_and_plain(scheduled_lr, invariant_lr, **bent_kwargs):
    """Two small nets trained 3 steps: one by FixNorm(lr=0.4, **bent_kwargs) with every group's lr set to
    ``scheduled_lr`` (a scheduler's value), one by a plain FixNorm whose scale-invariant weights get ``invariant_lr``
    and every other group ``scheduled_lr``. Returns (bent model, bent optimizer, plain model)."""
    data = batches(3)
    x = data[0][0]
    bent_model, plain_model = small_net(), small_net()
    bent = FixNorm(bent_model, x, lr=0.4, **bent_kwargs)
    for g in bent.param_groups:
        g["lr"] = scheduled_lr
    plain = FixNorm(plain_model, x, lr=invariant_lr)
    for g in plain.param_groups:
        if g["role"] != "scale_invariant":
            g["lr"] = scheduled_lr
    train(bent_model, bent, data)
    train(plain_model, plain, data)
    return bent_model, bent, plain_model


def test_lr_power_bends_the_schedule_of_the_scale_invariant_weights_only():
    """lr_power=0.5 at a scheduled lr of lr0/4: the convs step as with lr0/2, the classifier with lr0/4."""
    bent_model, bent, plain_model = bent_and_plain(0.1, 0.2, lr_power=0.5)  # 0.2 = lr0 * (1/4) ** 0.5
    for (name, a), (_, b) in zip(bent_model.state_dict().items(), plain_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(g["lr"] == 0.1 for g in bent.param_groups)  # the scheduler's values are left as they were


@pytest.mark.parametrize("save_at", [1, 4])  # inside and after the free phase (2 steps)
def test_a_state_dict_saved_before_the_held_flag_existed_resumes_bit_identically(save_at):
    """The layout before rules: per-parameter fixnorm_target / fixnorm_steps, no fixnorm_held."""
    data = batches(7)
    model = small_net()
    opt = FixNorm(model, data[0][0], free_steps=2, lr=0.5, momentum=0.9)
    train(model, opt, data[:save_at])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    for entry in saved["opt"]["state"].values():
        assert entry.pop("fixnorm_held", None) is not None or "fixnorm_target" not in entry
    train(model, opt, data[save_at:])
    resumed = small_net(seed=4)
    opt2 = FixNorm(resumed, data[0][0], free_steps=2, lr=0.5, momentum=0.9)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps_done == save_at
    train(resumed, opt2, data[save_at:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_lr_power_steps_scale_invariant_weights_with_lr_ref_times_the_schedule_factor_to_the_power():
    """A scheduler at factor 1/4 with lr_power 0.5: invariant weights step with lr_ref / 2, the rest with lr_ref / 4."""
    bent_model, plain_model, fc_model = small_net(), small_net(), small_net()
    x, y = batches(1)[0]
    bent = FixNorm(bent_model, x, lr=0.2, lr_power=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(bent, lambda step: 0.25)
    assert [g["lr"] for g in bent.param_groups] == [pytest.approx(0.05)] * len(bent.param_groups)
    plain = FixNorm(plain_model, x, lr=0.1)  # what the invariant weights should get: 0.2 * 0.25 ** 0.5
    fc = FixNorm(fc_model, x, lr=0.05)       # what the classifier should get: the scheduler's lr
    for model, opt in ((bent_model, bent), (plain_model, plain), (fc_model, fc)):
        train(model, opt, [(x, y)])
    assert torch.equal(bent_model[0].weight, plain_model[0].weight)
    assert torch.equal(bent_model[3].weight, plain_model[3].weight)
    assert torch.equal(bent_model[8].weight, fc_model[8].weight)
    assert not torch.equal(bent_model[8].weight, plain_model[8].weight)
    assert all(g["lr"] == pytest.approx(0.05) for g in bent.param_groups)  # the scheduler's lr is left as it was
    assert fixnorm.optim.stepping_lr(next(g for g in bent.param_groups if g["role"] == "scale_invariant")) == \
        pytest.approx(0.1)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.05)


def test_schedule_end_bends_only_the_decay_above_the_schedules_floor():
    """stepping_lr with schedule_end e: lr_ref * (e + (1 - e) * ((r - e) / (1 - e)) ** p) above the floor, the
    scheduler's lr at or below it; e = 0 is the plain law to the bit, e = 1 no bend."""
    def group(lr, end, power=0.5):
        return {"lr": lr, "lr_ref": 0.4, "lr_power": power, "schedule_end": end}

    stepping_lr = fixnorm.optim.stepping_lr
    assert stepping_lr(group(0.2, 0.25)) == pytest.approx(0.4 * (0.25 + 0.75 * ((0.5 - 0.25) / 0.75) ** 0.5))
    assert stepping_lr(group(0.4, 0.25)) == pytest.approx(0.4)    # the peak: unchanged
    assert stepping_lr(group(0.1, 0.25)) == 0.1                   # the floor: the schedule's own lr, continuous
    assert stepping_lr(group(0.05, 0.25)) == 0.05                 # below it (a warm-up's start): as scheduled
    for lr in (0.3, 0.1, 0.013, 0.0):
        assert stepping_lr(group(lr, 0.0)) == 0.4 * (lr / 0.4) ** 0.5  # the plain law, bit for bit
        assert stepping_lr(group(lr, 1.0)) == lr
    assert stepping_lr(group(0.2, 0.25, power=1.0)) == 0.2        # power 1: the schedule itself, whatever the floor
    for lo, hi in ((0.11, 0.2), (0.2, 0.3), (0.3, 0.39)):         # monotone between floor and peak
        assert stepping_lr(group(lo, 0.25)) < stepping_lr(group(hi, 0.25))


def test_schedule_end_through_the_optimizer_steps_the_invariant_weights_with_the_bent_lr():
    """At a scheduled lr0 / 2 with schedule_end 1/4 and lr_power 0.5 the convs step as a plain FixNorm at
    lr0 * (1/4 + 3/4 * (1/3) ** 0.5); the classifier with lr0 / 2."""
    bent_model, bent, plain_model = bent_and_plain(0.2, 0.4 * (0.25 + 0.75 * (1 / 3) ** 0.5), lr_power=0.5,
                                                   schedule_end=0.25)
    for (name, a), (_, b) in zip(bent_model.state_dict().items(), plain_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)  # the two lrs agree to rounding only
    assert all(g["lr"] == 0.2 for g in bent.param_groups)
    x = batches(1)[0][0]
    for bad in (-0.1, 1.5, True, "auto"):
        with pytest.raises(FixNormError, match="schedule_end"):
            FixNorm(small_net(), x, lr=0.4, schedule_end=bad)


# lr 0.3, momentum 0.9: weight decay's relaxation time (1 - m) / (4 lr wd) is 4 steps at this wd
WD_RELAXING_IN_4_STEPS = 0.1 / (4 * 0.3 * 4)


@pytest.mark.parametrize("ceiling,follows_lr", [(None, False), (6e-3, False), (WD_RELAXING_IN_4_STEPS, True)],
                         ids=["as-taken", "ceiling", "weight-decay"])
def test_norm_drift_moves_held_norms_as_the_fourth_root_of_the_unit_gradient_mean_square(ceiling, follows_lr):
    """The held norm after step k is its norm when taken times (m_k / m_taken) ** 1/4, m the bias-corrected running
    mean (time constant N steps, from the middle of the free phase) of (|g| |w|)**2, |w| the norm the gradient was
    computed at; the classifier stays. With equilibrium_wd the norm taken is min(norm, (K m_taken) ** 1/4), K =
    lr / (2 wd (1 - momentum)) weight decay's equilibrium constant: here it caps the first conv, not the second.
    With drift_follows_lr N is weight decay's relaxation time at the lr of construction, and under a
    schedule at factor r the mean takes r (|g| |w|)**2 with weight r / N, corrected by the sum of the weights."""
    data, free, n, lr, momentum = batches(9), 4, 4, 0.3, 0.9
    factors = [1.0, 1.0, 0.8, 0.5, 0.9, 0.3, 0.2, 0.6, 0.1] if follows_lr else [1.0] * 9
    model = small_net()
    opt = _FixNorm(model, data[0][0], free_steps=free, norm_drift="auto" if follows_lr else n, equilibrium_wd=ceiling,
                   drift_follows_lr=follows_lr, lr=lr, momentum=momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, 8)])
    convs = [model[0].weight, model[3].weight]
    # the same run without balancing shows the norms the free phase reached (balancing projects inside the step)
    twin = small_net()
    twin_opt = _FixNorm(twin, data[0][0], free_steps=free, norm_drift=n, equilibrium_wd=None,
                        drift_follows_lr=follows_lr, lr=0.3, momentum=0.9)
    twin_schedule = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda step: factors[min(step, 8)])
    mean, weight, taken, ref = [0.0, 0.0], 0.0, None, None
    fc_norm = None
    for k, (x, y) in enumerate(data, start=1):
        r = factors[k - 1]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [float(w.grad.detach().norm()) for w in convs]
        norm_before = [float(w.detach().norm()) for w in convs]
        opt.step()
        schedule.step()
        if k <= free:  # free phase: the gradient was computed at about the norm the step ends at (no projection)
            twin_opt.zero_grad()
            F.cross_entropy(twin(x), y).backward()
            twin_opt.step()
            twin_schedule.step()
            at = [float(twin[i].weight.detach().norm()) for i in (0, 3)]
        else:
            at = norm_before
        if k <= free // 2:  # the first half of the free phase is not counted
            continue
        rate, value = (r / n, r) if follows_lr else (1 / n, 1.0)
        mean = [(1 - rate) * m + rate * value * (g * a) ** 2 for m, g, a in zip(mean, grads, at)]
        weight = (1 - rate) * weight + rate
        corrected = [m / weight for m in mean]
        if k == free:
            ref = corrected
            if ceiling is not None:
                k_wd = lr / (2 * ceiling * (1 - momentum))
                taken = [min(a, (k_wd * r) ** 0.25) for a, r in zip(at, ref)]
                for w, t in zip(convs, taken):
                    assert float(w.detach().norm()) == pytest.approx(t, rel=1e-4)
                if not follows_lr:
                    assert [t < a for a, t in zip(at, taken)] == [True, False]
            else:
                taken = [float(w.detach().norm()) for w in convs]
            fc_norm = float(model[8].weight.detach().norm())
        elif k > free:
            expected = [t * (c / r) ** 0.25 for t, c, r in zip(taken, corrected, ref)]
            for w, e in zip(convs, expected):
                assert float(w.detach().norm()) == pytest.approx(e, rel=1e-4), k
            assert float(model[8].weight.detach().norm()) == pytest.approx(fc_norm, rel=1e-5)
    assert any(abs(float(w.detach().norm()) / t - 1) > 1e-3 for w, t in zip(convs, taken)), "the norms never drifted"


@pytest.mark.parametrize("lr_power,schedule_end", [("auto", 0.0), (0.5, 0.0), (0.5, 0.25)])
def test_growth_signal_runs_weight_decays_norm_equation_on_the_growth_each_step_made(lr_power, schedule_end):
    """drift_signal="growth": after the norms are taken, each step's held norm t_k satisfies
    t_k**4 = (1 - r_k / N) t_{k-1}**4 + 2 (|w'_k|**2 - t_{k-1}**2) t_{k-1}**2, w'_k the weight the base step reached
    (before the projection), r_k the scheduler's lr ratio, N weight decay's relaxation time at lr0; the classifier
    stays. With an lr_power bend the base step takes the bent lr (the growth it makes is what is measured) and the
    decay keeps the scheduler's rate."""
    data, free, lr, momentum = batches(9), 4, 0.3, 0.9
    factors = [1.0, 1.0, 0.8, 0.5, 0.9, 0.3, 0.2, 0.6, 0.1]
    power = 1.0 if lr_power == "auto" else lr_power

    def bent(ratio: float) -> float:  # the stepping lr's law, written out (docs/fixnorm.md, "The seventh fix")
        if power == 1.0 or ratio <= schedule_end:
            return lr * ratio
        return lr * (schedule_end + (1 - schedule_end) * ((ratio - schedule_end) / (1 - schedule_end)) ** power)

    model = small_net()
    opt = _FixNorm(model, data[0][0], free_steps=free, drift_signal="growth", equilibrium_wd=WD_RELAXING_IN_4_STEPS,
                   lr=lr, momentum=momentum, lr_power=lr_power, schedule_end=schedule_end)
    rule = opt._waiting[0][0]
    assert rule.drift_signal == "growth" and rule.drift_steps == 4  # (1 - 0.9) / (4 * 0.3 * wd)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, 8)])
    convs = [model[0].weight, model[3].weight]
    group = next(g for g in opt.param_groups if g["role"] == "scale_invariant")
    moved = False
    for k, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [w.detach().clone() for w in convs]
        step_lr = group["lr"]
        opt.step()
        schedule.step()
        if k == free:
            fc_norm = float(model[8].weight.detach().norm())
        if k <= free:
            continue
        rate = (step_lr / lr) / 4
        for w, b in zip(convs, before):
            # SGD with momentum, no dampening, no nesterov, at the bent lr
            reached = b - bent(step_lr / lr) * opt.state[w]["momentum_buffer"]
            held_sq, reached_sq = float(b.norm()) ** 2, float(reached.norm()) ** 2
            expected = ((1 - rate) * held_sq ** 2 + 2 * (reached_sq - held_sq) * held_sq) ** 0.25
            assert float(w.detach().norm()) == pytest.approx(expected, rel=1e-4), k
            moved |= abs(expected / held_sq ** 0.5 - 1) > 1e-3
        assert float(model[8].weight.detach().norm()) == pytest.approx(fc_norm, rel=1e-5)
    assert moved, "the norms never moved"


def test_drift_signal_auto_is_the_growth_law_with_the_bend_where_sgds_law_applies_and_the_gradient_law_elsewhere():
    """"auto" (the default) trains bit for bit as drift_signal="growth" with lr_power=0.5 over SGD; it keeps the
    gradient law where the growth law cannot apply or another choice was made, without an error."""
    data = batches(6)

    def trained(**kwargs) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = small_net()
        opt = _FixNorm(model, data[0][0], free_steps=2, lr=0.3, momentum=0.9, **kwargs)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: [1.0, 1.0, 0.7, 0.4, 0.3, 0.2][min(step, 5)])
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            schedule.step()
        return [p.detach().clone() for p in model.parameters()]

    auto, explicit = trained(), trained(drift_signal="growth", lr_power=0.5)
    assert all(torch.equal(a, b) for a, b in zip(auto, explicit))
    assert not all(torch.equal(a, b) for a, b in zip(auto, trained(drift_signal="gradient")))
    x = data[0][0]
    for kwargs in ({"base": torch.optim.Adam}, {"dampening": 0.1}, {"drift_follows_lr": False},
                   {"drift_follows_lr": True}, {"norm_drift": None}, {"free_steps": 0}, {"granularity": "filter"},
                   {"target": 2.0}, {"joint": "hold"}):
        opt = _FixNorm(small_net(), x, lr=0.1, **kwargs)
        assert opt.drift_signal == "gradient", kwargs
    assert _FixNorm(small_net(), x, lr=0.1, lr_power=1).drift_signal == "growth"  # the law with the bend asked off
    torch.manual_seed(0)  # joint groups (held by default) keep the gradient law, which the joint rule has
    split = split_conv_net(nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    opt = _FixNorm(split, torch.randn(4, 2, 8, 8), lr=0.1)
    assert (opt.drift_signal, opt.joint_policy) == ("gradient", "hold")
    with pytest.raises(FixNormError, match="drift_signal must be one of"):
        _FixNorm(small_net(), x, lr=0.1, drift_signal="norms")


def test_a_tensor_lr_is_read_as_its_value_and_a_zero_or_bad_lr_is_a_clear_error():
    """torch.optim accepts a one-element tensor lr: SGD's norm laws read its value (it once made "auto" fall back to
    the gradient law silently), and train as the same float lr does (to rounding: torch.optim's tensor-lr path
    multiplies before it adds, which a fused kernel need not). An lr SGD's laws cannot use is an error naming the
    lr."""
    data = batches(5)

    def trained(lr: float | torch.Tensor) -> tuple[str, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = small_net()
        opt = _FixNorm(model, data[0][0], free_steps=2, lr=lr, momentum=0.9)
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return opt.drift_signal, [p.detach().clone() for p in model.parameters()]

    (signal, weights), (tensor_signal, tensor_weights) = trained(0.3), trained(torch.tensor(0.3))
    assert signal == tensor_signal == "growth"
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(weights, tensor_weights))
    x = data[0][0]
    with pytest.raises(FixNormError, match="positive lr"):
        _FixNorm(small_net(), x, lr=0.0)
    with pytest.raises(FixNormError, match="one-element tensor"):
        _FixNorm(small_net(), x, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(FixNormError, match="lr must be a number"):
        _FixNorm(small_net(), x, lr="0.1")


def test_a_state_saved_with_fixed_norms_does_not_load_into_drifting_norms():
    """(Resuming with drifting norms, bit for bit: test_resume_inside_and_after_the_free_phase_is_bit_identical.)"""
    x = batches(1)[0][0]
    plain_state = copy.deepcopy(_FixNorm(small_net(), x, free_steps=4, norm_drift=None, lr=0.5).state_dict())
    drifting = _FixNorm(small_net(), x, free_steps=4, norm_drift=3, lr=0.5)
    with pytest.raises(FixNormError, match="without drifting norms"):
        drifting.load_state_dict(plain_state)
    # and the other way: a state with drifting norms never loads silently into fixed ones
    drifting_state = copy.deepcopy(_FixNorm(small_net(), x, free_steps=4, norm_drift=3, lr=0.5).state_dict())
    with pytest.raises(FixNormError, match="grad_sq.*these rules do not keep"):
        _FixNorm(small_net(), x, free_steps=4, norm_drift=None, lr=0.5).load_state_dict(drifting_state)


@pytest.mark.parametrize("kwargs,message", [
    ({"norm_drift": None}, "needs norm_drift"), ({"free_steps": 0}, "needs norm_drift"),
    ({"granularity": "filter"}, "needs norm_drift"), ({"equilibrium_wd": "5e-4"}, "positive weight decay"),
    ({"equilibrium_wd": -1e-4}, "positive weight decay"), ({"equilibrium_wd": True}, "positive weight decay"),
    ({"base": torch.optim.Adam, "norm_drift": 10}, "SGD's equilibrium"), ({"dampening": 0.1}, "no dampening")])
def test_equilibrium_wd_errors(kwargs, message):
    settings = {"free_steps": 3, "equilibrium_wd": 5e-4, "lr": 0.1, **kwargs}
    with pytest.raises(FixNormError, match=message):
        _FixNorm(small_net(), batches(1)[0][0], **settings)
    with pytest.raises(FixNormError, match="drift_steps"):
        HoldNorms([small_net()[0].weight], from_step=3, ceiling=100.0)


def test_equilibrium_norms_follow_the_fourth_root_law_and_never_cap_a_weight_without_gradient():
    grad_sq = [torch.tensor(1.0), torch.tensor(16.0), torch.tensor(0.0), torch.tensor(float("nan"))]
    out = equilibrium_norms(grad_sq, 16.0, like=[torch.tensor(1.0)] * 4)
    assert [float(v) for v in out[:2]] == pytest.approx([2.0, 4.0], rel=1e-6)
    assert float(out[2]) == math.inf and float(out[3]) == math.inf


def test_the_equilibrium_ceiling_is_where_sgd_with_weight_decay_settles():
    """On a stationary problem (random inputs and labels, a BatchNorm after the weight), SGD + weight decay's norm
    settles where |w|**4 = lr |g~|**2 / (2 wd (1 - momentum)). Started well above it (a norm a free phase blew up),
    SGD + WD decays to it, and FixNorm with equilibrium_wd=wd is held at it from the end of its free phase."""
    def net() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False), nn.ReLU(),
                              nn.Linear(16, 4))
        with torch.no_grad():
            model[0].weight.mul_(4.0)
        return model

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(1)
        norms4, grads = [], []
        for t in range(steps):
            x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 4, (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            w = model[0].weight.detach()
            if t >= steps // 2:
                norms4.append(float(w.norm()) ** 4)
                grads.append((float(model[0].weight.grad.norm()) * float(w.norm())) ** 2)
            opt.step()
        return sum(norms4) / len(norms4), sum(grads) / len(grads)

    lr, wd, momentum = 0.1, 5e-3, 0.9
    decayed = net()
    sgd = torch.optim.SGD([{"params": [decayed[0].weight], "weight_decay": wd},
                           {"params": decayed[3].parameters()}], lr=lr, momentum=momentum)
    norm4_sgd, grad_sq = run(decayed, sgd, 2000)
    assert norm4_sgd / grad_sq == pytest.approx(lr / (2 * wd * (1 - momentum)), rel=0.15)
    held = net()
    opt = _FixNorm(held, torch.randn(8, 32), free_steps=20, norm_drift=200, equilibrium_wd=wd, lr=lr,
                   momentum=momentum, drift_signal="gradient")  # the ceiling on the gradient law's norms
    assert float(held[0].weight.detach().norm()) ** 4 > 10 * norm4_sgd
    norm4_held, _ = run(held, opt, 2000)
    assert norm4_held == pytest.approx(norm4_sgd, rel=0.25)


def test_weight_decay_drift_follows_sgd_with_weight_decay_through_an_lr_drop():
    """drift_follows_lr: on a stationary problem SGD + weight decay settles at its equilibrium norm; after
    the lr drops 10x its equilibrium falls by 10 ** (1/4) but the norm gets there only at the lower lr's slow rate.
    FixNorm's held norm follows the same path (and so the same angle per step, at lr_power 1), while a drift with a
    constant time constant relaxes as fast after the drop as before it."""
    lr, wd, momentum, before, after = 0.1, 5e-3, 0.9, 400, 300

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False), nn.ReLU(),
                             nn.Linear(16, 4))

    def norms4(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < before else 0.1)
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(before + after):
            x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 4, (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            schedule.step()
            out.append(float(model[0].weight.detach().norm()) ** 4)
        return out

    def shrink(path: list[float]) -> float:  # norm**4 over the last 50 steps against the 50 before the drop
        return (sum(path[-50:]) / 50) / (sum(path[before - 50:before]) / 50)

    decayed = net()
    sgd = torch.optim.SGD([{"params": [decayed[0].weight], "weight_decay": wd},
                           {"params": decayed[3].parameters()}], lr=lr, momentum=momentum)
    sgd_shrink = shrink(norms4(decayed, sgd))
    # the relaxation time at lr 0.01 is 500 steps: 300 steps move norm**4 about 45% of the way down to 1/10
    assert 0.45 < sgd_shrink < 0.75
    held = net()
    opt = _FixNorm(held, torch.randn(8, 32), free_steps=20, drift_follows_lr=True, equilibrium_wd=wd, lr=lr,
                   momentum=momentum)
    assert opt._waiting[0][0].drift_steps == 50  # (1 - 0.9) / (4 * 0.1 * 5e-3)
    assert shrink(norms4(held, opt)) == pytest.approx(sgd_shrink, rel=0.15)
    grown = net()  # weight decay's own equation on the measured growth: the same path
    opt = _FixNorm(grown, torch.randn(8, 32), free_steps=20, drift_signal="growth", equilibrium_wd=wd, lr=lr,
                   momentum=momentum)
    assert shrink(norms4(grown, opt)) == pytest.approx(sgd_shrink, rel=0.15)
    constant = net()
    opt = _FixNorm(constant, torch.randn(8, 32), free_steps=20, norm_drift=50, equilibrium_wd=wd, lr=lr,
                   momentum=momentum, drift_follows_lr=False)
    # its norm relaxes at the old rate after the drop (toward the falling gradient scale): far below weight decay's
    assert shrink(norms4(constant, opt)) < 0.6 * sgd_shrink


@pytest.mark.parametrize("kwargs,message", [
    ({"base": torch.optim.Adam}, "SGD \\+ weight decay's norm dynamics"), ({"lr_power": 0.5}, "a second time"),
    ({"free_steps": 0}, "needs free_steps"), ({"dampening": 0.1}, "no dampening"),
    ({"equilibrium_wd": -1.0}, "positive weight decay"), ({"drift_follows_lr": "yes"}, "'auto', True or False"),
    ({"drift_signal": "norm"}, "drift_signal must be one of"),
    ({"drift_signal": "growth", "drift_follows_lr": False}, "needs drift_follows_lr=True"),
    ({"drift_signal": "growth", "base": torch.optim.Adam}, "SGD \\+ weight decay's norm dynamics")])
def test_weight_decay_drift_errors(kwargs, message):
    settings = {"free_steps": 3, "drift_follows_lr": True, "lr": 0.1, **kwargs}
    with pytest.raises(FixNormError, match=message):
        _FixNorm(small_net(), batches(1)[0][0], **settings)
    with pytest.raises(FixNormError, match="drift_steps"):
        HoldNorms([small_net()[0].weight], from_step=3, drift_lr=lambda: 1.0)
    with pytest.raises(FixNormError, match="give drift_lr"):
        HoldNorms([small_net()[0].weight], from_step=3, drift_steps=10, drift_signal="growth")


@pytest.mark.parametrize("kwargs", [{"free_steps": 0}, {"granularity": "filter"}, {"target": 2.0},
                                    {"norm_drift": 0}, {"norm_drift": 2.5}, {"norm_drift": True}])
def test_norm_drift_needs_a_free_phase_and_whole_tensors(kwargs):
    settings = {"free_steps": 3, "norm_drift": 10, **kwargs}
    with pytest.raises(FixNormError, match="norm_drift"):
        _FixNorm(small_net(), batches(1)[0][0], lr=0.1, **settings)


def test_the_classifier_stays_free_over_adaptive_bases_and_is_held_over_sgd():
    """fc_free_steps="auto": over SGD the classifier is held from the end of the free phase with the rest; over Adam or
    RMSprop it is never held (the base moves it every step, its norm included) unless fc_scale asks for a hold;
    the scale-invariant weights are held either way."""
    data = batches(8)
    x = data[0][0]
    for base, kwargs, free in ((torch.optim.SGD, {"lr": 0.5, "momentum": 0.9, "norm_drift": None}, False),
                               (torch.optim.Adam, {"lr": 0.01}, True), (torch.optim.RMSprop, {"lr": 0.01}, True),
                               (torch.optim.Adam, {"lr": 0.01, "fc_scale": 2.0}, False)):
        model = small_net()
        opt = _FixNorm(model, x, base=base, free_steps=3, **kwargs)
        assert (opt.fc_free_steps is None) == free, (base, kwargs)
        entry = next(e for e in opt.plan.entries if e.role == "classifier")
        assert (entry.constraint is None) == free
        norms = []
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            norms.append((float(model[3].weight.norm()), float(model[8].weight.norm())))
        conv, fc = zip(*norms[3:])  # after the free phase
        assert max(conv) / min(conv) - 1 < 1e-5  # held (no drift over Adam and RMSprop by default)
        moving = max(fc) / min(fc) - 1 > 1e-3
        assert moving == free, (base, kwargs, fc)
        assert ("8.weight" in opt.norm_targets()) != free and "3.weight" in opt.norm_targets()


@pytest.mark.parametrize("value,kwargs,expected", [
    ("auto", {}, 3), ("free_steps", {"base": torch.optim.Adam}, 3), (7, {"base": torch.optim.Adam}, 7),
    (0, {}, 0), (None, {}, None), ("auto", {"base": torch.optim.Adam}, None)])
def test_fc_free_steps_takes_the_classifier_norm_when_asked(value, kwargs, expected):
    data = batches(8)
    model = small_net()
    kwargs = {"lr": 0.01 if "base" in kwargs else 0.5, **kwargs}
    opt = _FixNorm(model, data[0][0], free_steps=3, fc_free_steps=value, **kwargs)
    assert opt.fc_free_steps == expected
    taken_at = None
    for step, (xb, yb) in enumerate(data, 1):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if taken_at is None and "8.weight" in opt.norm_targets():
            taken_at = step
            target = float(opt.norm_targets()["8.weight"])
    if expected is None:
        assert taken_at is None
    else:
        assert taken_at == max(expected, 1)  # 0: held from construction, so seen after the first step
        assert float(model[8].weight.norm()) == pytest.approx(target, rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"fc_free_steps": None, "fc_norm": 2.0}, "give one of them"), ({"fc_free_steps": None, "fc_scale": 2.0}, "give one"),
    ({"fc_free_steps": 5, "fc_norm": 2.0}, "give one of them"), ({"fc_free_steps": -1}, "fc_free_steps must be"),
    ({"fc_free_steps": 2.5}, "fc_free_steps must be"), ({"fc_free_steps": True}, "fc_free_steps must be"),
    ({"fc_free_steps": "later"}, "fc_free_steps must be")])
def test_bad_fc_free_steps_is_a_clear_error(kwargs, message):
    with pytest.raises(FixNormError, match=message):
        _FixNorm(small_net(), torch.randn(4, 1, 8, 8), lr=0.1, free_steps=3, **kwargs)


def test_every_fixnorm_option_is_a_setting_of_the_fixnorm_method():
    """What FixNorm(...) offers a user of the library, the engine's config and CLI offer too (``--set key=value``):
    the keyword options of FixNorm.__init__ are the fields of the method's settings, but for what the engine supplies
    itself (the roles it analyses, the run's length and warm-up) and ``target``, whose setting is ``target_norm``."""
    import dataclasses
    import inspect

    from fixnorm.methods.fixnorm_method import FixNormSettings

    options = {name for name, p in inspect.signature(_FixNorm.__init__).parameters.items()
               if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and name == "fc_norm")}
    engine_supplies = {"roles", "total_steps", "warmup_steps"}
    settings = {f.name for f in dataclasses.fields(FixNormSettings)} - {"norm_replay", "norm_replay_roles"}
    assert options - engine_supplies - {"target"} == settings - {"target_norm"}


@pytest.mark.parametrize("base, kwargs", [(torch.optim.SGD, {"lr": 20.0, "momentum": 0.9, "nesterov": True}),
                                          (torch.optim.Adam, {"lr": 2.0})], ids=["sgd", "adam"])
def test_fc_max_step_shortens_a_classifier_step_to_that_multiple_of_its_norm_and_touches_nothing_else(base, kwargs):
    """With fc_max_step=tau a step that would move the classifier by more than tau x its norm moves it along the same
    direction by exactly tau x its norm: w = b + (u - b) tau |b| / |u - b|, u the step without the cap. Every other
    parameter and the momentum buffers are the uncapped run's, bit for bit."""
    x, y = batches(1)[0]
    runs = {}
    for cap in (None, 0.2):
        model = small_net()
        opt = _FixNorm(model, x, base=base, free_steps=3, fc_max_step=cap, **kwargs)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = model[8].weight.detach().clone()
        opt.step()
        runs[cap] = (model, opt, before)
    (plain, plain_opt, before), (capped, capped_opt, _) = runs[None], runs[0.2]
    change = plain[8].weight.detach() - before
    assert float(change.norm()) > 0.2 * float(before.norm())  # the step this test needs: one the cap shortens
    expected = before + change * (0.2 * before.norm() / change.norm())
    assert torch.allclose(capped[8].weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert float((capped[8].weight.detach() - before).norm()) == pytest.approx(0.2 * float(before.norm()), rel=1e-5)
    for (name, a), b in zip(plain.named_parameters(), capped.parameters()):
        if name != "8.weight":
            assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), capped.parameters()):
        for key, value in plain_opt.state[a].items():
            if torch.is_tensor(value):
                assert torch.equal(value, capped_opt.state[b][key]), key
    assert capped_opt.capped_steps == 1 and plain_opt.capped_steps == 0


def test_fc_max_step_leaves_steps_it_does_not_shorten_bit_for_bit_and_holds_the_classifier_after_its_free_phase():
    data = batches(8)
    models, opts = {}, {}
    for cap in (None, 0.2):
        models[cap] = small_net()
        opts[cap] = _FixNorm(models[cap], data[0][0], free_steps=3, fc_max_step=cap, lr=0.05, momentum=0.9)
        train(models[cap], opts[cap], data)
    assert opts[0.2].capped_steps == 0
    for a, b in zip(models[None].parameters(), models[0.2].parameters()):
        assert torch.equal(a, b)
    # a large lr: the cap shortens steps after the classifier is held too, and the projection still holds its norm
    model = small_net()
    opt = _FixNorm(model, data[0][0], free_steps=3, fc_max_step=0.05, lr=2.0, momentum=0.9)
    norms = []
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        b = model[8].weight.detach().clone()
        opt.step()
        assert float((model[8].weight.detach() - b).norm()) <= 0.05 * float(b.norm()) * (1 + 1e-5) + 1e-6
        norms.append(float(model[8].weight.detach().norm()))
    assert norms[3:] == pytest.approx([norms[2]] * 5, rel=1e-5)
    assert opt.capped_steps >= 3


@pytest.mark.parametrize("value", [0, -0.1, True, float("nan"), float("inf"), "0.2"])
def test_fc_max_step_errors(value):
    with pytest.raises(FixNormError, match="fc_max_step must be a positive number"):
        _FixNorm(small_net(), batches(1)[0][0], fc_max_step=value, lr=0.1)


def test_fc_max_step_reaches_the_optimizer_from_a_run_config_and_a_config_saved_before_it_reads_none():
    from fixnorm.methods.fixnorm_method import build_fixnorm
    from fixnorm.train.config import load_recipe, make_config, parse_overrides, saved_config

    cfg = make_config(load_recipe("fmnist-smoke"), {"method": "fixnorm"}, parse_overrides(["fc_max_step=0.3"]))
    x = batches(1)[0][0]
    opt = build_fixnorm(small_net(), cfg, x)
    assert [g.get("max_step") for g in opt.param_groups if g["role"] == "classifier"] == [0.3]
    assert all("max_step" not in g for g in opt.param_groups if g["role"] != "classifier")
    old = cfg.to_dict()
    del old["method_kwargs"]["fixnorm"]["fc_max_step"]
    assert saved_config(old).method_kwargs["fixnorm"]["fc_max_step"] is None


def tiny_preact(seed=0):
    from test_roles import TinyPreAct  # the two-stage pre-activation net whose joint groups test_roles checks

    torch.manual_seed(seed)
    return TinyPreAct()


def joint_norm(model, names):
    params = dict(model.named_parameters())
    return float(sum(params[n].detach().double().norm() ** 2 for n in names) ** 0.5)


GROUPS = [["stem.weight", "conv2.weight"], ["conv4.weight", "short.weight"]]


def test_joint_hold_holds_each_groups_joint_norm_and_leaves_its_members_free():
    data = batches(10)
    model = tiny_preact()
    opt = _FixNorm(model, data[0][0], free_steps=3, norm_drift=None, lr=0.5, momentum=0.9, joint="hold")
    assert [e.role for e in opt.plan.entries if e.name in GROUPS[0] + GROUPS[1]] == ["joint-invariant"] * 4
    assert opt.roles.joint == GROUPS
    train(model, opt, data[:3])  # the free phase: nothing held yet
    taken = [joint_norm(model, g) for g in GROUPS]
    members = {n: float(dict(model.named_parameters())[n].detach().norm()) for g in GROUPS for n in g}
    train(model, opt, data[3:])
    for group, norm in zip(GROUPS, taken):
        assert joint_norm(model, group) == pytest.approx(norm, rel=1e-6), group
    moved = [abs(float(dict(model.named_parameters())[n].detach().norm()) / v - 1) for n, v in members.items()]
    assert max(moved) > 1e-3  # the members' shares of the joint norm still train
    assert opt.param_groups[[g["role"] for g in opt.param_groups].index("joint_invariant")]["lr_power"] == 0.5
    # free: the same groups drift off their norms under the same steps
    free_model = tiny_preact()
    free_opt = _FixNorm(free_model, data[0][0], free_steps=3, norm_drift=None, lr=0.5, momentum=0.9, joint="free")
    train(free_model, free_opt, data)
    assert all(abs(joint_norm(free_model, g) / n - 1) > 1e-3 for g, n in zip(GROUPS, taken))


@pytest.mark.parametrize("drift", [None, "auto"], ids=["fixed", "drifting"])
def test_joint_norms_resume_bit_identically_inside_and_after_the_free_phase(drift):
    settings = {"free_steps": 4, "norm_drift": drift, "lr": 0.5, "momentum": 0.9, "joint": "hold"}
    assert_resumes_bit_identically(tiny_preact, settings)
    data = batches(8)
    # a state saved with the groups free cannot silently resume as held
    free = tiny_preact()
    free_opt = _FixNorm(free, data[0][0], free_steps=4, lr=0.5, momentum=0.9, joint="free")
    train(free, free_opt, data[:6])
    held_opt = _FixNorm(tiny_preact(), data[0][0], **settings)
    with pytest.raises(FixNormError, match="joint"):
        held_opt.load_state_dict(save_and_load(free_opt.state_dict()))


def test_joint_auto_holds_the_groups_where_the_joint_rule_applies_and_leaves_them_free_elsewhere():
    x = torch.randn(4, 1, 8, 8)
    default = _FixNorm(tiny_preact(), x, lr=0.1, momentum=0.9)  # the default is "auto"
    assert default.joint_policy == "hold" and default.roles.joint == GROUPS
    assert {e.role for e in default.plan.entries if e.name in GROUPS[0] + GROUPS[1]} == {"joint-invariant"}
    adam = _FixNorm(tiny_preact(), x, base=torch.optim.Adam, lr=1e-3)  # any base: held, without the drift
    assert adam.joint_policy == "hold"
    assert any(isinstance(rule, fixnorm.rules.HoldJointNorms) for rule in adam._rules.rules)
    for per_tensor_law in ({"angular_update": 0.01}, {"target": 1.0}, {"drift_follows_lr": True}):
        opt = _FixNorm(tiny_preact(), x, lr=0.1, **per_tensor_law)
        assert opt.joint_policy == "free", per_tensor_law
        assert not {e.role for e in opt.plan.entries} & {"joint-invariant"}, per_tensor_law


def test_joint_hold_refuses_what_it_cannot_combine_with():
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(FixNormError, match="unknown joint policy 'fixed'"):
        _FixNorm(tiny_preact(), x, lr=0.1, joint="fixed")
    for bad in ({"angular_update": 0.01}, {"target": 1.0}, {"drift_follows_lr": True}):
        with pytest.raises(FixNormError, match="joint='hold'"):
            _FixNorm(tiny_preact(), x, lr=0.1, joint="hold", **bad)
    partly_frozen = tiny_preact()
    roles = fixnorm.analyze(partly_frozen, x, joint=True)  # (measured on a frozen model, a frozen weight is unused)
    partly_frozen.stem.weight.requires_grad_(False)
    with pytest.raises(FixNormError, match=r"\['stem.weight', 'conv2.weight'\] .* some of it is frozen"):
        _FixNorm(partly_frozen, x, lr=0.1, joint="hold", roles=roles)
    partly_frozen.conv2.weight.requires_grad_(False)  # the whole group frozen: nothing of it to hold
    opt = _FixNorm(partly_frozen, x, lr=0.1, joint="hold", roles=roles)
    assert [r.group_names for r in opt._rules.rules if isinstance(r, fixnorm.rules.HoldJointNorms)] == \
        [[["conv4.weight", "short.weight"]]]


class SplitConv(nn.Module):
    """A conv whose weight is two parameters along its input channels: a conv of each input channel, summed."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.a, self.b = nn.Parameter(weight[:, :1].clone()), nn.Parameter(weight[:, 1:].clone())

    def forward(self, x):
        return F.conv2d(x[:, :1], self.a, padding=1) + F.conv2d(x[:, 1:], self.b, padding=1)


def split_conv_net(whole: nn.Sequential) -> nn.Sequential:
    """``whole`` with its first conv cut in two (then BatchNorm): ``0.a`` and ``0.b`` are scale-invariant only
    together, and together they are the one weight of ``whole``."""
    return nn.Sequential(SplitConv(whole[0].weight.detach()), *copy.deepcopy(whole[1:]))


def test_a_split_weight_held_jointly_trains_as_the_whole_weight_held_per_tensor():
    """The definition of the joint rule: the joint norm and the joint unit-norm gradient of a tensor cut in two are
    the whole tensor's, so the free phase, the norm taken, its drift and the equilibrium cap must give the same run."""
    torch.manual_seed(0)
    whole = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    split = split_conv_net(whole)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 2, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(12)]
    # the joint rule has the gradient law (drift_signal "auto" keeps it where joint groups are held)
    settings = {"free_steps": 4, "norm_drift": 3, "equilibrium_wd": 5e-3, "lr": 0.5, "momentum": 0.9}
    opt_whole = _FixNorm(whole, data[0][0], drift_signal="gradient", **settings)
    opt_split = _FixNorm(split, data[0][0], joint="hold", **settings)
    assert opt_split.roles.joint == [["0.a", "0.b"]] and opt_split.drift_signal == "gradient"
    assert {e.name: e.role for e in opt_whole.plan.entries}["0.weight"] == "scale-invariant"
    for x, y in data:
        for model, opt in ((whole, opt_whole), (split, opt_split)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert torch.allclose(torch.cat([split[0].a, split[0].b], 1), whole[0].weight, rtol=1e-5, atol=1e-6)
    held = opt_whole.norm_targets()["0.weight"]
    assert float(held) != pytest.approx(float(opt_whole._hold_rules()[0]._base[0]))  # the drift moved it
    assert float(torch.cat([split[0].a, split[0].b], 1).detach().norm()) == pytest.approx(float(held), rel=1e-5)
