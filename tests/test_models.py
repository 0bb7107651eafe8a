"""Every registered model runs, and the reference architectures have their published sizes."""

import pytest
import torch

from fixnorm.errors import FixNormError
from fixnorm.models import create_model, list_models, register_model


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("resnet110", "wrn28_10")])
def test_forward_shape(name):
    torch.manual_seed(0)
    grey = name in ("small_cnn", "fast_cnn")  # Fashion-MNIST models: 28x28, one channel
    size = 64 if name in ("resnet50", "mobilenetv2", "efficientnet_b0") else 28 if grey else 32
    in_channels = 1 if grey else 3
    model = create_model(name, num_classes=7, in_channels=in_channels)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_registry_lists_the_reference_models():
    assert {"small_cnn", "fast_cnn", "resnet20", "resnet32", "resnet56", "resnet110", "resnet50"} <= set(list_models())
    assert {"preact_resnet18", "wrn16_4", "wrn28_10", "mobilenetv2", "mobilenetv2_cifar", "efficientnet_b0",
            "efficientnet_b0_cifar"} <= set(list_models())  # the zoo, tested in test_models_zoo.py


def test_resnet110_depth():
    model = create_model("resnet110")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 110  # 3x3 convs plus the classifier


def test_parameter_counts():
    assert 260_000 <= _n_params(create_model("resnet20")) <= 280_000
    assert 25_000_000 <= _n_params(create_model("resnet50", num_classes=1000)) <= 26_000_000
    # any WRN-d-k by model_kwargs: WRN-16-1 is the paper's 0.175M, WRN-16-4 the registered one
    assert 170_000 <= _n_params(create_model("wrn", depth=16, widen_factor=1)) <= 180_000
    assert _n_params(create_model("wrn", depth=16, widen_factor=4)) == _n_params(create_model("wrn16_4"))


def test_convs_have_no_bias_and_are_followed_by_bn():
    model = create_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(c.bias is None for c in convs) and len(convs) == len(bns)


def test_fast_cnn_pools_early_and_every_conv_is_scale_invariant():
    """One conv at full resolution, the rest at 1/2 or less; every conv is followed by BN (FixNorm holds each filter)
    and the final linear is the classifier, as measured by the role analysis."""
    import fixnorm

    torch.manual_seed(0)
    model = create_model("fast_cnn", in_channels=1)
    assert 280_000 <= _n_params(model) <= 300_000  # width 32
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.randn(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert sizes == [28, 14, 14, 7, 7, 3]
    roles = fixnorm.analyze(model, torch.randn(4, 1, 28, 28))
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {n: roles.scale_invariant.get(n) for n in convs} == dict.fromkeys(convs, "filter"), roles.table()
    assert roles.classifier == ["classifier.weight"]
    with pytest.raises(ValueError, match="width"):
        create_model("fast_cnn", width=0)


def test_fast_cnn_pool_first_pools_before_bn_and_stays_scale_invariant():
    """``pool_first``: the same parameters as the default layout, each block's first BN sees the pooled map (a quarter
    of the pixels), and every conv is still scale-invariant filter by filter (max-pooling is positively homogeneous)."""
    import fixnorm

    torch.manual_seed(0)
    default, pooled = create_model("fast_cnn", in_channels=1), create_model("fast_cnn", in_channels=1, pool_first=True)
    assert [p.shape for p in default.parameters()] == [p.shape for p in pooled.parameters()]
    bn_sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: bn_sizes.append(i[0].shape[-1]))
             for m in pooled.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    pooled(torch.randn(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert bn_sizes == [14, 14, 7, 7, 3, 3]  # the default layout normalises at [28, 14, 14, 7, 7, 3]
    roles = fixnorm.analyze(pooled, torch.randn(4, 1, 28, 28))
    convs = {f"{n}.weight" for n, m in pooled.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {n: roles.scale_invariant.get(n) for n in convs} == dict.fromkeys(convs, "filter"), roles.table()
    assert roles.classifier == ["classifier.weight"]


def test_zero_init_residual():
    model = create_model("resnet50", num_classes=10, zero_init_residual=True)
    assert all(bool((b.bn3.weight == 0).all()) for b in model.modules() if hasattr(b, "bn3"))


def test_unknown_model_lists_known_names():
    with pytest.raises(FixNormError, match="resnet20"):
        create_model("vgg16")


def test_register_model(monkeypatch):
    import fixnorm.models as models

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # keep the global registry clean

    @register_model("tiny_linear_for_test")
    def tiny(num_classes=10, in_channels=3):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 16, num_classes))

    assert "tiny_linear_for_test" in list_models()
    assert create_model("tiny_linear_for_test", num_classes=4)(torch.randn(2, 3, 4, 4)).shape == (2, 4)
    with pytest.raises(FixNormError, match="already registered"):
        register_model("tiny_linear_for_test")(tiny)
