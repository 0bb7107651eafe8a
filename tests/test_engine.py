"""The training engine, for real: runs on Fashion-MNIST files, resume bit for bit, SIGKILL, torchrun with 2 ranks."""
import csv
import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fixnorm import FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.hooks import TrainStep
from fixnorm.train import (RECIPES, Trainer, load_checkpoint, load_recipe, lr_factor, make_config, parse_overrides,
                           train)
from fixnorm.train.config import saved_config
from fixnorm.train.compare import run_comparison
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(),
                                  reason="apt-get install dataset-fashion-mnist")
HERE = Path(__file__).resolve().parent

# a tiny but real run: small CNN, 1000 Fashion-MNIST images, about a second per epoch
# 10 steps an epoch: FixNorm (the default method) holds its norms after 2 (a free phase as long as the run is
# refused)
# evaluated on 1,000 held-out training images: a full test-set pass costs five of its epochs on 2 CPU cores
TINY = dict(load_recipe("fmnist-smoke"), train_subset=1000, holdout=1000, epochs=3, threads=1, free_steps=2)


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- configuration -------------------------------------------------------------------------------
def test_overrides_are_typed_and_unknown_keys_are_errors():
    values = parse_overrides(["lr=0.05", "milestones=[60, 120]", "fc_norm=null", "nesterov=false", "method=sgd"])
    cfg = make_config(RECIPES["fmnist-resnet20"], values)
    assert cfg.lr == 0.05 and cfg.milestones == [60.0, 120.0] and cfg.nesterov is False
    # FixNorm's settings live in method_kwargs.fixnorm; the top-level keys are shortcuts, and the later layer wins
    assert cfg.method_kwargs == {"fixnorm": {"fc_norm": None}}
    cfg = make_config({"method_kwargs": {"fixnorm": {"free_steps": 5, "lr_power": 1}}}, {"free_steps": 7})
    assert cfg.method_kwargs == {"fixnorm": {"free_steps": 7, "lr_power": 1}}
    assert make_config({"free_steps": 7}) == make_config(parse_overrides(["method_kwargs.fixnorm.free_steps=7"]))
    with pytest.raises(FixNormError, match="method_kwargs.fixnorm.free_steps must be an integer"):
        make_config({"free_steps": 2.5})
    with pytest.raises(FixNormError, match=r"unknown setting\(s\) \['fc_nrom'\] for method_kwargs.fixnorm"):
        make_config({"method_kwargs": {"fixnorm": {"fc_nrom": 3}}})
    # unions are read member by member, a string last: "reference" or a number; a list of strings or a string
    from fixnorm.methods import method_settings
    from fixnorm.methods.lawn import LAWNSettings
    from fixnorm.methods.mimicnorm import MimicNormSettings
    for given, read in (("reference", "reference"), (1.5, 1.5), ("2e-1", 0.2)):
        cfg = make_config({"method": "mimicnorm", "method_kwargs": {"mimicnorm": {"branch_gain_init": given}}})
        assert method_settings(cfg, "mimicnorm", MimicNormSettings).branch_gain_init == read
    with pytest.raises(FixNormError, match="branch_gain_init must be 'reference' or a number"):
        make_config({"method_kwargs": {"mimicnorm": {"branch_gain_init": "refrence"}}})
    cfg = make_config({"method_kwargs": {"lawn": {"layers": ["classifier.*"]}}})
    assert method_settings(cfg, "lawn", LAWNSettings).layers == ["classifier.*"]
    with pytest.raises(FixNormError, match=r"method_kwargs.lawn.layers\[1\] must be a string"):
        make_config({"method_kwargs": {"lawn": {"layers": ["classifier.*", 3]}}})
    with pytest.raises(FixNormError, match="unknown setting 'lr_rate'"):
        make_config({"lr_rate": 0.1})
    with pytest.raises(FixNormError, match="epochs must be an integer"):
        make_config({"epochs": 2.5})
    with pytest.raises(FixNormError, match="schedule"):
        make_config({"schedule": "linear"})
    with pytest.raises(FixNormError, match="milestones"):
        make_config({"schedule": "step"})
    with pytest.raises(FixNormError, match="method_kwargs.fixnorm.target_norm must be a number"):
        make_config({"target_norm": "big"})
    for variant in ({"granularity": "filter"}, {"target_norm": 1.0}, {"fc_norm": 8.0, "fc_granularity": "class"}):
        make_config(variant)  # every variant benchmarks/defaults_ablation.py trains is a valid setting
    with pytest.raises(FixNormError, match="not key=value"):
        parse_overrides(["lr"])
    # method settings are keyed by method; dotted keys set one entry and merge with the recipe's
    values = parse_overrides(["method_kwargs.sgd.x=2", "model_kwargs.width=8"])
    assert values == {"method_kwargs": {"sgd": {"x": 2}}, "model_kwargs": {"width": 8}}
    cfg = make_config({"model_kwargs": {"width": 4, "depth": 2}}, values)
    assert cfg.model_kwargs == {"width": 8, "depth": 2} and cfg.method_kwargs == {"sgd": {"x": 2}}
    with pytest.raises(FixNormError, match="unknown method"):
        make_config({"method_kwargs": {"alpha": 2}})
    with pytest.raises(FixNormError, match="holdout"):
        make_config({"holdout": -1})
    # YAML reads 1e-3 as a string; it is still the number the user meant
    assert make_config(parse_overrides(["weight_decay=1e-3", "epochs=2e0"])).weight_decay == 0.001
    with pytest.raises(FixNormError, match="lr must be a number"):
        make_config({"lr": "nan"})


