"""Rules and ``attach``: each rule against its definition, state through every checkpoint path, one NaN policy."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixnorm.errors import FixNormError, NonFiniteError
from fixnorm.rules import CentreFilters, HoldJointNorms, HoldNorms, Mask, Project, attach


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def filter_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).norm(dim=1)


@pytest.mark.parametrize("per", ["tensor", "filter"])
def test_hold_norms_is_free_until_its_step_then_holds_the_norms_it_had_then(per):
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    weights = [model[0].weight, model[2].weight]
    rule = HoldNorms(weights, per=per, from_step=3)
    attach(optimizer, [rule])
    measure = (lambda w: filter_norms(w)) if per == "filter" else (lambda w: w.detach().norm().reshape(()))
    seen = []
    for batch in batches(8):
        train(model, optimizer, [batch])
        seen.append([measure(w).clone() for w in weights])
    assert not torch.allclose(seen[0][0], seen[1][0])  # free: the norms move
    for later in seen[3:]:
        for now, at_three, target in zip(later, seen[2], rule.targets):
            torch.testing.assert_close(now, at_three, rtol=1e-6, atol=0)
            torch.testing.assert_close(target.float(), at_three.float(), rtol=1e-6, atol=0)


def test_given_targets_are_held_from_the_first_step_and_scale_multiplies_a_taken_norm():
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    w0, w1 = model[0].weight, model[2].weight
    start = float(w1.detach().norm())
    attach(optimizer, [HoldNorms([w0], targets=[torch.tensor(2.5)]), HoldNorms([w1], from_step=0, scale={0: 2.0})])
    train(model, optimizer, batches(3))
    assert float(w0.detach().norm()) == pytest.approx(2.5, rel=1e-6)
    assert float(w1.detach().norm()) == pytest.approx(2 * start, rel=1e-6)


def test_centre_filters_leaves_every_filter_mean_zero_and_saves_nothing():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    weights = [model[0].weight, model[2].weight]
    attach(optimizer, [CentreFilters(weights)], name="centring")
    for w in weights:  # centred at attach
        assert w.detach().reshape(w.shape[0], -1).mean(1).abs().max() < 1e-7
    train(model, optimizer, batches(4))
    for w in weights:
        assert w.detach().reshape(w.shape[0], -1).mean(1).abs().max() < 1e-7
    assert all(not any(k.startswith("centring") for k in entry) for entry in optimizer.state_dict()["state"].values())


@pytest.mark.parametrize("save_at", [1, 5])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_state_round_trip_continues_bit_identically(save_at, kind):
    data = batches(9)

    def build():
        model = net()
        cls, kwargs = (torch.optim.SGD, {"lr": 0.3, "momentum": 0.9}) if kind == "sgd" else (torch.optim.Adam,
                                                                                            {"lr": 0.02})
        optimizer = cls(model.parameters(), **kwargs)
        rules = [HoldNorms([model[0].weight], per="filter", from_step=3), HoldNorms([model[6].weight], from_step=0)]
        return model, optimizer, attach(optimizer, rules, name="hold")

    model, optimizer, attachment = build()
    train(model, optimizer, data[:save_at])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})
    assert all(int(e["hold_steps"]) == save_at for e in saved["opt"]["state"].values() if "hold_steps" in e)
    train(model, optimizer, data[save_at:])

    model2, optimizer2, attachment2 = build()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    assert attachment2.steps == save_at
    train(model2, optimizer2, data[save_at:])
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert attachment2.steps == attachment.steps == 9


@pytest.mark.parametrize("save_at", [1, 4])  # before and after the norms are taken (step 2)
def test_distributed_checkpoint_carries_the_rule_state(tmp_path, save_at):
    """torch.distributed.checkpoint keeps only `state` and `param_groups`, keyed by parameter name."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, load, save
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    data = batches(8)

    def build(seed):
        model = net(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        attach(optimizer, [HoldNorms([model[0].weight, model[2].weight], from_step=2)], name="hold")
        return model, optimizer

    model, optimizer = build(0)
    train(model, optimizer, data[:save_at])
    osd = get_optimizer_state_dict(model, optimizer)
    assert any("hold_target" in entry for entry in osd["state"].values())
    save({"model": model.state_dict(), "optim": osd}, storage_writer=FileSystemWriter(str(tmp_path / "dcp")))
    resumed, optimizer2 = build(9)  # another init: its taken norms would differ
    target = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, optimizer2)}
    load(target, storage_reader=FileSystemReader(str(tmp_path / "dcp")))
    resumed.load_state_dict(target["model"])
    set_optimizer_state_dict(resumed, optimizer2, target["optim"])
    train(model, optimizer, data[save_at:])
    train(resumed, optimizer2, data[save_at:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_nan_gradient_raises_nonfinite_error_or_is_skipped_and_counted():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(optimizer, [HoldNorms([model[0].weight])], names={model[0].weight: "stem"})
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'stem'.*non-finite norm"):
        optimizer.step()

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attachment = attach(optimizer, [HoldNorms([model[0].weight])], nonfinite="skip")
    start = model[0].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad.fill_(float("inf"))
    optimizer.step()
    assert torch.equal(model[0].weight.detach(), start)  # the bad gradient was zeroed: no move, norm kept
    assert attachment.skipped_count == 1


def test_misuse_fails_loudly():
    model = net()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(FixNormError, match="not trained by this optimizer"):
        attach(optimizer, [HoldNorms([model[2].weight])])
    with pytest.raises(FixNormError, match="zero or non-finite norm"):
        HoldNorms([torch.zeros(3, 3)])
    with pytest.raises(FixNormError, match="ndim >= 2"):
        HoldNorms([torch.ones(3)], per="filter")
    with pytest.raises(FixNormError, match="shape"):
        HoldNorms([model[0].weight], per="filter", targets=[torch.ones(2)])
    first = attach(optimizer, [HoldNorms([model[0].weight])], name="a")
    with pytest.raises(FixNormError, match="already has rules attached"):
        attach(optimizer, [HoldNorms([model[0].weight])], name="a")
    first.remove()
    deferred = HoldNorms([model[0].weight], from_step=None)
    attach(optimizer, [deferred], name="b")
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(FixNormError, match="from_step.* is not set"):
        optimizer.step()
    plain = torch.optim.SGD(model[0].parameters(), lr=0.1).state_dict()
    with pytest.raises(FixNormError, match="no 'b' rule state"):
        optimizer.load_state_dict(plain)


def test_mask_keeps_pruned_entries_at_zero_trains_the_rest_and_resumes_bit_identically():
    data = batches(8)

    def build():
        model = net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        g = torch.Generator().manual_seed(3)
        masks = [torch.rand(p.shape, generator=g) > 0.5 for p in (model[0].weight, model[2].weight)]
        rule = Mask([model[0].weight, model[2].weight], masks)
        attach(optimizer, [rule], name="mask")
        return model, optimizer, rule

    model, optimizer, rule = build()
    start = model[2].weight.detach().clone()
    for w, m in zip(rule.params, rule.masks):  # applied at attach
        assert torch.count_nonzero(w.detach()[~m]) == 0
    train(model, optimizer, data[:3])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})
    train(model, optimizer, data[3:])
    for w, m in zip(rule.params, rule.masks):
        assert torch.count_nonzero(w.detach()[~m]) == 0
    kept = rule.masks[1]
    assert bool((model[2].weight.detach()[kept] != start[kept]).all())  # every kept weight trained
    assert rule.density() == pytest.approx(sum(int(m.sum()) for m in rule.masks) / sum(m.numel() for m in rule.masks))

    model2, optimizer2, rule2 = build()
    rule2.masks = [torch.ones_like(m) for m in rule2.masks]  # the saved masks must come back from the checkpoint
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    assert all(torch.equal(a, b) for a, b in zip(rule.masks, rule2.masks))
    train(model2, optimizer2, data[3:])
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FixNormError, match="bool tensor of shape"):
        Mask([model[0].weight], [torch.ones(3, 3)])


