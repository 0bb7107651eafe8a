"""Tuners: the coordinate search's logic, real SQLite studies shared by real processes, and SIGKILL + restart."""
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from fixnorm import FixNormError  # noqa: E402
from fixnorm.data import DEFAULT_FASHION_MNIST_DIR  # noqa: E402
from fixnorm.tune import (Axis, SearchSpace, Tuner, coordinate_search_best, coordinate_search_next,  # noqa: E402
                          fitted_point, search_space)

needs_fmnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(),
                                  reason="apt-get install dataset-fashion-mnist")
SPACE = SearchSpace((Axis("lr", 0.1, 2.0, -3, 4), Axis("fc_norm", 2.0, 2.0, -2, 4)))


def bowl(point, optimum=(2, 3)):
    """A separable, unimodal 'accuracy' over the lattice, highest at ``optimum``."""
    return 0.9 - 0.01 * ((point[0] - optimum[0]) ** 2 + 0.5 * (point[1] - optimum[1]) ** 2)


def run_search(space, f, steps=(2, 1)):
    results, order = {}, []
    while True:
        pending = coordinate_search_next(space, results, steps)
        if not pending:
            return results, order
        for p in pending:
            results[p] = f(p)
            order.append(p)


@pytest.mark.parametrize("optimum", [(2, 3), (-3, -2), (4, 4), (0, 0), (-1, 1)])
def test_coordinate_search_finds_a_separable_optimum_in_few_trials(optimum):
    results, order = run_search(SPACE, lambda p: bowl(p, optimum))
    assert coordinate_search_best(SPACE, results, (2, 1)) == optimum
    assert max(results, key=results.get) == optimum
    assert len(order) == len(set(order)) <= 16  # the full lattice has 56 points
    assert all(SPACE.contains(p) for p in order)


def test_coordinate_search_is_a_pure_function_of_the_results():
    results, order = run_search(SPACE, bowl)
    for k in range(len(order)):
        partial = {p: results[p] for p in order[:k]}
        pending = coordinate_search_next(SPACE, partial, (2, 1))
        assert order[k] in pending  # the same next point, whoever asks and whenever


SPACE3 = SearchSpace(SPACE.axes + (Axis("norm_scale", 1.0, 2 ** 0.25, -4, 4),))


@pytest.mark.parametrize("optimum", [(2, 3, -2), (-3, -2, 4), (0, 0, 0), (1, 1, -4)])
def test_coordinate_search_on_three_axes_finds_a_separable_optimum(optimum):
    def bowl3(point):
        return bowl(point[:2], optimum[:2]) - 0.003 * (point[2] - optimum[2]) ** 2

    results, order = run_search(SPACE3, bowl3)
    assert coordinate_search_best(SPACE3, results, (2, 1)) == optimum
    assert len(order) == len(set(order)) <= 24 < len(SPACE3.grid()) == 8 * 7 * 9
    assert all(len(p) == 3 and SPACE3.contains(p) for p in order)
    # the first line search runs along the lr with the other axes at their centres
    assert {p[1:] for p in order[:3]} == {(0, 0)}


def test_search_space_refuses_repeated_or_empty_axes():
    with pytest.raises(FixNormError, match="distinct"):
        SearchSpace((Axis("lr", 0.1, 2.0, -1, 1), Axis("lr", 0.2, 2.0, -1, 1)))
    with pytest.raises(FixNormError, match="at least one"):
        SearchSpace(())


def test_axes_and_spaces_refuse_bad_ranges():
    with pytest.raises(FixNormError, match="centre"):
        Axis("lr", 0.1, 2.0, 1, 3)
    with pytest.raises(FixNormError, match="ratio"):
        Axis("lr", 0.1, 1.0, -1, 1)
    axis = Axis.spanning("lr", 0.1, 0.01, 1.0, ratio=2.0)
    assert axis.value(axis.low) >= 0.01 and axis.value(axis.high) <= 1.0 and (axis.low, axis.high) == (-3, 3)
    with pytest.raises(FixNormError, match="tuning knows methods"):
        search_space({"method": "powerprop-like"})


