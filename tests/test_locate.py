"""Tests for gradkit.diagnostics.locate_gradient_error: the wrong equation and its line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gradkit import _corpus
from gradkit._corpus import BUGS, bug_line
from gradkit.diagnostics import check_grads, locate_gradient_error


def _location_for(bug):
    args = bug.make_args(jnp.float32, np.random.default_rng(0))
    if bug.order == 2:
        # The first derivative is right; its own derivative is wrong.
        gradient = jax.grad(lambda *a: jnp.sum(bug.function(*a)))
        return locate_gradient_error(gradient, *args)
    return locate_gradient_error(bug.function, *args)


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_every_bug_is_localised_to_its_equation_and_line(bug):
    location = _location_for(bug)
    culprit = location.culprit
    assert culprit is not None, str(location)
    assert culprit.primitive == bug.primitive
    assert culprit.file == _corpus.__file__
    assert culprit.line == bug_line(bug.name), str(location)
    assert f"{_corpus.__file__}:{bug_line(bug.name)}" in str(location)


def test_context_names_the_enclosing_calls():
    by_name = {b.name: b for b in BUGS}
    scan = _location_for(by_name["inside_scan"]).culprit
    assert scan.context[0].startswith("scan iteration") and scan.rule_name == "tanh_wrong"
    assert "inside scan iteration" in str(scan)
    jitted = _location_for(by_name["inside_jit"]).culprit
    assert jitted.context == ("jit `jitted_softplus_sum`",)
    cond = _location_for(by_name["sigmoid_missing_factor"]).culprit
    assert cond.context == ("cond branch 1",)
    leaf = _location_for(by_name["one_leaf"]).culprit
    assert "cotangent of input 1 is wrong" in leaf.problem  # the bias


def test_correct_programs_have_no_culprit():
    def model(params, x):
        def step(h, xt):
            h = jnp.tanh(params["w"] * h + xt)
            return h, h

        _, hs = lax.scan(step, jnp.zeros(3), x)
        logits = jax.jit(lambda h: h @ params["out"])(hs)
        return jnp.mean(jax.nn.log_softmax(logits)) + lax.cond(
            jnp.sum(x) > 0, jnp.sum, jnp.mean, hs
        )

    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal(3)),
        "out": jnp.asarray(rng.standard_normal((3, 2))),
    }
    location = locate_gradient_error(model, params, jnp.asarray(rng.standard_normal((4, 3))))
    assert location.culprit is None
    assert location.equations_checked >= 6  # scan, jit, cond and the top-level arithmetic
    assert "agrees with finite differences" in location.explanation
    for smooth in _corpus.smooth_functions(5, seed=3):
        x = smooth.make_args(jnp.float32, rng)
        assert locate_gradient_error(smooth.function, *x).culprit is None, smooth.name


def test_truncation_and_stop_gradient_are_expected_deviations_that_explain_the_mismatch():
    def truncated(x):
        # A stand-in for gradkit.recurrent's truncated scans.
        with jax.named_scope("gradkit_truncation[Chunked(1)]"):
            carried = lax.stop_gradient(x)
        return jnp.sum(jnp.sin(x) * carried)

    report = check_grads(truncated, jnp.linspace(0.5, 1.5, 4), locate=True)
    assert report.verdict == "fail"
    location = report.location
    assert location.culprit is None
    (deviation,) = location.expected_deviations
    assert deviation.primitive == "stop_gradient"
    assert "Chunked(1)" in deviation.reason and deviation.mismatch is True
    assert location.explanation.startswith("expected: the gradient is changed on purpose")
    assert "expected deviations" in str(report)


def test_plain_stop_gradient_round_and_gradkit_rules_are_listed():
    @jax.custom_jvp
    def gradkit_surrogate_step(x):
        return jnp.round(x)

    gradkit_surrogate_step.defjvp(lambda p, t: (jnp.round(p[0]), t[0]))

    def f(x):
        return jnp.sum(lax.stop_gradient(x) * x + jnp.round(x * 3.1) + gradkit_surrogate_step(x))

    location = locate_gradient_error(f, jnp.array([0.3, 1.2]))
    assert location.culprit is None
    kinds = {d.primitive: d for d in location.expected_deviations}
    assert "stop_gradient" in kinds and "round" in kinds and "custom_jvp_call" in kinds
    assert "gradkit custom rule `gradkit_surrogate_step`" in kinds["custom_jvp_call"].reason
    # round sits inside jnp.round's jit, which agrees with finite differences as a whole (away
    # from a jump both derivatives are zero), so it is listed without being evaluated.
    assert kinds["round"].mismatch is None and kinds["round"].context == ("jit",)
    assert kinds["round"].source is not None and kinds["round"].source.line > 0


def test_kink_is_not_blamed():
    location = locate_gradient_error(
        lambda x: jnp.sum(jax.nn.relu(x) ** 2 + jnp.abs(x)), jnp.zeros(3)
    )
    assert location.culprit is None
    assert location.kinks


def test_report_serialises():
    location = _location_for(BUGS[0])
    data = location.to_dict()
    assert data["culprit"]["line"] == bug_line(BUGS[0].name)
    assert data["culprit"]["primitive"] == "custom_jvp_call"
    assert "wrong" in data["explanation"]


def test_bad_input_errors():
    with pytest.raises(TypeError, match="f must be callable"):
        locate_gradient_error(3, jnp.ones(2))
    with pytest.raises(TypeError, match="cannot be traced by JAX"):
        locate_gradient_error(lambda x: jnp.sin(x) if x[0] > 0 else x, jnp.ones(2))
    with pytest.raises(ValueError, match=r"argnums=\(0, 4\) refers to argument"):
        locate_gradient_error(lambda x: x, jnp.ones(2), argnums=(0, 4))
    with pytest.raises(ValueError, match="no arguments"):
        locate_gradient_error(jnp.sin)


def _primitive_with_wrong_transpose():
    from jax.extend.core import Primitive
    from jax.interpreters import ad, batching, mlir

    scale_p = Primitive("scale_by_two")
    scale_p.def_impl(lambda x: 2.0 * x)
    scale_p.def_abstract_eval(lambda x: x)
    ad.deflinear2(scale_p, lambda ct, x: [3.0 * ct])  # wrong transpose: should be 2 * ct
    batching.primitive_batchers[scale_p] = lambda args, dims: (scale_p.bind(*args), dims[0])
    mlir.register_lowering(scale_p, mlir.lower_fun(lambda x: 2.0 * x, multiple_results=False))
    return scale_p


def test_wrong_transpose_rule_is_found_by_the_dot_product_test():
    scale_p = _primitive_with_wrong_transpose()

    def f(x):
        return jnp.sum(jnp.sin(scale_p.bind(x)))

    x = jnp.linspace(-1.0, 1.0, 4)
    report = check_grads(f, x, locate=True)
    verdicts = {row.mode: row.verdict for row in report.rows}
    assert verdicts == {"forward": "pass", "reverse": "fail"}
    culprit = report.location.culprit
    assert culprit.primitive == "scale_by_two"
    assert "transpose" in culprit.problem and "dot-product test" in culprit.problem
    # A primitive's rules live in JAX's tables, not in traceable user code: the report names the
    # line where the primitive is applied.
    source = open(__file__).read().splitlines()
    assert "scale_p.bind(x)" in source[culprit.line - 1]