def test_recipes_from_names_and_yaml_files(tmp_path):
    for name in RECIPES:
        make_config(load_recipe(name))
    path = tmp_path / "r.yaml"
    path.write_text("model: small_cnn\nepochs: 2\nlr: 0.05\n")
    assert make_config(load_recipe(path)).lr == 0.05
    path.write_text("- not a mapping\n")
    with pytest.raises(FixNormError, match="mapping"):
        load_recipe(path)
    with pytest.raises(FixNormError, match="no recipe"):
        load_recipe("no-such-recipe")


def test_precision_auto_is_decided_when_the_config_is_made_and_recorded_as_decided(tmp_path):
    from fixnorm.train.config import native_precision

    here = native_precision("cpu")
    assert here in ("bf16", "fp32")
    # the recipes that train in bf16 where it is fast say auto; the config holds what this machine decided
    assert RECIPES["fmnist-resnet20"]["precision"] == "auto"
    assert make_config(RECIPES["fmnist-resnet20"], {"device": "cpu"}).precision == here
    # what the user names is kept, auto or not; a saved config is read as it was saved, never decided again
    assert make_config({"precision": "bf16"}).precision == "bf16"
    assert make_config({"precision": "fp32"}).precision == "fp32"
    other = "fp32" if here == "bf16" else "bf16"
    assert saved_config({"precision": other}).precision == other
    with pytest.raises(FixNormError, match="precision='fp8' is not one of"):
        make_config({"precision": "fp8"})
    # a TrainConfig built by hand is decided by the Trainer, before anything is written
    by_hand = dataclasses.replace(make_config(TINY, {"device": "cpu"}), precision="auto")
    assert Trainer(by_hand, tmp_path / "by_hand").cfg.precision == here
    assert yaml.safe_load((tmp_path / "by_hand" / "config.yaml").read_text())["precision"] == here