def test_fixnorm_search_is_centred_on_the_default_classifier():
    """With a free phase the classifier axis is fc_scale around the norm training chose (1 = the default)."""
    smoke = {"model": "small_cnn", "dataset": "synthetic", "method": "fixnorm", "lr": 0.1}
    lr, second = search_space(smoke).axes
    assert second.name == "fc_scale" and second.center == 1.0 and lr.center == 0.1
    assert (second.value(second.low), second.value(second.high)) == pytest.approx((0.25, 4.0))
    assert search_space({**smoke, "free_steps": 0}).axes[1].name == "fc_norm"
    assert search_space({**smoke, "fc_norm": 3.0}).axes[1].name == "fc_norm"
    with pytest.raises(FixNormError, match="leaves the classifier free"):
        search_space({**smoke, "fc_free_steps": None}, axes=["fc_scale"])
    assert search_space({**smoke, "fc_free_steps": None}).axes[1].name == "norm_scale"  # nothing to tune on it


def test_over_adam_the_free_classifier_is_not_an_axis_that_changes_rule_at_its_centre():
    """Over an Adam-like base 'auto' leaves the classifier free at fc_scale 1 and holds it at any other scale: a
    classifier axis would compare two rules, not two norms. The default axis there is norm_scale, spaced so that
    one step moves lr / norm (an Adam step's size does not follow the gradient's) by the lr axis's factor."""
    adam = {"model": "small_cnn", "dataset": "synthetic", "method": "fixnorm", "base": "adam", "lr": 1e-3}
    lr, norm = search_space(adam).axes
    assert norm.name == "norm_scale" and norm.center == 1.0
    assert (norm.value(norm.low), norm.value(norm.high)) == pytest.approx((0.25, 4.0))
    effective_lr = lambda index: 1 / norm.value(index)  # noqa: E731 - lr / norm at a fixed lr
    assert effective_lr(-1) / effective_lr(0) == pytest.approx(lr.value(1) / lr.value(0))
    for base in ("adam", "adamw", "rmsprop"):
        with pytest.raises(FixNormError, match="change rule within it"):
            search_space({**adam, "base": base}, axes=["fc_scale"])
    with pytest.raises(FixNormError, match="change rule within it"):  # an axis from 2 down would reach 1, and free
        search_space({**adam, "fc_scale": 2.0}, axes=["fc_scale"])
    # held at every point (the old rule, a number of steps, or a norm given): the classifier axis is coherent again
    assert search_space({**adam, "fc_free_steps": "free_steps"}).axes[1].name == "fc_scale"
    assert search_space({**adam, "fc_free_steps": 300}).axes[1].name == "fc_scale"
    assert search_space({**adam, "fc_norm": 4.0}).axes[1].name == "fc_norm"


def test_norm_scale_axis_moves_the_effective_lr_by_the_lr_axis_step():
    """norm_scale is spaced at sqrt(ratio): one step changes lr / norm² by the lr axis's own factor."""
    smoke = {"model": "small_cnn", "dataset": "synthetic", "method": "fixnorm", "lr": 0.1}
    lr, norm, fc = search_space(smoke, axes=["norm_scale", "fc_scale"]).axes
    assert (lr.name, norm.name, fc.name) == ("lr", "norm_scale", "fc_scale")
    assert norm.center == 1.0 and (norm.value(norm.low), norm.value(norm.high)) == pytest.approx((0.5, 2.0))
    effective_lr = lambda index: 1 / norm.value(index) ** 2  # noqa: E731 - at a fixed lr
    assert effective_lr(-1) / effective_lr(0) == pytest.approx(lr.value(1) / lr.value(0))
    assert search_space(smoke, axes=["norm_scale"], second_range=(0.75, 1.0)).axes[1].low == -1
    with pytest.raises(FixNormError, match="numeric target"):
        search_space({**smoke, "target_norm": 2.0}, axes=["norm_scale"])
    with pytest.raises(FixNormError, match="each once"):
        search_space(smoke, axes=["weight_decay"])
    with pytest.raises(FixNormError, match="each once"):
        search_space(smoke, axes=["norm_scale", "norm_scale"])
    with pytest.raises(FixNormError, match="each once"):
        search_space({**smoke, "method": "sgd"}, axes=["norm_scale"])
    with pytest.raises(FixNormError, match="the lr alone"):
        search_space(smoke, axes=["lr"])
    # the lr can be searched later than first; the range given is the first non-lr axis's
    names = [a.name for a in search_space(smoke, axes=["norm_scale", "lr"], second_range=(0.75, 1.0)).axes]
    assert names == ["norm_scale", "lr"]
    assert search_space(smoke, axes=["norm_scale", "lr"], second_range=(0.75, 1.0)).axes[0].low == -1


