"""EMAN's teacher update against its definition: the EMA law and its limits, integer buffers, teacher purity."""
import pytest
import torch
from torch import nn

from fixnorm import FixNormError, eman_update_
from fixnorm.eman import ema_update_, teacher_copy
from fixnorm.models import create_model


def trained_pair(seed=0):
    """A student whose weights and BN statistics have moved away from its teacher's (two different models)."""
    torch.manual_seed(seed)
    teacher = teacher_copy(create_model("small_cnn", num_classes=10, in_channels=1, width=4))
    student = create_model("small_cnn", num_classes=10, in_channels=1, width=4)
    student.train()
    with torch.no_grad():
        for _ in range(3):
            student(torch.randn(8, 1, 12, 12) * 2 + 1)  # running statistics and num_batches_tracked move
    return teacher, student


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("m", [0.0, 0.3, 0.999, 1.0])
def test_every_floating_entry_follows_the_ema_law_and_integer_buffers_are_copied(m):
    teacher, student = trained_pair()
    before, s = snapshot(teacher), snapshot(student)
    eman_update_(teacher, student, m)
    after = snapshot(teacher)
    kinds = set()
    for key, t in after.items():
        if before[key].is_floating_point():
            kinds.add("float")
            expected = m * before[key] + (1 - m) * s[key]
            torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-6)
            if m == 1.0:
                assert torch.equal(t, before[key]), key  # the limits hold exactly
            if m == 0.0:
                assert torch.equal(t, s[key]), key
        else:
            kinds.add("int")
            assert key.endswith("num_batches_tracked") and torch.equal(t, s[key]) and int(t) == 3, key
    assert kinds == {"float", "int"}
    running = [k for k in after if k.endswith("running_mean")]
    assert running and (m == 1.0 or not torch.equal(after[running[0]], before[running[0]]))  # buffers averaged too


def test_buffer_modes_keep_and_copy_are_the_other_projects_rules():
    teacher, student = trained_pair()
    before, s = snapshot(teacher), snapshot(student)
    ema_update_(teacher, student, 0.5, buffers="keep")  # lightly / solo-learn: parameters only
    params = {k for k, _ in teacher.named_parameters()}
    for key, value in snapshot(teacher).items():
        if key in params:
            torch.testing.assert_close(value, 0.5 * before[key] + 0.5 * s[key])
        else:
            assert torch.equal(value, before[key]), key
    ema_update_(teacher, student, 0.5, buffers="copy")  # USB: the student's buffers
    for key, value in snapshot(teacher).items():
        if key not in params:
            assert torch.equal(value, s[key]), key


def test_the_teacher_is_pure_eval_mode_no_buffer_moves_no_gradient():
    teacher, student = trained_pair()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    eman_update_(teacher, student, 0.9)
    before = snapshot(teacher)
    x = torch.randn(6, 1, 12, 12)
    targets = teacher(x).softmax(1)  # its forward: eval mode, averaged statistics
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    loss = -(targets * student(x).log_softmax(1)).sum(1).mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    eman_update_(teacher, student, 0.9)  # the update builds no graph
    assert all(p.grad_fn is None and not p.requires_grad for p in teacher.parameters())


def test_bad_arguments_are_clear_errors():
    teacher, student = trained_pair()
    for m in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(FixNormError, match="momentum"):
            eman_update_(teacher, student, m)
    with pytest.raises(FixNormError, match="different state-dict entries"):
        eman_update_(teacher, nn.Linear(2, 2), 0.9)
    with pytest.raises(FixNormError, match="teacher is the student"):
        eman_update_(student, student, 0.9)
    with pytest.raises(FixNormError, match="buffers"):
        ema_update_(teacher, student, 0.9, buffers="mean")
