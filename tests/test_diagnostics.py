"""Diagnostics against their definitions: angles, effective LR, margins, flip rate, and exact resume."""
import csv
import math

import pytest
import torch

from fixnorm import FixNorm, FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.diagnostics import DiagnosticsHook, angles, effective_lr_power, load_norm_trace, margins
from fixnorm.models import create_model
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(),
                                  reason="apt-get install dataset-fashion-mnist")
TINY = dict(load_recipe("fmnist-smoke"), train_subset=600, holdout=500, epochs=2, threads=1, diagnostics=True,
            diagnostics_every=1, probe_size=300)


def rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def test_angles_match_a_known_rotation_even_when_tiny():
    torch.manual_seed(0)
    for angle in (1e-7, 1e-3, 0.5, 2.0):
        before = torch.randn(16, 8, dtype=torch.float64)
        other = torch.randn(16, 8, dtype=torch.float64)
        other -= (other * before).sum() / (before * before).sum() * before  # orthogonal to before
        w = math.cos(angle) * before + math.sin(angle) * other / other.norm() * before.norm()
        w *= 3.0  # a change of norm is not a turn
        assert angles([before], [w]).item() == pytest.approx(angle, rel=1e-9)


def test_margins_are_true_logit_minus_best_other():
    z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 2, 1])
    assert margins(z, y).tolist() == [1.5, -2.0, 0.0]


def test_effective_lr_power_follows_the_optimizer():
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8)
    x = torch.randn(4, 1, 28, 28)
    assert effective_lr_power(torch.optim.SGD(model.parameters(), lr=0.1)) == 2
    assert effective_lr_power(torch.optim.AdamW(model.parameters())) == 1
    assert effective_lr_power(FixNorm(model, x, base=torch.optim.Adam, lr=1e-3)) == 1
    assert effective_lr_power(FixNorm(model, x, lr=0.1)) == 2
    with pytest.raises(FixNormError, match="every must be"):
        DiagnosticsHook(every=0)


@needs_fmnist
@pytest.mark.parametrize("lr_power", [1.0, 0.5])
def test_measured_angle_is_effective_lr_times_unit_norm_gradient(tmp_path, lr_power):
    """Plain SGD on fixed norms: one step turns w by atan(lr * ||g|| / ||w||) = atan(eff_lr * ||g~||).

    With a milestone at epoch 0 the scheduler's lr is 0.05 / 4 throughout, and lr_power 0.5 makes the
    scale-invariant weights step with 0.05 * (1/4) ** 0.5 = 0.025: eff_lr must be the lr they step with.
    (schedule_end=0: "auto" would read this schedule's end, 1/4, and leave an lr at its floor unbent.)
    """
    cfg = make_config(TINY, {"method": "fixnorm", "free_steps": 0, "momentum": 0.0, "nesterov": False,
                             "schedule": "step", "milestones": [0.0], "gamma": 0.25, "lr_power": lr_power,
                             "schedule_end": 0.0, "lr": 0.05, "epochs": 1})
    stepped = 0.05 * 0.25 ** lr_power
    train(cfg, tmp_path / "run")
    record = rows(tmp_path / "run")[-1]
    # the classifier is not scale-invariant (its gradient has a radial part): only invariant layers obey this
    layers = [k[:-len("/angle")] for k in record if k.startswith("diag/invariant/") and k.endswith("/angle")]
    assert layers, "no layer was watched"
    assert [k for k in record if k.startswith("diag/classifier/") and k.endswith("/norm")] == [
        "diag/classifier/classifier.weight/norm"]
    for layer in layers:
        norm, eff_lr = float(record[f"{layer}/norm"]), float(record[f"{layer}/eff_lr"])
        angle, grad_norm = float(record[f"{layer}/angle"]), float(record[f"{layer}/grad_norm"])
        assert eff_lr == pytest.approx(stepped / norm ** 2, rel=1e-5)
        # the mean of atan(x) over steps equals the mean of x to O(x^2); x is about 1e-2 here
        assert angle == pytest.approx(eff_lr * norm * grad_norm, rel=2e-3), layer