def tabular(values, trial):
    point = (round(math.log2(values["lr"] / 0.1)), round(math.log2(values["fc_norm"] / 2.0)))
    return bowl(point)


def test_tuner_on_sqlite_matches_the_pure_search_and_refuses_other_settings(tmp_path):
    expected, order = run_search(SPACE, bowl)
    tuner = Tuner(SPACE, tabular, tuner="coordinate", n_trials=100, out_dir=tmp_path, steps=(2, 1), poll_seconds=0)
    result = tuner.run()
    assert result.finished and len(result.trials) == len(order)
    assert result.best["value"] == pytest.approx(max(expected.values()))
    assert (tmp_path / "study.db").is_file()
    # an existing study with other settings is refused, not silently mixed
    other = SearchSpace((Axis("lr", 0.2, 2.0, -3, 4), Axis("fc_norm", 2.0, 2.0, -2, 4)))
    with pytest.raises(FixNormError, match="other settings") as refused:
        Tuner(other, tabular, tuner="coordinate", n_trials=10, out_dir=tmp_path, steps=(2, 1))
    # and it names what differs, so a user who upgraded sees which default moved
    assert "space.axes[0].center: 0.1 -> 0.2" in str(refused.value)
    with pytest.raises(FixNormError, match=r"settings.lr_power: \(unset\) -> 0.5"):
        Tuner(SPACE, tabular, tuner="coordinate", n_trials=10, out_dir=tmp_path, steps=(2, 1),
              settings={"lr_power": 0.5})
    with pytest.raises(FixNormError, match="pruning needs a sampler"):
        Tuner(SPACE, tabular, tuner="coordinate", n_trials=10, out_dir=tmp_path / "b", pruner="median")
    # precision auto is recorded as this machine decides it: a machine that decides otherwise cannot join
    from fixnorm.train.config import native_precision
    here = native_precision("auto")
    Tuner(SPACE, tabular, tuner="coordinate", n_trials=10, out_dir=tmp_path / "p", steps=(2, 1),
          settings={"precision": here})
    Tuner(SPACE, tabular, tuner="coordinate", n_trials=10, out_dir=tmp_path / "p", steps=(2, 1),
          settings={"precision": "auto"})  # the same trials: auto trains in `here` on this machine
    other = "fp32" if here == "bf16" else "bf16"
    Tuner(SPACE, tabular, tuner="coordinate", n_trials=10, out_dir=tmp_path / "q", steps=(2, 1),
          settings={"precision": other})  # as a machine that decides the other precision would create it
    with pytest.raises(FixNormError, match=f"settings.precision: '{other}' -> '{here}'"):
        Tuner(SPACE, tabular, tuner="coordinate", n_trials=10, out_dir=tmp_path / "q", steps=(2, 1),
              settings={"precision": "auto"})


LINE = SearchSpace((Axis("lr", 0.1, 2.0 ** 0.5, -8, 8),))


@pytest.mark.parametrize("ks, peak", [((0, 2, 4), 1.3), ((0, 2, 4), 2.0), ((0, 2, 4), 2.7), ((-4, 0, 2), 0.7),
                                      ((-4, 0, 2), -1.6), ((2, 3, 8), 3.4)])
