"""The command line, run as a user would: real subprocesses on the real Fashion-MNIST files."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixnorm.data import DEFAULT_FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fixnorm", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "error::UserWarning"})


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_demo_learns_on_a_subset_of_fashion_mnist():
    proc = run_cli("demo", "--train-subset", "3000", "--quiet", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", proc.stdout).group(1))
    assert accuracy > 0.5  # 10 classes: chance is 0.1; 24 steps on 3000 images reach about 0.6


def test_demo_with_missing_data_says_how_to_get_it(tmp_path):
    proc = run_cli("demo", "--data-dir", str(tmp_path), "--quiet")
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr


def test_roles_prints_the_plan_for_a_registered_model():
    proc = run_cli("roles", "--model", "resnet20", "--size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "fc.weight" in proc.stdout and "classifier" in proc.stdout and "fix norm per tensor" in proc.stdout
    why = run_cli("roles", "--model", "resnet20", "--size", "16", "--why")
    assert "output unchanged when each filter is scaled" in why.stdout


def test_readme_has_the_two_setup_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = {}
    for marker in ("main-command", "test-command"):
        block = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", readme, re.S)
        assert block, marker
        commands[marker] = block.group(1)
    assert commands["main-command"].endswith("fixnorm demo")
    assert "pytest" in commands["test-command"] and "constraints-cpu.txt" in commands["test-command"]
    assert "torch==2.13.0" in (ROOT / "constraints-cpu.txt").read_text()
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
