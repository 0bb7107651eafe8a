"""Test-time flip (config eval_flip): the evaluation is the mean of the logits of each image and its mirror."""
import pytest
import torch
import torch.nn.functional as F

from fixnorm.data import DEFAULT_FASHION_MNIST_DIR
from fixnorm.train import Trainer, load_recipe, make_config

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")

TINY = dict(load_recipe("fmnist-smoke"), train_subset=600, holdout=500, eval_batch_size=250, epochs=1, threads=1,
            free_steps=1)  # 6 steps: FixNorm holds its norms after 1


def by_hand(trainer, model, flip):
    """(mean loss, accuracy) computed here from the definition, on the trainer's own test batches."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for x, y in trainer.data.test_batches():
            x = trainer.prepare_batch(x)
            logits = model(x).float()
            if flip:
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return loss_sum / trainer.data.test_size, correct / trainer.data.test_size


@needs_fmnist
def test_eval_flip_is_the_mean_of_the_logits_of_the_image_and_its_mirror(tmp_path):
    trainer = Trainer(make_config(TINY, {"eval_flip": True}), tmp_path / "flip")
    trainer.fit()  # trained weights: the two views then disagree on some images
    loss, acc = trainer.evaluate(trainer.model)
    hand_loss, hand_acc = by_hand(trainer, trainer.model, flip=True)
    assert acc == hand_acc
    assert loss == pytest.approx(hand_loss, rel=1e-5)
    plain_loss, _ = by_hand(trainer, trainer.model, flip=False)
    assert loss != pytest.approx(plain_loss, rel=1e-5), "the mirror changed nothing: the flip was not applied"
    assert trainer.history[-1]["test_acc"] == acc
