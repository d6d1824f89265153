"""The wrong half of the corpus: every deliberately wrong rule is detected, in float32 and float64.

The localisation of each bug to its line is tested in tests/test_locate.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradkit._corpus import BUGS, ONE_ELEMENT_INDEX, bug_line
from gradkit.diagnostics import check_grads


def _report(bug, dtype):
    args = bug.make_args(dtype, np.random.default_rng(0))
    return check_grads(bug.function, *args, order=bug.order)


def test_corpus_has_at_least_15_bugs_of_the_required_kinds():
    assert len(BUGS) >= 15
    names = {b.name for b in BUGS}
    for required in (
        "wrong_sign",
        "factor_of_two",
        "missing_term",
        "transposed",
        "one_element",
        "forward_only",
        "one_leaf",
        "inside_scan",
        "second_order",
    ):
        assert required in names


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_every_bug_is_detected(bug, dtype):
    if dtype == "float64":
        with jax.enable_x64(True):
            report = _report(bug, jnp.float64)
    else:
        report = _report(bug, jnp.float32)
    assert report.verdict == "fail", str(report)
    failing = [row for row in report.rows if row.verdict == "fail"]
    # The failure shows where the bug is: at its order, in its modes, in its leaf.
    assert {row.order for row in failing} == {bug.order}
    modes = {row.mode.split(" over ")[0] for row in failing}
    if bug.order == 1:
        assert modes <= set(bug.modes), str(report)
    if bug.leaf is not None:
        assert {row.leaf for row in failing} == {bug.leaf}
    # Nothing else is reported as failing: the other rows pass (or, for a bug that only shows in
    # one mode, the other mode passes).
    assert all(row.verdict == "pass" for row in report.rows if row not in failing)


def test_bug_in_one_element_of_a_10k_vector_is_named():
    (bug,) = [b for b in BUGS if b.name == "one_element"]
    report = _report(bug, jnp.float32)
    assert report.worst.path == f"x[{ONE_ELEMENT_INDEX}]"
    x = bug.make_args(jnp.float32, np.random.default_rng(0))[0]
    exact = 2 * float(x[ONE_ELEMENT_INDEX]) * np.cos(float(x[ONE_ELEMENT_INDEX]) ** 2)
    assert report.worst.finite_difference == pytest.approx(exact, rel=1e-6)
    assert report.worst.autodiff == pytest.approx(3 * exact, rel=1e-4)


def test_second_order_bug_passes_at_first_order():
    (bug,) = [b for b in BUGS if b.name == "second_order"]
    args = bug.make_args(jnp.float32, np.random.default_rng(0))
    assert check_grads(bug.function, *args).verdict == "pass"
    # At order 2 locate=True examines the derivative function and finds the wrong inner rule.
    report = check_grads(bug.function, *args, order=2, locate=True)
    assert report.location.culprit.line == bug_line(bug.name)
    assert report.location.function.startswith("vjp_of_")
