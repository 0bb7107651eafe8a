"""Micro-structured weight unification against its definitions: blocks, projections, the exact two-cardinality
solver (brute force), the storage counter, unify files, retraining with blocks held, and `fixnorm unify`."""
import itertools
import json
import math

import pytest
import torch

from fixnorm import FixNormError
from fixnorm.compress import (FREE, PRUNED, UNIFIED, assign_blocks, assignment_cost, block_costs, block_dims,
                              expand_blocks, from_blocks, greedy_assign_blocks, prunable_weights, project_blocks,
                              storage_bits, tile_grid, to_blocks, unify_assignment, unify_blocks_)
from fixnorm.train import Trainer, load_checkpoint, load_recipe, make_config, train
from fixnorm.train.unified_blocks import UnifiedLayer, load_unify_file, save_unify_file
from fixnorm.train.unify import run_unification
from helpers import train_until

TINY = dict(load_recipe("fmnist-smoke"), dataset="synthetic", train_subset=200, holdout=100, batch_size=50, epochs=2,
            threads=1, method="sgd", weight_decay=5e-4)


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def block_rows(weight, block):
    """Each block's real entries, as a list of 1-D tensors (the definition, written out with loops)."""
    br, bc = block_dims(block, weight.shape)
    m = weight.reshape(weight.shape[0], -1)
    rows, cols = m.shape
    return [m[i:i + br, j:j + bc].flatten() for i in range(0, rows, br) for j in range(0, cols, bc)]


# -- blocks -------------------------------------------------------------------------------------------------
def test_blocks_tile_the_out_by_in_kh_kw_matrix_row_major_with_padding_never_counted():
    w = gaussian(5, 2, 1, 3)  # the matrix is 5 x 6; 2x4 tiles: a 3 x 2 grid, the right and bottom ones padded
    dims = block_dims("2x4", w.shape)
    assert tile_grid(w.shape, dims) == (3, 2)
    blocks, real = to_blocks(w, dims)
    assert blocks.shape == (6, 8) and torch.equal(from_blocks(blocks, w.shape, dims), w)
    mean, error, square = block_costs(w, dims)
    for k, b in enumerate(block_rows(w, "2x4")):
        assert int(real[k].sum()) == b.numel()  # 8, 4, 8, 4, 4, 2 real entries
        b = b.double()
        assert mean[k].item() == pytest.approx(b.abs().mean().item(), rel=1e-12)
        assert error[k].item() == pytest.approx(((b.abs() - b.abs().mean()) ** 2).sum().item(), rel=1e-12)
        assert square[k].item() == pytest.approx((b ** 2).sum().item(), rel=1e-12)
    assert [int(r.sum()) for r in real] == [8, 4, 8, 4, 4, 2]


def test_block_shapes_by_name_and_clear_errors_for_unknown_ones():
    assert block_dims("kernel", (8, 4, 3, 3)) == (1, 9) and block_dims("kernel", (10, 32)) == (1, 1)
    assert [block_dims(b, (8, 8)) for b in ("1x4", "4x1", "2x2", "4x4")] == [(1, 4), (4, 1), (2, 2), (4, 4)]
    for bad in ("3by3", "0x2", "2x", "", "x2", (0, 2), (2,), "kernels"):
        with pytest.raises(FixNormError, match="unknown block shape"):
            block_dims(bad, (8, 8))
    with pytest.raises(FixNormError, match="at least 2 dims"):
        unify_blocks_(torch.ones(8), "2x2", 0.5)