def test_fitted_point_is_the_vertex_of_the_parabola_through_the_bracket(ks, peak):
    f = {(k,): 0.9 - 0.003 * (k - peak) ** 2 for k in ks}  # a parabola in log lr, sampled at three points
    best = max(f, key=f.get)
    fitted, used = fitted_point(LINE, f, best)
    assert fitted == (math.floor(peak + 0.5),) and used == sorted(f)


def test_fitted_point_stays_within_half_a_spacing_of_an_evenly_bracketed_maximum():
    gen = random.Random(0)
    for _ in range(200):
        ys = {(0,): gen.random(), (2,): gen.random(), (4,): gen.random()}
        ys[(2,)] = max(ys.values()) + gen.random() * 0.01
        assert fitted_point(LINE, ys, (2,))[0][0] in (1, 2, 3)


def test_fitted_point_keeps_unbracketed_flat_and_off_line_points():
    assert fitted_point(LINE, {(0,): 0.5, (2,): 0.7, (4,): 0.8}, (4,)) == ((4,), [(4,)])  # an edge: no bracket
    assert fitted_point(LINE, {(0,): 0.8, (2,): 0.7, (4,): 0.8}, (0,))[0] == (0,)
    assert fitted_point(LINE, {(0,): 0.7, (2,): 0.7, (4,): 0.7}, (2,))[0] == (2,)  # flat: no curvature
    assert fitted_point(LINE, {(0,): 0.9, (2,): 0.7, (4,): 0.6}, (2,))[0] == (2,)  # not the best of its bracket
    # two axes: each is fitted along its own line through the point; points off those lines are not used
    f = {(0, 0): 0.80, (2, 0): 0.90, (4, 0): 0.89, (2, -2): 0.85, (2, 2): 0.85, (4, 2): 0.99}
    fitted, used = fitted_point(SPACE, f, (2, 0))
    assert fitted == (3, 0) and (4, 2) not in used and len(used) == 5
    with pytest.raises(FixNormError, match="among the evaluated"):
        fitted_point(LINE, {(0,): 0.5}, (2,))


def test_tuner_recommends_the_vertex_between_lattice_points(tmp_path):
    """The coordinate search on a noiseless curve peaking between lattice points: the best trial is one step
    off the peak, the recommendation (not trained) lands on it."""
    space = SearchSpace((Axis("lr", 0.1, 2.0 ** 0.5, -8, 8), Axis("fc_norm", 2.0, 2.0, -2, 4)))

    def curve(values, trial):
        k = math.log(values["lr"] / 0.1) / math.log(2.0 ** 0.5)
        return 0.9 - 0.002 * (k - 4.8) ** 2 - 0.01 * math.log2(values["fc_norm"] / 2.0) ** 2

    result = Tuner(space, curve, tuner="coordinate", n_trials=8, out_dir=tmp_path, steps=(4, 2), poll_seconds=0).run()
    best_k = round(math.log(result.best["lr"] / 0.1) / math.log(2.0 ** 0.5))
    rec = result.recommended
    assert best_k == 4 and rec["lr"] == pytest.approx(0.1 * 2.0 ** 2.5) and rec["fc_norm"] == 2.0
    assert rec["evaluated"] is False and len(rec["trials"]) >= 3
    values = [t["value"] for t in result.trials]
    assert all(values[n] <= result.best["value"] for n in rec["trials"])


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_optuna_samplers_spend_exactly_the_budget(tmp_path, sampler):
    result = Tuner(SPACE, tabular, tuner=sampler, n_trials=8, out_dir=tmp_path, seed=3, poll_seconds=0).run()
    assert len(result.trials) == 8 and all(t["state"] == "complete" for t in result.trials)
    curve = result.best_so_far()
    assert curve == sorted(curve) and curve[-1] == result.best["value"]


