"""Runs examples/sigmoid_family_xor.py (seed 000) as a user would and checks its answer."""

import re

import matplotlib.image

from gradkit.cli import run_example


def test_xor_example_gives_the_right_verdict(tmp_path):
    completed = run_example("sigmoid_family_xor.py", tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    verdicts = [line for line in completed.stdout.splitlines() if line.startswith("Verdict:")]
    assert len(verdicts) == 3, output
    assert not any("WRONG" in line for line in verdicts)

    counts = {
        name: int(match.group(1))
        for name, pattern in {
            "sigmoid": r"sigmoid learns XOR from (\d+)/64",
            "ultra_fast": r"ultra_fast_sigmoid now has a gradient \(0\.375 at x = 0\) and learns "
            r"from (\d+)/64",
            "hard": r"hard_sigmoid \(slope 0\.2\) learns from (\d+)/64",
            "surrogate": r"1\.5 x sigmoid's derivative learns from (\d+)/64",
        }.items()
        if (match := re.search(pattern, completed.stdout))
    }
    assert set(counts) == {"sigmoid", "ultra_fast", "hard", "surrogate"}, output
    assert counts["sigmoid"] >= 48 and counts["ultra_fast"] >= 48
    assert counts["hard"] <= 6
    assert counts["surrogate"] >= 48
    # The cost trajectory is printed every 500 epochs, and the answer's demo is shown.
    assert completed.stdout.count("epoch 3500") == 6
    assert "dy/dw = -0.2" in completed.stdout and "dy/dw = +0.2" in completed.stdout

    # diagnose runs on each variant's representative trained network and on hard_sigmoid's dead
    # run; every table row prints diagnose's zero-gradient fraction next to the example's own.
    rows = re.findall(
        r"^ +(hidden|output) +([\d.]+)% / +([\d.]+)% +(\S+) +(\S+) +(.+)$",
        completed.stdout,
        flags=re.M,
    )
    assert completed.stdout.count("gradkit.diagnostics.diagnose on init #") == 7, output
    assert len(rows) == 14 and all(row[1] == row[2] for row in rows), rows
    # hard_sigmoid's stalled runs: the affine representative is not saturated at all, and the
    # dead run's output is 100% saturated with no gradient reaching any weight.
    affine = re.search(
        r"diagnose on init #\d+ \(stuck on the linear piece, like (\d+) of the (\d+) "
        r"failures\).*\n.*\n +hidden +0\.0% / +0\.0% +0\.0% +(\S+) +ok\n"
        r" +output +0\.0% / +0\.0% +0\.0% +(\S+) +ok\n",
        completed.stdout,
    )
    assert affine, output
    assert int(affine.group(1)) >= 0.75 * int(affine.group(2))
    assert float(affine.group(3)) > 0 and float(affine.group(4)) > 0
    dead = re.search(
        r"diagnose on init #\d+ \(dead, like \d+ failure\(s\)\).*\n.*\n"
        r" +hidden +([\d.]+)% / +[\d.]+% +([\d.]+)% +0\.00e\+00 +no gradient\n"
        r" +output +100\.0% / +100\.0% +100\.0% +0\.00e\+00 +no gradient, dead units, "
        r"saturated\n",
        completed.stdout,
    )
    assert dead, output
    assert "fix 1. " in completed.stdout and "surrogate gradient: " in completed.stdout
    (hard_verdict,) = [line for line in verdicts if "hard_sigmoid (slope 0.2)" in line]
    assert re.search(
        r"diagnose: affine run #\d+: hidden / output 0% / 0% saturated, no symptom", hard_verdict
    )

    image = matplotlib.image.imread(tmp_path / "xor_cost.png")
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300
    assert image.std() > 0.01  # not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xor_cost.png"]
