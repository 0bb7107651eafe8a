"""A-FAN: the split, feature PGD, the points and mix, against their definitions; the method on the engine."""
import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixnorm import FixNorm, FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.methods.afan import (AFANStep, feature_pgd, feature_points, mix, positional_moments, split_model,
                                  split_points)
from fixnorm.models import create_model
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
MODELS = ["resnet20", "small_cnn", "wrn16_4", "mobilenetv2_cifar", "preact_resnet18"]
TINY = dict(load_recipe("fmnist-smoke"), train_subset=600, holdout=500, epochs=2, threads=1, method="afan")


@pytest.mark.parametrize("name", MODELS)
def test_the_split_is_the_model_at_every_point(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 28, 28)
    _, points = split_points(model)
    assert "stage1" in points
    for mode in (False, True):  # eval, then train mode (batch statistics)
        model.train(mode)
        for point in points:
            split = split_model(model, point)
            with torch.no_grad():
                torch.manual_seed(5)  # the same dropout draws
                pieces = split.tail(split.head(x))
                torch.manual_seed(5)
                assert torch.equal(pieces, model(x)), (name, point, mode)


def test_unknown_models_and_points_are_clear_errors():
    with pytest.raises(FixNormError, match=r"offers \['stage1', 'stage2'\]"):
        split_model(create_model("small_cnn", num_classes=10, in_channels=1), "stage3")
    with pytest.raises(FixNormError, match="no split points for Sequential"):
        split_model(nn.Sequential(nn.Linear(2, 2)))


def linear_tail():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


def test_pgd_stays_in_its_linf_bounds():
    tail, h, y = linear_tail(), torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    steps, gamma, eps = 5, 0.03, 0.05
    clipped = feature_pgd(tail, h, y, steps=steps, step_size=gamma, epsilon=eps)
    assert (clipped - h).abs().max() <= eps + 1e-6
    free = feature_pgd(tail, h, y, steps=steps, step_size=gamma)
    assert (free - h).abs().max() <= steps * gamma + 1e-6
    assert (free - h).abs().max() >= steps * gamma - 1e-6  # a linear tail's gradient sign never flips
    torch.manual_seed(2)
    started = feature_pgd(lambda z: tail(z), h, y, steps=steps, step_size=gamma, epsilon=eps, random_start=True)
    assert (started - h).abs().max() <= eps + 1e-6
    with pytest.raises(FixNormError, match="random_start needs an epsilon"):
        feature_pgd(tail, h, y, steps=1, step_size=gamma, random_start=True)


def test_one_pgd_step_on_a_linear_tail_is_the_closed_form():
    tail, h, y = linear_tail(), torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (8,))
    tail = tail.double()
    gamma = 0.01
    W = tail[1].weight.detach()
    logits = tail(h).detach()
    # d CE / d h = W^T (softmax - onehot) / batch, per sample
    grad = ((logits.softmax(1) - F.one_hot(y, 5).double()) @ W / len(y)).reshape(h.shape)
    expected = h + gamma * grad.sign()
    assert torch.equal(feature_pgd(tail, h, y, steps=1, step_size=gamma), expected)


def test_pgd_leaves_every_parameter_gradient_untouched():
    tail, h, y = linear_tail(), torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    for p in tail.parameters():
        p.grad = torch.full_like(p, 7.0)
    feature_pgd(tail, h, y, steps=3, step_size=0.1)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in tail.parameters())


def test_points_hit_their_endpoints_bitwise_and_mix_moves_the_statistics():
    torch.manual_seed(3)
    h, adv = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5) * 3 + 1
    start, end, middle = feature_points(h, adv, [0.0, 1.0, 0.5], [False, False, False])
    assert torch.equal(start, h) and torch.equal(end, adv)
    assert torch.allclose(middle, (h + adv) / 2, atol=1e-6)
    mixed = mix(h, adv)
    mean, std = positional_moments(mixed)
    adv_mean, adv_std = positional_moments(adv)
    assert torch.allclose(mean, adv_mean, atol=1e-5) and torch.allclose(std, adv_std, rtol=1e-3)
    # the clean input's own per-position affine scale does not matter (up to the 1e-5 inside the std)
    assert torch.allclose(mix(2.5 * h - 0.7, adv), mixed, atol=1e-3)