def test_median_pruner_stops_poor_trials(tmp_path):
    def objective(values, trial):
        final = tabular(values, trial)
        for epoch in range(1, 4):
            trial.report(final * epoch / 3, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return final

    result = Tuner(SPACE, objective, tuner="random", n_trials=14, out_dir=tmp_path, seed=0, pruner="median",
                   poll_seconds=0).run()
    states = [t["state"] for t in result.trials]
    assert "pruned" in states and states.count("complete") >= 3


WORKER = textwrap.dedent("""
    import math, sys, time
    from fixnorm.tune import Axis, SearchSpace, Tuner
    storage = sys.argv[5] if len(sys.argv) > 5 else None
    space = SearchSpace((Axis("lr", 0.1, 2.0, -3, 4), Axis("fc_norm", 2.0, 2.0, -2, 4)))
    def objective(values, trial):
        time.sleep(0.3)
        p = (round(math.log2(values["lr"] / 0.1)), round(math.log2(values["fc_norm"] / 2.0)))
        return 0.9 - 0.01 * ((p[0] - 2) ** 2 + 0.5 * (p[1] - 3) ** 2)
    Tuner(space, objective, tuner=sys.argv[2], n_trials=int(sys.argv[3]), out_dir=sys.argv[1], steps=(2, 1),
          poll_seconds=0.1, seed=int(sys.argv[4]), storage=storage).run()
""")


@pytest.mark.parametrize("sampler", ["coordinate", "tpe"])
def test_two_worker_processes_share_one_study_without_repeating_a_point(tmp_path, sampler):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    budget = 30 if sampler == "coordinate" else 10
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path), sampler, str(budget), str(seed)])
               for seed in (0, 1)]
    assert [w.wait(timeout=240) for w in workers] == [0, 0]
    study = optuna.load_study(study_name=sampler, storage=f"sqlite:///{tmp_path / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = [SPACE.point_of(t.params) for t in done]
    assert all(t.params == SPACE.values(p) for t, p in zip(done, points))  # real values, exactly on the lattice
    workers_seen = {t.user_attrs["worker"] for t in done}
    if sampler == "coordinate":
        expected, order = run_search(SPACE, bowl)
        # the same search split across two workers: every point it needs, none twice (a worker may have
        # started a point that the other's result made unnecessary a moment later)
        assert len(points) == len(set(points)) and set(order) <= set(points) and len(points) <= len(order) + 2
        assert len(workers_seen) == 2
    else:
        assert len(done) == budget


def _postgres_binaries():
    found = shutil.which("initdb") and shutil.which("pg_ctl")
    if found:
        return Path(shutil.which("initdb")).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server in a temporary folder (skipped where PostgreSQL or psycopg is not installed)."""
    pytest.importorskip("psycopg")
    bin_dir = _postgres_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="fixnorm-pg-"))  # not under pytest's 0700 tree: the server user reads it
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                              f"-p {port} -k {root} -c listen_addresses=''", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_study_on_a_real_postgresql_server(tmp_path, postgres_url):
    """The multi-machine set-up: no file lock, only the database (row locks, the earlier trial wins)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"w{seed}"), "coordinate", "30",
                                 str(seed), postgres_url]) for seed in (0, 1)]
    assert [w.wait(timeout=240) for w in workers] == [0, 0]
    study = optuna.load_study(study_name="coordinate", storage=postgres_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = [SPACE.point_of(t.params) for t in done]
    assert all(t.params == SPACE.values(p) for t, p in zip(done, points))  # real values, exactly on the lattice
    expected, order = run_search(SPACE, bowl)
    assert len(points) == len(set(points)) and set(order) <= set(points) and len(points) <= len(order) + 2
    assert not (tmp_path / "w0" / "study.db").exists()  # nothing went to a local SQLite file


STARTER = textwrap.dedent("""
    import sys, time
    from fixnorm.tune import Axis, SearchSpace, Tuner
    space = SearchSpace((Axis("lr", 0.1, 2.0, -1, 1), Axis("fc_norm", 2.0, 2.0, -1, 1)))
    start_at = float(sys.argv[3])
    time.sleep(max(0.0, start_at - time.time() - 0.05))
    while time.time() < start_at:  # every worker leaves this line within a few milliseconds of the others
        pass
    Tuner(space, lambda values, trial: 0.5, tuner="coordinate", n_trials=1, out_dir=sys.argv[1],
          storage=sys.argv[2], study_name="race")
""")


def test_four_workers_started_together_on_a_fresh_postgresql_database(tmp_path, postgres_url):
    """Optuna's first-run race (optuna/optuna#1092): workers that create the schema at once must all start.

    Round 0 makes the race certain: the test holds the setup lock while four workers start, checks that none
    of them creates a table meanwhile, then lets them all go at once. Later rounds start them together freely.
    """
    import sqlalchemy
    from fixnorm.tune import _DatabaseLock

    script = tmp_path / "starter.py"
    script.write_text(STARTER)
    engine = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    for round_ in range(4):
        with engine.begin() as conn:  # a fresh database each round: no Optuna table or type left
            conn.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        start_at = time.time() + 4.0  # after every interpreter has imported optuna and torch
        held = _DatabaseLock(postgres_url).__enter__() if round_ == 0 else None
        workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"r{round_}w{i}"), postgres_url,
                                     str(start_at)], stderr=subprocess.PIPE, text=True) for i in range(4)]
        if held is not None:
            time.sleep(6.0)
            assert sqlalchemy.inspect(engine).get_table_names() == [], "a worker created tables without the lock"
            assert all(w.poll() is None for w in workers)
            held.__exit__(None, None, None)
        errors = [w.communicate(timeout=240)[1] for w in workers]
        assert [w.returncode for w in workers] == [0] * 4, "\n".join(errors)
        assert len(optuna.get_all_study_summaries(postgres_url)) == 1
    engine.dispose()


