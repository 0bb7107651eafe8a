"""Role analysis against the definition of scale invariance, on every case the issue lists.

Each case states the expected roles (derived by hand) and a second, independent check
scales the weight in a float64 copy and compares outputs directly.
"""
import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixnorm
from fixnorm import FixNormError, analyze
from fixnorm.models import create_model

torch.manual_seed(0)


def output_change(model, inputs, name, per_filter, seed=0):
    """Relative output change when `name` is scaled (float64, norm eps made tiny, same dropout masks)."""
    work = copy.deepcopy(model).double().train()
    for m in work.modules():
        if isinstance(getattr(m, "eps", None), float):
            m.eps = 1e-14
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)

    def run():
        torch.manual_seed(seed)
        return work(*inputs)

    with torch.no_grad():
        ref = run()
        p = dict(work.named_parameters())[name]
        g = torch.Generator().manual_seed(seed + 7)
        shape = (p.shape[0],) + (1,) * (p.ndim - 1) if per_filter else (1,)
        p.mul_(torch.rand(shape, generator=g, dtype=torch.float64) * 3 + 0.3)
        out = run()
    return float((out - ref).abs().max() / ref.abs().max())


def check_against_definition(model, inputs, roles):
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        role = roles.role(name)
        tensor_change = output_change(model, inputs, name, per_filter=False)
        filter_change = output_change(model, inputs, name, per_filter=True)
        if role == "filter":
            assert filter_change < 1e-6, (name, filter_change)
        elif role == "tensor":
            assert tensor_change < 1e-6 and filter_change > 1e-4, (name, tensor_change, filter_change)
        else:
            assert tensor_change > 1e-4, (name, tensor_change)


def assert_roles(model, inputs, expected, classifier=()):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    roles = analyze(model, inputs)
    got = {n: roles.role(n) for n, p in model.named_parameters() if p.ndim >= 2}
    assert got == expected, roles.table()
    assert sorted(roles.classifier) == sorted(classifier), roles.table()
    check_against_definition(model, inputs, roles)
    return roles


def image(n=4, c=3, s=8):
    return torch.randn(n, c, s, s)


class Head(nn.Module):
    def __init__(self, c, k=5):
        super().__init__()
        self.fc = nn.Linear(c, k)

    def forward(self, x):
        return self.fc(x.mean((2, 3)) if x.ndim == 4 else x)


@pytest.mark.parametrize("norm, expected", [
    (nn.BatchNorm2d(8), "filter"),
    (nn.GroupNorm(2, 8), "tensor"),
    (nn.GroupNorm(8, 8), "filter"),
    (nn.InstanceNorm2d(8, affine=True), "filter"),
])
def test_conv_followed_by_norm(norm, expected):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm, nn.ReLU(), Head(8))
    assert_roles(model, image(), {"0.weight": expected, "3.fc.weight": "classifier"}, ["3.fc.weight"])


def test_linear_followed_by_layernorm_and_batchnorm():
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.LayerNorm(8), nn.ReLU(),
                          nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    assert_roles(model, torch.randn(6, 6), {"0.weight": "tensor", "3.weight": "filter", "6.weight": "classifier"},
                 ["6.weight"])


def test_homogeneous_ops_between_weight_and_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3),
                          nn.AvgPool2d(1), nn.BatchNorm2d(8), Head(8))
    assert_roles(model, image(s=10), {"0.weight": "filter", "6.fc.weight": "classifier"}, ["6.fc.weight"])


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(3, 4, 3, bias=False)
        self.bn, self.head = nn.BatchNorm2d(8), Head(8)

    def forward(self, x):
        return self.head(self.bn(torch.cat([F.relu(self.a(x)), self.b(x)], 1)))


def test_concatenation_keeps_each_branch_invariant():
    assert_roles(Concat(), image(), {"a.weight": "filter", "b.weight": "filter", "head.fc.weight": "classifier"},
                 ["head.fc.weight"])


class BiasBeforeReLU(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, bias=True), norm, Head(8)
        self.relu_first = isinstance(norm, nn.BatchNorm2d)

    def forward(self, x):
        h = self.conv(x)
        return self.head(self.norm(F.relu(h) if self.relu_first else h))