# -- projections --------------------------------------------------------------------------------------------
def test_unification_unifies_exactly_the_count_with_the_least_error_and_leaves_the_rest_bitwise():
    w = gaussian(6, 5, 3, 3, seed=1)
    original = w.clone()
    assignment = unify_blocks_(w, "2x2", 0.37)
    n = math.prod(assignment.shape)
    assert int((assignment == UNIFIED).sum()) == round(0.37 * n) and not bool((assignment == PRUNED).any())
    error = block_costs(original, (2, 2))[1]
    chosen = assignment.flatten() == UNIFIED
    assert error[chosen].max() <= error[~chosen].min()  # the least unification errors
    for k, (before, after) in enumerate(zip(block_rows(original, "2x2"), block_rows(w, "2x2"))):
        if chosen[k]:
            assert torch.equal(after.abs(), after.abs()[:1].expand_as(after))  # one |w| per block ...
            assert after.abs()[0].item() == pytest.approx(before.abs().mean().item(), rel=1e-6)  # ... = mean|b|
            assert torch.equal(torch.sign(after), torch.sign(before))  # signs kept
        else:
            assert torch.equal(after, before)  # other blocks bitwise unchanged


def test_ties_go_by_index_and_sign_zero_is_plus_one():
    w = torch.ones(4, 4)  # every 2x2 block has error 0 and norm 2: ties everywhere
    assert unify_assignment(w, "2x2", 0.5).flatten().tolist() == [UNIFIED, UNIFIED, FREE, FREE]
    assert unify_assignment(w, "2x2", 0.0, 0.25).flatten().tolist() == [PRUNED, FREE, FREE, FREE]
    b = torch.tensor([[0.0, -2.0, 4.0, 0.0]])  # mean|b| = 1.5
    out = project_blocks(b, (1, 4), torch.tensor([[UNIFIED]], dtype=torch.int8))
    assert out.tolist() == [[1.5, -1.5, 1.5, 1.5]]


def test_one_by_one_blocks_are_a_no_op_and_so_is_a_linear_kernel():
    w = gaussian(7, 9, seed=2)
    w[0, 0] = 0.0
    original = w.clone()
    assert int((unify_blocks_(w, "1x1", 0.9) == UNIFIED).sum()) == round(0.9 * 63)
    assert torch.equal(w, original)
    unify_blocks_(w, "kernel", 0.5)
    assert torch.equal(w, original)


def test_prune_only_zeroes_exactly_the_blocks_of_least_norm():
    w = gaussian(8, 12, seed=3)
    original = w.clone()
    assignment = unify_blocks_(w, "1x4", 0.0, prune_ratio=0.4)
    chosen = assignment.flatten() == PRUNED
    assert int(chosen.sum()) == round(0.4 * 24) and not bool((assignment == UNIFIED).any())
    square = block_costs(original, (1, 4))[2]
    assert square[chosen].max() <= square[~chosen].min()
    kind = expand_blocks(assignment, w.shape, (1, 4))
    assert int((w[kind == PRUNED] != 0).sum()) == 0 and torch.equal(w[kind == FREE], original[kind == FREE])


def brute_force(unify_cost, prune_cost, unified, pruned):
    """The least total over every assignment with exactly these counts (3^n of them)."""
    n, best = len(unify_cost), math.inf
    for codes in itertools.product((FREE, UNIFIED, PRUNED), repeat=n):
        if codes.count(UNIFIED) == unified and codes.count(PRUNED) == pruned:
            best = min(best, assignment_cost(unify_cost, prune_cost, torch.tensor(codes, dtype=torch.int8)))
    return best