@needs_fmnist
def test_bf16_on_a_cpu_without_native_bf16_warns_and_still_trains_bf16(tmp_path):
    from fixnorm.train.config import native_precision

    cfg = make_config(TINY, {"precision": "bf16", "epochs": 1, "device": "cpu"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, tmp_path / "run")
    slow = [w for w in caught if "without native bfloat16" in str(w.message)]
    assert len(slow) == (native_precision("cpu") != "bf16")  # warned exactly where bf16 is emulated
    assert trainer.cfg.precision == "bf16"  # never silently another precision
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["precision"] == "bf16"


def test_lr_schedules():
    cfg = make_config({"epochs": 10, "warmup_epochs": 1, "schedule": "cosine"})
    f = lr_factor(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(99) < 0.001
    step = lr_factor(make_config({"epochs": 10, "schedule": "step", "milestones": [3, 6], "gamma": 0.1}), 10)
    assert step(29) == 1.0 and step(30) == pytest.approx(0.1) and step(60) == pytest.approx(0.01)
    exp = lr_factor(make_config({"epochs": 10, "schedule": "exponential", "gamma": 0.97, "decay_epochs": 2.4}), 10)
    assert exp(23) == 1.0 and exp(24) == pytest.approx(0.97) and exp(48) == pytest.approx(0.97 ** 2)


def test_where_each_schedule_ends_and_fixnorm_bending_only_the_decay_above_it():
    from fixnorm.methods import with_method_settings
    from fixnorm.schedule import schedule_end
    from fixnorm.train.config import saved_config

    ends = {"cosine": ({}, 0.0), "cosine floor": ({"min_lr_ratio": 0.25}, 0.25),
            "step": ({"schedule": "step", "milestones": [1.5, 9], "gamma": 0.2}, 0.2),  # 9 lies after the run
            "exponential": ({"schedule": "exponential", "gamma": 0.5, "decay_epochs": 1}, 0.25),
            "constant": ({"schedule": "constant", "warmup_epochs": 1}, 1.0)}
    for name, (settings, end) in ends.items():
        cfg = make_config({"epochs": 3, "method": "fixnorm", "schedule_end": "auto"}, settings)
        assert schedule_end(cfg) == pytest.approx(end), name
        last = lr_factor(cfg, 10)(29)  # the last step of 3 epochs of 10 steps: the factor it names
        assert last == pytest.approx(end, abs=0.01), name
        assert with_method_settings(cfg).method_kwargs["fixnorm"]["schedule_end"] == pytest.approx(end), name
    from fixnorm.methods.fixnorm_method import FixNormSettings
    assert FixNormSettings().schedule_end == "auto"  # the engine's default; FixNorm(...) itself defaults to 0
    explicit = make_config({"method": "fixnorm", "schedule_end": 0.0, "schedule": "constant"})
    assert with_method_settings(explicit).method_kwargs["fixnorm"]["schedule_end"] == 0.0
    # a run saved before the setting existed bent the whole schedule: it resumes so, whatever its schedule
    old = saved_config({"method": "fixnorm", "schedule": "exponential", "gamma": 0.5, "decay_epochs": 1})
    assert with_method_settings(old).method_kwargs["fixnorm"]["schedule_end"] == 0.0
    with pytest.raises(FixNormError, match="schedule_end"):
        make_config({"method": "fixnorm", "schedule_end": 2})


@needs_fmnist
def test_the_engine_hands_fixnorm_the_end_of_its_schedule(tmp_path):
    cfg = make_config(TINY, {"method": "fixnorm", "schedule": "exponential", "gamma": 0.5, "decay_epochs": 1,
                             "schedule_end": "auto"})
    trainer = Trainer(cfg, tmp_path / "run")
    invariant = [g for g in trainer.optimizer.param_groups if g["role"] == "scale_invariant"]
    assert invariant and all(g["schedule_end"] == pytest.approx(0.25) for g in invariant)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method_kwargs"]["fixnorm"]["schedule_end"] == pytest.approx(0.25)
    # a run stopped after epoch 1 and resumed ends bit for bit like one that never stopped
    train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "stopped", epoch=1)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "stopped" / "last.pt"))


# -- runs ----------------------------------------------------------------------------------------
@needs_fmnist
def test_a_run_writes_its_directory(tmp_path):
    summary = train(make_config(TINY, {"epochs": 2, "ema_decay": 0.9, "label_smoothing": 0.1, "grad_clip": 5.0}),
                    tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "summary.json", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "ema_test_acc"} <= rows[0].keys()
    saved = json.loads((run / "summary.json").read_text())
    assert saved["final_test_acc"] == summary["final_test_acc"] > 0.2  # chance is 0.1
    assert saved["best_test_acc"] >= saved["final_test_acc"] and saved["images_per_second"] > 0
    assert saved["environment"]["torch"] == torch.__version__
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    pytest.importorskip("tensorboard")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(FixNormError, match="already holds a run"):
        Trainer(make_config(TINY), run)


