"""Precise BN: BatchNorm statistics re-estimated before each evaluation, by definition and through the real engine."""
import copy
import csv
import dataclasses

import pytest
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import update_bn

from fixnorm import FixNormError, recompute_bn_statistics_
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from fixnorm.train.config import PRECISE_BN_IMAGES, saved_config
from fixnorm.train.hooks import EmaHook
from fixnorm.tune.worker import _as_trained
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")

# the smoke recipe's width-8 CNN on 1,200 images (12 steps an epoch), 500 of them re-estimated on, evaluated on 500
# held-out training images; a constant lr keeps the weights turning to the last step, so the running statistics lag
TINY = dict(load_recipe("fmnist-smoke"), train_subset=1200, holdout=500, eval_batch_size=500, epochs=2, threads=1,
            schedule="constant", precise_bn=500, free_steps=2)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5), nn.BatchNorm2d(2, momentum=0.3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


# -- the function, by its definition -----------------------------------------------------------------
def test_statistics_are_the_mean_of_batch_means_and_unbiased_batch_variances_in_place():
    model = small_model()
    model[2].running_mean.fill_(7.0)  # statistics the re-estimate must forget
    model[2].num_batches_tracked.fill_(40)
    model.train()
    model[1].eval()  # a mix of modes, each to be given back as it was
    params = {n: p.clone() for n, p in model.named_parameters()}
    batches = [torch.randn(5, 1, 6, 6), torch.randn(5, 1, 6, 6) * 2 + 1, torch.randn(3, 1, 6, 6) - 1]
    rng = torch.get_rng_state()

    assert recompute_bn_statistics_(model, iter(batches)) == 3

    with torch.no_grad():
        features = [model[0](x).transpose(0, 1).reshape(2, -1) for x in batches]  # per channel; dropout is off
    bn = model[2]
    torch.testing.assert_close(bn.running_mean, torch.stack([f.mean(1) for f in features]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([f.var(1, unbiased=True) for f in features]).mean(0))
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.3
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True, True]
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout draw: a run's random streams are untouched
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name


def test_it_matches_torchs_update_bn_on_a_model_without_dropout():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2),
                          nn.BatchNorm1d(2))
    batches = [torch.randn(4, 1, 6, 6) for _ in range(3)]
    by_torch = copy.deepcopy(model)
    update_bn(batches, by_torch)
    recompute_bn_statistics_(model, batches)
    for (name, mine), theirs in zip(model.named_buffers(), by_torch.buffers()):
        assert torch.equal(mine, theirs), name


def test_a_model_without_batchnorm_is_left_alone_and_bad_input_is_refused_without_harm():
    plain = nn.Sequential(nn.Linear(3, 2))
    assert recompute_bn_statistics_(plain, [torch.randn(2, 3)]) == 0
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FixNormError, match="got no batches"):
        recompute_bn_statistics_(model, [])
    with pytest.raises(FixNormError, match=r"not finite in \['2'\]"):
        recompute_bn_statistics_(model, [torch.full((2, 1, 6, 6), float("inf"))])
    with pytest.raises(RuntimeError):  # the model's own error (wrong shape), statistics kept all the same
        recompute_bn_statistics_(model, [torch.randn(2, 3, 6, 6)])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model[2].momentum == 0.3 and model.training


# -- the setting ------------------------------------------------------------------------------------
def test_auto_is_decided_with_the_config_for_stored_and_streamed_datasets():
    assert make_config({}).precise_bn == PRECISE_BN_IMAGES == 2000
    assert make_config({"precise_bn": 0}).precise_bn == 0
    assert make_config({"dataset": "imagenet", "data_dir": "x"}).precise_bn == 2000  # streamed: spread over the tree
    assert make_config({"dataset": "imagefolder", "precise_bn": 100}).precise_bn == 100
    for bad in (-1, 1.5, "some", True):
        with pytest.raises(FixNormError, match="precise_bn"):
            make_config({"precise_bn": bad})
    # a run saved before the setting existed evaluated with its running statistics: it reads as 0, not as auto
    assert saved_config({"method": "sgd"}).precise_bn == 0
    assert saved_config({"method": "sgd", "precise_bn": 300}).precise_bn == 300
    # a tuning study's identity holds the decided number, so trials evaluated otherwise cannot join it
    assert _as_trained({"dataset": "fashion_mnist"})["precise_bn"] == 2000
    assert _as_trained({"dataset": "imagefolder"})["precise_bn"] == 2000
    assert _as_trained({"precise_bn": 0})["precise_bn"] == 0


