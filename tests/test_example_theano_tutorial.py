"""Runs examples/theano_tutorial.py (seed 001) as a user would and checks its answer."""

import re

import matplotlib
import numpy as np

from gradkit.cli import run_example

matplotlib.use("Agg")
import matplotlib.image

ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def test_theano_tutorial_example_reproduces_the_numpy_trajectory(tmp_path):
    completed = run_example("theano_tutorial.py", tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output

    verdicts = [line for line in completed.stdout.splitlines() if line.startswith("Verdict:")]
    assert len(verdicts) == 2, verdicts
    assert "the Theano tour works in pure JAX" in verdicts[0]
    assert "match plain NumPy at all 20 iterations" in verdicts[1]
    assert "WRONG" not in output

    # the per-iteration table: iteration, cost, accuracy (gradkit), cost, accuracy (NumPy)
    rows = np.array(
        [[float(v) for v in m.groups()] for line in output.splitlines() if (m := ROW.match(line))]
    )
    assert rows.shape == (20, 5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(1, 21))
    np.testing.assert_allclose(rows[:, 1], rows[:, 3], rtol=1e-4)  # cost
    np.testing.assert_allclose(rows[:, 2], rows[:, 4], atol=1e-3)  # accuracy, within 1/N
    assert rows[0, 1] == rows[1, 1]  # the first step uses the zero velocity
    assert np.all((rows[:, 2] >= 0.5) & (rows[:, 2] <= 1.0))

    # the shape error names the user's line; the NaN section catches the division
    assert re.search(
        r"layer 'dense_0' expects inputs of shape \(\.\.\., 2\), but got an input "
        r"of shape \(2, 1000\) \(called at .*theano_tutorial\.py:\d+",
        output,
    )
    assert "with jax.debug_nans(True): invalid value (nan) encountered in div" in output
    assert re.search(
        r"first: div in the forward pass produced NaN at .*theano_tutorial\.py:", output
    )

    for name in ("decision_surface", "cost_curve", "output_per_iteration", "history"):
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 200, (name, image.shape)
        assert np.ptp(image[..., :3]) > 0.5, name  # not blank
