"""The three-way EMA check (config ema_bn_check): each column by its definition, and training left bit for bit alone."""
import copy
import csv

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from fixnorm import FixNormError
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.models import list_models, register_model
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from fixnorm.train.config import saved_config
from fixnorm.train.hooks import BN_CHECK_IMAGES, EmaHook, with_recomputed_bn

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")

# tiny but real: the smoke recipe's width-8 CNN on 2,500 images (more than the 2,000 the check re-estimates on),
# 25 steps per epoch, evaluated on 500 held-out training images; a short EMA so its buffers differ from the student's
TINY = dict(load_recipe("fmnist-smoke"), train_subset=2500, holdout=500, eval_batch_size=500, epochs=1,
            ema_decay=0.9, threads=1)
COLUMNS = ("ema/test_acc_ema_buffers", "ema/test_acc_student_buffers", "ema/test_acc_recomputed_bn")


def metrics(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    """A finished one-epoch run with the check on: (trainer, its last record)."""
    trainer = Trainer(make_config(TINY, {"ema_bn_check": True}), tmp_path_factory.mktemp("ema_check") / "run")
    trainer.fit()
    return trainer, trainer.history[-1]


def assert_same(a, b, where="state"):
    """Nested dicts, lists and tensors equal bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def ema_hook(trainer):
    return next(h for h in trainer.hooks if isinstance(h, EmaHook))


# -- the definitions of the columns ------------------------------------------------------------------
@needs_fmnist
def test_the_ema_buffers_column_is_the_ema_model_as_it_stands(checked_run):
    trainer, record = checked_run
    assert record["ema/test_acc_ema_buffers"] == trainer.evaluate(ema_hook(trainer).ema.module)[1]


@needs_fmnist
def test_with_precise_bn_the_ema_is_scored_with_statistics_recomputed_on_the_precise_bn_images(checked_run):
    trainer, record = checked_run
    assert trainer.cfg.ema_bn == "recomputed" and trainer.cfg.precise_bn == BN_CHECK_IMAGES  # both by default
    assert record["ema_test_acc"] == record["ema/test_acc_recomputed_bn"]  # its definition is pinned below
    assert record["ema_test_acc"] != record["ema/test_acc_ema_buffers"], "the test needs statistics that matter"


@needs_fmnist
def test_the_student_buffers_column_is_the_ema_weights_with_the_students_buffers_loaded(checked_run):
    trainer, record = checked_run
    ema = ema_hook(trainer).ema.module
    students = {name: b for name, b in trainer.model.named_buffers()}
    assert any(not torch.equal(b, students[n]) for n, b in ema.named_buffers()), "the test needs buffers that differ"
    hand = copy.deepcopy(ema)
    hand.load_state_dict({**hand.state_dict(), **students})
    assert record["ema/test_acc_student_buffers"] == trainer.evaluate(hand)[1]


@needs_fmnist
def test_the_recomputed_column_is_torchs_update_bn_on_the_first_2000_training_images(checked_run):
    trainer, record = checked_run
    images = trainer.data.train_x[:BN_CHECK_IMAGES]
    assert len(images) == BN_CHECK_IMAGES < len(trainer.data.train_x)
    batches = [trainer.prepare_batch(images[i:i + trainer.cfg.batch_size])
               for i in range(0, len(images), trainer.cfg.batch_size)]
    hand = copy.deepcopy(ema_hook(trainer).ema.module)
    update_bn(batches, hand)  # torch's own: the whole model in train mode, momentum None (small_cnn has no dropout)
    assert record["ema/test_acc_recomputed_bn"] == trainer.evaluate(hand)[1]


def test_recomputed_statistics_are_the_mean_of_batch_means_and_unbiased_batch_variances():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3)
    model = nn.Sequential(conv, nn.Dropout(0.5), nn.BatchNorm2d(2, momentum=0.3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3))
    model[2].running_mean.fill_(7.0)  # statistics the re-estimate must forget, and a count it must restart
    model[2].num_batches_tracked.fill_(4)
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(5, 1, 6, 6), torch.randn(5, 1, 6, 6) * 2 + 1, torch.randn(3, 1, 6, 6) - 1]
    rng = torch.get_rng_state()

    recomputed = with_recomputed_bn(model, batches)

    with torch.no_grad():
        features = [conv(x).transpose(0, 1).reshape(2, -1) for x in batches]  # per channel; dropout is off
    mean = torch.stack([f.mean(1) for f in features]).mean(0)
    var = torch.stack([f.var(1, unbiased=True) for f in features]).mean(0)
    bn = recomputed[2]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.3 and not recomputed.training
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout draw: the run's random streams are untouched
    for name, value in model.state_dict().items():  # the original is left as it was
        assert torch.equal(value, before[name]), name


# -- the run is unchanged by it ---------------------------------------------------------------------
@needs_fmnist
def test_neither_the_check_nor_the_ema_statistics_change_training(tmp_path):
    """A run scoring its EMA with the averaged buffers, without the check, against one with recomputed statistics
    (the default) and the check: model, optimizer and EMA bit for bit the same; the EMA's numbers are each other's
    columns."""
    cfg = make_config(TINY, {"epochs": 2, "ema_bn": "averaged"})
    train(cfg, tmp_path / "plain")
    train(make_config(cfg.to_dict(), {"ema_bn_check": True, "ema_bn": "auto"}), tmp_path / "checked")
    plain, checked = load_checkpoint(tmp_path / "plain" / "last.pt"), load_checkpoint(tmp_path / "checked" / "last.pt")
    assert (plain["config"]["ema_bn"], checked["config"]["ema_bn"]) == ("averaged", "recomputed")
    for part in ("model", "optimizer", "hooks"):  # the hooks' state is the EMA model
        assert_same(plain[part], checked[part], part)
    rows_plain, rows_checked = metrics(tmp_path / "plain"), metrics(tmp_path / "checked")
    for column in ("train_loss", "test_acc"):
        assert [r[column] for r in rows_plain] == [r[column] for r in rows_checked], column
    assert [r["ema_test_acc"] for r in rows_plain] == [r["ema/test_acc_ema_buffers"] for r in rows_checked]
    assert [r["ema_test_acc"] for r in rows_checked] == [r["ema/test_acc_recomputed_bn"] for r in rows_checked]
    assert not set(COLUMNS) & rows_plain[0].keys() and set(COLUMNS) <= rows_checked[0].keys()


# -- a model without BatchNorm; bad settings ------------------------------------------------------------
class NoNormCNN(nn.Module):
    """conv-ReLU, pool, linear: no BatchNorm, no buffers."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.body(x)


@needs_fmnist
def test_a_model_without_batchnorm_gives_three_equal_numbers(tmp_path):
    if "test_no_norm_cnn" not in list_models():
        register_model("test_no_norm_cnn")(NoNormCNN)
    train(make_config(TINY, {"model": "test_no_norm_cnn", "train_subset": 500, "free_steps": 1,
                             "ema_bn_check": True}), tmp_path / "run")
    row = metrics(tmp_path / "run")[-1]
    assert row[COLUMNS[0]] == row[COLUMNS[1]] == row[COLUMNS[2]] == row["ema_test_acc"]


def test_the_check_needs_an_ema_and_a_yes_or_no():
    with pytest.raises(FixNormError, match="needs one: set ema_decay"):
        make_config({"ema_bn_check": True})
    with pytest.raises(FixNormError, match="ema_bn_check"):
        make_config({"ema_decay": 0.9, "ema_bn_check": "sometimes"})


def test_the_ema_statistics_setting_is_decided_with_the_config_and_refused_where_it_cannot_apply():
    assert make_config({"ema_decay": 0.9}).ema_bn == "recomputed"  # precise BN on by default for stored data
    assert make_config({"ema_decay": 0.9, "precise_bn": 0}).ema_bn == "averaged"
    assert make_config({"ema_decay": 0.9, "dataset": "imagefolder"}).ema_bn == "recomputed"  # streamed data too
    assert make_config({}).ema_bn == "averaged"  # no EMA: what runs saved before the setting read
    assert saved_config({"ema_decay": 0.9}).ema_bn == "averaged"  # a run saved before it scored the averaged buffers
    with pytest.raises(FixNormError, match="precise_bn is 0"):
        make_config({"ema_decay": 0.9, "precise_bn": 0, "ema_bn": "recomputed"})
    with pytest.raises(FixNormError, match="set ema_decay"):
        make_config({"ema_bn": "recomputed"})
    with pytest.raises(FixNormError, match="ema_bn"):
        make_config({"ema_decay": 0.9, "ema_bn": "running"})