@needs_fmnist
def test_probe_statistics_match_the_saved_model(tmp_path):
    cfg = make_config(TINY, {"method": "sgd"})
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    record = rows(tmp_path / "run")[-1]
    model = trainer.model
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "last.pt")["model"])
    model.eval()
    x, y = trainer.data.train_x[:300], trainer.data.train_y[:300]
    with torch.no_grad(), trainer.autocast():
        z = model(trainer.prepare_batch(x)).float()
    m = margins(z, y)
    assert float(record["diag/logit_norm"]) == pytest.approx(z.norm(dim=1).mean().item(), rel=1e-5)
    assert float(record["diag/margin_p50"]) == pytest.approx(m.median().item(), abs=0.05)
    assert float(record["diag/probe_error"]) == pytest.approx((m <= 0).float().mean().item())
    assert 0.0 <= float(record["diag/flip_rate"]) <= 1.0
    assert rows(tmp_path / "run")[0]["diag/flip_rate"] == ""  # no previous epoch to compare with
    # SGD+WD runs get the same per-layer figures as FixNorm runs
    assert any(k.endswith("/eff_lr") for k in record) and float(record["diag/classifier_norm"]) > 0


@needs_fmnist
def test_diagnostics_resume_exactly(tmp_path):
    cfg = make_config(TINY, {"method": "fixnorm", "epochs": 2})
    train(cfg, tmp_path / "straight")

    train_until(cfg, tmp_path / "stopped", epoch=1)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "stopped")
    assert straight == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} | {
        "seconds": s["seconds"], "images_per_second": s["images_per_second"]} for r, s in zip(resumed, straight)]
    assert math.isfinite(float(resumed[-1]["diag/flip_rate"]))
    # the norm trace (every step here) continues across the resume bit for bit
    names, steps, norms = load_norm_trace(tmp_path / "straight")
    names_resumed, steps_resumed, norms_resumed = load_norm_trace(tmp_path / "stopped")
    assert names == names_resumed and torch.equal(steps, steps_resumed) and torch.equal(norms, norms_resumed)
    assert steps.tolist() == list(range(int(steps[-1]) + 1))


@needs_fmnist
def test_the_norm_trace_holds_each_weights_norm_after_each_recorded_step(tmp_path):
    cfg = make_config(TINY, {"method": "sgd", "weight_decay": 5e-4, "epochs": 1, "diagnostics_every": 2})
    train(cfg, tmp_path / "run")
    names, steps, norms = load_norm_trace(tmp_path / "run")
    last = int(steps[-1])
    assert steps.tolist() == list(range(0, last, 2)) + [last]  # every 2 steps from the start, and the last step
    model = create_model("small_cnn", num_classes=10, in_channels=1, **cfg.model_kwargs)
    torch.manual_seed(cfg.seed)
    fresh = dict(create_model("small_cnn", num_classes=10, in_channels=1, **cfg.model_kwargs).named_parameters())
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "last.pt")["model"])
    final = dict(model.named_parameters())
    assert names[-1] == "classifier.weight" and len(names) == norms.shape[1]
    for i, name in enumerate(names):
        assert float(norms[0, i]) == pytest.approx(float(fresh[name].detach().norm()), rel=1e-6)
        assert float(norms[-1, i]) == pytest.approx(float(final[name].detach().norm()), rel=1e-6)


@needs_fmnist
def test_report_draws_every_plot_from_the_records_of_real_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from fixnorm.report import make_report

    for method in ("sgd", "fixnorm"):
        train(make_config(TINY, {"method": method}), tmp_path / method)
    plain = make_config(TINY, {"method": "sgd", "diagnostics": False, "epochs": 1})
    train(plain, tmp_path / "plain")
    path = make_report([tmp_path / "sgd", tmp_path / "fixnorm", tmp_path / "plain"], tmp_path / "report")
    text = path.read_text()
    for name in ("curves.png", "effective_lr.png", "norms.png", "angles.png", "classifier.png", "boundary.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"]({name})" in text
    assert "| sgd | sgd |" in text and "| fixnorm | fixnorm |" in text and "| plain | sgd |" in text
    with pytest.raises(FixNormError, match="no metrics.csv"):
        make_report([tmp_path / "report"], tmp_path / "r2")
