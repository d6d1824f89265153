"""Runs examples/derivatives_tour.py (seed 003) as a user would and checks its verdict."""

import re

import matplotlib.image

from gradkit.cli import run_example


def test_derivatives_tour_reproduces_the_theano_post(tmp_path):
    completed = run_example("derivatives_tour.py", tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    verdicts = [line for line in completed.stdout.splitlines() if line.startswith("Verdict:")]
    assert len(verdicts) == 2, output
    matched = re.search(r"Verdict: (\d+) of (\d+) results match", verdicts[0])
    assert matched is not None, verdicts[0]
    assert matched.group(1) == matched.group(2)
    assert int(matched.group(2)) >= 15
    assert "DIFFERENT" not in completed.stdout
    assert "4*x**3 + 3*x**2 + 2*x" in verdicts[1]
    assert "(1 - sigmoid(x))*sigmoid(x)" in verdicts[1]
    # gradkit's own results (not the post's, printed next to them) give the post's numbers.
    ours = "\n".join(
        line for line in completed.stdout.splitlines() if line.strip().startswith("gradkit/JAX :")
    )
    for value in ("[[8., 0.], [0., 8.]]", "[[0., 0.], [2., 2.]]", "[4., 4.]", "[2., 2.]"):
        assert value in ours
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["logistic_derivative.png"]
    image = matplotlib.image.imread(tmp_path / "logistic_derivative.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.05  # not a blank canvas
