"""LAWN: the final homogeneous sub-network (roles), the norm rule after warm-up, its state, and the engine method."""
import copy
import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixnorm
from fixnorm import FixNormError, analyze
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.methods.baselines import decay_groups
from fixnorm.methods.lawn import LAWN, build_lawn, glob_names
from fixnorm.models import create_model
from fixnorm.roles import _final_homogeneous
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(),
                                  reason="apt-get install dataset-fashion-mnist")


def image(n=4, c=3, size=12, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def assert_homogeneous(model, x, names, degree, c=1.7):
    """Independent of the graph walk: with the sub-network's biases at zero, scaling its weights by c
    scales the output by c**degree (float64, eval mode so BN uses fixed statistics)."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():  # a generic point: no zero-initialised layer may hide the scaling
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype) * p.pow(2).mean().sqrt() + 0.05)
        for name in names:
            bias = params.get(name.rsplit(".", 1)[0] + ".bias")
            if bias is not None:
                bias.zero_()
        before = model(x.double())
        for name in names:
            params[name].mul_(c)
        after = model(x.double())
    assert torch.allclose(after, c ** degree * before, rtol=1e-9, atol=1e-12)
    assert before.abs().max() > 1e-6  # a zero output would pass anything


# -- roles.final_homogeneous -------------------------------------------------------------------------
def test_resnet20_final_homogeneous_is_the_classifier():
    # ... -> BN -> (+ shortcut) -> ReLU -> global average pool -> fc: every path stops at a BatchNorm
    model = create_model("resnet20", num_classes=10)
    roles = analyze(model, image(size=16))
    assert roles.final_homogeneous == ["fc.weight"]
    assert_homogeneous(model, image(size=16), ["fc.weight"], 1)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_without_norm_layers_every_weight_is_in_the_sub_network(kind):
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 16), nn.ReLU(), nn.Dropout(0.0),
                              nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
        expected = ["1.weight", "4.weight", "6.weight"]
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.LeakyReLU(0.1),
                              nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        expected = ["0.weight", "3.weight", "8.weight"]
    roles = analyze(model, image())
    assert roles.final_homogeneous == expected
    assert_homogeneous(model, image(), expected, 3)
    with pytest.raises(AssertionError):  # the degree is the chain's length: a wrong k fails the check
        assert_homogeneous(model, image(), expected, 2)


def bn_then(*head):
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), *head)


def test_batchnorm_then_two_linear_relu_layers():
    model = bn_then(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    roles = analyze(model, image())
    assert roles.final_homogeneous == ["5.weight", "7.weight"]
    assert_homogeneous(model, image(), ["5.weight", "7.weight"], 2)
    assert "final homogeneous sub-network: 5.weight, 7.weight" in roles.table()


def test_silu_ends_the_sub_network():
    # BN -> SiLU -> Linear: SiLU(c x) != c SiLU(x), so only the linear after it
    model = bn_then(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 5))
    roles = analyze(model, image())
    assert roles.final_homogeneous == ["6.weight"]
    assert_homogeneous(model, image(), ["6.weight"], 1)


def test_layernorm_right_before_the_head():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 5))
    roles = analyze(model, image())
    assert roles.final_homogeneous == ["4.weight"]
    assert_homogeneous(model, image(), ["4.weight"], 1)


@pytest.mark.parametrize("name", ["efficientnet_b0_cifar", "mobilenetv2_cifar"])
def test_model_zoo_heads(name):
    # EfficientNet: head conv -> BN -> SiLU -> pool -> dropout -> fc; MobileNetV2: ... BN -> ReLU6 (clips
    # at 6, so not homogeneous) -> pool -> dropout -> fc. Both: the classifier alone.
    model = create_model(name, num_classes=10)
    x = image(n=2, size=16)
    if name == "mobilenetv2_cifar":
        roles = analyze(model, x)
        assert roles.final_homogeneous == ["fc.weight"] == roles.classifier
    else:  # analyze() takes ~11 s on EfficientNet (its invariance bisection); the graph walk alone, ~1 ms
        assert _final_homogeneous([model(x).grad_fn], dict(model.named_parameters())) == {"fc.weight"}
    assert_homogeneous(model, x, ["fc.weight"], 1)


class Residual(nn.Module):
    """x + W2 relu(W1 x) without a norm: the branches have degrees 0 and 2, so the sum is not homogeneous."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(x + self.b(F.relu(self.a(x)))))


class GatedAfterNorm(nn.Module):
    """A squeeze-excite gate after the last BN: the sigmoid reads conv2's output, so conv2 cannot be scaled."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.reduce, self.expand, self.fc = (nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1),
                                                         nn.Linear(8, 5))

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.bn(self.conv(x)))))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(h.mean((2, 3), keepdim=True)))))
        return self.fc((h * gate).mean((2, 3)))


def test_degree_mismatch_and_gates_end_the_sub_network():
    assert analyze(Residual(), torch.randn(4, 8)).final_homogeneous == ["head.weight"]
    assert analyze(GatedAfterNorm(), image()).final_homogeneous == ["fc.weight"]
    on_logits = bn_then(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5))
    assert analyze(on_logits, image()).final_homogeneous == []


def test_roles_dict_round_trip_and_old_dicts():
    roles = analyze(bn_then(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), image())
    assert fixnorm.Roles.from_dict(roles.to_dict()).final_homogeneous == ["5.weight"]
    old = roles.to_dict()
    del old["final_homogeneous"]  # saved before the field existed
    assert fixnorm.Roles.from_dict(old).final_homogeneous == []


# -- the LAWN rule -------------------------------------------------------------------------------------
def lawn_model(seed=0):
    torch.manual_seed(seed)
    return bn_then(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))


HELD = ["5.weight", "7.weight"]


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def make_optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(decay_groups(model, 5e-3), lr=0.2, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.02)
    if kind == "adamw":
        return torch.optim.AdamW(decay_groups(model, 0.1), lr=0.02)
    return fixnorm.FixNorm(model, image(), base=torch.optim.Adam, lr=0.02, free_steps=0)


def train_steps(model, optimizer, data):
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "fixnorm"])
def test_norms_free_during_warmup_then_held(kind):
    model = lawn_model()
    optimizer = make_optimizer(kind, model)
    lawn = LAWN(model, optimizer, image(), warmup_steps=4)
    assert lawn.names == HELD
    params = dict(model.named_parameters())
    conv_norm = params["0.weight"].norm().item()
    history, conv = [], []
    for x, y in batches(10):
        train_steps(model, optimizer, [(x, y)])
        history.append(lawn.norms())
        conv.append(params["0.weight"].detach().clone())
    warm = history[:4]
    for name in HELD:
        if kind != "fixnorm" or name != "7.weight":  # FixNorm itself holds the classifier from the start
            assert len({round(h[name], 6) for h in warm}) == 4, (name, warm)  # free: the norm moves every step
        end = warm[-1][name]
        assert lawn.targets()[name] == pytest.approx(end, rel=1e-7)
        for h in history[4:]:
            assert h[name] == pytest.approx(end, rel=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(conv[4:], conv[5:]))  # the others keep training
    assert len({round(h["7.weight"], 6) for h in history[4:]}) == 1
    decays = [g.get("weight_decay", 0.0) for g in optimizer.param_groups
              if any(p is params[HELD[0]] for p in g["params"])]
    assert decays == [0.0]  # off for the held weights after warm-up ...
    if kind in ("sgd", "adamw"):
        conv_group = next(g for g in optimizer.param_groups if any(p is params["0.weight"] for p in g["params"]))
        assert conv_group["weight_decay"] > 0  # ... and still on for the others (the group was split)
    if kind == "fixnorm":
        assert params["0.weight"].norm().item() == pytest.approx(conv_norm, rel=1e-5)  # FixNorm's own rule holds


def test_warmup_zero_holds_the_initial_norms():
    model = lawn_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    lawn = LAWN(model, optimizer, params=["7.weight"], warmup_steps=0)
    start = model[7].weight.norm().item()
    train_steps(model, optimizer, batches(3))
    assert model[7].weight.norm().item() == pytest.approx(start, rel=1e-5) and lawn.constrained


@pytest.mark.parametrize("save_at", [2, 6])
def test_state_dict_round_trip_continues_bit_identically(save_at):
    data = batches(10)

    def build():
        model = lawn_model()
        optimizer = torch.optim.AdamW(decay_groups(model, 0.05), lr=0.02)
        return model, optimizer, LAWN(model, optimizer, image(), warmup_steps=4)

    model, optimizer, lawn = build()
    train_steps(model, optimizer, data[:save_at])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict(), "lawn": lawn.state_dict()})
    train_steps(model, optimizer, data[save_at:])

    model2, optimizer2, lawn2 = build()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    lawn2.load_state_dict(saved["lawn"])
    train_steps(model2, optimizer2, data[save_at:])
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert lawn2.step_count == 10 and lawn.targets() == lawn2.targets()


def test_errors():
    model = lawn_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(FixNormError, match="warmup_steps"):
            LAWN(model, optimizer, image(), warmup_steps=bad)
    with pytest.raises(FixNormError, match="unknown parameter"):
        LAWN(model, optimizer, warmup_steps=1, params=["7.weight", "head.weight"])
    with pytest.raises(FixNormError, match="example_inputs"):
        LAWN(model, optimizer, warmup_steps=1)
    with pytest.raises(FixNormError, match="not trained by this optimizer"):
        LAWN(model, torch.optim.Adam(model[0].parameters()), warmup_steps=1, params=["7.weight"])
    on_logits = bn_then(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5))
    with pytest.raises(FixNormError, match="no final homogeneous"):
        LAWN(on_logits, torch.optim.Adam(on_logits.parameters()), image(), warmup_steps=1)
    zeroed = lawn_model()
    nn.init.zeros_(zeroed[7].weight)
    with pytest.raises(FixNormError, match="zero or non-finite norm"):
        LAWN(zeroed, torch.optim.Adam(zeroed.parameters()), image(), warmup_steps=0)
    deferred = LAWN(model, optimizer, warmup_steps=None, params=["7.weight"])
    with pytest.raises(FixNormError, match="warmup_steps. is not set"):
        train_steps(model, optimizer, batches(1))
    deferred.remove()
    lawn = LAWN(model, optimizer, warmup_steps=0, params=["7.weight"])
    with pytest.raises(FixNormError, match="cannot change"):
        lawn.warmup_steps = 5
    with pytest.raises(FixNormError, match="already has rules attached"):
        LAWN(model, optimizer, warmup_steps=0, params=["5.weight"])
    lawn.remove()
    other = LAWN(model, optimizer, warmup_steps=0, params=["5.weight"])
    with pytest.raises(FixNormError, match="another model"):
        other.load_state_dict(lawn.state_dict())
    other.remove()
    lawn = LAWN(model, optimizer, warmup_steps=0, params=["7.weight"])
    x, y = batches(1)[0]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[7].weight.grad.fill_(float("nan"))
    with pytest.raises(FixNormError, match="non-finite"):
        optimizer.step()


# -- the engine method ---------------------------------------------------------------------------------
TINY = dict(load_recipe("fmnist-smoke"), train_subset=1000, holdout=500, epochs=3, threads=1, method="lawn", base="adam",
            lr=0.003, weight_decay=5e-4, method_kwargs={"lawn": {"warmup_epochs": 1}})


def test_method_settings_are_checked():
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(FixNormError, match="unknown setting"):
        build_lawn(model, make_config(TINY, {"method_kwargs": {"lawn": {"warmup": 1}}}), x)
    with pytest.raises(FixNormError, match="warmup_epochs"):
        build_lawn(model, make_config(TINY, {"method_kwargs": {"lawn": {"warmup_epochs": -1}}}), x)
    with pytest.raises(FixNormError, match="matches no weight"):
        build_lawn(model, make_config(TINY, {"method_kwargs": {"lawn": {"layers": ["head.*"]}}}), x)
    assert glob_names(model, ["classifier.*", "features.0.*"]) == ["features.0.0.weight", "classifier.weight"]
    optimizer = build_lawn(model, make_config(TINY), x)
    assert isinstance(optimizer, torch.optim.Adam)


@needs_fmnist
def test_engine_run_trains_holds_the_norm_and_resumes(tmp_path):
    cfg = make_config(TINY)
    summary = train(cfg, tmp_path / "straight")
    assert summary["final_test_acc"] > 0.2  # chance is 0.1
    rows = list(csv.DictReader((tmp_path / "straight" / "metrics.csv").open()))
    assert [r["lawn_constrained"] for r in rows] == ["1", "1", "1"]  # warm-up: exactly the first epoch

    train_until(cfg, tmp_path / "stopped", epoch=1)
    after_warmup = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]["classifier.weight"].norm()
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert straight["classifier.weight"].norm().item() == pytest.approx(after_warmup.item(), rel=1e-5)
    assert float(rows[-1]["lawn_norm"]) == pytest.approx(after_warmup.item(), rel=1e-5)
