"""Runs the seed-002 example (examples/recurrent_truncation.py) as a user would."""

from __future__ import annotations

import matplotlib.image

from gradkit.cli import run_example


def test_example_answers_seed_002(tmp_path):
    completed = run_example("recurrent_truncation.py", tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    verdicts = [line for line in completed.stdout.splitlines() if line.startswith("Verdict:")]
    assert len(verdicts) == 3, output
    assert not any("WRONG" in line for line in verdicts), output
    assert "Full(), Chunked(1) and Window(1) agree" in verdicts[0]
    assert "TheanoTail(1), Lasagne's gradient_steps=1" in verdicts[1]
    assert "only the last step's loss terms" in verdicts[1]
    # gradkit.diagnostics exists, so the checker must run and explain the truncation.
    assert "checker passes the Full() network and explains the TheanoTail(1)" in verdicts[2]
    assert "Why: Theano's scan(truncate_gradient=k)" in completed.stdout
    image = matplotlib.image.imread(tmp_path / "recurrent_truncation.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recurrent_truncation.png"]