@needs_fmnist
def test_fixnorm_refuses_a_run_shorter_than_its_free_phase_before_writing_anything(tmp_path):
    """30 steps with the default 100 free steps would train SGD without weight decay under FixNorm's name."""
    cfg = make_config(TINY, {"method": "fixnorm", "method_kwargs": {"fixnorm": {"free_steps": 100}}})
    with pytest.raises(FixNormError, match=r"takes 30 optimizer steps .* free_steps=100"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # counted from start_step: a run resumed from step 25 of 30 has 5 steps left for its fresh optimizer
    cfg = make_config(TINY, {"method": "fixnorm", "start_step": 25, "method_kwargs": {"fixnorm": {"free_steps": 5}}})
    with pytest.raises(FixNormError, match=r"takes 5 optimizer steps .* free_steps=5"):
        Trainer(cfg, tmp_path / "run")
    # through a warm-up the free phase is counted in full-lr steps: 15 of them take all 30 steps of a 3-epoch one
    cfg = make_config(TINY, {"method": "fixnorm", "warmup_epochs": 3, "method_kwargs": {"fixnorm": {"free_steps": 15}}})
    with pytest.raises(FixNormError, match=r"takes 30 optimizer steps .* free_steps=15 full-lr steps, 30 steps "
                                           r"through the 30-step warm-up"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@needs_fmnist
@pytest.mark.parametrize("method", ["fixnorm", "sgd", "fixnorm-warmup"])
def test_resume_reaches_the_same_weights_bit_for_bit(tmp_path, method):
    # fixnorm-warmup: 6 free steps through a 10-step warm-up end at step 11, after the epoch-1 checkpoint; the
    # resumed optimizer must count the warm-up before it reads that checkpoint (else its phase ended at step 6)
    warmup = {"method": "fixnorm", "warmup_epochs": 1, "free_steps": 6} if method == "fixnorm-warmup" else {}
    cfg = make_config(TINY, {"method": method, "ema_decay": 0.9, **warmup})
    train(cfg, tmp_path / "straight")

    train_until(cfg, tmp_path / "stopped", epoch=1)
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["epoch"] == 1
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "stopped" / "last.pt"))
    straight = list(csv.DictReader((tmp_path / "straight" / "metrics.csv").open()))
    resumed = list(csv.DictReader((tmp_path / "stopped" / "metrics.csv").open()))
    assert [r["test_acc"] for r in straight] == [r["test_acc"] for r in resumed]


