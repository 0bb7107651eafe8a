"""ADMM towards unified blocks (method admm) against its definitions: the penalty's gradient, the Z and U updates,
the start, the rho schedule with its logged residuals, and a bit-exact resume."""
import csv

import pytest
import torch

from fixnorm import FixNormError
from fixnorm.compress import PRUNED, UNIFIED, prunable_weights, unify_assignment, unify_projection
from fixnorm.methods.admm import ADMMSettings, ADMMStep
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from helpers import train_until

TINY = dict(load_recipe("fmnist-smoke"), dataset="synthetic", train_subset=200, holdout=100, batch_size=50, epochs=2,
            threads=1, method="admm", weight_decay=5e-4)
SETTINGS = ADMMSettings(block="2x2", ratio=0.5, prune_ratio=0.25, rho=0.05, rho_growth=3.0)


def admm(**settings):
    return {"method_kwargs": {"admm": {"block": "2x2", "ratio": 0.5, "prune_ratio": 0.25, **settings}}}


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 3, 3, 3, generator=g).requires_grad_(), "b": torch.randn(10, 16, generator=g)
            .requires_grad_()}


def started(ws, seed=1):
    """An ADMM step with Z, U and rho set to arbitrary values (not its start), as after some stages."""
    step = ADMMStep(ws, SETTINGS)
    g = torch.Generator().manual_seed(seed)
    step.z = [torch.randn(w.shape, generator=g) for w in ws.values()]
    step.u = [torch.randn(w.shape, generator=g) * 0.1 for w in ws.values()]
    step.rho = [0.3, 2.5]
    return step


def test_the_penalty_is_the_squared_norm_and_its_gradient_is_rho_times_w_minus_z_plus_u():
    ws = weights()
    step = started(ws)
    penalty = step.penalty()
    expected = sum(r / 2 * ((w - z + u) ** 2).sum() for w, z, u, r in zip(ws.values(), step.z, step.u, step.rho))
    assert float(penalty.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    grads = torch.autograd.grad(penalty, list(ws.values()))
    for g, w, z, u, r in zip(grads, ws.values(), step.z, step.u, step.rho):
        torch.testing.assert_close(g, r * (w.detach() - z + u), rtol=1e-6, atol=1e-7)


def test_z_and_u_updates_follow_their_formulas():
    ws = weights(2)
    step = started(ws, seed=3)
    before_u = [u.clone() for u in step.u]
    step.update_dual()
    for w, z, u, u0 in zip(ws.values(), step.z, step.u, before_u):
        target = w.detach() + u0
        assert torch.equal(z, unify_projection(target, "2x2", 0.5, 0.25)[0])  # Z = Π(W + U)
        assignment = unify_assignment(target, "2x2", 0.5, 0.25)
        assert int((assignment == UNIFIED).sum()) == round(0.5 * assignment.numel())  # Z is in the constraint set
        assert int((assignment == PRUNED).sum()) == round(0.25 * assignment.numel())
        assert torch.equal(u, u0 + w.detach() - z)  # U = U + W - Z


def test_a_stage_multiplies_rho_where_w_is_far_from_z_and_rescales_u_to_keep_the_unscaled_dual():
    ws = weights(4)
    step = started(ws, seed=5)
    step.z[1] = ws["b"].detach().clone()  # layer b: W = Z, converged
    duals = [r * u.clone() for r, u in zip(step.rho, step.u)]
    record = {}
    step.on_epoch_end(None, record)
    assert step.rho == [0.3 * 3.0, 2.5]  # only the layer still far from Z
    for r, u, dual in zip(step.rho, step.u, duals):
        torch.testing.assert_close(r * u, dual)  # rho * U unchanged (Boyd et al. 3.4.1)
    assert record["admm/residual/b"] == 0 and record["admm/residual_max"] == record["admm/residual/a"] > 1e-3


def test_a_run_starts_at_z_equal_to_the_projection_of_its_starting_weights_and_u_zero(tmp_path):
    trainer = Trainer(make_config(TINY, admm()), tmp_path / "run")
    step = trainer.train_step
    assert isinstance(step, ADMMStep)
    step.on_train_start(trainer)
    constrained = prunable_weights(trainer.model, exclude_first_conv=True)
    assert step.names == list(constrained)  # the first conv left dense by default
    for (name, w), z, u in zip(constrained.items(), step.z, step.u):
        assert torch.equal(z, unify_projection(w.detach(), "2x2", 0.5, 0.25)[0]), name
        assert not bool(u.any()), name
    assert step.rho == [0.01] * len(constrained)


def test_rho_grows_per_epoch_where_w_is_still_far_from_z_and_residuals_are_logged(tmp_path):
    cfg = make_config(TINY, admm(rho=0.05, rho_growth=3.0, tolerance=1e-9))  # no layer converges in 2 epochs
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    step = trainer.train_step
    assert step.rho == pytest.approx([0.05 * 9] * len(step.names))
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        per_layer = [float(row[f"admm/residual/{n}"]) for n in step.names]
        assert float(row["admm/residual_max"]) == max(per_layer) > 0
    last = [float(rows[-1][f"admm/residual/{n}"]) for n in step.names]
    assert last == pytest.approx(step.residuals())
    # a layer whose residual is below the tolerance keeps its rho
    converged = make_config(TINY, admm(rho=0.05, rho_growth=3.0, tolerance=10.0))
    again = Trainer(converged, tmp_path / "converged")
    again.fit()
    assert again.train_step.rho == [0.05] * len(step.names)


def test_admm_pulls_the_weights_towards_the_constraint_set(tmp_path):
    weak, strong = (make_config(TINY, admm(rho=rho, rho_growth=1.0), {"epochs": 2}) for rho in (1e-6, 5.0))
    residual = {}
    for name, cfg in (("weak", weak), ("strong", strong)):
        trainer = Trainer(cfg, tmp_path / name)
        trainer.fit()
        residual[name] = max(trainer.train_step.residuals())
    assert residual["strong"] < 0.5 * residual["weak"]


def test_an_admm_run_resumes_bit_for_bit(tmp_path):
    cfg = make_config(TINY, admm(rho=0.05), {"epochs": 3})
    train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "stopped", epoch=1)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "stopped"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    (sa,), (sb,) = a["hooks"], b["hooks"]
    assert sa["rho"] == sb["rho"] and sa["names"] == sb["names"]
    assert all(torch.equal(x, y) for x, y in zip(sa["z"] + sa["u"], sb["z"] + sb["u"]))


def test_bad_admm_settings_are_clear_errors():
    for bad, message in (({"block": "3by3"}, "unknown block shape"), ({"ratio": 1.0}, "ratio must be a share"),
                         ({"ratio": 0.0, "prune_ratio": 0.0}, "nothing to constrain"), ({"optimizer": "admm"}, "not admm itself"),
                         ({"rho": 0.0}, "rho > 0"), ({"rho_growth": 0.5}, "rho_growth >= 1"),
                         ({"ratio": 0.6, "prune_ratio": 0.6}, "together they must leave")):
        with pytest.raises(FixNormError, match=message):
            make_config(TINY, admm(**bad))
