"""FixMatch on the engine: the loss by its formula, the label split, the three teachers as defined, bit-exact resume."""
import csv

import pytest
import torch

from fixnorm import FixNorm, FixNormError
from fixnorm.cli import main as cli_main
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.hooks import Hook
from fixnorm.methods.fixmatch import fixmatch_loss
from fixnorm.train import Trainer, load_checkpoint, make_config
from fixnorm.train.data_source import labelled_subset
from helpers import train_until

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")

# tiny but real: 10 labels per class from a pool of 300 images, 12 steps per epoch (a pass of the pool) of 25
# labelled + 50 unlabelled,
# evaluated on 500 held-out training images; threshold 0 so that every pseudo-label counts and the stream matters
TINY = dict(model="small_cnn", model_kwargs={"width": 8}, dataset="fashion_mnist", train_subset=300, holdout=500,
            labels_per_class=10, epochs=1, batch_size=25, eval_batch_size=500, method="fixmatch", lr=0.05,
            weight_decay=5e-4, augment="crop_flip", crop_padding=2, threads=1)


def tiny(teacher="none", momentum=0.5, epochs=1, others=None, **fixmatch):
    settings = {"mu": 2, "threshold": 0.0, "teacher": teacher, "teacher_momentum": momentum, **fixmatch}
    return make_config(TINY, {"epochs": epochs, "method_kwargs": {"fixmatch": settings, **(others or {})}})


# -- the loss ---------------------------------------------------------------------------------------
def test_the_loss_on_a_hand_batch_is_the_formula_over_all_unlabelled_images():
    logits_x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    logits_strong = torch.tensor([[0.5, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 3.0, 0.0], [2.0, 0.0, -1.0]],
                                 requires_grad=True)
    probs_weak = torch.tensor([[0.75, 0.125, 0.125],    # at the threshold: counts, label 0
                               [0.5, 0.25, 0.25],       # below: masked
                               [0.0625, 0.875, 0.0625],  # counts, label 1
                               [0.25, 0.25, 0.5]], requires_grad=True)
    terms = fixmatch_loss(logits_x, labels, logits_strong, probs_weak, threshold=0.75, lambda_u=2.0)

    def ce(row, label):
        return -(row[label] - row.exp().sum().log())

    loss_x = (ce(logits_x[0], 0) + ce(logits_x[1], 2)) / 2
    loss_u = (ce(logits_strong[0], 0) + ce(logits_strong[2], 1)) / 4  # over all 4, not the 2 kept
    torch.testing.assert_close(terms.loss_x, loss_x)
    torch.testing.assert_close(terms.loss_u, loss_u)
    torch.testing.assert_close(terms.loss, loss_x + 2.0 * loss_u)
    assert terms.mask.tolist() == [1.0, 0.0, 1.0, 0.0] and terms.pseudo_labels.tolist() == [0, 0, 1, 2]
    terms.loss.backward()
    assert probs_weak.grad is None and logits_strong.grad[1].abs().sum() == 0  # no gradient through p or masked rows


# -- the label split -----------------------------------------------------------------------------------
def test_the_labelled_subset_is_exactly_k_per_class_and_a_function_of_the_seed():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    keep = labelled_subset(labels, 7, seed=3)
    assert torch.bincount(labels[keep], minlength=10).tolist() == [7] * 10
    assert torch.equal(keep, keep.unique())  # sorted, no repeats
    assert torch.equal(keep, labelled_subset(labels, 7, seed=3))
    assert not torch.equal(keep, labelled_subset(labels, 7, seed=4))
    with pytest.raises(FixNormError, match="class 0 has only 100"):
        labelled_subset(labels, 101, seed=0)


