"""Rank and curvature diagnostics against their definitions; the hooks on the engine."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixnorm import FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.spectra import effective_rank, hessian_vector_product, numerical_rank, top_eigenvalue
from fixnorm.train import load_recipe, make_config, train

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


def with_spectrum(values, rows=7, cols=9, seed=0):
    """A rows x cols matrix whose singular values are exactly ``values`` (the rest zero)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    for i, value in enumerate(values):
        s[i, i] = value
    return u @ s @ v.T


def test_numerical_rank_counts_exactly_the_constructed_rank():
    for k in range(0, 7):
        assert numerical_rank(with_spectrum([3.0] * k)) == k
    # relative tolerance: 1e-2 of the largest is counted at 1e-3 and not at 1e-1
    spectrum = with_spectrum([1.0, 0.5, 1e-2, 1e-5])
    assert numerical_rank(spectrum) == 3 and numerical_rank(spectrum, tolerance=0.1) == 2
    # a conv weight is its filters as rows: 8 filters spanning 2 directions have rank 2
    basis = torch.randn(2, 3 * 3 * 3, dtype=torch.float64)
    conv = (torch.randn(8, 2, dtype=torch.float64) @ basis).reshape(8, 3, 3, 3)
    assert numerical_rank(conv) == 2
    with pytest.raises(FixNormError, match="matrix"):
        numerical_rank(torch.ones(5))


def test_effective_rank_of_known_spectra():
    assert effective_rank(with_spectrum([2.0] * 5)) == pytest.approx(5.0, rel=1e-9)  # flat: the full count
    assert effective_rank(with_spectrum([4.0])) == pytest.approx(1.0, rel=1e-9)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp H = 2 ** 1.5
    assert effective_rank(with_spectrum([2.0, 1.0, 1.0])) == pytest.approx(2 ** 1.5, rel=1e-9)
    assert effective_rank(torch.zeros(3, 4)) == 0.0
    assert effective_rank(5 * with_spectrum([2.0, 1.0, 1.0])) == pytest.approx(2 ** 1.5, rel=1e-9)  # scale-free


def test_power_iteration_finds_the_top_eigenvalue_of_an_exact_quadratic():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([5.0, 2.0, 1.0, 0.5, -1.0, 0.1], dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    x = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    v = [torch.randn(6, generator=g, dtype=torch.float64)]
    assert torch.allclose(hessian_vector_product(lambda: 0.5 * x @ a @ x, [x], v)[0], a @ v[0])
    top = top_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=200, generator=torch.Generator().manual_seed(0))
    assert top == pytest.approx(5.0, rel=1e-6)
    assert x.grad is None  # no .grad touched


def test_power_iteration_matches_the_exact_hessian_of_a_tiny_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    weight = net[0].weight

    def loss_of(w):
        return F.cross_entropy(F.linear(torch.tanh(F.linear(x, w, net[0].bias)), net[2].weight, net[2].bias), y)

    exact = torch.autograd.functional.hessian(loss_of, weight.detach()).reshape(20, 20)
    eigenvalues = torch.linalg.eigvalsh(exact)
    expected = eigenvalues[eigenvalues.abs().argmax()]
    top = top_eigenvalue(lambda: F.cross_entropy(net(x), y), [weight], iterations=500,
                         generator=torch.Generator().manual_seed(0))
    assert top == pytest.approx(float(expected), rel=1e-4)


def test_curvature_of_a_scale_invariant_layer_scales_as_one_over_its_squared_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.LayerNorm(8, eps=1e-14, elementwise_affine=False), nn.ReLU(),
                        nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    weight = net[0].weight

    def top():
        return top_eigenvalue(lambda: F.cross_entropy(net(x), y), [weight], iterations=100,
                              generator=torch.Generator().manual_seed(0))

    before = top()
    with torch.no_grad():
        weight.mul_(3.0)
    assert top() == pytest.approx(before / 9.0, rel=1e-9)  # at unit norm (x ||w||^2) the two agree


@needs_fmnist
def test_hooks_write_rank_and_curvature_columns_and_leave_training_alone(tmp_path):
    base = dict(load_recipe("fmnist-smoke"), train_subset=600, holdout=500, epochs=2, threads=1, method="fixnorm")
    plain = train(make_config(base), tmp_path / "plain")
    cfg = make_config(base, {"rank_every": 1, "curvature_every": 2, "curvature_probe": 64})
    measured = train(cfg, tmp_path / "measured")
    assert measured["final_test_acc"] == plain["final_test_acc"]  # measuring changes nothing, BN statistics included
    rows = list(csv.DictReader((tmp_path / "measured" / "metrics.csv").open()))
    first, last = rows
    assert 0 < float(first["rank/effective_fraction"]) <= 1
    assert int(first["rank/features.0.0.weight/numerical"]) <= 8  # 8 filters
    assert first.get("curvature/top_max", "") == ""  # every 2 epochs
    assert float(last["curvature/top_max"]) > 0
    top = float(last["curvature/features.3.0.weight/top"])
    unit = float(last["curvature/features.3.0.weight/top_unit_norm"])
    assert math.isfinite(top) and math.isfinite(unit)
    with pytest.raises(FixNormError, match="rank_every"):
        make_config(base, {"rank_every": -1})
    from fixnorm.report import make_report

    make_report([tmp_path / "measured", tmp_path / "plain"], tmp_path / "report")
    assert (tmp_path / "report" / "spectra.png").stat().st_size > 0