def test_the_joint_solver_is_exact_against_brute_force_and_the_greedy_heuristic_is_not():
    g = torch.Generator().manual_seed(4)
    gaps = []
    for trial in range(150):
        n = int(torch.randint(3, 8, (), generator=g))
        unified = int(torch.randint(1, n, (), generator=g))
        pruned = int(torch.randint(1, n - unified + 1, (), generator=g))
        if trial % 3:  # real blocks of a weight (scaled rows: norms and errors vary)
            w = torch.randn(n, 4, generator=g) * torch.rand(n, 1, generator=g) * 3
            _, unify_cost, prune_cost = block_costs(w, (1, 4))
        else:  # any costs, prune cheaper than unify included: the exchange argument needs no ordering
            unify_cost, prune_cost = torch.rand(n, generator=g).double(), torch.rand(n, generator=g).double()
        codes = assign_blocks(unify_cost, prune_cost, unified, pruned)
        assert (int((codes == UNIFIED).sum()), int((codes == PRUNED).sum())) == (unified, pruned)
        exact = assignment_cost(unify_cost, prune_cost, codes)
        assert exact == pytest.approx(brute_force(unify_cost, prune_cost, unified, pruned), rel=1e-12, abs=1e-15)
        greedy = assignment_cost(unify_cost, prune_cost, greedy_assign_blocks(unify_cost, prune_cost, unified, pruned))
        assert greedy >= exact - 1e-12
        gaps.append((greedy - exact) / max(exact, 1e-12))
    assert max(gaps) > 0.01  # the greedy heuristic (prune the smallest, then unify) is measurably suboptimal
    # on a real layer: the joint projection is never farther from the weight than the greedy one
    w = gaussian(64, 16, 3, 3, seed=5)
    _, e, s = block_costs(w, (2, 2))
    exact = assignment_cost(e, s, unify_assignment(w, "2x2", 0.5, 0.25))
    assert exact <= assignment_cost(e, s, unify_assignment(w, "2x2", 0.5, 0.25, exact=False))


def test_counts_round_as_stated_and_bad_shares_are_errors():
    w = gaussian(1, 18, seed=6)  # 5 blocks of 1x4 (the last one padded): 0.5 * 5 = 2.5 rounds half to even, to 2
    assert int((unify_assignment(w, "1x4", 0.5) == UNIFIED).sum()) == 2
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(FixNormError, match=r"ratio must be a share of blocks in \[0, 1\)"):
            unify_assignment(w, "1x4", bad)
    with pytest.raises(FixNormError, match="together they must leave"):
        unify_assignment(gaussian(5, 4), "1x4", 0.6, 0.6)
    with pytest.raises(FixNormError, match="does not fit a weight"):
        project_blocks(w, (1, 4), torch.zeros(3, 3, dtype=torch.int8))


def test_the_storage_counter_on_a_hand_built_layer():
    shape = (2, 10)  # 2x4 blocks: a 1 x 3 grid of 8, 8 and 4 real entries (20 weights)
    grid = lambda *codes: torch.tensor([codes], dtype=torch.int8)  # noqa: E731
    assert storage_bits(shape, "2x4", grid(FREE, FREE, FREE)) == 32 * 20  # dense: no index
    # free 8 x 32, unified one magnitude + 8 signs, pruned nothing; 3 kinds: a 2-bit index per block
    assert storage_bits(shape, "2x4", grid(FREE, UNIFIED, PRUNED)) == 256 + (32 + 8) + 0 + 3 * 2
    # two kinds: a 1-bit index per block; the padded edge block has 4 sign bits, not 8
    assert storage_bits(shape, "2x4", grid(FREE, FREE, UNIFIED)) == 512 + (32 + 4) + 3 * 1
    assert storage_bits(shape, "2x4", grid(PRUNED, FREE, PRUNED)) == 256 + 3 * 1
    with pytest.raises(FixNormError, match="does not fit"):
        storage_bits(shape, "2x2", grid(FREE, FREE, FREE))


# -- retraining with blocks held ----------------------------------------------------------------------------
def write_unify_file(tmp_path, cfg, ratio=0.5, prune_ratio=0.25, block="2x2", name="unify.pt"):
    """The exact assignment of a fresh model's conv/linear weights (first conv left out), saved."""
    model = Trainer(cfg, tmp_path / f"probe-{name}").model
    weights = prunable_weights(model, exclude_first_conv=True)
    layers = {n: UnifiedLayer(block_dims(block, w.shape), unify_assignment(w, block, ratio, prune_ratio))
              for n, w in weights.items()}
    save_unify_file(tmp_path / name, layers, block=block)
    return tmp_path / name, layers


def blocks_by_kind(weight, layer, kind):
    rows = block_rows(weight, f"{layer.dims[0]}x{layer.dims[1]}")
    return [b for b, k in zip(rows, layer.assignment.flatten().tolist()) if k == kind]


