"""Powerpropagation against its definition: w = v|v|^(alpha-1), dL/dv = alpha|v|^(alpha-1) dL/dw, pruning."""
import math

import pytest
import torch
from torch import nn

from fixnorm import FixNormError, analyze
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.methods import get_method
from fixnorm.methods.powerprop import (PowerPropagation, PruneMask, magnitude_prune_, powerprop_, remove_powerprop_,
                                       weight_sparsity)
from fixnorm.models import create_model
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(),
                                  reason="apt-get install dataset-fashion-mnist")


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=1, width=8)


def layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd_steps(model, steps, lr=0.05, weight_decay=5e-4):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    for i in range(steps):
        x, y = batch(seed=100 + i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0])
def test_forward_weight_is_v_times_abs_v_to_the_alpha_minus_one(alpha):
    model = small_cnn()
    names = powerprop_(model, alpha)
    assert names == ["features.0.0.weight", "features.1.0.weight", "features.3.0.weight", "features.4.0.weight",
                     "classifier.weight"]
    for m in layers(model):
        v = m.parametrizations.weight.original
        assert torch.equal(m.weight, v * v.abs().pow(alpha - 1))
    keys = model.state_dict().keys()
    assert "classifier.parametrizations.weight.original" in keys and "classifier.weight" not in keys
    assert "classifier.bias" in keys and "features.0.1.weight" in keys  # biases and BN untouched


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0])
def test_gradient_wrt_v_is_alpha_abs_v_pow_times_dl_dw(alpha):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    powerprop_(layer, alpha)
    v = layer.parametrizations.weight.original
    with torch.no_grad():
        v[0, 0] = 0.0  # the derivative at v = 0: 0 for alpha > 1, 1 for alpha = 1, never NaN
        v[1, 1] = -0.3
    x, r = torch.randn(7, 5), torch.randn(7, 3)
    (layer(x) * r).sum().backward()
    dl_dw = r.t() @ x  # by hand: L = sum r * (x W^T + b)  =>  dL/dW = r^T x
    expected = alpha * v.detach().abs().pow(alpha - 1) * dl_dw
    torch.testing.assert_close(v.grad, expected, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(v.grad).all()
    assert v.grad[0, 0] == (dl_dw[0, 0] if alpha == 1 else 0.0)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0])
def test_init_keeps_the_weights_and_outputs(alpha):
    model, plain = small_cnn(), small_cnn()
    powerprop_(model, alpha)
    for a, b in zip(layers(model), layers(plain)):
        # v = sign(w0)|w0|^(1/alpha), rounded once: w(v) is w0 to the last bit or two of float32
        torch.testing.assert_close(a.weight, b.weight, rtol=3e-7, atol=0)
        v = a.parametrizations.weight.original
        assert torch.equal(v.sign(), b.weight.sign())
    x, _ = batch()
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)


def test_alpha_one_is_exactly_the_plain_network():
    model, plain = small_cnn(), small_cnn()
    powerprop_(model, 1.0)
    for a, b in zip(layers(model), layers(plain)):
        assert torch.equal(a.weight, b.weight)
    x, _ = batch()
    assert torch.equal(model(x), plain(x))
    sgd_steps(model, 3), sgd_steps(plain, 3)
    for a, b in zip(layers(model), layers(plain)):
        assert torch.equal(a.weight, b.weight)
    assert torch.equal(model(x), plain(x))