def test_project_applies_its_projection_after_every_step():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    weights = [model[0].weight, model[2].weight]
    attach(optimizer, [Project(weights, lambda w: w.clamp(-0.05, 0.05))], name="box")
    for w in weights:
        assert bool(w.detach().abs().max() <= torch.tensor(0.05))  # float32 bound
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    expected = [(w.detach() - w.grad).clamp(-0.05, 0.05) for w in weights]
    optimizer.step()
    for w, e in zip(weights, expected):
        assert torch.equal(w.detach(), e)
    with pytest.raises(FixNormError, match="shape"):
        attach(optimizer, [Project(weights, lambda w: w.flatten())], name="bad")


def test_follow_norms_sets_the_trace_norm_interpolated_between_records_and_stops_at_its_end():
    from fixnorm.rules import FollowNorms
    model = net()
    params = [model[0].weight, model[6].weight]
    steps = torch.tensor([0, 4, 10])
    norms = torch.tensor([[1.0, 2.0], [3.0, 2.5], [2.0, 0.5]], dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rule = FollowNorms(params, steps, norms)
    attach(optimizer, [rule], name="replay")
    data = batches(10)
    for t, (x, y) in enumerate(data, start=1):
        train(model, optimizer, [(x, y)])
        i = 0 if t <= 4 else 1
        lo, hi = (0, 4) if t <= 4 else (4, 10)
        expected = norms[i] + (norms[i + 1] - norms[i]) * (t - lo) / (hi - lo)
        got = torch.stack([p.detach().double().norm() for p in params])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    with pytest.raises(FixNormError, match="ends at step 10"):
        train(model, optimizer, batches(1))
    for bad_steps, bad_norms, message in [(torch.tensor([1, 4]), norms[:2], "starting at 0"),
                                          (torch.tensor([0, 4, 4]), norms, "increase"),
                                          (steps, norms[:, :1], "shape"),
                                          (steps, norms * torch.tensor([1.0, 0.0]), "zero or non-finite")]:
        with pytest.raises(FixNormError, match=message):
            FollowNorms(params, bad_steps, bad_norms)


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_replaying_an_sgd_weight_decay_run_norms_gives_fixnorm_its_weights(tmp_path):
    """With the reference run's norms replayed after every step and its lr schedule (lr_power=1), FixNorm's step is
    SGD + weight decay's up to the decay's radial share (lr * wd of a step): the two runs' weights stay together."""
    from fixnorm import FixNorm, analyze
    from fixnorm.diagnostics import save_norm_trace
    from fixnorm.methods.baselines import decay_groups
    from fixnorm.methods.fixnorm_method import replay_norms

    data = batches(40)
    reference = bn_net()
    roles = analyze(reference, data[0][0])
    followed = [n for n, _ in reference.named_parameters() if n in roles.scale_invariant or n in roles.classifier]
    assert followed == ["0.weight", "3.weight", "8.weight"]
    sgd = torch.optim.SGD(decay_groups(reference, 5e-4), lr=0.2)
    named = dict(reference.named_parameters())
    trace = [torch.stack([named[n].detach().double().norm() for n in followed])]
    for x, y in data:
        train(reference, sgd, [(x, y)])
        trace.append(torch.stack([named[n].detach().double().norm() for n in followed]))
    save_norm_trace(tmp_path / "norm_trace.pt", followed, list(range(len(trace))), torch.stack(trace))

    model = bn_net()
    optimizer = FixNorm(model, data[0][0], base=torch.optim.SGD, lr=0.2, lr_power=1.0)
    rule = replay_norms(optimizer, model, str(tmp_path))
    train(model, optimizer, data)
    mine = dict(model.named_parameters())
    for name in followed:
        torch.testing.assert_close(mine[name].detach().double().norm(), trace[-1][followed.index(name)], rtol=1e-6,
                                   atol=0)
        cosine = F.cosine_similarity(mine[name].detach().flatten(), named[name].detach().flatten(), dim=0)
        assert cosine > 1 - 1e-6, (name, float(cosine))
    assert rule.last_step == len(data)


def test_a_replayed_run_resumes_bit_identically_and_bad_traces_fail_loudly(tmp_path):
    from fixnorm import FixNorm
    from fixnorm.diagnostics import save_norm_trace
    from fixnorm.methods.fixnorm_method import replay_norms

    data = batches(12)
    names = ["0.weight", "3.weight", "8.weight"]
    norms = torch.linspace(1.0, 3.0, 13, dtype=torch.float64)[:, None].repeat(1, 3)
    save_norm_trace(tmp_path / "norm_trace.pt", names, list(range(13)), norms)

    def build():
        model = bn_net()
        optimizer = FixNorm(model, data[0][0], base=torch.optim.SGD, lr=0.2, momentum=0.9)
        replay_norms(optimizer, model, str(tmp_path / "norm_trace.pt"), "scale-invariant")
        return model, optimizer

    straight, opt = build()
    train(straight, opt, data)
    assert float(straight[8].weight.detach().norm()) != pytest.approx(3.0)  # the classifier is FixNorm's own
    first, opt = build()
    train(first, opt, data[:5])
    state = copy.deepcopy((first.state_dict(), opt.state_dict()))
    resumed, opt = build()
    resumed.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    train(resumed, opt, data[5:])
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)

    model = bn_net()
    optimizer = FixNorm(model, data[0][0], base=torch.optim.SGD, lr=0.2)
    save_norm_trace(tmp_path / "other.pt", ["conv.weight"], [0], torch.ones(1, 1))
    with pytest.raises(FixNormError, match="same architecture"):
        replay_norms(optimizer, model, str(tmp_path / "other.pt"))
    with pytest.raises(FixNormError, match="norm_replay_roles"):
        replay_norms(optimizer, model, str(tmp_path / "norm_trace.pt"), "convs")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "norm_trace.pt").read_bytes()[:100])
    with pytest.raises(FixNormError, match="cannot be read safely"):
        replay_norms(optimizer, model, str(tmp_path / "cut.pt"))
    with pytest.raises(FixNormError, match="no norm trace"):
        replay_norms(optimizer, model, str(tmp_path / "nowhere"))