@pytest.mark.parametrize("method", ["sgd", "adamw"])
@pytest.mark.parametrize("magnitudes", [False, True])
def test_retraining_keeps_unified_blocks_unified_and_pruned_blocks_zero(tmp_path, method, magnitudes):
    cfg = make_config(TINY, {"method": method, "momentum": 0.9, "weight_decay": 5e-4,
                             **({"lr": 1e-2} if method == "adamw" else {})})
    unify_file, layers = write_unify_file(tmp_path, cfg)
    trainer = Trainer(make_config(cfg.to_dict(), {"unify_from": str(unify_file), "unify_magnitudes": magnitudes}),
                      tmp_path / "run")
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    final = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    for name, layer in layers.items():
        assert all(int((b != 0).sum()) == 0 for b in blocks_by_kind(final[name], layer, PRUNED)), name
        moved = 0
        for before, after in zip(blocks_by_kind(start[name], layer, UNIFIED), blocks_by_kind(final[name], layer,
                                                                                             UNIFIED)):
            assert torch.equal(after.abs(), after.abs()[:1].expand_as(after)), name  # one |w| per block, exactly
            assert bool(((torch.sign(after) == torch.sign(before)) | (after == 0)).all()), name  # signs unchanged
            moved += not torch.equal(after, before)
        assert (moved > 0) == magnitudes, name  # fixed blocks stay bitwise; trainable magnitudes move
        free = blocks_by_kind(start[name], layer, FREE), blocks_by_kind(final[name], layer, FREE)
        assert any(not torch.equal(a, b) for a, b in zip(*free)), name  # the free blocks trained