@needs_fmnist
def test_sigkill_loses_at_most_the_epoch_in_progress(tmp_path):
    settings = dict(TINY, epochs=6)  # the kill lands after epoch 2 with four epochs (about 2 s here) to spare
    train(make_config(settings), tmp_path / "straight")
    run = tmp_path / "killed"
    args = [f"--set={k}={json.dumps(v)}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "fixnorm", "train", "--recipe", "fmnist-smoke", *args, "--run-dir", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until two epochs are on disk, then kill without warning
        metrics = run / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().strip().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # as if the kill had landed mid-write
    kept = load_checkpoint(run / "last.pt")["epoch"]
    assert 2 <= kept < 6, kept
    resumed = subprocess.run([sys.executable, "-m", "fixnorm", "train", "--resume", str(run), "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(run / "last.pt"))
    assert not list(run.glob(".*.tmp"))  # a kill during a write leaves a temp file; resuming removes it


@needs_fmnist
def test_torchrun_two_ranks_keep_identical_weights(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "ddp"
    proc = subprocess.run([torchrun, "--nproc_per_node=2", "--standalone",
                           str(HERE / "ddp_worker.py"), str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert_same_weights(rank0, rank1)
    assert load_checkpoint(out / "run" / "last.pt")["epoch"] == 2  # written by rank 0 only
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2
    conv = [k for k in rank0 if k.endswith("weight") and rank0[k].ndim == 4][1]
    initial = torch.load(out / "initial.pt", weights_only=True)[conv]
    # FixNorm held the norm the free phase took (not the initial one) on both ranks
    state = load_checkpoint(out / "run" / "last.pt")["optimizer"]["state"]
    targets = [float(e["fixnorm_target"]) for e in state.values() if e.get("fixnorm_target", torch.zeros(2)).ndim == 0]
    assert any(abs(t - float(rank0[conv].norm())) < 1e-5 * t for t in targets)
    assert abs(float(rank0[conv].norm()) - float(initial.norm())) > 1e-4 and not torch.equal(rank0[conv], initial)


# -- checkpoints -----------------------------------------------------------------------------------
@needs_fmnist
def test_truncated_or_tampered_checkpoints_are_clear_errors(tmp_path):
    train(make_config(TINY, {"epochs": 1}), tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    data = last.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FixNormError, match="truncated"):
        load_checkpoint(tmp_path / "truncated.pt")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "fixnorm-checkpoint", "model": Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(FixNormError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    shutil.copy(last, tmp_path / "copy.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(FixNormError, match="not a fixnorm checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


# -- compare ---------------------------------------------------------------------------------------
@needs_fmnist
def test_compare_runs_methods_and_seeds_and_reuses_finished_runs(tmp_path):
    from fixnorm.train.config import native_precision

    settings = dict(TINY, epochs=1, precision="auto", ema_decay=0.9)
    result = run_comparison(settings, ["sgd", "fixnorm"], [0, 1], tmp_path / "cmp")
    assert [r["method"] for r in result["rows"]] == ["sgd", "fixnorm"] and all(r["runs"] == 2 for r in result["rows"])
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| sgd | 2 |" in table and "| fixnorm | 2 |" in table
    assert f"precision=auto ({native_precision('auto')})" in table  # what this machine trained in
    assert "precise_bn=auto (2000 images)" in table  # and how it evaluated
    assert "ema_bn=auto (recomputed)" in table  # and how it scored the EMA
    assert len(json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]) == 4
    before = (tmp_path / "cmp" / "sgd-s0" / "last.pt").stat().st_mtime_ns
    run_comparison(settings, ["sgd", "fixnorm"], [0, 1], tmp_path / "cmp")
    assert (tmp_path / "cmp" / "sgd-s0" / "last.pt").stat().st_mtime_ns == before


def test_unknown_method_lists_the_known_ones(tmp_path):
    from fixnorm.methods import get_method, list_methods

    with pytest.raises(FixNormError, match="known methods: " + ", ".join(list_methods())):
        get_method("lamb")
    assert {"adamw", "fixnorm", "rmsprop", "sgd"} <= set(list_methods())


def test_imagefolder_tree_trains_and_resumes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 4)):
        for label, tint in (("cat", 0), ("dog", 2)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 100, (40, 48, 3), generator=g, dtype=torch.uint8)
                pixels[..., tint] += 120  # a colour the classes differ by
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    settings = dict(model="small_cnn", dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=32,
                    batch_size=8, eval_batch_size=8, epochs=2, lr=0.1, workers=0, threads=1, free_steps=1)
    summary = train(make_config(settings), tmp_path / "straight")
    assert summary["epochs"] == 2 and 0.0 <= summary["final_test_acc"] <= 1.0

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(make_config(settings), tmp_path / "stopped", on_epoch=stop).fit()
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "stopped" / "last.pt"))
    with pytest.raises(FixNormError, match="train/ and val/"):
        Trainer(make_config(settings, {"data_dir": str(tmp_path)}), tmp_path / "bad")


def test_cifar10_files_train_through_the_engine(tmp_path):
    """The CIFAR-10 binary layout (records of 1 label byte + 3072 pixels), generated small, through a real run."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = torch.randint(0, 10, (20, 1), generator=g, dtype=torch.uint8)
        pixels = torch.randint(0, 256, (20, 3072), generator=g, dtype=torch.uint8)
        (folder / f"{name}.bin").write_bytes(torch.cat([labels, pixels], 1).numpy().tobytes())
    settings = dict(model="small_cnn", dataset="cifar10", data_dir=str(tmp_path), epochs=1, batch_size=25,
                    augment="crop_flip", cutout=8, threads=1, free_steps=1)
    summary = train(make_config(settings), tmp_path / "run")
    assert summary["epochs"] == 1 and summary["images_per_second"] > 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["dataset"] == "cifar10"


@needs_fmnist
def test_torch_compile_trains_like_eager(tmp_path):
    """compile=true goes through torch.compile (about 20 s of compilation here) and follows the eager run."""
    settings = dict(TINY, epochs=1)
    eager = train(make_config(settings), tmp_path / "eager")
    compiled = train(make_config(settings, {"compile": True}), tmp_path / "compiled")
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-2)


@needs_fmnist
def test_holdout_evaluates_on_training_images_and_never_on_the_test_set(tmp_path):
    cfg = make_config(TINY, {"holdout": 500, "epochs": 1})
    trainer = Trainer(cfg, tmp_path / "run")
    from fixnorm.data import load_dataset

    train_x, _, _ = load_dataset("fashion_mnist", None, "train")
    assert trainer.data.test_size == 500 and torch.equal(trainer.data.test_x.cpu(), train_x[-500:])
    assert torch.equal(trainer.data.train_x.cpu(), train_x[:1000])  # train_subset from the rest
    summary = trainer.fit()
    assert summary["evaluated_on"] == "holdout of 500 training images"
    with pytest.raises(FixNormError, match="leaves no training images"):
        Trainer(make_config(TINY, {"holdout": 60000}), tmp_path / "r2")


class SmoothedCrossEntropy(TrainStep):
    """The engine's default loss with label smoothing, written as a method's own step."""

    def loss(self, run, x, y):
        logits = run.forward_model(x)
        return torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=0.1), logits


class AnchoredStep(TrainStep):
    """Cross-entropy + a penalty towards the weights at the start (state, like ADMM's Z, kept in checkpoints)."""

    def __init__(self):
        self.anchor = None

    def on_train_start(self, run):
        if self.anchor is None:  # a resumed run keeps the anchor of its checkpoint
            self.anchor = [p.detach().clone() for p in run.model.parameters()]

    def loss(self, run, x, y):
        logits = run.forward_model(x)
        penalty = sum(((p - a) ** 2).sum() for p, a in zip(run.model.parameters(), self.anchor))
        return torch.nn.functional.cross_entropy(logits.float(), y) + 0.5 * penalty, logits

    def state_dict(self):
        return {"anchor": self.anchor}

    def load_state_dict(self, state):
        self.anchor = state["anchor"]


@needs_fmnist
def test_a_train_step_owns_the_loss_and_the_engine_keeps_the_rest(tmp_path):
    smoothing = make_config(TINY, {"method": "sgd", "epochs": 1, "label_smoothing": 0.1})
    train(smoothing, tmp_path / "engine")
    Trainer(make_config(TINY, {"method": "sgd", "epochs": 1}), tmp_path / "step", hooks=[SmoothedCrossEntropy()]).fit()
    assert_same_weights(weights(tmp_path / "engine" / "last.pt"), weights(tmp_path / "step" / "last.pt"))
    with pytest.raises(FixNormError, match="at most one TrainStep"):
        Trainer(make_config(TINY), tmp_path / "two", hooks=[SmoothedCrossEntropy(), AnchoredStep()])


@needs_fmnist
def test_a_train_step_with_state_resumes_bit_for_bit(tmp_path):
    cfg = make_config(TINY, {"method": "fixnorm", "epochs": 2})
    Trainer(cfg, tmp_path / "straight", hooks=[AnchoredStep()]).fit()
    train_until(cfg, tmp_path / "stopped", epoch=1, hooks=[AnchoredStep()])
    Trainer(None, tmp_path / "stopped", resume=True, hooks=[AnchoredStep()]).fit()
    assert_same_weights(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "stopped" / "last.pt"))
    train(cfg, tmp_path / "plain")  # the penalty really acted
    plain, anchored = weights(tmp_path / "plain" / "last.pt"), weights(tmp_path / "straight" / "last.pt")
    assert any(not torch.equal(plain[k], anchored[k]) for k in plain)


@needs_fmnist
def test_train_or_reuse_trains_a_new_run_resumes_an_interrupted_one_and_reads_a_finished_one(tmp_path):
    from fixnorm.run_folder import RunFolder
    from fixnorm.train.engine import train_or_reuse

    cfg = make_config(TINY, {"method": "fixnorm"})
    straight = train_or_reuse(cfg, tmp_path / "straight")
    assert RunFolder(tmp_path / "straight").finished
    train_until(cfg, tmp_path / "killed", epoch=1)
    folder = RunFolder(tmp_path / "killed")
    assert folder.interrupted and not folder.finished
    resumed = train_or_reuse(cfg, folder.path)
    assert resumed["final_test_acc"] == straight["final_test_acc"]
    stamp = folder.summary.stat().st_mtime_ns
    elsewhere = make_config(TINY, {"method": "fixnorm", "threads": 2, "eval_batch_size": 250, "diagnostics": True})
    again = train_or_reuse(elsewhere, folder.path)  # finished: read, not retrained, under other execution settings
    assert again == folder.read_summary() and folder.summary.stat().st_mtime_ns == stamp
    assert not RunFolder(tmp_path / "nothing").finished and not RunFolder(tmp_path / "nothing").interrupted


@needs_fmnist
def test_a_run_folder_is_never_reused_for_a_run_with_other_settings(tmp_path):
    """A finished or interrupted run stands only for the run it is: another method, lr or method setting asked of
    its folder is an error naming the difference, and the folder is left as it was."""
    from fixnorm.train.config import EXECUTION_ONLY_SETTINGS
    from fixnorm.train.engine import check_same_run, train_or_reuse

    cfg = make_config(TINY, {"method": "fixnorm", "epochs": 2})
    train_until(cfg, tmp_path / "killed", epoch=1)
    last = (tmp_path / "killed" / "last.pt").read_bytes()
    for other, named in (({"lr": 0.05}, "lr: 0.1 -> 0.05"), ({"method": "sgd"}, "method: 'fixnorm' -> 'sgd'"),
                         ({"fc_scale": 2.0}, "method_kwargs.fixnorm.fc_scale: 1.0 -> 2.0"), ({"epochs": 3}, "epochs")):
        with pytest.raises(FixNormError, match=re.escape(named)):
            train_or_reuse(make_config(cfg.to_dict(), other), tmp_path / "killed")
        with pytest.raises(FixNormError, match="an interrupted run with other settings"):
            Trainer(make_config(cfg.to_dict(), other), tmp_path / "killed", resume=True)
    assert (tmp_path / "killed" / "last.pt").read_bytes() == last  # nothing trained, nothing written
    finished = train_or_reuse(cfg, tmp_path / "killed")  # the same settings: resumed to the end
    with pytest.raises(FixNormError, match="a finished run with other settings.*lr: 0.1 -> 0.2"):
        train_or_reuse(make_config(cfg.to_dict(), {"lr": 0.2}), tmp_path / "killed")
    assert train_or_reuse(cfg, tmp_path / "killed") == finished
    with pytest.raises(FixNormError, match="holds no run"):
        check_same_run(tmp_path / "nothing", cfg)
    assert EXECUTION_ONLY_SETTINGS <= set(cfg.to_dict())  # every name a real setting: a typo would compare it


@needs_fmnist
def test_a_run_saved_before_a_setting_existed_is_not_reused_for_todays_default(tmp_path):
    """A config saved without a setting reads the value the run trained with (SETTINGS_BEFORE_THEY_EXISTED), not
    today's default; asked for today's default, its folder is refused, not silently reused."""
    from fixnorm.train.engine import train_or_reuse

    cfg = make_config(TINY, {"method": "fixnorm", "base": "adam", "lr": 1e-3, "epochs": 1})
    train_or_reuse(cfg, tmp_path / "old")
    config = tmp_path / "old" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    del saved["method_kwargs"]["fixnorm"]["fc_free_steps"]  # as written before the setting existed
    config.write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(FixNormError, match="fc_free_steps: 'free_steps' -> 'auto'"):
        train_or_reuse(cfg, tmp_path / "old")
    assert train_or_reuse(make_config(cfg.to_dict(), {"fc_free_steps": "free_steps"}), tmp_path / "old")


@needs_fmnist
def test_init_from_starts_a_run_from_another_runs_final_weights(tmp_path):
    dense = make_config(TINY, {"method": "sgd", "epochs": 1})
    Trainer(dense, tmp_path / "dense").fit()
    final = load_checkpoint(tmp_path / "dense" / "last.pt")["model"]
    tuned = Trainer(make_config(TINY, {"method": "fixnorm", "free_steps": 0, "init_from": str(tmp_path / "dense")}),
                    tmp_path / "finetune")
    for key, value in tuned.model.state_dict().items():
        assert torch.equal(value, final[key]), key
    # FixNorm analysed and took its norms from the loaded weights, not from a fresh initialisation
    for name, target in tuned.optimizer.norm_targets().items():
        assert float(target) == pytest.approx(float(final[name].float().norm()), rel=1e-6), name
    assert tuned.optimizer.steps_done == 0 and tuned.start_epoch == 0  # a new run: fresh optimizer and schedule
    with pytest.raises(FixNormError, match="another model"):
        Trainer(make_config(TINY, {"method": "sgd", "model_kwargs": {"width": 4}, "init_from": str(tmp_path / "dense")}),
                tmp_path / "other")
    with pytest.raises(FixNormError, match="no checkpoint"):
        Trainer(make_config(TINY, {"method": "sgd", "init_from": str(tmp_path / "missing")}), tmp_path / "none")


@needs_fmnist
def test_states_saved_at_chosen_steps_are_the_run_at_those_steps_and_change_nothing(tmp_path):
    """save_at_steps writes step-<k>.pt: the initialisation at 0, the epoch-end weights at a boundary; a rewinding point
    that init_from takes, and the run itself trains exactly as without it."""
    # precise BN off: it re-estimates the statistics after an epoch's last step, so last.pt's buffers (not its
    # weights) would differ from the step's
    cfg = make_config(TINY, {"method": "sgd", "epochs": 2, "precise_bn": 0})
    plain = train(cfg, tmp_path / "plain")
    steps = Trainer(cfg, tmp_path / "probe").steps_per_epoch
    initial = Trainer(cfg, tmp_path / "fresh").model.state_dict()
    saving = make_config(cfg.to_dict(), {"save_at_steps": [0, 3, steps]})
    train_until(saving, tmp_path / "saving", epoch=1)
    at_epoch = load_checkpoint(tmp_path / "saving" / "last.pt")["model"]
    for step, expected in ((0, initial), (steps, at_epoch)):
        state = load_checkpoint(tmp_path / "saving" / f"step-{step}.pt")
        assert state["global_step"] == step
        assert all(torch.equal(state["model"][k], expected[k]) for k in expected), step
    assert (tmp_path / "saving" / "step-3.pt").is_file()
    assert Trainer(saving, tmp_path / "saving", resume=True).fit()["final_test_acc"] == plain["final_test_acc"]
    rewound = Trainer(make_config(cfg.to_dict(), {"init_from": str(tmp_path / "saving" / "step-3.pt")}), tmp_path / "rewound")
    mid = load_checkpoint(tmp_path / "saving" / "step-3.pt")["model"]
    assert all(torch.equal(v, mid[k]) for k, v in rewound.model.state_dict().items())
    with pytest.raises(FixNormError, match="save_at_steps"):
        make_config(cfg.to_dict(), {"save_at_steps": [-1]})


@needs_fmnist
def test_a_run_saved_before_a_setting_existed_resumes_with_the_value_it_trained_with(tmp_path):
    """Runs from before the free phase, the schedule law, drifting norms, the equilibrium ceiling, the classifier's
    own free phase and the drift that follows the lr resume with free_steps=0, lr_power=1, fixed norms, no ceiling,
    the classifier held with the rest and a drift that does not follow the lr."""
    from fixnorm.train.checkpoint import save_checkpoint
    from fixnorm.methods.fixnorm_method import fixnorm_settings
    from fixnorm.train.config import SETTINGS_BEFORE_THEY_EXISTED

    cfg = make_config(TINY, {"method": "fixnorm", "free_steps": 0, "lr_power": 1.0, "norm_drift": None})
    train_until(cfg, tmp_path / "old", epoch=1)
    state = load_checkpoint(tmp_path / "old" / "last.pt")
    saved = state["config"]  # as an older fixnorm wrote it: its settings at the top level, without the new ones
    for key, value in saved["method_kwargs"].pop("fixnorm").items():
        if key not in SETTINGS_BEFORE_THEY_EXISTED["fixnorm"]:
            saved[key] = value
    save_checkpoint(tmp_path / "old" / "last.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    resumed = Trainer(None, tmp_path / "old", resume=True)
    settings = fixnorm_settings(resumed.cfg)
    assert settings.free_steps == 0 and settings.lr_power == 1.0 and settings.norm_drift is None
    assert settings.equilibrium_wd is None and settings.fc_free_steps == "free_steps" and settings.warmup_count is True
    assert settings.drift_follows_lr is False and settings.drift_signal == "gradient"
    assert resumed.cfg.method_kwargs["fixnorm"]["free_steps"] == 0  # written out in full from now on
    assert resumed.fit()["final_test_acc"] == train(cfg, tmp_path / "straight")["final_test_acc"]


@needs_fmnist
def test_a_diverged_run_stops_with_a_clear_error_and_keeps_its_last_good_state(tmp_path):
    """A NaN training loss ends the run (NonFiniteError, which the tuner records as a diverged trial) before the
    epoch's checkpoint, instead of training NaN weights to the end."""
    from fixnorm.errors import NonFiniteError

    cfg = make_config(TINY, {"epochs": 2, "lr": 1e30, "method": "sgd"})  # FixNorm has its own check (rules)
    with pytest.raises(NonFiniteError, match="diverged in epoch 1"):
        Trainer(cfg, tmp_path / "run").fit()
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing of the diverged epoch was saved as a result
