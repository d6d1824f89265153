"""The seed-004 example runs, prints the right verdicts and writes real images and event files."""

import json

import matplotlib.image

from gradkit import _tensorboard
from gradkit.cli import run_example


def test_vanishing_gradients_example(tmp_path):
    completed = run_example("vanishing_gradients.py", tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    verdicts = [line for line in completed.stdout.splitlines() if line.startswith("Verdict:")]
    assert len(verdicts) == 3
    assert "vanishing gradients starting in its first layer dense_0" in verdicts[0]
    assert "the 2-layer net does not" in verdicts[0]
    assert "dL/dz norm" in verdicts[1] and "from the output layer back" in verdicts[1]
    assert "clears the flag" in verdicts[2]
    assert "FAILED" not in completed.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    two, three, fixed = (summary[run] for run in summary)
    assert two["report"]["ok"] and fixed["report"]["ok"]
    first_layer = three["report"]["layers"][0]
    assert first_layer["name"] == "dense_0" and first_layer["symptoms"] == ["vanishing"]
    assert two["error_after"] < 0.05 and fixed["error_after"] < 0.05 < 0.25 < three["error_after"]
    for name in ("gradient_norms_over_training.png", "run1_3_layer__N_0__1e_3_report.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas
    report = (tmp_path / "run1_3_layer__N_0__1e_3_report.txt").read_text()
    assert "dense_0" in report and "vanishing" in report
    scalars = _tensorboard.read_scalars(tmp_path / "tensorboard" / "run1_3_layer__N_0__1e_3")
    steps = [step for step, _ in scalars["health/dense_0/kernel/norm"]]
    assert steps == list(range(0, 10_000, 100))
    assert max(value for _, value in scalars["health/dense_0/grad_norm"]) < 1e-4
    histograms = _tensorboard.read_histograms(tmp_path / "tensorboard" / "run1_3_layer__N_0__1e_3")
    assert "health/dense_0/kernel/log2_magnitude" in histograms