def test_a_unified_run_resumes_bit_for_bit(tmp_path):
    cfg = make_config(TINY, {"epochs": 3})
    unify_file, _ = write_unify_file(tmp_path, cfg)
    cfg = make_config(cfg.to_dict(), {"unify_from": str(unify_file), "unify_magnitudes": True})
    train(cfg, tmp_path / "straight")
    train_until(cfg, tmp_path / "stopped", epoch=1)
    Trainer(None, tmp_path / "stopped", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "stopped"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any("unify_signs" in entry for entry in b["optimizer"]["state"].values())  # the rule's state rides along


def test_bad_unify_files_are_clear_errors(tmp_path):
    cfg = make_config(TINY)
    unify_file, layers = write_unify_file(tmp_path, cfg)
    with pytest.raises(FixNormError, match="no such file"):
        Trainer(make_config(TINY, {"unify_from": str(tmp_path / "missing.pt")}), tmp_path / "a")
    name = next(iter(layers))
    save_unify_file(tmp_path / "grid.pt", {name: UnifiedLayer((2, 2), torch.zeros(3, 3, dtype=torch.int8))})
    with pytest.raises(FixNormError, match=f"does not fit this model.*{name}"):
        Trainer(make_config(TINY, {"unify_from": str(tmp_path / "grid.pt")}), tmp_path / "b")
    save_unify_file(tmp_path / "names.pt", {"encoder.weight": layers[name]})
    with pytest.raises(FixNormError, match=r"\['encoder.weight'\], which are not parameters"):
        Trainer(make_config(TINY, {"unify_from": str(tmp_path / "names.pt")}), tmp_path / "c")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(FixNormError, match="not a fixnorm unify file"):
        load_unify_file(tmp_path / "foreign.pt")
    with pytest.raises(FixNormError, match="needs unify_from"):
        make_config(TINY, {"unify_magnitudes": True})
    assert make_config({}).unify_from is None  # old configs: no unification


# -- the study ----------------------------------------------------------------------------------------------
def test_the_unification_study_projects_retrains_at_equal_epochs_writes_the_table_and_reuses_its_runs(tmp_path):
    out = tmp_path / "study"
    study = dict(blocks=["2x2"], ratios=[0.5], prune_ratios=[0.25], modes=["oneshot", "admm"], seeds=[0],
                 out_dir=out)
    result = run_unification(TINY, **study)
    assert [(r["mode"], r["runs"], r["epochs"]) for r in result["rows"]] == [("oneshot", 1, 2), ("admm", 1, 1)]
    table = (out / "unify.md").read_text()
    assert "| oneshot | 2x2 | 0.5 | 0.25 | 1 | 2 |" in table and "| admm | 2x2 | 0.5 | 0.25 | 1 | 1 ADMM + 1 |" in table
    saved = json.loads((out / "unify.json").read_text())
    assert saved["runs"][1]["admm_residual_max"] is not None and 0 < saved["rows"][0]["bits_per_weight"] < 32
    for mode, source in (("oneshot", out / "dense-s0" / "last.pt"), ("admm", out / "admm-b2x2-u0.5-p0.25-s0" / "last.pt")):
        layers, about = load_unify_file(out / "unify" / f"{mode}-b2x2-u0.5-p0.25-s0.pt")
        start, final = load_checkpoint(source)["model"], load_checkpoint(out / f"retrain-{mode}-b2x2-u0.5-p0.25-s0" /
                                                                         "last.pt")["model"]
        for name, layer in layers.items():  # the projection of the phase's final weights, held to the end
            assert int((layer.assignment == PRUNED).sum()) == round(0.25 * layer.assignment.numel())
            assert int((layer.assignment == UNIFIED).sum()) == round(0.5 * layer.assignment.numel())
            assert torch.equal(layer.assignment, unify_assignment(start[name], "2x2", 0.5, 0.25))
            projected = project_blocks(start[name], layer.dims, layer.assignment)
            held = expand_blocks(layer.assignment, start[name].shape, layer.dims) != FREE
            assert torch.equal(final[name][held], projected[held]), (mode, name)
    # a second invocation reads everything back: no run trains again, no unify file is rewritten
    files = sorted(out.glob("*/last.pt")) + sorted((out / "unify").glob("*.pt"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_unification(TINY, **study)
    assert [f.stat().st_mtime_ns for f in files] == stamps and again["rows"] == result["rows"]
    with pytest.raises(FixNormError, match="another study's files"):
        run_unification(TINY, **{**study, "unify_first_conv": True})


def test_the_study_refuses_bad_settings_before_training(tmp_path):
    good = dict(blocks=["2x2"], ratios=[0.5], modes=["oneshot"], seeds=[0], out_dir=tmp_path / "s")
    for bad, message in (({"blocks": ["3x"]}, "unknown block shape"), ({"ratios": [1.0]}, "ratios must be"),
                         ({"ratios": [0.0]}, "not be \\(0, 0\\)"), ({"modes": ["admm", "lottery"]}, "modes"),
                         ({"ratios": [0.8], "prune_ratios": [0.5]}, "at most every block"),
                         ({"seeds": []}, "seeds"), ({"retrain": "frozen"}, "retrain"),
                         ({"modes": ["admm"], "admm_epochs": 2}, "admm-epochs")):
        with pytest.raises(FixNormError, match=message):
            run_unification(TINY, **{**good, **bad})
    for settings, message in (({"unify_from": "x"}, "set per phase"), ({"method": "admm"}, "another --method"),
                              ({"method_kwargs": {"admm": {"block": "4x4"}}}, "set by the study"),
                              ({"method_kwargs": {"admm": {"rho": -1.0}}}, "rho > 0")):
        with pytest.raises(FixNormError, match=message):
            run_unification(dict(TINY, **settings), **good)
    assert not (tmp_path / "s").exists()


def test_fixnorm_unify_from_the_command_line(tmp_path):
    import subprocess
    import sys

    settings = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k not in ("method", "model_kwargs")]
    cmd = [sys.executable, "-m", "fixnorm", "unify", "--recipe", "fmnist-smoke", "--method", "sgd", *settings,
           "--epochs", "1", "--block", "1x4", "--ratio", "0.5", "--mode", "oneshot", "--out", str(tmp_path / "u"),
           "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| oneshot | 1x4 | 0.5 | 0 | 1 | 1 |" in proc.stdout and (tmp_path / "u" / "unify.json").is_file()