def test_bias_the_norm_does_not_cancel_breaks_invariance():
    # conv with bias -> ReLU -> BN: the bias is not removed by the mean subtraction
    assert_roles(BiasBeforeReLU(nn.BatchNorm2d(8)), image(), {"conv.weight": "other", "head.fc.weight": "classifier"},
                 ["head.fc.weight"])
    # conv with bias -> GroupNorm, 4 channels per group: the group mean does not cancel per-channel biases
    assert_roles(BiasBeforeReLU(nn.GroupNorm(2, 8)), image(), {"conv.weight": "other", "head.fc.weight": "classifier"},
                 ["head.fc.weight"])


def test_bias_directly_before_batchnorm_is_cancelled():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), Head(8))
    assert_roles(model, image(), {"0.weight": "filter", "2.fc.weight": "classifier"}, ["2.fc.weight"])


class Residual(nn.Module):
    def __init__(self, sum_of_branches=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.branch = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn, self.head, self.sum_of_branches = nn.BatchNorm2d(8), Head(8), sum_of_branches
        self.bn0 = nn.BatchNorm2d(8)

    def forward(self, x):
        h = self.bn0(self.stem(x))
        other = self.stem(x) if self.sum_of_branches else h  # two weighted branches, or a skip
        return self.head(self.bn(self.branch(h) + other))


def test_residual_addition_breaks_invariance():
    assert_roles(Residual(), image(), {"stem.weight": "filter", "branch.weight": "other",
                                       "head.fc.weight": "classifier"}, ["head.fc.weight"])


def test_sum_of_two_branches_before_one_norm_is_not_invariant_per_branch():
    roles = assert_roles(Residual(sum_of_branches=True), image(),
                         {"stem.weight": "other", "branch.weight": "other", "head.fc.weight": "classifier"},
                         ["head.fc.weight"])
    assert "not scale-invariant" in roles.reasons["branch.weight"]


class WSConv(nn.Conv2d):
    """Weight standardisation: the conv uses (w - mean) / std per filter, so w's scale never matters."""

    eps = 1e-5

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True) + self.eps).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_standardization_is_invariant_without_a_norm_after():
    model = nn.Sequential(WSConv(3, 8, 3, bias=False), nn.ReLU(), Head(8))
    assert_roles(model, image(), {"0.weight": "filter", "2.fc.weight": "classifier"}, ["2.fc.weight"])


class QKNormAttention(nn.Module):
    def __init__(self, d=16, heads=2, classes=4):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.q_norm, self.k_norm = nn.LayerNorm(self.dh), nn.LayerNorm(self.dh)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, self.dh).transpose(1, 2)  # noqa: E731
        q, k, v = self.q_norm(split(self.q(x))), self.k_norm(split(self.k(x))), split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.out(y.mean(1))


def test_attention_with_qk_norm():
    assert_roles(QKNormAttention(), torch.randn(3, 5, 16),
                 {"q.weight": "tensor", "k.weight": "tensor", "v.weight": "other", "out.weight": "classifier"},
                 ["out.weight"])


class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8, tied=False):
        super().__init__()
        self.emb, self.ln, self.tied = nn.Embedding(vocab, d), nn.LayerNorm(d), tied
        self.lin = nn.Linear(d, d, bias=False)
        self.head = None if tied else nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        h = self.ln(self.emb(tokens))
        h = F.relu(self.lin(h))
        return h @ self.emb.weight.t() if self.tied else self.head(h)


def test_embedding_followed_by_layernorm():
    tokens = torch.randint(0, 11, (3, 6))
    assert_roles(TinyLM(), (tokens,), {"emb.weight": "filter", "lin.weight": "other", "head.weight": "classifier"},
                 ["head.weight"])