@needs_fmnist
def test_the_engine_trains_on_the_labelled_subset_and_offers_the_whole_set_unlabelled(tmp_path):
    trainer = Trainer(tiny(), tmp_path / "run")
    assert torch.bincount(trainer.data.train_y, minlength=10).tolist() == [10] * 10
    images, labels = trainer.unlabelled_images()
    assert len(images) == len(labels) == 300 and trainer.steps_per_epoch == 12  # a pass of the unlabelled pool
    taken = torch.cat([y for _, y in trainer.data.train_batches(0)])  # the 100 labels cycled 3 times, none dropped
    assert len(taken) == 300 and torch.bincount(taken, minlength=10).tolist() == [30] * 10
    keep = labelled_subset(labels, 10, seed=0)
    assert torch.equal(trainer.data.train_x, images[keep]) and torch.equal(trainer.data.train_y, labels[keep])


def test_bad_settings_are_clear_errors_at_config_time():
    def fixmatch(**settings):
        return make_config({"method": "fixmatch", "labels_per_class": 4, "method_kwargs": {"fixmatch": settings}})

    with pytest.raises(FixNormError, match="eman_renorm .* needs FixNorm as the optimizer"):
        fixmatch(teacher="eman_renorm")
    fixmatch(teacher="eman_renorm", optimizer="fixnorm")
    with pytest.raises(FixNormError, match=r"threshold is a probability in \[0, 1\], got 1.5"):
        fixmatch(threshold=1.5)
    with pytest.raises(FixNormError, match="teacher must be one of"):
        fixmatch(teacher="mean")
    with pytest.raises(FixNormError, match="teacher_momentum"):
        fixmatch(teacher_momentum=1.2)
    with pytest.raises(FixNormError, match="labels_per_class must be a whole number"):
        make_config({"labels_per_class": -1})


@needs_fmnist
def test_fixmatch_without_a_label_budget_says_what_to_set(tmp_path):
    with pytest.raises(FixNormError, match="set labels_per_class"):
        Trainer(make_config(TINY, {"labels_per_class": 0}), tmp_path / "run")


# -- the teachers on the engine -------------------------------------------------------------------------------
class Watch(Hook):
    """The student's state after every step, the student's batch sizes and the teacher's mode in its forwards."""

    def __init__(self):
        self.students, self.batch_sizes, self.teacher_modes = [], [], []

    def on_train_start(self, run):
        self.initial = {k: v.clone() for k, v in run.model.state_dict().items()}
        run.model.register_forward_pre_hook(lambda m, args: self.batch_sizes.append(len(args[0])))
        teacher = run.train_step.teacher
        if teacher is not None:
            teacher.register_forward_pre_hook(lambda m, args: self.teacher_modes.append(m.training))

    def after_step(self, run):
        self.students.append({k: v.clone() for k, v in run.model.state_dict().items()})


def expected_average(initial, students, m, buffers):
    """The teacher by definition: t = m·t + (1-m)·s after each step (buffers too when ``buffers``), ints copied."""
    teacher = {k: v.clone() for k, v in initial.items()}
    for student in students:
        for key, s in student.items():
            if s.is_floating_point() and (buffers or "running" not in key):
                teacher[key] = m * teacher[key] + (1 - m) * s
            elif buffers:
                teacher[key] = s.clone()
    return teacher


def run_watched(cfg, path):
    watch = Watch()
    trainer = Trainer(cfg, path, hooks=[watch])
    trainer.fit()
    return trainer, watch


@needs_fmnist
def test_eman_teacher_averages_parameters_and_bn_statistics_and_labels_in_eval_mode(tmp_path):
    trainer, watch = run_watched(tiny("eman"), tmp_path / "eman")
    teacher = trainer.train_step.teacher.state_dict()
    expected = expected_average(watch.initial, watch.students, 0.5, buffers=True)
    for key, value in teacher.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(k.endswith("running_var") for k in teacher)
    assert watch.teacher_modes[:4] == [False] * 4  # eval mode whenever it labels (then evaluation, eval too)
    assert watch.batch_sizes[:4] == [25 + 50] * 4  # the student sees labelled + strong views only
    row = trainer.history[-1]
    assert 0 <= row["fixmatch/teacher_test_acc"] <= 1 and row["fixmatch/mask_rate"] == 1.0
    assert 0 <= row["fixmatch/pseudo_label_acc"] <= 1