def test_hold_joint_norms_over_weights_of_several_dtypes_holds_each_groups_joint_norm():
    """Members in several (device, dtype) buckets are measured in their own order; the projection puts each group's
    joint norm back and keeps the members' proportions; a zero group is flagged, never divided by."""
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(3, 4, generator=g), torch.randn(2, 2, generator=g)
    b, d = torch.randn(5, 2, generator=g).double(), torch.randn(4, 4, generator=g).double()
    rule = HoldJointNorms([[a, b], [c, d]], names=[["a", "b"], ["c", "d"]], from_step=0)
    expected = [float((x.double().norm() ** 2 + y.double().norm() ** 2).sqrt()) for x, y in ((a, b), (c, d))]
    assert rule.targets.tolist() == pytest.approx(expected, rel=1e-6)
    before = [t.clone() for t in (a, b, c, d)]
    for t, f in zip((a, b, c, d), (3.0, 0.5, 1.0, 2.0)):
        t.mul_(f)
    opt = torch.optim.SGD([a, b, c, d], lr=0.0)
    attach(opt, [rule], name="joint")
    for t in (a, b, c, d):
        t.grad = torch.zeros_like(t)
    opt.step()
    assert [float((x.double().norm() ** 2 + y.double().norm() ** 2).sqrt()) for x, y in ((a, b), (c, d))] == \
        pytest.approx(expected, rel=1e-6)
    scale = expected[0] / float(((3 * before[0]).double().norm() ** 2 + (0.5 * before[1]).norm() ** 2).sqrt())
    assert torch.allclose(a.double(), 3 * scale * before[0].double(), rtol=1e-6)
    c.zero_(), d.zero_()
    with pytest.raises(NonFiniteError, match="zero or non-finite joint norm"):
        opt.step()