def completed(db):
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


@needs_fmnist
def test_sigkill_during_a_trial_loses_no_completed_trial_and_repeats_none(tmp_path):
    """A real `fixnorm tune` (real training trials, SQLite) killed mid-trial and started again."""
    args = [sys.executable, "-m", "fixnorm", "tune", "--recipe", "fmnist-smoke", "--method", "fixnorm",
            "--set", "train_subset=600", "--set", "epochs=2", "--set", "threads=1", "--set", "holdout=500",
            "--trials", "5", "--ratio", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(args + ["--out", str(tmp_path / "straight")], env=env, capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while completed(out / "study.db") < 2 and time.time() < deadline:
        time.sleep(0.2)
    # kill inside the third trial, once its run directory holds a checkpoint (nothing of it may be lost either)
    while not list(out.glob("runs/*/last.pt"))[2:] and time.time() < deadline:
        time.sleep(0.05)
    before = completed(out / "study.db")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert before >= 2
    again = subprocess.run(args + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr

    def trials(folder):
        data = json.loads((folder / "tune.json").read_text())
        return [(t["lr"], t["fc_scale"], t["value"]) for t in data["trials"]]  # the classifier axis: fc_scale

    resumed, reference = trials(out), trials(tmp_path / "straight")
    points = [(lr, fc) for lr, fc, _ in resumed]
    assert len(points) == len(set(points)) == 5  # no completed point repeated, the budget met
    assert sorted(resumed) == sorted(reference)  # same points, same accuracies: the resumed trial was exact
    study = optuna.load_study(study_name="fixnorm-coordinate", storage=f"sqlite:///{out / 'study.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) <= 1  # the trial the kill interrupted, failed on restart and redone


# -- real values in the study, journal storage, the coordinate search as an Optuna sampler -------------
def test_study_params_are_real_values_so_best_params_speak_the_users_units(tmp_path):
    Tuner(SPACE, tabular, tuner="coordinate", n_trials=100, out_dir=tmp_path / "c", steps=(2, 1), poll_seconds=0).run()
    study = optuna.load_study(study_name="coordinate", storage=f"sqlite:///{tmp_path / 'c' / 'study.db'}")
    assert study.best_params == {"lr": 0.1 * 2 ** 2, "fc_norm": 2.0 * 2 ** 3}  # bowl's optimum (2, 3), exactly
    dist = study.best_trial.distributions["lr"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log
    # Optuna's samplers stay on the same lattice while the study stores values
    for sampler in ("tpe", "random", "grid"):
        Tuner(SPACE, tabular, tuner=sampler, n_trials=6, out_dir=tmp_path / sampler, seed=1, poll_seconds=0).run()
        study = optuna.load_study(study_name=sampler, storage=f"sqlite:///{tmp_path / sampler / 'study.db'}")
        for t in study.trials:
            point = SPACE.point_of(t.params)
            assert point is not None and t.params == SPACE.values(point), t.params
        importances = optuna.importance.get_param_importances(study)
        assert set(importances) == {"lr", "fc_norm"}


def test_a_study_written_with_index_params_resumes_exactly(tmp_path):
    """Studies made before the params were values (lr_index, fc_norm_index) continue without repeating a point."""
    expected, order = run_search(SPACE, bowl)
    tuner = Tuner(SPACE, tabular, tuner="coordinate", n_trials=100, out_dir=tmp_path, steps=(2, 1), poll_seconds=0)
    dists = {f"{a.name}_index": optuna.distributions.IntDistribution(a.low, a.high) for a in SPACE.axes}
    for p in order[:4]:
        tuner.study.add_trial(optuna.trial.create_trial(
            params={"lr_index": p[0], "fc_norm_index": p[1]}, distributions=dists, value=bowl(p)))
    result = tuner.run()
    assert result.finished
    study = tuner.study
    points = [SPACE.point_of(t.params) for t in study.trials]
    assert sorted(points) == sorted(order)  # the old four plus the rest, none twice
    assert result.best["value"] == pytest.approx(max(expected.values()))


@pytest.mark.parametrize("storage", ["journal.log", "journal:{tmp}/sub/study.jsonl"])
def test_a_journal_file_is_a_storage(tmp_path, storage):
    storage = storage.format(tmp=tmp_path) if "{tmp}" in storage else str(tmp_path / storage)
    path = Path(storage.removeprefix("journal:"))
    result = Tuner(SPACE, tabular, tuner="coordinate", n_trials=100, out_dir=tmp_path / "out", storage=storage,
                   steps=(2, 1), poll_seconds=0).run()
    assert result.finished and path.is_file() and not (tmp_path / "out" / "study.db").exists()
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    study = optuna.load_study(study_name="coordinate", storage=optuna.storages.JournalStorage(backend))
    assert study.best_params == {"lr": 0.4, "fc_norm": 16.0}
    # started again on the finished journal study: nothing more to do, nothing repeated
    again = Tuner(SPACE, tabular, tuner="coordinate", n_trials=100, out_dir=tmp_path / "out", storage=storage,
                  steps=(2, 1), poll_seconds=0).run()
    assert len(again.trials) == len(result.trials)


def test_a_storage_that_is_neither_a_url_nor_a_journal_is_a_clear_error(tmp_path):
    with pytest.raises(FixNormError, match="journal:PATH"):
        Tuner(SPACE, tabular, tuner="coordinate", n_trials=3, out_dir=tmp_path, storage=str(tmp_path / "study.txt"))


def test_two_worker_processes_share_a_journal_study(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    journal = str(tmp_path / "journal.log")
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"w{seed}"), "coordinate", "30",
                                 str(seed), journal]) for seed in (0, 1)]
    assert [w.wait(timeout=240) for w in workers] == [0, 0]
    backend = optuna.storages.journal.JournalFileBackend(journal)
    study = optuna.load_study(study_name="coordinate", storage=optuna.storages.JournalStorage(backend))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = [SPACE.point_of(t.params) for t in done]
    expected, order = run_search(SPACE, bowl)
    assert len(points) == len(set(points)) and set(order) <= set(points) and len(points) <= len(order) + 2
    assert len({t.user_attrs["worker"] for t in done}) == 2


def test_coordinate_sampler_runs_the_search_inside_a_users_own_optimize():
    from fixnorm.tune import CoordinateSampler

    expected, order = run_search(SPACE, bowl)
    seen = []

    def objective(trial):
        values = SPACE.suggest(trial)
        trial.suggest_float("dropout", 0.0, 0.5)  # a parameter of the user's own: the fallback sampler's
        seen.append(SPACE.point_of(values))
        return bowl(seen[-1])

    study = optuna.create_study(direction="maximize", sampler=CoordinateSampler(SPACE, steps=(2, 1), seed=0))
    study.optimize(objective, n_trials=100)  # stops by itself when the search has finished
    assert seen == order  # the very sequence of the pure search
    assert study.best_params["lr"] == 0.4 and study.best_params["fc_norm"] == 16.0
    assert 0.0 <= study.best_params["dropout"] <= 0.5
    assert coordinate_search_best(SPACE, expected, (2, 1)) == SPACE.point_of(study.best_params)


def test_coordinate_sampler_minimises_resumes_and_keeps_threads_apart(tmp_path):
    from fixnorm.tune import CoordinateSampler

    expected, order = run_search(SPACE, bowl)
    storage = f"sqlite:///{tmp_path / 'own.db'}"

    def loss(trial):
        return -bowl(SPACE.point_of(SPACE.suggest(trial)))

    study = optuna.create_study(storage=storage, study_name="own", direction="minimize",
                                sampler=CoordinateSampler(SPACE, steps=(2, 1)))
    study.optimize(loss, n_trials=5)
    # a new process would load the study with a new sampler: the replay continues it
    study = optuna.load_study(storage=storage, study_name="own", sampler=CoordinateSampler(SPACE, steps=(2, 1)))
    study.optimize(loss, n_trials=100)
    assert [SPACE.point_of(t.params) for t in study.trials] == order

    threaded = optuna.create_study(direction="minimize", sampler=CoordinateSampler(SPACE, steps=(2, 1)))
    threaded.optimize(loss, n_trials=100, n_jobs=2)
    points = [SPACE.point_of(t.params) for t in threaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # two threads: every point the search needs, none twice, a few extra re-evaluations at most while waiting
    assert set(order) <= set(points) and len(points) <= len(order) + 4


def test_coordinate_sampler_refuses_a_range_that_misses_its_lattice():
    from fixnorm.tune import CoordinateSampler

    study = optuna.create_study(direction="maximize", sampler=CoordinateSampler(SPACE, steps=(2, 1)))
    with pytest.raises(FixNormError, match="range holding its lattice"):
        study.optimize(lambda t: t.suggest_float("lr", 0.5, 1.0, log=True) + t.suggest_float("fc_norm", 1, 2),
                       n_trials=1)


@needs_fmnist
def test_cli_searches_norm_scale_and_each_trial_trains_with_its_value(tmp_path):
    """`fixnorm tune --axes norm_scale fc_scale`: three-axis trials, each run's config holding its point's values."""
    out = tmp_path / "tune"
    proc = subprocess.run([sys.executable, "-m", "fixnorm", "tune", "--recipe", "fmnist-smoke", "--method", "fixnorm",
                           "--set", "train_subset=300", "--set", "holdout=200", "--epochs", "1", "--set", "threads=1",
                           "--set", "free_steps=1",  # 3 steps: the norms (then scaled) are taken after 1
                           "--axes", "norm_scale", "fc_scale", "--trials", "3", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "tune.json").read_text())
    assert [a["name"] for a in data["space"]["axes"]] == ["lr", "norm_scale", "fc_scale"]
    trials = data["trials"]
    assert len(trials) == 3 and {t["norm_scale"] for t in trials} == {1.0}  # the first line search is the lr's
    for t in trials:
        run = out / "runs" / f"lr={t['lr']:.6g},norm_scale={t['norm_scale']:.6g},fc_scale={t['fc_scale']:.6g}"
        config = (run / "config.yaml").read_text()
        assert f"norm_scale: {t['norm_scale']}" in config and f"lr: {t['lr']}" in config
    # the recommendation written and printed is the fitted point of these trials
    space = SearchSpace(tuple(Axis(**a) for a in data["space"]["axes"]))
    done = {space.point_of(t): t["value"] for t in trials}
    fitted, used = fitted_point(space, done, space.point_of(data["best"]))
    rec = data["recommended"]
    assert space.point_of(rec) == fitted and sorted(space.point_of(trials[n]) for n in rec["trials"]) == used
    assert "recommended: lr=" in proc.stdout