class KeywordLM(TinyLM):
    """Called the Hugging Face way: keyword inputs, a dict out with the loss when labels are given."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = super().forward(input_ids) * attention_mask.unsqueeze(-1)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


def test_keyword_inputs_as_a_mapping():
    tokens = torch.randint(0, 11, (3, 6))
    batch = {"input_ids": tokens, "attention_mask": torch.ones(3, 6), "labels": tokens}
    model = KeywordLM()
    roles = analyze(model, batch)  # the same roles as TinyLM's positional call, checked against the definition above
    assert {n: roles.role(n) for n, p in model.named_parameters() if p.ndim >= 2} == \
        {"emb.weight": "filter", "lin.weight": "other", "head.weight": "classifier"}, roles.table()
    assert roles.classifier == ["head.weight"]
    opt = fixnorm.FixNorm(model, batch, base=torch.optim.SGD, lr=0.1, free_steps=1, norm_drift=None)
    norms, before = [], model.emb.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(**batch)["loss"].backward()
        opt.step()
        norms.append(model.emb.weight.detach().norm(dim=1))
    torch.testing.assert_close(norms[2], norms[0], rtol=1e-5, atol=0)  # held per row after the free step
    assert (model.emb.weight.detach() - before).abs().max() > 1e-3  # and trained
    with pytest.raises(FixNormError, match=r"model\(\*\*example_inputs\)"):
        analyze(model, {"input_ids": "not a tensor"})
    with pytest.raises(FixNormError, match=r"model\(\*\*example_inputs\) failed during analysis"):
        analyze(model, {"input_ids": tokens})  # no attention_mask: the forward itself fails, named as called


def test_weight_used_twice_is_invariant_only_if_every_use_is():
    # tied embedding: normalised at the input, used raw as the output layer
    tokens = torch.randint(0, 11, (3, 6))
    assert_roles(TinyLM(tied=True), (tokens,), {"emb.weight": "classifier", "lin.weight": "other"}, ["emb.weight"])
    # tied the Hugging Face way, one Parameter in two modules: named_parameters() lists it once, as emb.weight, and
    # the output layer's module is found by the parameter itself, not by its path (head.weight)
    aliased = TinyLM()
    aliased.head.weight = aliased.emb.weight
    assert_roles(aliased, (tokens,), {"emb.weight": "classifier", "lin.weight": "other"}, ["emb.weight"])
    opt = fixnorm.FixNorm(aliased, (tokens,), base=torch.optim.SGD, lr=0.1, free_steps=1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(aliased(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
    assert aliased.head.weight is aliased.emb.weight

    class TwiceNormalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.conv, self.bn1, self.bn2, self.head = nn.Conv2d(8, 8, 3, padding=1, bias=False), \
                nn.BatchNorm2d(8), nn.BatchNorm2d(8), Head(8)

        def forward(self, x):
            h = F.relu(self.bn1(self.conv(self.stem(x))))
            return self.head(F.relu(self.bn2(self.conv(h))))

    # stem feeds conv with no norm between: its filters are mixed, so only the whole tensor is free
    assert_roles(TwiceNormalized(), image(), {"stem.weight": "tensor", "conv.weight": "filter",
                                              "head.fc.weight": "classifier"}, ["head.fc.weight"])


class SqueezeExcite(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, bias=False), nn.BatchNorm2d(c)
        self.se_reduce, self.se_expand = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.head = Head(c)

    def forward(self, x):
        h = F.silu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return self.head(h * gate)


def test_squeeze_excite_gates_are_not_invariant():
    assert_roles(SqueezeExcite(), image(), {"conv.weight": "filter", "se_reduce.weight": "other",
                                            "se_expand.weight": "other", "head.fc.weight": "classifier"},
                 ["head.fc.weight"])


def test_transposed_convolution_is_invariant_per_tensor_only():
    # weight is (in, out, k, k): slices along dim 0 are input channels, which BN does not normalise
    model = nn.Sequential(nn.ConvTranspose2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), Head(6))
    assert_roles(model, image(), {"0.weight": "tensor", "2.fc.weight": "classifier"}, ["2.fc.weight"])


def test_final_linear_followed_by_batchnorm_on_logits_is_not_a_classifier():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5, bias=False), nn.BatchNorm1d(5, affine=False))
    roles = assert_roles(model, image(), {"0.weight": "filter", "5.weight": "filter"}, [])
    assert roles.final_layer == ["5.weight"]


def test_dropout_randomness_does_not_fake_a_difference():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Dropout(0.5), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Dropout2d(0.5), Head(8))
    assert_roles(model, image(), {"0.weight": "filter", "5.fc.weight": "classifier"}, ["5.fc.weight"])


def test_resnet50_is_analysed_in_seconds():
    model = create_model("resnet50", num_classes=100)
    start = time.perf_counter()
    roles = analyze(model, torch.randn(2, 3, 64, 64))
    elapsed = time.perf_counter() - start
    convs = [n for n, p in model.named_parameters() if p.ndim == 4]
    assert set(roles.scale_invariant) == set(convs) and all(v == "filter" for v in roles.scale_invariant.values())
    assert roles.classifier == ["fc.weight"]
    assert elapsed < 30, elapsed  # generous: seconds here, a guard against an O(n) forward-per-weight regression


def test_analysis_leaves_the_model_untouched():
    model = create_model("resnet20", num_classes=10)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, torch.randn(2, 3, 16, 16))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_table_lists_every_parameter_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Head(8))
    text = analyze(model, image()).table()
    for name, _ in model.named_parameters():
        assert name in text
    assert "classifier" in text and "filter" in text


def test_overrides_force_and_exclude():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), Head(8))
    roles = fixnorm.analyze(model, image(), overrides={"0.weight": "other", "2.fc.*": "tensor"})
    assert roles.role("0.weight") == "other" and roles.role("2.fc.weight") == "tensor"
    assert roles.role("2.fc.bias") == "other"  # a role for weights skips the 1-D matches
    assert "override" in roles.reasons["0.weight"]
    with pytest.raises(FixNormError, match="matches no parameter"):
        analyze(model, image(), overrides={"nothing.*": "other"})
    with pytest.raises(FixNormError, match="unknown role"):
        analyze(model, image(), overrides={"0.weight": "frozen"})
    with pytest.raises(FixNormError, match="ndim >= 2"):
        analyze(model, image(), overrides={"1.weight": "tensor"})


def test_unused_parameters_are_reported():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    roles = analyze(WithSpare(), torch.randn(3, 4))
    assert roles.role("spare.weight") == "other" and "not used" in roles.reasons["spare.weight"]


@pytest.mark.parametrize("bad", [{"x": torch.randn(2, 3)}, [], "tensor", None, [torch.randn(2, 3), 3]])
def test_wrong_example_inputs_are_a_clear_error(bad):
    with pytest.raises(FixNormError, match="example_inputs"):
        analyze(nn.Linear(3, 2), bad)


def test_example_input_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(FixNormError, match="failed during analysis"):
        analyze(nn.Linear(3, 2), torch.randn(2, 5))


def test_roles_round_trip_through_a_dict():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), Head(8))
    roles = analyze(model, image())
    again = fixnorm.Roles.from_dict(roles.to_dict())
    assert again == roles


# -- wrapped models and models whose forward casts its input ------------------------------------------
def conv_bn_head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), Head(8))


def same_roles_under_other_names(roles, reference, prefix):
    """``roles`` (of a wrapper) says what ``reference`` (of the bare model) says, under ``prefix`` + the bare names."""
    assert set(roles.shapes) == {prefix + n for n in reference.shapes}
    assert roles.scale_invariant == {prefix + n: r for n, r in reference.scale_invariant.items()}
    assert roles.classifier == [prefix + n for n in reference.classifier]
    assert roles.final_homogeneous == [prefix + n for n in reference.final_homogeneous]


class CastsInput(nn.Module):
    """A wrapper whose forward casts its input to bfloat16 (as mixed-precision wrappers do) before the model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner.to(torch.bfloat16)

    def forward(self, x):
        return self.inner(x.to(torch.bfloat16))