# -- the engine ---------------------------------------------------------------------------------------
@needs_fmnist
def test_a_run_evaluates_the_weights_with_statistics_re_estimated_and_trains_exactly_as_without(tmp_path):
    on = make_config(TINY)
    off = make_config(TINY, {"precise_bn": 0})
    trainer = Trainer(on, tmp_path / "on")
    trainer.fit()
    train(off, tmp_path / "off")
    with_it, without = load_checkpoint(tmp_path / "on" / "last.pt"), load_checkpoint(tmp_path / "off" / "last.pt")
    for name, value in without["model"].items():  # the weights are the same; only the BN statistics differ
        same = torch.equal(value, with_it["model"][name])
        assert same == ("running" not in name and "num_batches" not in name), name
    assert with_it["optimizer"]["state"].keys() == without["optimizer"]["state"].keys()

    # the stored statistics are torch's update_bn of the final weights on the first 500 training images, and the
    # recorded accuracy is the evaluation of that model
    hand = copy.deepcopy(trainer.model)
    hand.load_state_dict(without["model"])
    images = trainer.data.train_x[:500]
    update_bn([trainer.prepare_batch(images[i:i + 100]) for i in range(0, 500, 100)], hand)
    for name, value in hand.state_dict().items():
        torch.testing.assert_close(value, with_it["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    rows = list(csv.DictReader((tmp_path / "on" / "metrics.csv").open()))
    assert float(rows[-1]["test_acc"]) == trainer.evaluate(hand)[1]
    assert yaml.safe_load((tmp_path / "on" / "config.yaml").read_text())["precise_bn"] == 500


@needs_fmnist
def test_a_resumed_run_with_precise_bn_matches_one_that_never_stopped_bit_for_bit(tmp_path):
    cfg = make_config(TINY, {"epochs": 3})
    train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "stopped", epoch=1)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    straight, resumed = (load_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "stopped"))
    for name, value in straight["model"].items():  # buffers included
        assert torch.equal(value, resumed["model"][name]), name
    rows = [list(csv.DictReader((tmp_path / run / "metrics.csv").open())) for run in ("straight", "stopped")]
    assert [r["test_acc"] for r in rows[0]] == [r["test_acc"] for r in rows[1]]


@needs_fmnist
def test_a_hand_built_config_saying_auto_is_decided_by_the_trainer(tmp_path):
    by_hand = dataclasses.replace(make_config(TINY), precise_bn="auto")
    assert Trainer(by_hand, tmp_path / "run").cfg.precise_bn == PRECISE_BN_IMAGES


@needs_fmnist
def test_the_images_come_in_the_runs_batches_and_a_last_batch_of_one_joins_the_one_before(tmp_path):
    from fixnorm.train.hooks import training_image_batches

    trainer = Trainer(make_config(TINY), tmp_path / "run")
    assert trainer.cfg.batch_size == 100
    assert [len(b) for b in training_image_batches(trainer, 250)] == [100, 100, 50]
    batches = list(training_image_batches(trainer, 201))  # BatchNorm1d cannot normalise a batch of one
    assert [len(b) for b in batches] == [100, 101]
    expected = trainer.prepare_batch(trainer.data.train_x[:201])
    assert torch.equal(torch.cat(batches), expected)  # the first stored images, un-augmented, prepared


# -- a streamed ImageFolder tree ------------------------------------------------------------------------
def test_on_a_streamed_tree_the_statistics_come_from_images_spread_over_every_class_uncropped(tmp_path):
    """Three classes of 10 files each, 9 images re-estimated on: every 30/9-th file in class order (the first 9
    would be one class), decoded with the evaluation transform; the engine's statistics are update_bn's on them."""
    Image = pytest.importorskip("PIL.Image")
    from fixnorm.data.imagefolder import ImageFolderDataset, ResizeCenterCrop
    from fixnorm.data import normalize
    from fixnorm.train.data_source import IMAGENET_MEAN, IMAGENET_STD

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 10), ("val", 3)):
        for label, tint in (("a", 0), ("b", 1), ("c", 2)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 100, (40, 48, 3), generator=g, dtype=torch.uint8)
                pixels[..., tint] += 120  # classes differ in colour, so which images are used shows in the mean
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    settings = dict(model="small_cnn", dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=32,
                    batch_size=4, eval_batch_size=8, epochs=1, lr=0.1, workers=0, threads=1, free_steps=1,
                    precise_bn=9, ema_decay=0.5, ema_bn_check=True)
    trainer = Trainer(make_config(settings), tmp_path / "on")
    trainer.fit()
    train(make_config(settings, {"precise_bn": 0, "ema_bn_check": False}), tmp_path / "off")
    with_it, without = load_checkpoint(tmp_path / "on" / "last.pt"), load_checkpoint(tmp_path / "off" / "last.pt")

    dataset = ImageFolderDataset(tmp_path / "data" / "train", ResizeCenterCrop(32))
    picked = [0, 3, 6, 10, 13, 16, 20, 23, 26]  # i * 30 // 9
    assert {dataset.samples[i][1] for i in picked} == {0, 1, 2}
    images = torch.stack([dataset[i][0] for i in picked])
    prepared = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    hand = copy.deepcopy(trainer.model)
    hand.load_state_dict(without["model"])
    update_bn([prepared[:4], prepared[4:]], hand)  # batches of 4; the last one of a single image joins the one before
    for name, value in hand.state_dict().items():
        torch.testing.assert_close(value, with_it["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    row = list(csv.DictReader((tmp_path / "on" / "metrics.csv").open()))[-1]
    assert float(row["test_acc"]) == trainer.evaluate(hand)[1]
    # the EMA is scored with its statistics re-estimated on the same 9 images (the check's column uses up to 2000)
    ema = copy.deepcopy(next(h for h in trainer.hooks if isinstance(h, EmaHook)).ema.module)
    update_bn([prepared[:4], prepared[4:]], ema)
    assert trainer.cfg.ema_bn == "recomputed" and float(row["ema_test_acc"]) == trainer.evaluate(ema)[1]
    assert "ema/test_acc_recomputed_bn" in row
