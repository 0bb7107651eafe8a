"""Masked runs, runs that start at step k, and the pruning study (fixnorm prune), for real on a tiny synthetic task."""
import json

import pytest
import torch

from fixnorm import FixNormError
from fixnorm.compress import magnitude_masks, prunable_weights
from fixnorm.hooks import TrainStep
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from fixnorm.train.masks import load_masks, save_masks
from fixnorm.train.prune import ARMS, REINIT_SEED_OFFSET, run_pruning
from helpers import train_until

# the smoke recipe's small CNN on 200 synthetic images (4 steps per epoch), evaluated on a holdout of 100: ~0.5 s a run
TINY = dict(load_recipe("fmnist-smoke"), dataset="synthetic", train_subset=200, holdout=100, batch_size=50, epochs=2,
            threads=1, method="sgd", weight_decay=5e-4)


def model_state(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def write_masks(tmp_path, cfg, sparsity=0.7, name="masks.pt"):
    """Layer-wise masks of the model's conv and linear weights (pruning the smallest initial weights), saved."""
    model = Trainer(cfg, tmp_path / f"probe-{name}").model
    masks = magnitude_masks(prunable_weights(model), sparsity)
    save_masks(tmp_path / name, masks, sparsity=sparsity)
    return tmp_path / name, masks


class RecordedStep(TrainStep):
    """Cross-entropy, recording each step's labels and learning rate (the lr the optimizer step will use)."""

    def __init__(self):
        self.labels, self.lrs = [], []

    def loss(self, run, x, y):
        self.labels.append(y.clone())
        self.lrs.append(run.optimizer.param_groups[0]["lr"])
        logits = run.forward_model(x)
        return torch.nn.functional.cross_entropy(logits.float(), y), logits


# -- masked runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sgd", "fixnorm"])
def test_masked_weights_are_exactly_zero_after_training_whatever_the_method(tmp_path, method):
    cfg = make_config(TINY, {"method": method, "free_steps": 0} if method == "fixnorm" else {"momentum": 0.9})
    mask_file, masks = write_masks(tmp_path, cfg)
    trainer = Trainer(make_config(cfg.to_dict(), {"mask_from": str(mask_file)}), tmp_path / "run")
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    final = model_state(tmp_path / "run" / "last.pt")
    for name, mask in masks.items():
        assert int((final[name][~mask] != 0).sum()) == 0, name  # exactly zero, not small
        assert not torch.equal(final[name][mask], start[name][mask]), name  # the kept weights trained
    if method == "fixnorm":  # the norms are held over the kept entries (pruned gradients never move them: without
        held = trainer.optimizer.norm_targets()  # that, the mask after the norm rule leaves norms ~5e-6 short)
        assert set(masks) <= set(held) and all(held[n].ndim == 0 for n in masks)
        for name in masks:
            assert float(final[name].float().norm()) == pytest.approx(float(held[name]), rel=1e-6), name


def test_a_masked_run_that_starts_at_step_k_resumes_bit_for_bit(tmp_path):
    dense = make_config(TINY, {"save_at_steps": [3]})
    train(dense, tmp_path / "dense")
    mask_file, _ = write_masks(tmp_path, dense)
    cfg = make_config(TINY, {"mask_from": str(mask_file), "init_from": str(tmp_path / "dense" / "step-3.pt"),
                             "start_step": 3, "epochs": 3})
    train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "stopped", epoch=2)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    assert_same_weights(model_state(tmp_path / "straight" / "last.pt"), model_state(tmp_path / "stopped" / "last.pt"))
    saved = load_checkpoint(tmp_path / "stopped" / "last.pt")["optimizer"]["state"]
    assert any("mask_mask" in entry for entry in saved.values())  # the masks ride in the optimizer state


def test_a_run_from_step_k_continues_the_schedule_and_the_data_order_at_k(tmp_path):
    """open_lth's rewinding: the run takes steps k .. T of the dense run's schedule, on the same batches."""
    settings = dict(TINY, schedule="cosine", epochs=2, save_at_steps=[3])
    dense_step = RecordedStep()
    Trainer(make_config(settings), tmp_path / "dense", hooks=[dense_step]).fit()
    assert len(dense_step.lrs) == 8
    rewound_step = RecordedStep()
    rewound = Trainer(make_config(settings, {"init_from": str(tmp_path / "dense" / "step-3.pt"), "start_step": 3}),
                      tmp_path / "rewound", hooks=[rewound_step])
    assert rewound.optimizer.param_groups[0]["lr"] == dense_step.lrs[3] != dense_step.lrs[0]
    summary = rewound.fit()
    assert rewound_step.lrs == dense_step.lrs[3:]  # the first lr is the dense run's at step k, and so on to T
    assert all(torch.equal(a, b) for a, b in zip(rewound_step.labels, dense_step.labels[3:]))
    assert rewound.global_step == 8 and summary["epochs"] == 2  # the partial first epoch is recorded as epoch 1
    assert (tmp_path / "rewound" / "step-3.pt").is_file()  # its starting state, when asked for
    with pytest.raises(FixNormError, match="leaves nothing to train"):
        Trainer(make_config(settings, {"start_step": 8}), tmp_path / "nothing")
    with pytest.raises(FixNormError, match="start_step must be a whole number"):
        make_config(settings, {"start_step": -1})


