"""The command line, run as a user would: real subprocesses on the real Fashion-MNIST files."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixnorm.data import DEFAULT_FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300, warnings_are_errors=True):
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning" if warnings_are_errors else "default"}
    return subprocess.run([sys.executable, "-m", "fixnorm", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_train_and_compare_from_the_command_line(tmp_path):
    # 10 steps: FixNorm's free phase shortened below them (a longer one is refused: tests/test_engine.py)
    proc = run_cli("train", "--recipe", "fmnist-smoke", "--set", "train_subset=1000", "--set", "free_steps=2",
                   "--epochs", "1", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"epoch 1/1  train loss [0-9.]+ acc", proc.stdout)
    accuracy = float(re.search(r"final test accuracy: ([0-9.]+)", proc.stdout).group(1))
    assert accuracy > 0.2  # chance is 0.1
    proc = run_cli("compare", "--recipe", "fmnist-smoke", "--set", "train_subset=500", "--set", "free_steps=1",
                   "--epochs", "1", "--set", "precision=auto",
                   "--methods", "sgd", "fixnorm", "--out", str(tmp_path / "cmp"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "| sgd | 1 |" in proc.stdout and "| fixnorm | 1 |" in proc.stdout
    assert re.search(r"precision=auto \((fp32|bf16)\)", proc.stdout)  # the table printed says what trained


def test_missing_data_and_bad_settings_say_what_to_do(tmp_path):
    proc = run_cli("train", "--recipe", "fmnist-smoke", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--set", "lrate=0.1")
    assert proc.returncode == 2 and "unknown setting 'lrate'" in proc.stderr
    proc = run_cli("train", "--resume", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_list_names_methods_models_and_recipes():
    proc = run_cli("list")
    assert proc.returncode == 0
    for name in ("fixnorm", "sgd", "resnet20", "efficientnet_b0", "fmnist-resnet20", "imagenet-efficientnet-b0"):
        assert name in proc.stdout


def test_roles_prints_the_plan_for_a_registered_model():
    proc = run_cli("roles", "--model", "resnet20", "--size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "fc.weight" in proc.stdout and "classifier" in proc.stdout and "fix norm per tensor" in proc.stdout
    why = run_cli("roles", "--model", "resnet20", "--size", "16", "--why")
    assert "output unchanged when each filter is scaled" in why.stdout
    joint = run_cli("roles", "--model", "wrn", "--size", "12")  # the default, "auto", holds them
    assert joint.returncode == 0, joint.stderr
    assert re.search(r"layers\.2\.shortcut\.weight .* joint-invariant +fix norm per joint +initial \(joint, group 2\)",
                     joint.stdout), joint.stdout
    # left free, the stream writers are 57% of the weights: the plan prints, with the warning that says so
    free = run_cli("roles", "--model", "wrn", "--size", "12", "--joint", "free", warnings_are_errors=False)
    assert free.returncode == 0 and "joint-invariant" not in free.stdout, free.stderr
    assert "controls no norm for 57% of this model's weight elements" in free.stderr


def test_readme_has_the_two_setup_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = {}
    for marker in ("main-command", "test-command"):
        block = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", readme, re.S)
        assert block, marker
        commands[marker] = block.group(1)
    assert "fixnorm compare" in commands["main-command"]
    assert "pytest" in commands["test-command"] and "constraints-cpu.txt" in commands["test-command"]
    assert "torch==2.13.0" in (ROOT / "constraints-cpu.txt").read_text()
    assert "test-command" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.+?)\n```", readme, re.S).group(1)
    assert "range(total_steps)" in code and "opt.check_horizon(total_steps)" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("range(total_steps)", "range(2)"), "README.md", "exec"), {})
    saved = __import__("torch").load(tmp_path / "ckpt.pt", weights_only=True)
    # the targets travel in the parameters' state entries, as every checkpoint API carries them
    assert any("fixnorm_target" in entry for entry in saved["opt"]["state"].values())


def test_tune_help_shows_the_recipe_tune_uses():
    proc = run_cli("tune", "--help")
    assert proc.returncode == 0
    text = re.sub(r"\s+", "", proc.stdout)  # argparse wraps lines at spaces and hyphens
    assert "default:fmnist-tune;" in text and "fmnist-resnet20" not in text
    assert "journal:PATH" in text


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_tune_lists_only_the_files_it_wrote_and_takes_a_journal(tmp_path):
    """A real one-trial tune into a journal file, in an interpreter where matplotlib cannot be imported."""
    code = ("import sys; sys.modules['matplotlib'] = None; from fixnorm.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out, journal = tmp_path / "tune", tmp_path / "journal.log"
    proc = subprocess.run([sys.executable, "-c", code, "tune", "--recipe", "fmnist-smoke", "--set", "train_subset=300",
                           "--set", "holdout=200", "--set", "free_steps=0", "--epochs", "1", "--set", "threads=1",
                           "--trials", "1",
                           "--out", str(out), "--storage", str(journal)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "no plot: plots need matplotlib" in proc.stdout
    written = re.search(r"written: (.+); study in (.+)", proc.stdout)
    assert written and "best_so_far.png" not in written.group(1) and written.group(2) == str(journal)
    assert all(Path(p).is_file() for p in written.group(1).split(", "))
    assert journal.is_file() and not (out / "study.db").exists()
