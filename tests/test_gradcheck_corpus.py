"""The correct half of the corpus: smooth functions of random shapes never fail the check.

Each test batches many functions into one pytree function (one input leaf and one output per
function), so the per-leaf verdicts of one compiled check give one verdict per function. The
default run checks 24 functions in float32 and 24 others in float64; the whole corpus of 200
functions in both dtypes is the slow test (``python -m pytest -m slow``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradkit._corpus import smooth_functions
from gradkit.diagnostics import check_grads

CORPUS = smooth_functions(200)


def _check_batch(functions, dtype):
    def corpus(*xs):
        return tuple(f.function(x) for f, x in zip(functions, xs, strict=True))

    rng = np.random.default_rng(1)
    args = [f.make_args(dtype, rng)[0] for f in functions]
    report = check_grads(corpus, *args)
    verdicts = {}
    for row in report.rows:
        index = int(row.leaf.split("[")[1].rstrip("]"))
        verdicts.setdefault(functions[index].name, set()).add(row.verdict)
    return report, verdicts


def _assert_all_pass(functions, dtype):
    report, verdicts = _check_batch(functions, dtype)
    assert len(verdicts) == len(functions)
    not_passing = {name: v for name, v in verdicts.items() if v != {"pass"}}
    assert not not_passing, (not_passing, str(report))
    assert report.verdict == "pass"
    assert report.dtype == np.dtype(dtype).name and report.reference_dtype == "float64"


def test_corpus_has_200_distinct_functions_of_random_shapes():
    assert len(CORPUS) == 200
    assert len({f.name.split(": ")[1] for f in CORPUS}) > 150
    assert len({f.input_shape for f in CORPUS}) > 30
    assert {len(f.input_shape) for f in CORPUS} == {0, 1, 2, 3}


def test_smooth_functions_pass_in_float32():
    _assert_all_pass(CORPUS[:24], jnp.float32)


def test_smooth_functions_pass_in_float64():
    with jax.enable_x64(True):
        _assert_all_pass(CORPUS[24:48], jnp.float64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_whole_corpus_passes(dtype, request):
    selected = request.config.getoption("markexpr") or ""
    if "slow" not in selected or "not slow" in selected:
        pytest.skip("the whole corpus takes minutes; run it with `python -m pytest -m slow`")
    if dtype == "float64":
        with jax.enable_x64(True):
            _assert_all_pass(CORPUS, jnp.float64)
    else:
        _assert_all_pass(CORPUS, jnp.float32)