def test_init_seed_draws_other_weights_and_keeps_the_seeds_data_order(tmp_path):
    seeded = Trainer(make_config(TINY, {"seed": 3}), tmp_path / "seeded")
    redrawn = Trainer(make_config(TINY, {"seed": 3, "init_seed": 4}), tmp_path / "redrawn")
    other = Trainer(make_config(TINY, {"seed": 4}), tmp_path / "other")
    name = next(iter(prunable_weights(seeded.model)))
    assert not torch.equal(seeded.model.state_dict()[name], redrawn.model.state_dict()[name])
    assert torch.equal(redrawn.model.state_dict()[name], other.model.state_dict()[name])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seeded.data.train_batches(0), redrawn.data.train_batches(0)))


def test_bad_mask_files_are_clear_errors(tmp_path):
    cfg = make_config(TINY)
    mask_file, masks = write_masks(tmp_path, cfg)
    with pytest.raises(FixNormError, match="no such file"):
        Trainer(make_config(TINY, {"mask_from": str(tmp_path / "missing.pt")}), tmp_path / "a")
    first = next(iter(masks))
    save_masks(tmp_path / "shape.pt", {**masks, first: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(FixNormError, match=f"do not fit this model.*{first}"):
        Trainer(make_config(TINY, {"mask_from": str(tmp_path / "shape.pt")}), tmp_path / "b")
    save_masks(tmp_path / "names.pt", {"encoder.weight": masks[first]})
    with pytest.raises(FixNormError, match=r"\['encoder.weight'\], which are not parameters"):
        Trainer(make_config(TINY, {"mask_from": str(tmp_path / "names.pt")}), tmp_path / "c")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(FixNormError, match="not a fixnorm mask file"):
        load_masks(tmp_path / "foreign.pt")
    with pytest.raises(FixNormError, match="bool tensors"):
        save_masks(tmp_path / "float.pt", {first: masks[first].float()})
    assert make_config({}).mask_from is None and make_config({}).start_step == 0  # old configs: no mask, step 0


# -- the study -----------------------------------------------------------------------------------------
def test_the_pruning_study_starts_every_arm_as_defined_writes_the_table_and_reuses_its_runs(tmp_path):
    out = tmp_path / "study"
    study = dict(sparsities=[0.8], arms=list(ARMS), seeds=[0, 1], lrs=[0.1], out_dir=out, rewind_step=3)
    result = run_pruning(TINY, **study)
    assert [(r["arm"], r["runs"]) for r in result["rows"]] == [(arm, 2) for arm in ARMS]
    table = (out / "prune.md").read_text()
    for arm in ARMS:
        assert f"| 0.1 | 0.8 | {arm} | 2 |" in table
    saved = json.loads((out / "prune.json").read_text())
    assert set(saved["dense"][0]["r_p"]) == {"0.1", "0.2", "0.3", "0.4", "0.5"} and len(saved["runs"]) == 8
    assert all(0 <= r["r_p_start_end"] <= 1 for r in saved["rows"])

    # each arm's saved starting state, against its definition, bit for bit
    masks = load_masks(out / "masks" / "lr0.1-s0-sp0.8.pt")
    first_conv = next(iter(prunable_weights(Trainer(make_config(TINY), tmp_path / "probe").model)))
    assert first_conv not in masks and len(masks) >= 2  # layer-wise, the first conv left dense
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(0.8 * mask.numel()), name
    dense = out / "dense-lr0.1-s0"
    reinit_cfg = make_config(TINY, {"seed": 0, "init_seed": REINIT_SEED_OFFSET})
    fresh = Trainer(reinit_cfg, tmp_path / "fresh").model.state_dict()
    expected = {"finetune": (dense / "last.pt", 0), "ticket": (dense / "step-0.pt", 0),
                "rewind": (dense / "step-3.pt", 3), "reinit": (None, 0)}
    for arm, (source, step) in expected.items():
        started = load_checkpoint(out / f"{arm}-lr0.1-sp0.8-s0" / f"step-{step}.pt")
        reference = fresh if source is None else model_state(source)
        for key, value in reference.items():
            want = value * masks[key] if key in masks else value
            assert torch.equal(started["model"][key], want), (arm, key)  # BN and every other tensor too
        assert not any("momentum_buffer" in e for e in started["optimizer"]["state"].values()), arm  # fresh state
    assert not torch.equal(fresh[first_conv], model_state(dense / "step-0.pt")[first_conv])  # reinit: a new draw

    # a second invocation reads everything back: no run trains again, no mask is rewritten
    files = sorted(out.glob("*/last.pt")) + sorted((out / "masks").glob("*.pt"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_pruning(TINY, **study)
    assert [f.stat().st_mtime_ns for f in files] == stamps and again["rows"] == result["rows"]
    with pytest.raises(FixNormError, match="another study's masks"):
        run_pruning(TINY, **{**study, "scope": "global"})


def test_the_study_refuses_bad_settings_before_training(tmp_path):
    good = dict(sparsities=[0.5], arms=["ticket"], seeds=[0], lrs=[0.1], out_dir=tmp_path / "s")
    for bad, message in (({"sparsities": [0.0]}, "sparsities must be fractions"),
                         ({"sparsities": [1.0]}, "sparsities must be fractions"),
                         ({"sparsities": [1.5]}, "sparsities must be fractions"),
                         ({"arms": ["ticket", "lottery"]}, r"\['lottery'\] unknown"),
                         ({"seeds": []}, "seeds"), ({"lrs": [-0.1]}, "learning rates"),
                         ({"scope": "block"}, "scope"), ({"rewind_step": 8, "arms": ["rewind"]}, "rewind-step")):
        with pytest.raises(FixNormError, match=message):
            run_pruning(TINY, **{**good, **bad})
    with pytest.raises(FixNormError, match="set per phase"):
        run_pruning(dict(TINY, init_from="x"), **good)
    assert not (tmp_path / "s").exists()


def test_fixnorm_prune_from_the_command_line(tmp_path):
    import subprocess
    import sys

    settings = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k not in ("method", "model_kwargs")]
    cmd = [sys.executable, "-m", "fixnorm", "prune", "--recipe", "fmnist-smoke", "--method", "sgd", *settings,
           "--epochs", "1", "--sparsity", "0.5", "--arms", "ticket", "--lrs", "0.05", "--out", str(tmp_path / "p"),
           "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| 0.05 | 0.5 | ticket | 1 |" in proc.stdout and (tmp_path / "p" / "prune.json").is_file()


def test_iterative_masks_are_nested_rounds_at_one_rate_and_each_lineage_retrains_as_defined(tmp_path):
    out = tmp_path / "iterative"
    result = run_pruning(TINY, sparsities=[0.75], arms=["finetune", "ticket"], seeds=[0], lrs=[0.1], out_dir=out,
                         rounds=2)
    assert result["rounds"] == 2 and "iterative, 2 rounds" in (out / "prune.md").read_text()
    dense = out / "dense-lr0.1-s0"
    theta_0, theta_T = model_state(dense / "step-0.pt"), model_state(dense / "last.pt")
    for lineage, round_start in (("reset", theta_0), ("continue", theta_T)):
        first = load_masks(out / "masks" / f"lr0.1-s0-sp0.75-{lineage}-r1of2.pt")
        last = load_masks(out / "masks" / f"lr0.1-s0-sp0.75-{lineage}-r2of2.pt")
        assert first.keys() == last.keys()
        for name in first:
            n = first[name].numel()
            assert int((~first[name]).sum()) == round(0.5 * n), name  # 1 - (1 - 0.75) ** (1 / 2): half a round
            assert int((~last[name]).sum()) == round(0.75 * n), name
            assert not (last[name] & ~first[name]).any(), name      # nested: nothing pruned grows back
        # round 1 was computed from θ_T, trained from its lineage's start under it; round 2 from that run's end
        assert all(torch.equal(first[k], m) for k, m in magnitude_masks({k: theta_T[k] for k in first}, 0.5).items())
        round_run = out / f"round1of2-{lineage}-lr0.1-s0-sp0.75"
        started = model_state(round_run / "step-0.pt")
        end = model_state(round_run / "last.pt")
        expect_last = magnitude_masks({k: end[k] for k in first}, 0.75, previous=first)
        assert all(torch.equal(last[k], m) for k, m in expect_last.items())
        assert all(torch.equal(end[k][~first[k]], torch.zeros_like(end[k][~first[k]])) for k in first)
        assert all(torch.equal(started[k], round_start[k] * first[k] if k in first else round_start[k])
                   for k in round_start)
        arm = "ticket" if lineage == "reset" else "finetune"
        arm_start = load_checkpoint(out / f"{arm}-lr0.1-sp0.75-s0-it2" / "step-0.pt")["model"]
        source = theta_0 if lineage == "reset" else end   # fine-tune starts from the last round's end
        for key, value in source.items():
            want = value * last[key] if key in last else value
            assert torch.equal(arm_start[key], want), (arm, key)
    with pytest.raises(FixNormError, match="rounds"):
        run_pruning(TINY, sparsities=[0.5], arms=["ticket"], seeds=[0], lrs=[0.1], out_dir=tmp_path / "x", rounds=0)