@needs_fmnist
def test_ema_teacher_averages_parameters_only_and_labels_with_batch_statistics(tmp_path):
    trainer, watch = run_watched(tiny("ema"), tmp_path / "ema")
    teacher = trainer.train_step.teacher
    state = teacher.state_dict()
    expected = expected_average(watch.initial, watch.students, 0.5, buffers=False)
    params = {k for k, _ in teacher.named_parameters()}
    for key in params:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    averaged = expected_average(watch.initial, watch.students, 0.5, buffers=True)
    means = [k for k in state if k.endswith("running_mean")]
    assert all(not torch.allclose(state[k], averaged[k]) for k in means)  # its statistics are not the average
    counts = [int(v) for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert counts == [trainer.steps_per_epoch] * len(counts)  # its own train-mode forwards, one per step
    assert watch.teacher_modes[:4] == [True] * 4 and teacher.training


@needs_fmnist
def test_without_a_teacher_the_student_labels_the_weak_view_in_one_forward(tmp_path):
    trainer, watch = run_watched(tiny("none"), tmp_path / "none")
    assert trainer.train_step.teacher is None and trainer.train_step.state_dict() == {}
    assert watch.batch_sizes[:4] == [25 + 2 * 50] * 4  # labelled, weak and strong together
    assert "fixmatch/teacher_test_acc" not in trainer.history[-1]
    rows = list(csv.DictReader((tmp_path / "none" / "metrics.csv").open()))
    assert {"fixmatch/pseudo_label_acc", "fixmatch/mask_rate", "fixmatch/loss_u"} <= rows[0].keys()


@needs_fmnist
def test_a_run_with_a_teacher_resumes_bit_for_bit(tmp_path):
    cfg = tiny("eman", momentum=0.9, epochs=2)
    Trainer(cfg, tmp_path / "straight").fit()
    train_until(cfg, tmp_path / "stopped", epoch=1)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    teachers = straight["hooks"][-1]["teacher"], resumed["hooks"][-1]["teacher"]
    for key, value in teachers[0].items():
        assert torch.equal(value, teachers[1][key]), key

    def measured(history):  # everything but the clock
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in history]

    assert measured(straight["history"]) == measured(resumed["history"])
    assert straight["history"][-1]["fixmatch/loss_u"] > 0  # the unlabelled stream took part


@needs_fmnist
def test_eman_renorm_puts_every_constrained_teacher_weight_at_its_target(tmp_path):
    for teacher in ("eman_renorm", "eman"):
        cfg = tiny(teacher, optimizer="fixnorm", others={"fixnorm": {"free_steps": 0}})
        trainer = Trainer(cfg, tmp_path / teacher)
        trainer.fit()
        assert isinstance(trainer.optimizer, FixNorm)
        weights = dict(trainer.train_step.teacher.named_parameters())
        targets = trainer.optimizer.norm_targets()
        assert targets
        ratios = []
        for name, target in targets.items():
            w = weights[name].detach()
            norms = w.norm() if target.numel() == 1 else w.flatten(1).norm(dim=1)
            ratios.append((norms / target).flatten())
        ratios = torch.cat(ratios)
        if teacher == "eman_renorm":
            torch.testing.assert_close(ratios, torch.ones_like(ratios), rtol=1e-5, atol=0)
        else:  # the average of weights of one norm is no longer than they are, and shorter once they turn
            assert (ratios <= 1 + 1e-5).all() and (ratios < 1 - 1e-4).any()


@needs_fmnist
def test_the_command_line_trains_fixmatch_with_an_eman_teacher(tmp_path, capsys):
    settings = ["method_kwargs.fixmatch.teacher=eman", "method_kwargs.fixmatch.mu=2", "labels_per_class=5",
                "train_subset=1000", "holdout=300", "model_kwargs.width=8", "batch_size=25", "epochs=1", "threads=1"]
    code = cli_main(["train", "--recipe", "fmnist-fixmatch", "--method", "fixmatch",
                     *[f"--set={s}" for s in settings], "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["fixmatch/teacher_test_acc"]) >= 0

