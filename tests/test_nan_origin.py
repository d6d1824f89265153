"""find_nan_origin names the equation, the pass and the user's line for the usual NaN traps."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradkit.diagnostics import find_nan_origin


def _line_of(function, marker):
    """The file line of ``function`` holding the comment ``marker``."""
    lines, start = inspect.getsourcelines(function)
    (offset,) = [i for i, line in enumerate(lines) if f"# {marker}" in line]
    return start + offset


def log_of_softmax(logits):
    probabilities = jax.nn.softmax(logits)
    return -jnp.log(probabilities)[0]  # LOG


def stable_cross_entropy(logits):
    return -jax.nn.log_softmax(logits)[0]


def test_log_of_softmax_with_large_logits():
    logits = jnp.array([0.0, 200.0])
    assert np.isnan(jax.grad(log_of_softmax)(logits)).all()  # the trap is real
    report = find_nan_origin(jax.grad(log_of_softmax), logits)
    assert report.found and report.cause == "log_of_softmax"
    first = report.first
    assert first.primitive == "log" and first.phase == "forward" and first.produced == "-Inf"
    assert first.location.file == __file__
    assert first.location.line == _line_of(log_of_softmax, "LOG")
    assert first.inputs[0].zero_count == 1
    assert "log_softmax" in report.explanation
    assert any(e.phase == "backward" and "NaN" in e.produced for e in report.events)
    assert f"{__file__}:{first.location.line}" in str(report)
    # The fix it recommends has a finite gradient and no event at all.
    assert np.isfinite(jax.grad(stable_cross_entropy)(logits)).all()
    assert not find_nan_origin(jax.grad(stable_cross_entropy), logits).found


def distance(x):
    return jnp.sqrt(jnp.sum(x**2))  # SQRT


def test_sqrt_at_zero_in_the_backward_pass():
    report = find_nan_origin(jax.grad(distance), jnp.zeros(3))
    assert report.cause == "sqrt_at_zero"
    assert report.first.primitive == "div" and report.first.produced == "+Inf"
    assert report.first.location.line == _line_of(distance, "SQRT")
    # The forward value was fine: the NaN is made in the backward pass.
    nan_events = [e for e in report.events if "NaN" in e.produced]
    assert nan_events and nan_events[0].phase == "backward"
    assert report.outputs[0].nan_count == 3


def test_library_norm_at_zero_is_named_too():
    report = find_nan_origin(jax.grad(jnp.linalg.norm), jnp.zeros(4))
    assert report.cause == "sqrt_at_zero"
    assert any("norm" in scope for scope in report.first.scopes)


def safe_log(x):
    return jnp.where(x > 0, jnp.log(x), 0.0)  # WHERE


def double_where_log(x):
    positive = x > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), 0.0)


def test_where_does_not_protect_the_backward_pass():
    x = jnp.array([0.0, 2.0])
    grad = jax.grad(lambda x: jnp.sum(safe_log(x)))
    assert np.isnan(grad(x)[0]) and np.isfinite(safe_log(x)).all()
    report = find_nan_origin(grad, x)
    assert report.cause == "unprotected_where"
    assert report.first.primitive == "log" and report.first.phase == "forward"
    assert report.first.location.line == _line_of(safe_log, "WHERE")
    backward = [e for e in report.events if e.phase == "backward" and "NaN" in e.produced]
    assert backward and backward[0].location.line == _line_of(safe_log, "WHERE")
    assert "double-where" in report.explanation
    fixed = jax.grad(lambda x: jnp.sum(double_where_log(x)))
    np.testing.assert_allclose(fixed(x), [0.0, 0.5])
    assert not find_nan_origin(fixed, x).found


def outer(x):
    return middle(x) * 2.0  # OUTER


def middle(x):
    return jnp.log(x - 1.0)  # INNER


def test_call_chain_and_jit_and_plain_functions():
    report = find_nan_origin(jax.jit(outer), jnp.array([1.0, 3.0]))
    assert report.cause == "log_of_zero" and report.first.phase == "forward"
    assert report.first.location.line == _line_of(middle, "INNER")
    chain = [(frame.function, frame.line) for frame in report.first.call_chain]
    assert ("outer", _line_of(outer, "OUTER")) in chain
    assert chain[-1] == ("middle", _line_of(middle, "INNER"))
    assert report.first.scopes and report.first.scopes[0].startswith("jit")


def test_nan_inside_scan_and_cond_names_the_step():
    def body(carry, t):
        return carry * t, jnp.log(carry)

    def scanned(x):
        return jax.lax.scan(body, x, jnp.array([1.0, 0.0, 2.0]))[1].sum()

    report = find_nan_origin(scanned, 1.0)
    assert report.first.primitive == "log"
    assert report.first.scopes[-1] == "scan step 2"

    def branchy(x):
        return jax.lax.cond(x > 0, lambda x: x, lambda x: jnp.sqrt(x), x)

    report = find_nan_origin(branchy, -1.0)
    assert report.first.primitive == "sqrt" and report.first.produced == "NaN"
    assert report.first.scopes[-1] == "cond branch 0"
    assert report.cause == "invalid_operation"


def test_scanned_sequences_are_summarised_step_by_step_and_whole():
    # Each step sees its own slice: a log(0) at step 2 shows the 0 it was given, not step 0's 1.
    def accumulate(x):
        return jax.lax.scan(lambda c, xi: (c + jnp.log(xi), c), 0.0, x)[0]

    report = find_nan_origin(accumulate, jnp.array([1.0, 2.0, 0.0, 3.0]))
    assert report.first.scopes[-1] == "scan step 2"
    assert report.cause == "log_of_zero"
    assert str(report.first.inputs[0]) == "float32[scalar] = 0 (1 exact zeros)"

    # A NaN already in the input is not an origin, inside the scan or after it.
    def uses_the_sequence_twice(x):
        total = jax.lax.scan(lambda c, xi: (c + xi * 0 + 1.0, None), 0.0, x)[0]
        return jnp.sum(x * 2.0) + total

    assert not find_nan_origin(uses_the_sequence_twice, jnp.array([1.0, jnp.nan])).found


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_functions_drawing_random_numbers_are_inspected(make_key):
    def noisy_log(key, x):
        return jnp.log(x * jax.random.uniform(key))

    report = find_nan_origin(noisy_log, make_key(0), jnp.zeros(1))
    assert report.first.primitive == "log" and report.cause == "log_of_zero"

    def dropout_loss(w, key, x):
        h = x @ w
        h = jnp.where(jax.random.bernoulli(key, 0.5, h.shape), h / 0.5, 0.0)
        return jnp.sum(jnp.sqrt(h * h))

    report = find_nan_origin(
        jax.grad(dropout_loss), jnp.zeros((3, 2)), make_key(1), jnp.ones((4, 3))
    )
    assert report.found and report.cause == "sqrt_at_zero"


def test_nan_inside_a_while_loop_names_the_iteration():
    def halving_logs(x):
        body = lambda c: (c[0] + 1, jnp.log(c[1] - 1.0))  # noqa: E731  # BODY
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    # log(3 - 1) = 0.69 at iteration 0, then log(0.69 - 1) is the log of a negative number.
    report = find_nan_origin(halving_logs, 3.0)
    assert report.first.primitive == "log" and report.first.produced == "NaN"
    assert report.first.scopes[-1] == "while iteration 1"
    assert report.first.location.line == _line_of(halving_logs, "BODY")
    assert report.cause == "invalid_operation"


def test_bfloat16_values_are_inspected():
    # bfloat16 is not a NumPy floating type; its Inf must still be seen (max is about 3.4e38).
    report = find_nan_origin(lambda x: x.astype(jnp.bfloat16) * jnp.bfloat16(1e30), 1e10)
    assert report.cause == "overflow" and report.first.primitive == "mul"
    assert report.first.inputs[0].dtype == "bfloat16"
    assert report.first.inputs[0].max == float(jnp.bfloat16(1e10))
    assert report.first.outputs[0].posinf_count == 1


def test_a_custom_vjp_backward_rule_is_named():
    @jax.custom_vjp
    def scaled(x):
        return x

    def forward(x):
        return x, x

    def backward(residual, g):
        return (g / (residual - residual),)

    scaled.defvjp(forward, backward)

    def loss(x):
        return 2.0 * scaled(x)  # CALL

    report = find_nan_origin(jax.grad(loss), 1.0)
    assert report.cause == "division_by_zero" and report.first.phase == "backward"
    assert report.first.primitive == "div" and report.first.produced == "+Inf"
    # JAX records the equations of a custom_vjp backward rule at the line that calls it.
    assert report.first.location.line == _line_of(loss, "CALL")


def test_overflow_and_clean_functions():
    report = find_nan_origin(lambda x: jnp.exp(x), jnp.float32(100.0))
    assert report.cause == "overflow" and report.first.produced == "+Inf"
    clean = find_nan_origin(lambda x: jnp.sum(x**2), jnp.ones(3))
    assert not clean.found and "no equation" in str(clean)
    assert clean.outputs[0].min == 3.0


def test_not_callable():
    with pytest.raises(TypeError, match="f must be callable, got int"):
        find_nan_origin(3, 1.0)


def test_arguments_already_holding_nan_are_named_not_passed_over():
    # fit's NonFiniteLossError sends users here with the failing batch; when the NaN is in the
    # data, no equation is its origin, and the report once said only "no equation produced a
    # NaN or an Inf", as if all were well.
    x = np.ones((32, 2), np.float32)
    x[20, 1] = np.nan
    x[25, 0] = -np.inf
    y = np.ones(32, np.float32)

    def loss(params, batch):
        inputs, labels = batch
        return jnp.mean((inputs @ params["w"] - labels) ** 2)

    report = find_nan_origin(jax.grad(loss), {"w": jnp.zeros(2)}, (x, y))
    assert not report.found and report.cause == "non_finite_input"
    assert report.non_finite_inputs == (
        "args[1][0] (float32[32, 2]): 1 NaN, 1 -Inf of 64, first at index (20, 1)",
    )
    text = str(report)
    assert "the arguments already held them" in text and "args[1][0]" in text

    # With an origin of its own as well, the report names both.
    report = find_nan_origin(lambda w, b: jnp.log(w) + b[0].sum(), jnp.zeros(2), (x, y))
    assert report.found and report.cause != "non_finite_input"
    assert "the arguments also held NaN or Inf already" in str(report)

    clean = find_nan_origin(jax.grad(loss), {"w": jnp.zeros(2)}, (np.ones((4, 2)), np.ones(4)))
    assert clean.non_finite_inputs == () and clean.cause is None
    assert str(clean) == "find_nan_origin: no equation produced a NaN or an Inf."


def test_explanations_fit_what_happened():
    # The derivative of sqrt at 0 without a later multiplication by 0 is an Inf, not a NaN.
    report = find_nan_origin(jax.grad(lambda p: jnp.sum(jnp.sqrt(p))), jnp.array([0.0, 1.0]))
    assert report.cause == "sqrt_at_zero"
    assert "the gradient is infinite there" in report.explanation
    assert "giving NaN" not in report.explanation
    report = find_nan_origin(jax.grad(jnp.linalg.norm), jnp.zeros(3))
    assert "multiplies it by 0, giving NaN" in report.explanation
    # 0 ** -0.5 in the backward pass of abs(x) ** 0.5 is a pole, not an overflow.
    report = find_nan_origin(jax.grad(lambda x: jnp.sum(jnp.abs(x) ** 0.5)), jnp.array([0.0, 1.0]))
    assert report.cause == "pole_at_zero"
    assert "negative power of 0" in report.explanation
    # The double-where example is written for the operation that needed protecting.
    report = find_nan_origin(
        jax.grad(lambda x: jnp.sum(jnp.where(x != 0, 1 / x, 0.0))), jnp.array([0.0, 1.0])
    )
    assert report.cause == "unprotected_where"
    assert "where(x != 0, 1.0 / where(x != 0, x, 1.0), 0.0)" in report.explanation
    assert "log(" not in report.explanation