def test_a_forward_that_casts_its_input_is_analysed_in_float64_with_its_casts_kept():
    bare = conv_bn_head()
    reference = analyze(bare, image())
    roles = analyze(CastsInput(copy.deepcopy(bare)), image())
    same_roles_under_other_names(roles, reference, "inner.")
    assert "casts to lower precision kept in float64" in roles.reasons["inner.0.weight"]
    assert float(roles.reasons["inner.0.weight"].split("max rel. change ")[1][:7]) < 1e-9  # float64 precision


class Bf16Only(nn.Module):
    """Computes in bfloat16 and refuses any other dtype (as a fused bf16 kernel would): only its own dtype works."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner.to(torch.bfloat16)

    def forward(self, x):
        x = x.to(torch.bfloat16)
        if x.dtype != torch.bfloat16:
            raise TypeError(f"this block runs in bfloat16 only, got {x.dtype}")
        return self.inner(x)


@pytest.mark.parametrize("make", [conv_bn_head, lambda: create_model("resnet20", num_classes=10)])
def test_a_model_that_runs_only_in_bfloat16_is_analysed_in_its_own_dtype(make):
    bare = make()
    x = image(s=16)
    reference = analyze(bare, x)
    roles = analyze(Bf16Only(copy.deepcopy(bare)), x)
    same_roles_under_other_names(roles, reference, "inner.")
    weight = next(n for n in roles.shapes if len(roles.shapes[n]) >= 2)
    assert "analysed in bfloat16, the model's own dtype, tolerance 3.1e-02" in roles.reasons[weight]
    assert "bfloat16 only" in roles.reasons[weight]  # the float64 failure, quoted
    # the model itself is untouched: still bf16, same values
    assert all(p.dtype == torch.bfloat16 for p in Bf16Only(copy.deepcopy(bare)).parameters())


def test_a_forward_that_fails_in_every_dtype_reports_the_float64_failure():
    with pytest.raises(FixNormError, match="failed during analysis"):
        analyze(CastsInput(nn.Linear(3, 2)), torch.randn(2, 5))


def test_torch_compile_and_dataparallel_are_looked_through_and_keep_their_names():
    bare = conv_bn_head()
    reference = analyze(bare, image())
    compiled = torch.compile(copy.deepcopy(bare))  # never run: analysis uses the module inside
    same_roles_under_other_names(analyze(compiled, image()), reference, "_orig_mod.")
    same_roles_under_other_names(analyze(nn.DataParallel(copy.deepcopy(bare)), image()), reference, "module.")
    assert fixnorm.roles.unwrap(nn.DataParallel(torch.compile(bare))) is bare


def test_distributed_data_parallel_is_looked_through(tmp_path):
    import torch.distributed as dist

    bare = conv_bn_head()
    reference = analyze(bare, image())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(bare))
        same_roles_under_other_names(analyze(ddp, image()), reference, "module.")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_lightning_fabric_bf16_modules_are_analysed_under_their_own_names(precision):
    L = pytest.importorskip("lightning")
    bare = conv_bn_head()
    reference = analyze(bare, image())
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    module = fabric.setup_module(copy.deepcopy(bare))
    assert module(image()).dtype in (torch.float32, torch.bfloat16)  # its forward casts the input: it runs in bf16
    roles = analyze(module, image())
    names = [n for n, _ in module.named_parameters()]
    assert set(roles.shapes) == set(names)
    prefix = names[0][: -len("0.weight")]
    same_roles_under_other_names(roles, reference, prefix)
    # and FixNorm built on the Fabric module constrains the same tensors
    opt = fixnorm.FixNorm(module, image(), lr=0.1)
    assert set(opt.roles.scale_invariant) == set(roles.scale_invariant)


def test_efficientnet_is_analysed_in_a_few_forward_passes():
    """Squeeze-excite convs in every block used to cost a bisection each (181 forward passes); now a handful."""
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=10)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))  # copied along with the model
    roles = analyze(model, torch.randn(2, 3, 64, 64))
    assert len(calls) <= 10, len(calls)
    weights = [n for n, p in model.named_parameters() if p.ndim >= 2]
    se = [n for n in weights if ".se." in n]
    assert len(se) == 32 and all(roles.role(n) == "other" for n in se)
    assert all(roles.role(n) == "filter" for n in weights if n not in se and n != "fc.weight")
    assert roles.classifier == ["fc.weight"]
    assert "derivative along the weight" in roles.reasons[se[0]]
    # the derivative's verdict agrees with scaling the weight itself
    x = (torch.randn(2, 3, 64, 64),)
    assert output_change(model, x, se[0], per_filter=False) > 1e-4


def test_module_groups_gather_one_module_across_depths():
    from fixnorm.roles import _module_groups

    names = ["features.1.se.reduce.weight", "features.1.dw.weight", "features.2.se.reduce.weight", "0.weight",
             "3.weight", "blocks.0.1.attn.q.weight", "blocks.1.0.attn.q.weight", "fc.weight"]
    assert _module_groups(names) == [["features.1.se.reduce.weight", "features.2.se.reduce.weight"],
                                     ["features.1.dw.weight"], ["0.weight", "3.weight"],
                                     ["blocks.0.1.attn.q.weight", "blocks.1.0.attn.q.weight"], ["fc.weight"]]


class TinyPreAct(nn.Module):
    """Two pre-activation stages: the stem and conv2 write the first residual stream, the shortcut and conv4 the
    second; each stream is read only through a BatchNorm (bn1/bn3, bn3/final), so each pair is scale-invariant
    together and neither weight alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn4, self.conv4 = nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.short = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.final, self.fc = nn.BatchNorm2d(16), nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        h = F.relu(self.bn3(x))
        x = self.short(h) + self.conv4(F.relu(self.bn4(self.conv3(h))))
        return self.fc(F.relu(self.final(x)).mean((2, 3)))


