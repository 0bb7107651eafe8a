"""MimicNorm against its definition: zero-mean filters after every step, one BN on the logits, residual scalars."""
import csv
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from fixnorm import FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.methods import get_method
from fixnorm.methods.mimicnorm import (REFERENCE_MIN_FAN_IN, Scale, attach_weight_centering, center_filters_,
                                       centered_weights, mimicnorm_model_)
from fixnorm.models import create_model
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(),
                                  reason="apt-get install dataset-fashion-mnist")


def filter_means(w):
    return w.detach().float().mean(dim=tuple(range(1, w.ndim)))


def mixed_net(seed=0):
    """A conv (fan-in 27), a depthwise conv (fan-in 9), a 1x1 conv (fan-in 16) and a linear layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def resnet20_mimic(**kwargs):
    torch.manual_seed(0)
    return mimicnorm_model_(create_model("resnet20", num_classes=10, in_channels=1), **kwargs)


# -- weight centring ---------------------------------------------------------------------------------
def test_selection_by_fan_in_groups_and_layer_type():
    net = mixed_net()
    conv, depthwise, pointwise, linear = net[0].weight, net[2].weight, net[3].weight, net[7].weight
    ids = lambda ws: [id(w) for w in ws]  # noqa: E731
    assert ids(centered_weights(net, min_fan_in=4)) == ids([conv, pointwise])
    assert ids(centered_weights(net, min_fan_in=4, include_grouped=True)) == ids([conv, depthwise, pointwise])
    assert ids(centered_weights(net, min_fan_in=4, include_linear=True)) == ids([conv, pointwise, linear])
    assert ids(centered_weights(net, min_fan_in=20)) == ids([conv])
    assert centered_weights(net) == []  # the reference threshold, 50, is above every fan-in here
    for bad in (0, -1, 2.5, True):
        with pytest.raises(FixNormError, match="min_fan_in"):
            centered_weights(net, min_fan_in=bad)
    # resnet20 on 1-channel images: the 3x3 convs of the blocks; not the stem (fan-in 9) or 1x1 shortcuts (16, 32)
    model = resnet20_mimic()
    chosen = centered_weights(model)
    assert len(chosen) == 18 and all(w.shape[-1] == 3 and w[0].numel() > REFERENCE_MIN_FAN_IN for w in chosen)


def test_every_selected_filter_has_zero_mean_after_every_step_and_the_rest_is_untouched():
    net = mixed_net()
    chosen = centered_weights(net, min_fan_in=4)
    others = [p for p in net.parameters() if all(p is not c for c in chosen)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    attach_weight_centering(opt, chosen)
    for w in chosen:  # centred at set-up
        assert filter_means(w).abs().max() < 1e-7
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for w in chosen:  # the gradient itself is not centred: the step alone would move the means
            assert filter_means(w.grad).abs().max() > 1e-6
        opt.step()
        for w in chosen:
            assert filter_means(w).abs().max() < 1e-7 * max(1.0, float(w.detach().abs().max()))
    # unselected weights: whatever a step leaves there stays, off-centre as it is
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.rand(p.shape, generator=g) + 0.5)  # every mean moves by about 1
    before = [p.detach().clone() for p in others]
    opt.zero_grad(set_to_none=True)
    opt.step()  # no gradients: torch.optim leaves every parameter as it is, then the hook centres
    for p, b in zip(others, before):
        assert torch.equal(p, b)
    assert all(filter_means(w).abs().max() < 1e-6 for w in chosen)
    assert filter_means(net[2].weight).abs().min() > 0.1 and filter_means(net[7].weight).abs().min() > 0.1


def test_centring_after_sgd_steps_equals_training_the_centred_reparametrisation():
    """With SGD (momentum, Nesterov, decay), centring after each step = gradient descent on W - mean(W)."""

    class Centred(nn.Module):
        def forward(self, w):
            return w - w.mean(dim=(1, 2, 3), keepdim=True)

    nets = [mixed_net(seed=3), mixed_net(seed=3)]
    hooked = nets[0]
    opt_a = torch.optim.SGD(hooked.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    attach_weight_centering(opt_a, centered_weights(hooked, min_fan_in=4))
    reparam = nets[1]
    with torch.no_grad():
        for w in centered_weights(reparam, min_fan_in=4):
            center_filters_([w])
    for conv in (reparam[0], reparam[3]):
        parametrize.register_parametrization(conv, "weight", Centred())
    opt_b = torch.optim.SGD(reparam.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        for net, opt in ((hooked, opt_a), (reparam, opt_b)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for i in (0, 3):
        torch.testing.assert_close(hooked[i].weight, reparam[i].weight, rtol=1e-5, atol=1e-6)


def test_centring_is_idempotent_and_leaves_zero_mean_filters_alone():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) + 0.3
    center_filters_([w])
    once = w.clone()
    center_filters_([w])
    torch.testing.assert_close(w, once, rtol=0, atol=1e-6)
    exact = torch.tensor([[1.0, -1.0, 2.0, -2.0], [0.5, 0.5, -0.25, -0.75]])  # exactly zero-mean rows
    kept = exact.clone()
    center_filters_([exact])
    assert torch.equal(exact, kept)
    # channels_last and bf16 weights, in one call with fp32 ones
    cl = (torch.randn(8, 4, 3, 3) + 1).contiguous(memory_format=torch.channels_last)
    half = torch.randn(8, 40, dtype=torch.bfloat16) + 1
    center_filters_([cl, half, w])
    assert cl.is_contiguous(memory_format=torch.channels_last) and filter_means(cl).abs().max() < 1e-6
    assert half.dtype == torch.bfloat16 and filter_means(half).abs().max() < 2e-2
    with pytest.raises(FixNormError, match="ndim >= 2"):
        center_filters_([torch.ones(3)])


def test_attach_checks_its_weights():
    net, other = mixed_net(), mixed_net(seed=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(FixNormError, match="no weights to centre"):
        attach_weight_centering(opt, centered_weights(net))
    with pytest.raises(FixNormError, match="not in the optimizer"):
        attach_weight_centering(opt, centered_weights(other, min_fan_in=4))
    handle = attach_weight_centering(opt, centered_weights(net, min_fan_in=4))
    handle.remove()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    opt.step()
    assert filter_means(net[0].weight).min() > 0.5  # detached: no longer centred


# -- the model transform -----------------------------------------------------------------------------
def test_transformed_resnet20_has_exactly_one_bn_on_the_logits():
    torch.manual_seed(0)
    original = create_model("resnet20", num_classes=10, in_channels=1)
    x = torch.randn(32, 1, 28, 28)
    shape = original(x).shape
    model = mimicnorm_model_(original)
    assert model is original
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == 1
    name, bn = bns[0]
    assert name == "fc.logit_bn" and isinstance(bn, nn.BatchNorm1d) and bn.num_features == 10
    assert not bn.affine and bn.weight is None and bn.bias is None
    assert list(model.fc.children()) == [model.fc.linear, bn] and isinstance(model.fc.linear, nn.Linear)
    logits = model(x)  # training mode: the logits are standardised per class over the batch
    assert logits.shape == shape
    torch.testing.assert_close(logits.mean(0), torch.zeros(10), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.var(0, unbiased=False), torch.ones(10), rtol=0, atol=1e-3)
    model.eval()
    assert model(x).shape == shape
    # the engine's recipe: channels_last and bf16 autocast
    model.train().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == shape and torch.isfinite(out).all()


def test_residual_scalars_are_learnable_and_initialised_as_the_reference_code():
    model = resnet20_mimic()
    blocks = list(model.layers)
    assert len(blocks) == 9
    for i, block in enumerate(blocks, start=1):
        assert isinstance(block.bn2, Scale) and isinstance(block.bn1, nn.Identity)
        assert block.bn2.gain.requires_grad and block.bn2.gain.ndim == 0
        assert float(block.bn2.gain.detach()) == pytest.approx(1.2 ** 2 / i)
    projections = [b.shortcut for b in blocks if isinstance(b.shortcut, nn.Sequential)]
    assert len(projections) == 2 and all(float(p[1].gain.detach()) == pytest.approx(1.2) for p in projections)
    gains = [m.gain for m in model.modules() if isinstance(m, Scale)]
    params = {id(p) for p in model.parameters()}
    assert len(gains) == 11 and all(id(g) in params for g in gains)
    F.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8)).backward()
    assert all(g.grad is not None and g.grad != 0 for g in gains)
    # one number for every branch; 0 is SkipInit: every block starts as its shortcut
    zero = resnet20_mimic(branch_gain_init=0, shortcut_gain_init=1.0)
    assert all(float(b.bn2.gain.detach()) == 0 for b in zero.layers)
    x = torch.relu(torch.randn(4, 16, 28, 28))
    torch.testing.assert_close(zero.layers[0](x), x)
    # wide / pre-activation ResNets: the gain follows the branch's last conv
    wrn = mimicnorm_model_(create_model("wrn16_4", num_classes=10, in_channels=1))
    assert [float(b.conv2.gain.gain.detach()) for b in wrn.layers] == pytest.approx([1.44 / i for i in range(1, 7)])
    assert [n for n, m in wrn.named_modules() if isinstance(m, _BatchNorm)] == ["fc.logit_bn"]


def test_he_init_fan_in_and_zero_conv_biases():
    model = resnet20_mimic()
    big = model.layers[8].conv2  # 64 x 64 x 3 x 3
    assert big.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is not None and torch.equal(m.bias, torch.zeros_like(m.bias)) for m in convs)
    assert all(m.bias is None for m in resnet20_mimic(conv_bias=False).modules() if isinstance(m, nn.Conv2d))


def test_unknown_models_and_settings_are_errors():
    for name in ("small_cnn", "mobilenetv2_cifar"):
        with pytest.raises(FixNormError, match="no residual block"):
            mimicnorm_model_(create_model(name))
    model = resnet20_mimic()
    with pytest.raises(FixNormError, match="already"):
        mimicnorm_model_(model)
    no_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(FixNormError, match="no BatchNorm"):
        mimicnorm_model_(no_bn)
    stray = create_model("resnet20", in_channels=1)
    stray.layers[0].extra = nn.BatchNorm2d(16)  # a BN the transform has no rule for: refuse, touch nothing
    before = {k: v.clone() for k, v in stray.state_dict().items()}
    with pytest.raises(FixNormError, match="does not know"):
        mimicnorm_model_(stray)
    assert all(torch.equal(before[k], v) for k, v in stray.state_dict().items())
    with pytest.raises(FixNormError, match="branch_gain_init"):
        mimicnorm_model_(create_model("resnet20"), branch_gain_init="big")
    method = get_method("mimicnorm")
    with pytest.raises(FixNormError, match="unknown setting"):  # as soon as the config is made
        make_config({"method": "mimicnorm", "method_kwargs": {"mimicnorm": {"min_fan_in_typo": 3}}})
    cfg = make_config({"method": "mimicnorm", "method_kwargs": {"mimicnorm": {"min_fan_in": 0}}})
    model = method.prepare_model(create_model("resnet20"), cfg)
    with pytest.raises(FixNormError, match="min_fan_in"):
        method.build_optimizer(model, cfg, torch.zeros(2, 3, 32, 32))


def test_method_builds_the_baseline_optimizer_with_centring():
    cfg = make_config({"method": "mimicnorm", "weight_decay": 1e-4, "lr": 0.05})
    method = get_method("mimicnorm")
    model = method.prepare_model(create_model("resnet20", in_channels=1), cfg)
    opt = method.build_optimizer(model, cfg, torch.zeros(2, 1, 28, 28))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.05
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]}
    assert all((id(p) in decayed) == (p.ndim >= 2) for p in model.parameters())
    assert all(filter_means(w).abs().max() < 1e-7 for w in centered_weights(model))  # centred at set-up
    assert len(opt._optimizer_step_post_hooks) == 1


@needs_fmnist
def test_engine_trains_resnet20_and_resumes_bit_for_bit(tmp_path):
    recipe = dict(load_recipe("fmnist-smoke"), model="resnet20", model_kwargs={}, method="mimicnorm",
                  train_subset=1000, epochs=2, threads=1, channels_last=True,
                  holdout=1000)  # evaluated on 1,000 held-out training images: a tenth of a test-set pass
    cfg = make_config(recipe)
    snapshot = tmp_path / "stopped"

    def copy_after_first(record):  # the run as a kill after epoch 1 would leave it
        if record["epoch"] == 1:
            shutil.copytree(tmp_path / "straight", snapshot)

    trainer = Trainer(cfg, tmp_path / "straight", on_epoch=copy_after_first)
    summary = trainer.fit()
    assert trainer.history[1]["train_loss"] < trainer.history[0]["train_loss"]
    assert summary["final_test_acc"] > 0.2  # chance is 0.1; 20 steps on 1000 images
    Trainer(None, snapshot, resume=True).fit()
    straight, resumed = (load_checkpoint(d / "last.pt")["model"] for d in (tmp_path / "straight", snapshot))
    assert straight.keys() == resumed.keys() and "fc.logit_bn.running_mean" in straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # the resumed epoch's steps were centred too: the hook came back with the optimizer
    model = resnet20_mimic()
    model.load_state_dict(resumed)
    assert all(filter_means(w).abs().max() < 1e-6 for w in centered_weights(model))
    rows = [list(csv.DictReader((d / "metrics.csv").open())) for d in (tmp_path / "straight", snapshot)]
    assert [r["test_acc"] for r in rows[0]] == [r["test_acc"] for r in rows[1]]