def test_state_dict_round_trips_and_remove_bakes_the_weights():
    model = small_cnn(seed=0)
    powerprop_(model, 2.0)
    sgd_steps(model, 2)  # v away from its initial value, BN statistics moved
    state = model.state_dict()
    fresh = small_cnn(seed=5)
    powerprop_(fresh, 2.0)
    fresh.load_state_dict(state)
    x, _ = batch()
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    with pytest.raises(RuntimeError, match="parametrizations.weight.original"):
        small_cnn().load_state_dict(state)  # a plain model has other keys: the mismatch is loud
    baked = [m.weight.detach().clone() for m in layers(model)]
    assert remove_powerprop_(model) == ["features.0.0.weight", "features.1.0.weight", "features.3.0.weight",
                                        "features.4.0.weight", "classifier.weight"]
    assert "classifier.weight" in model.state_dict()
    assert all(torch.equal(m.weight, w) for m, w in zip(layers(model), baked))
    assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("alpha", [1.0, 2.0, None])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_reaches_the_sparsity_and_sticks_under_momentum(alpha, scope):
    model = small_cnn()
    if alpha is not None:
        powerprop_(model, alpha)
    opt = sgd_steps(model, 2)  # momentum buffers are non-zero everywhere before pruning
    before = [m.weight.detach().abs().clone() for m in layers(model)]
    result = magnitude_prune_(model, 0.8, scope=scope)
    total = sum(w.numel() for w in before)
    assert result["total"] == total and abs(result["overall"] - 0.8) <= 1 / total
    for name, w in zip(result["layers"], before):
        if scope == "layer":
            assert abs(result["layers"][name] - 0.8) <= 1 / w.numel()
    masks = [m.weight == 0 for m in layers(model)]
    pruned = torch.cat([w[k] for w, k in zip(before, masks)])
    kept = torch.cat([w[~k] for w, k in zip(before, masks)])
    if scope == "global":  # the smallest |w| overall went, not v: ranked by the effective weights
        assert pruned.max() <= kept.min()
    for i in range(5):  # training goes on with the old optimizer: momentum, weight decay
        x, y = batch(seed=200 + i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = [m.weight.detach() for m in layers(model)]
    assert all(torch.equal(w == 0, k) for w, k in zip(after, masks)), "pruned weights must stay exactly zero"
    assert not torch.equal(torch.cat([w[~k] for w, k in zip(after, masks)]), kept)  # the rest still trains
    assert weight_sparsity(model)["overall"] == result["overall"]


def test_zero_v_is_a_fixed_point_of_the_gradient_but_not_of_momentum_hence_the_mask():
    model = small_cnn()
    powerprop_(model, 2.0)
    opt = sgd_steps(model, 2)
    conv = layers(model)[1]
    v = conv.parametrizations.weight.original
    with torch.no_grad():
        v[:2] = 0  # pruning by v = 0 alone, no mask
    x, y = batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert torch.equal(v.grad[:2], torch.zeros_like(v.grad[:2]))  # dL/dv = 2|v| dL/dw = 0 at v = 0
    opt.step()
    assert (v[:2] != 0).any()  # ... but the momentum from earlier steps moves it: masks are what make pruning stick
    magnitude_prune_(model, 0.5)
    assert isinstance(conv.parametrizations.weight[-1], PruneMask)
    assert torch.equal(v == 0, ~conv.parametrizations.weight[-1].mask)  # the stored v is zeroed too
    mask = conv.parametrizations.weight[-1].mask.clone()
    assert magnitude_prune_(model, 0.7)["overall"] == pytest.approx(0.7, abs=1e-3)  # pruning again tightens
    assert len(conv.parametrizations.weight) == 2 and not (conv.parametrizations.weight[-1].mask & ~mask).any()
    assert magnitude_prune_(model, 0.0)["overall"] == pytest.approx(0.7, abs=1e-3)  # and never un-prunes


def test_bad_settings_are_clear_errors():
    for alpha in (0.5, math.nan, math.inf, -2.0, True, "2"):
        with pytest.raises(FixNormError, match="alpha"):
            powerprop_(small_cnn(), alpha)
    with pytest.raises(FixNormError, match="alpha"):
        PowerPropagation(0.9)
    for sparsity in (1.0, 1.5, -0.1, math.nan, True):
        with pytest.raises(FixNormError, match="sparsity"):
            magnitude_prune_(small_cnn(), sparsity)
    with pytest.raises(FixNormError, match="scope"):
        magnitude_prune_(small_cnn(), 0.5, scope="filter")
    with pytest.raises(FixNormError, match="matches no conv or linear"):
        powerprop_(small_cnn(), 2.0, include=["head.*"])
    with pytest.raises(FixNormError, match="no conv"):
        powerprop_(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 2.0)
    model = small_cnn()
    assert powerprop_(model, 2.0, include=["classifier"]) == ["classifier.weight"]
    with pytest.raises(FixNormError, match="already parametrized"):
        powerprop_(model, 3.0, include="classifier")
    with pytest.raises(FixNormError, match="no powerprop weights"):
        remove_powerprop_(small_cnn())
    with pytest.raises(FixNormError, match="unknown setting.*alfa"):  # as soon as the config is made
        make_config(load_recipe("fmnist-smoke"), {"method": "powerprop", "method_kwargs": {"powerprop": {"alfa": 2}}})
    with pytest.raises(FixNormError, match="method_kwargs.powerprop.alpha must be a number"):
        make_config({"method": "powerprop", "method_kwargs": {"powerprop": {"alpha": "two"}}})


def test_method_settings_and_optimizer_groups():
    cfg = make_config(load_recipe("fmnist-smoke"), {"method": "powerprop", "method_kwargs": {
        "powerprop": {"alpha": 3, "include": ["features.*"]}}})
    method = get_method("powerprop")
    model = method.prepare_model(small_cnn(), cfg)
    chains = [m.parametrizations.weight for m in layers(model)[:4]]
    assert all(c[0].alpha == 3.0 for c in chains) and not hasattr(layers(model)[4], "parametrizations")
    opt = method.build_optimizer(model, cfg, batch()[0])
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {id(c.original) for c in chains} <= decayed  # weight decay acts on v
    assert id(layers(model)[0].parametrizations.weight.original) in decayed


def test_analyze_sees_the_reparametrised_weights():
    model = small_cnn()
    powerprop_(model, 2.0)
    x, _ = batch()
    roles = analyze(model, x)  # scaling v scales w by a positive factor: invariance carries over
    assert roles.classifier == ["classifier.parametrizations.weight.original"]
    assert roles.scale_invariant == {f"features.{i}.0.parametrizations.weight.original": "filter"
                                     for i in (0, 1, 3, 4)}


@needs_fmnist
def test_engine_run_trains_and_resumes_bit_for_bit(tmp_path):
    cfg = make_config(load_recipe("fmnist-smoke"), {"method": "powerprop", "epochs": 2, "threads": 1, "holdout": 1000,
                                                    "method_kwargs": {"powerprop": {"alpha": 2}}})
    summary = train(cfg, tmp_path / "straight")
    assert summary["final_test_acc"] > 0.2  # chance is 0.1

    train_until(cfg, tmp_path / "stopped", epoch=1)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "stopped" / "last.pt")["model"]
    assert "classifier.parametrizations.weight.original" in a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = get_method("powerprop").prepare_model(small_cnn(), cfg)
    fresh.load_state_dict(a)  # a checkpoint loads into a freshly prepared model


@needs_fmnist
def test_engine_alpha_one_equals_the_sgd_baseline(tmp_path):
    common = dict(load_recipe("fmnist-smoke"), train_subset=500, holdout=500, epochs=1, threads=1)
    sgd = train(make_config(common, {"method": "sgd"}), tmp_path / "sgd")
    pp = train(make_config(common, {"method": "powerprop", "method_kwargs": {"powerprop": {"alpha": 1}}}),
               tmp_path / "pp")
    assert pp["final_test_acc"] == sgd["final_test_acc"]
    a = load_checkpoint(tmp_path / "sgd" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "pp" / "last.pt")["model"]
    b = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in b.items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