def joint_output_change(model, inputs, names, factor):
    """Relative output change when every weight of ``names`` is scaled by one ``factor`` (float64, tiny eps)."""
    work = copy.deepcopy(model).double().train()
    for m in work.modules():
        if isinstance(getattr(m, "eps", None), float):
            m.eps = 1e-14
    x = inputs.double()
    with torch.no_grad():
        ref = work(x)
        params = dict(work.named_parameters())
        for n in names:
            params[n].mul_(factor)
        return float((work(x) - ref).abs().max() / ref.abs().max())


def test_weights_scale_invariant_only_together_are_found_as_groups_and_match_the_definition():
    torch.manual_seed(0)
    model, x = TinyPreAct(), torch.randn(8, 1, 8, 8)
    roles = analyze(model, x, joint=True)
    assert roles.joint == [["stem.weight", "conv2.weight"], ["conv4.weight", "short.weight"]]
    assert roles.scale_invariant == {"conv1.weight": "filter", "conv3.weight": "filter"}
    assert roles.classifier == ["fc.weight"]
    for group in roles.joint:
        assert joint_output_change(model, x, group, 2.7) < 1e-9  # the definition: one factor on the group
        for name in group:  # and no member alone
            assert joint_output_change(model, x, [name], 2.7) > 1e-3, name
            assert roles.role(name) == "other" and "jointly scale-invariant" in roles.reasons[name]
    assert joint_output_change(model, x, ["stem.weight", "short.weight"], 2.7) > 1e-3  # across groups: not
    assert "jointly scale-invariant groups: 1: stem.weight, conv2.weight" in roles.table()
    # asked for only: the test costs a backward pass per weight left over
    assert analyze(model, x).joint == []
    # kept through to_dict (roles saved before the field existed read as none), lost when an override breaks one
    assert fixnorm.roles.Roles.from_dict(roles.to_dict()).joint == roles.joint
    old = {k: v for k, v in roles.to_dict().items() if k != "joint"}
    assert fixnorm.roles.Roles.from_dict(old).joint == []
    assert analyze(model, x, joint=True, overrides={"conv2.weight": "other"}).joint == [["conv4.weight",
                                                                                        "short.weight"]]


