"""The model zoo beyond plain ResNets: shapes, published sizes, stochastic depth, and measured roles."""

import pytest
import torch
from torch import nn

import fixnorm
from fixnorm.errors import FixNormError
from fixnorm.models import create_model, wide_resnet
from fixnorm.models.efficientnet import SqueezeExcite
from fixnorm.models.layers import DropPath, make_divisible

# name -> (num_classes, input size): ImageNet variants get 64x64 so their last map is 2x2, not 1x1
CASES = {
    "preact_resnet18": (10, 32),
    "wrn16_4": (10, 32),
    "wrn28_10": (10, 32),
    "mobilenetv2": (1000, 64),
    "mobilenetv2_cifar": (10, 32),
    "efficientnet_b0": (1000, 64),
    "efficientnet_b0_cifar": (10, 32),
}

# (num_classes, low, high) around the published sizes
SIZES = {
    "preact_resnet18": (10, 11.0e6, 11.4e6),
    "wrn16_4": (10, 2.6e6, 2.8e6),
    "wrn28_10": (10, 36.0e6, 37.0e6),
    "mobilenetv2": (1000, 3.4e6, 3.6e6),
    "efficientnet_b0": (1000, 5.2e6, 5.4e6),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a small, shared CPU two spinning threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CASES))
def test_forward_shape_train_and_eval(name):
    torch.manual_seed(0)
    num_classes, size = CASES[name]
    model = create_model(name, num_classes=num_classes)
    x = torch.randn(2, 3, size, size)
    out = model.train()(x)
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


def test_in_channels():
    model = create_model("efficientnet_b0_cifar", num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_counts(name):
    num_classes, low, high = SIZES[name]
    assert low <= _n_params(create_model(name, num_classes=num_classes)) <= high


def test_cifar_variants_keep_resolution():
    x = torch.randn(2, 3, 32, 32)
    assert create_model("mobilenetv2_cifar").features(x).shape[-2:] == (4, 4)
    assert create_model("efficientnet_b0_cifar").features(x).shape[-2:] == (2, 2)
    assert create_model("mobilenetv2", cifar=True).features(x).shape[-2:] == (4, 4)
    assert create_model("efficientnet_b0").features(x).shape[-2:] == (1, 1)


def test_make_divisible_and_width_mult():
    assert make_divisible(32) == 32 and make_divisible(32 * 0.35) == 16  # never 10% below the target
    model = create_model("mobilenetv2", num_classes=1000, width_mult=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 16 and convs[-1].out_channels == 1280  # last conv never narrows
    assert all(c.out_channels % 8 == 0 for c in convs)


def test_wide_resnet_options():
    model = create_model("wrn16_4", drop_rate=0.3)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3] * 6
    with pytest.raises(FixNormError, match="6n\\+4"):
        wide_resnet(15, 2)


def test_bn_momentum_option():
    model = create_model("efficientnet_b0_cifar", bn_momentum=0.01)
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}


def test_drop_path_is_per_sample_and_seeded():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 2, 2)
    torch.manual_seed(0)
    out = drop(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # kept samples rescaled by 1 / (1 - p)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(FixNormError):
        DropPath(1.0)


def test_efficientnet_stochastic_depth():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0_cifar")
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 9 and rates == sorted(rates) and 0 < rates[0] < rates[-1] < 0.2  # 9 residual blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        outs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_efficientnet_roles():
    """The SE convs feed a sigmoid gate (and carry biases): not scale-invariant. Every other conv
    is followed by BN and is invariant per filter; the final linear is the classifier."""
    torch.manual_seed(0)
    model = create_model("efficientnet_b0_cifar")
    roles = fixnorm.analyze(model, torch.randn(2, 3, 32, 32))
    se = {f"{name}.{p}.weight" for name, m in model.named_modules() if isinstance(m, SqueezeExcite)
          for p in ("reduce", "expand")}
    convs = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(se) == 32 and len(convs) == 81
    assert not se & set(roles.scale_invariant), roles.table()
    assert {n: roles.scale_invariant.get(n) for n in convs - se} == dict.fromkeys(convs - se, "filter"), roles.table()
    assert roles.classifier == ["fc.weight"]