@needs_fmnist
def test_the_adversarial_loss_reaches_only_the_tail_and_frozen_bn_keeps_the_statistics(tmp_path):
    torch.manual_seed(0)
    cfg = make_config({**TINY, "model": "resnet20", "model_kwargs": {}},
                      {"method_kwargs": {"afan": {"bn_mode": "frozen"}}})
    trainer = Trainer(cfg, tmp_path / "run")
    step = trainer.train_step
    assert isinstance(step, AFANStep)
    x, y = trainer.data.example()[:16], trainer.data.train_y[:16]
    x = trainer.prepare_batch(x)
    model, split = trainer.model, step.split
    head = [p for m in split.pieces[:split.cut] for p in m.parameters()]
    start = {k: v.clone() for k, v in model.state_dict().items()}

    loss, _ = step.loss(trainer, x, y)
    loss.backward()
    afan_buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    head_grads = [p.grad.clone() for p in head]

    model.load_state_dict(start)
    model.zero_grad(set_to_none=True)
    clean = F.cross_entropy(model(x).float(), y) / 2  # the clean half of A-FAN's loss, through the whole model
    clean.backward()
    for mine, plain in zip(head_grads, [p.grad for p in head]):
        assert torch.allclose(mine, plain, rtol=1e-5, atol=1e-7)
    plain_buffers = {k: v for k, v in model.state_dict().items() if k in afan_buffers}
    assert all(torch.equal(afan_buffers[k], plain_buffers[k]) for k in afan_buffers)  # as a plain step would
    tail_bn = [k for k in afan_buffers if k.startswith(("layers.3", "layers.4", "fc")) and "running_mean" in k]
    assert tail_bn  # (the check above covered the tail's BN layers)


@needs_fmnist
def test_train_mode_bn_lets_every_extra_forward_update_the_statistics(tmp_path):
    cfg = make_config({**TINY, "model": "resnet20", "model_kwargs": {}})
    trainer = Trainer(cfg, tmp_path / "run")
    x, y = trainer.prepare_batch(trainer.data.example()[:16]), trainer.data.train_y[:16]
    trainer.train_step.loss(trainer, x, y)
    tracked = dict(trainer.model.named_buffers())
    # the last block of stage 3 sits in the tail: 1 clean + 5 PGD + 4 point forwards
    assert int(tracked["layers.8.bn2.num_batches_tracked"]) == 10
    assert int(tracked["stem.1.num_batches_tracked"]) == 1  # the head ran once


@needs_fmnist
@pytest.mark.filterwarnings("ignore:precision bf16 on a cpu without native bfloat16")
def test_method_trains_records_resumes_bit_for_bit_and_composes_with_fixnorm(tmp_path):
    # the adversarial steps run in fp32 even in a bf16 run (which a CPU without native bf16 emulates, and warns)
    cfg = make_config(TINY, {"precision": "bf16"})
    straight = train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "resumed", epoch=1)
    resumed = Trainer(None, tmp_path / "resumed", resume=True).fit()
    assert resumed["final_test_acc"] == straight["final_test_acc"]
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    row = list(csv.DictReader((tmp_path / "straight" / "metrics.csv").open()))[-1]
    # sign steps move every feature by gamma x RMS per step: L-infinity = steps x gamma x RMS (no clip); in bf16
    # these steps (0.2% of the RMS) would round away or be quantised to bf16's spacing
    rms, linf = float(row["afan/feature_rms"]), float(row["afan/linf"])
    assert linf == pytest.approx(5 * (0.5 / 255) * rms, rel=1e-3)

    composed = Trainer(make_config(TINY, {"method_kwargs": {"afan": {"optimizer": "fixnorm"}}}), tmp_path / "fx")
    assert isinstance(composed.optimizer, FixNorm) and isinstance(composed.train_step, AFANStep)
    written = composed.cfg.method_kwargs["fixnorm"]  # its settings written out in full too: the recipe's, defaults
    assert written["free_steps"] == 10 and written["lr_power"] == "auto" and written["norm_drift"] == "auto"
    for bad, message in (({"split": "stage9"}, "offers"), ({"optimizer": "afan"}, "not afan itself"),
                         ({"random_start": True}, "needs an epsilon"), ({"bn_mode": "eval"}, "bn_mode"),
                         ({"strengths": [0.5]}, "one entry per point"),
                         ({"adversarial_precision": "bf16"}, "adversarial_precision")):
        with pytest.raises(FixNormError, match=message):
            Trainer(make_config(TINY, {"method_kwargs": {"afan": bad}}), tmp_path / "bad")
