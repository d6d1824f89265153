"""Runs examples/gradient_checker.py (seed 002) as a user would and checks its answer."""

import json
from pathlib import Path

from gradkit.cli import run_example

ROOT = Path(__file__).resolve().parents[1]


def test_gradient_checker_example(tmp_path):
    completed = run_example("gradient_checker.py", tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    verdicts = [line for line in completed.stdout.splitlines() if line.startswith("Verdict:")]
    assert len(verdicts) == 3, output
    assert "gradients are correct: check_grads PASS in float32" in verdicts[0]
    assert "too noisy to tell" in verdicts[0]
    assert "explained as truncated BPTT (TheanoTail(1)), not a bug" in verdicts[1]
    assert "feed-forward gradient: True" in verdicts[1]
    assert "broken custom_vjp is located to gradient_checker.py:" in verdicts[2]
    reports = json.loads((tmp_path / "reports.json").read_text())
    assert reports["feedforward"]["verdict"] == "pass"
    assert reports["theano_tail"]["location"]["culprit"] is None
    culprit = reports["broken"]["location"]["culprit"]
    source = (ROOT / "examples" / "gradient_checker.py").read_text().splitlines()
    assert "# BROKEN" in source[culprit["line"] - 1]