def test_a_wide_resnet_has_one_joint_group_per_stage_and_a_post_activation_resnet_none():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 12, 12)
    roles = analyze(create_model("wrn", in_channels=1, depth=10, widen_factor=1), x, joint=True)
    # WRN-10-1: 16 channels in the stem and the first stage, so the stem writes the first stream (no shortcut conv)
    assert roles.joint == [["stem.weight", "layers.0.conv2.weight"],
                           ["layers.1.conv2.weight", "layers.1.shortcut.weight"],
                           ["layers.2.conv2.weight", "layers.2.shortcut.weight"]]
    assert analyze(create_model("resnet20", in_channels=1), x, joint=True).joint == []


class TinyViT(nn.Module):
    """A ViT's shape: the model itself owns the class token and position embedding (as timm's do)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(16, 32)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 32) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 32) * 0.02)
        self.norm1, self.norm2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):  # x: (batch, 4 patches, 16)
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch(x)], 1) + self.pos_embed
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm2(t)[:, 0])


def test_parameters_the_model_itself_owns_are_not_taken_for_its_final_layer():
    """The model's output is its head's; a cls_token or pos_embed on the root module is consumed at the input, so
    it is neither a final-layer weight nor a classifier FixNorm would hold (and cap) as one."""
    torch.manual_seed(0)
    model = TinyViT()
    roles = analyze(model, torch.randn(8, 4, 16))
    assert roles.classifier == ["head.weight"] and roles.final_layer == ["head.weight"]
    for name in ("cls_token", "pos_embed"):
        assert roles.role(name) == "other" and "final layer" not in roles.reasons[name], roles.reasons[name]
    check_against_definition(model, (torch.randn(8, 4, 16),), roles)
