"""FixNorm inside a real Lightning Trainer: train, checkpoint, resume; norms held and state restored exactly.

Lightning installs without torchvision (``pip install lightning`` with the CPU constraints), so this runs on
the CPU machines CI uses.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")

import fixnorm  # noqa: E402
from fixnorm import constrained_parameters  # noqa: E402

FC_NORM = 3.0


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def loader():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


class Classifier(L.LightningModule):
    """The Lightning example of docs/integrations.md: FixNorm returned from configure_optimizers."""

    def __init__(self, fc_norm=None):
        super().__init__()
        self.net, self.fc_norm = small_cnn(), fc_norm

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        example = torch.randn(8, 3, 8, 8)
        opt = fixnorm.FixNorm(self, example, lr=0.05, momentum=0.9, fc_norm=self.fc_norm, free_steps=0)
        opt.check_horizon(int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(tmp_path, epochs, precision, callbacks=()):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, callbacks=list(callbacks), deterministic=True)


class OptimizerStateAtStart(L.Callback):
    def on_train_start(self, trainer, module):
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("precision, fc_norm", [("32-true", None), ("bf16-mixed", None), ("32-true", FC_NORM)])
def test_lightning_trains_saves_and_resumes_fixnorm_exactly(tmp_path, precision, fc_norm):
    initial = {n: p.detach().norm() for n, p in small_cnn().named_parameters()}
    if fc_norm is not None:
        initial["8.weight"] = torch.tensor(fc_norm)

    # one run of 2 epochs, and the same run stopped after epoch 1, saved, and resumed in a new Trainer
    straight = Classifier(fc_norm)
    trainer(tmp_path / "a", 2, precision).fit(straight, loader())

    first = Classifier(fc_norm)
    t1 = trainer(tmp_path / "b", 1, precision)
    t1.fit(first, loader())
    opt = t1.optimizers[0]
    assert isinstance(opt, fixnorm.FixNorm)
    held = dict(constrained_parameters(opt))
    assert "net.0.weight" in held and "net.3.weight" in held and "net.8.weight" in held
    for name, p in held.items():  # every constrained weight at its target after real training steps
        expected = initial[name.removeprefix("net.")]
        assert float(p.detach().norm()) == pytest.approx(float(expected), rel=1e-5), name
    assert not torch.equal(first.net[0].weight, small_cnn()[0].weight)  # it did train
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)

    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 4 and len(saved["optimizer_states"]) == 1
    seen = OptimizerStateAtStart()
    resumed = Classifier(fc_norm)
    t2 = trainer(tmp_path / "c", 2, precision, callbacks=[seen])
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    assert_same(saved["optimizer_states"][0], seen.state)  # FixNorm's whole state came back, targets included
    assert t2.lr_scheduler_configs[0].scheduler.last_epoch == 8 and t2.global_step == 8

    for name, p in constrained_parameters(t2.optimizers[0]):  # norms still held
        expected = initial[name.removeprefix("net.")]
        assert float(p.detach().norm()) == pytest.approx(float(expected), rel=1e-5), name
    # bit for bit the run that was never stopped
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    # Lightning restores the weights before configure_optimizers: FixNorm(fc_norm=...) must leave a restored
    # classifier that is already at fc_norm exactly as it is
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_precise_bn_callback_of_the_docs_re_estimates_statistics_before_each_validation(tmp_path):
    """docs/integrations.md's PreciseBN callback, as written there, in a real Trainer with a validation loader."""
    import re
    from pathlib import Path

    from torch.optim.swa_utils import update_bn

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    code = re.search(r"<!-- example: lightning-precise-bn -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(code.split("\nL.Trainer(")[0], namespace)  # the class; the last line trains the docs' placeholders

    class Seen(L.Callback):  # what the validation ran with, right after the callback (it comes after in the list)
        def on_validation_epoch_start(self, trainer, module):
            if not trainer.sanity_checking:
                self.buffers = {n: b.clone() for n, b in module.named_buffers()}
                self.weights = {n: p.detach().clone() for n, p in module.named_parameters()}

    class Validated(Classifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

    seen = Seen()
    module = Validated()
    trainer(tmp_path, 1, "32-true", callbacks=[namespace["PreciseBN"](images=40), seen]).fit(
        module, loader(), loader())
    hand = copy.deepcopy(module.net)
    x = torch.cat([b[0] for b in loader()])[:40]
    update_bn([x[:16], x[16:32], x[32:40]], hand)  # the first 40 training images in the loader's batches
    for name, value in hand.named_buffers():
        torch.testing.assert_close(seen.buffers[f"net.{name}"], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in module.named_parameters():  # the weights are the trained ones, untouched by it
        assert torch.equal(seen.weights[name], value.detach()), name
