"""PathProx against its definitions: the prox's closed form, the unit-sphere projection, the rescaling invariance of
the neuron-wise objective, and that weight decay's minimisers are balanced points where both objectives agree."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixnorm import FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.methods.pathprox import (NeuronPair, PathProxRule, group_soft_threshold_, neuron_pairs, path_penalty,
                                      unit_norms_in, unit_norms_out)
from fixnorm.models import create_model
from fixnorm.rules import attach
from fixnorm.train import Trainer, load_recipe, make_config, train
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


def test_group_soft_threshold_is_the_closed_form_prox():
    torch.manual_seed(0)
    v = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    v[:, 2] *= 1e-3  # a column below the threshold
    threshold = 0.2
    norms = v.transpose(0, 1).flatten(1).norm(dim=1)
    expected = v.clone()
    for j in range(4):
        expected[:, j] = 0 if norms[j] <= threshold else v[:, j] * (1 - threshold / norms[j])
    out = v.clone()
    group_soft_threshold_(out, threshold)
    assert torch.allclose(out, expected, rtol=1e-12, atol=0) and torch.all(out[:, 2] == 0)
    # the prox minimises threshold * |v_j| + |v_j' - v_j|^2 / 2 per column: no nearby point does better
    def objective(x):
        return threshold * unit_norms_in(x).double().sum() + 0.5 * (x - v).pow(2).sum()
    for _ in range(20):
        assert objective(out) <= objective(out + 1e-3 * torch.randn_like(out)) + 1e-12


def test_the_neuron_objective_is_invariant_to_rescaling_a_neuron_and_so_is_a_relu_net():
    torch.manual_seed(1)
    w, v = torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    x = torch.randn(10, 4, dtype=torch.float64)
    pair = NeuronPair(nn.Parameter(w.clone()), nn.Parameter(v.clone()))
    before, out = path_penalty([pair]), torch.relu(x @ w.T) @ v.T
    alpha = torch.rand(6, dtype=torch.float64) * 3 + 0.1
    scaled = NeuronPair(nn.Parameter(w * alpha[:, None]), nn.Parameter(v / alpha[None, :]))
    assert float(path_penalty([scaled])) == pytest.approx(float(before), rel=1e-12)
    assert torch.allclose(torch.relu(x @ scaled.w.T) @ scaled.v.T, out)
    # min over a of (|a w|^2 + |v / a|^2) / 2 is |w| |v|, at a^2 = |v| / |w|: the weight-decay penalty's
    # infimum over the rescalings that leave the function alone is the path penalty
    nw, nv = w.norm(dim=1), v.norm(dim=0)
    best = ((nv / nw).sqrt() ** 2 * nw ** 2 + nv ** 2 / (nv / nw)) / 2
    assert torch.allclose(best, nw * nv)


def test_weight_decay_minimisers_are_balanced_where_the_two_objectives_agree():
    """Train a two-layer ReLU net to a weight-decay minimiser: every neuron is balanced, so the decay penalty equals
    the path penalty there; unbalancing it keeps the function and the path penalty and raises the decay penalty."""
    torch.manual_seed(2)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    w = nn.Parameter(torch.randn(8, 5, dtype=torch.float64) * 0.5)
    v = nn.Parameter(torch.randn(3, 8, dtype=torch.float64) * 0.5)
    lam = 0.05
    optimizer = torch.optim.SGD([w, v], lr=0.2, weight_decay=lam)
    for _ in range(2000):  # the imbalance |w_j|^2 - |v_j|^2 decays by (1 - lr lam)^2 a step, up to O(lr^2) drift
        optimizer.zero_grad()
        F.cross_entropy(torch.relu(x @ w.T) @ v.T, y).backward()
        optimizer.step()
    nw, nv = w.detach().norm(dim=1), v.detach().norm(dim=0)
    assert torch.allclose(nw, nv, rtol=2e-3, atol=1e-6)  # balanced
    decay = lam / 2 * (w.detach().pow(2).sum() + v.detach().pow(2).sum())
    path = lam * path_penalty([NeuronPair(w, v)])
    assert float(decay) == pytest.approx(float(path), rel=1e-4)
    unbalanced = NeuronPair(nn.Parameter(w.detach() * 2), nn.Parameter(v.detach() / 2))
    assert float(lam * path_penalty([unbalanced])) == pytest.approx(float(path), rel=1e-12)
    assert float(lam / 2 * (unbalanced.w.detach().pow(2).sum() + unbalanced.v.detach().pow(2).sum())) > float(decay) * 1.5


def test_the_rule_projects_the_incoming_weights_and_thresholds_the_outgoing_ones_at_lr_times_lambda():
    torch.manual_seed(3)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    pairs = neuron_pairs(model)
    assert len(pairs) == 9 and pairs[0].w is model.layers[0].conv1.weight and pairs[0].v is model.layers[0].conv2.weight
    lr, lam = 0.1, 5.0
    optimizer = torch.optim.SGD([{"params": [p for pair in pairs for p in (pair.w, pair.v)], "weight_decay": 0.0}],
                                lr=lr)
    v_before = pairs[0].v.detach().clone()
    attach(optimizer, [PathProxRule(pairs, lam)], name="pathprox")
    for pair in pairs:
        (pair.w.sum() + pair.v.sum()).backward()
    optimizer.step()
    for pair in pairs:
        assert torch.allclose(unit_norms_out(pair.w), torch.ones(pair.w.shape[0]), atol=1e-6)
    expected = v_before - lr  # the plain step (gradient 1), then the prox at lr * lam
    group_soft_threshold_(expected, lr * lam)
    assert torch.allclose(pairs[0].v.detach(), expected, atol=1e-6)
    with pytest.raises(FixNormError, match="no neuron pairs"):
        neuron_pairs(create_model("mobilenetv2_cifar"))
    decayed = torch.optim.SGD([pairs[0].w, pairs[0].v], lr=0.1, weight_decay=1e-4)
    with pytest.raises(FixNormError, match="must not also have weight decay"):
        attach(decayed, [PathProxRule(pairs[:1], lam)], name="pathprox")


@needs_fmnist
def test_method_trains_and_resumes_bit_for_bit(tmp_path):
    cfg = make_config(load_recipe("fmnist-smoke"), {"method": "pathprox", "train_subset": 600, "holdout": 500, "threads": 1,
                                                    "method_kwargs": {"pathprox": {"strength": 1e-2}}})
    straight = train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "resumed", epoch=1)
    assert Trainer(None, tmp_path / "resumed", resume=True).fit()["final_test_acc"] == straight["final_test_acc"]
    trainer = Trainer(cfg, tmp_path / "fresh")
    decays = sorted(g["weight_decay"] for g in trainer.optimizer.param_groups)
    assert decays == [0.0, 0.0, 1e-2]  # the pairs, the 1-D rest, the other weights (stem, classifier) at lambda
    with pytest.raises(FixNormError, match="strength must be >= 0"):
        make_config(cfg.to_dict(), {"method_kwargs": {"pathprox": {"strength": -1}}})
