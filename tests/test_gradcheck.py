"""Tests for gradkit.diagnostics.check_grads: verdicts, reports, kinks, modes, methods, errors."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradkit import _finite_differences as fd
from gradkit.diagnostics import (
    GradCheckReport,
    GradientCheckError,
    assert_grads_correct,
    check_grads,
)


def mlp_loss(params, x):
    hidden = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return jnp.mean((hidden @ params["dense_1"]["kernel"]) ** 2)


def mlp_args(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    params = {
        "dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((3, 4)), dtype),
            "bias": jnp.asarray(rng.standard_normal(4), dtype),
        },
        "dense_1": {"kernel": jnp.asarray(rng.standard_normal((4, 2)), dtype)},
    }
    return params, jnp.asarray(rng.standard_normal((5, 3)), dtype)


@jax.custom_jvp
def wrong_at_element_3(x):
    return jnp.sin(x)


@wrong_at_element_3.defjvp
def _wrong_at_element_3_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    slope = jnp.cos(x).at[3].multiply(-2.0)
    return jnp.sin(x), slope * t


def wrong_loss(params):
    return jnp.sum(wrong_at_element_3(params["w"]) * params["v"])


def wrong_args():
    rng = np.random.default_rng(1)
    return ({"w": jnp.asarray(rng.standard_normal(8), jnp.float32), "v": jnp.ones(8)},)


@functools.cache
def passing_report() -> GradCheckReport:
    return check_grads(mlp_loss, *mlp_args())


@functools.cache
def failing_report() -> GradCheckReport:
    return check_grads(wrong_loss, *wrong_args())


# ---- verdicts and the report


def test_correct_pytree_function_passes_with_one_row_per_leaf_and_mode():
    report = passing_report()
    assert report.verdict == "pass" and report.ok
    leaves = {row.leaf for row in report.rows}
    assert leaves == {
        "params['dense_0']['bias']",
        "params['dense_0']['kernel']",
        "params['dense_1']['kernel']",
        "x",
    }
    assert {(row.leaf, row.mode) for row in report.rows} == {
        (leaf, mode) for leaf in leaves for mode in ("forward", "reverse")
    }
    assert report.dtype == "float32" and report.reference_dtype == "float64"


def test_finite_difference_values_in_the_report_match_autodiff_within_the_bar():
    for row in passing_report().rows:
        assert row.abs_error <= row.tolerance
        assert math.isclose(row.autodiff, row.finite_difference, rel_tol=1e-4, abs_tol=1e-6)
        assert row.error_bar < 1e-8  # a float64 reference is far more precise than float32 AD


def test_wrong_rule_fails_and_the_report_names_leaf_and_element():
    report = failing_report()
    assert report.verdict == "fail" and not report.ok
    failing = {(row.leaf, row.mode) for row in report.rows if row.verdict == "fail"}
    assert failing == {("params['w']", "forward"), ("params['w']", "reverse")}
    assert all(row.verdict == "pass" for row in report.rows if row.leaf == "params['v']")
    worst = report.worst
    assert worst.path == "params['w'][3]"
    x3 = float(wrong_args()[0]["w"][3])
    # The narrowed element compares the partial derivatives themselves: -2 cos(x) vs cos(x).
    assert worst.finite_difference == pytest.approx(math.cos(x3), rel=1e-6)
    assert worst.autodiff == pytest.approx(-2 * math.cos(x3), rel=1e-5)
    assert worst.abs_error == pytest.approx(3 * abs(math.cos(x3)), rel=1e-5)


def test_str_says_which_side_is_which_and_gives_the_worst_element():
    text = str(failing_report())
    assert "FAIL" in text
    assert "AD = autodiff" in text and "FD = finite differences" in text
    assert "worst: params['w'][3]" in text
    assert "cost:" in text and "function evaluations" in text


def test_to_dict_is_json_and_html_renders():
    data = json.loads(json.dumps(failing_report().to_dict()))
    assert data["verdict"] == "fail" and data["ok"] is False
    assert data["worst"]["path"] == "params['w'][3]"
    assert {row["leaf"] for row in data["rows"]} == {"params['w']", "params['v']"}
    html = failing_report()._repr_html_()
    assert "<table>" in html and "FAIL" in html and "params[&#x27;w&#x27;][3]" in html


def test_raise_if_failed_and_assert_grads_correct():
    assert passing_report().raise_if_failed() is passing_report()
    with pytest.raises(GradientCheckError, match=r"params\['w'\]\[3\]") as info:
        failing_report().raise_if_failed()
    assert info.value.report is failing_report()
    assert isinstance(info.value, AssertionError)
    assert assert_grads_correct(jnp.tanh, jnp.linspace(-1.0, 1.0, 5)).ok
    with pytest.raises(GradientCheckError, match="wrong derivative rule") as info:
        assert_grads_correct(wrong_loss, *wrong_args())
    # assert_grads_correct localises by default.
    assert info.value.report.location.culprit.primitive == "custom_jvp_call"


def test_cost_of_a_directional_check_does_not_depend_on_input_size():
    costs = []
    for size in (10, 10_000):
        x = jnp.linspace(-1.0, 1.0, size)
        report = check_grads(lambda x: jnp.sum(jnp.sin(x) ** 2), x)
        assert report.ok
        costs.append(report.cost)
    for cost in costs:
        # 1 leaf x 2 probes x (3 steps x 2 signs) + f(x); 2 JVPs; 2 VJPs; AD and FD compiled once.
        assert cost.function_evaluations == 2 * 6 + 1
        assert cost.jvps == 2 and cost.vjps == 2 and cost.compilations == 2


def test_seed_makes_runs_identical_and_can_be_changed():
    args = mlp_args()
    first, second = check_grads(mlp_loss, *args), check_grads(mlp_loss, *args)
    assert [r.autodiff for r in first.rows] == [r.autodiff for r in second.rows]
    other = check_grads(mlp_loss, *args, seed=7)
    assert [r.autodiff for r in first.rows] != [r.autodiff for r in other.rows]


def test_argnums_and_integer_leaves_are_left_alone_and_said_so():
    def f(params, x):
        return jnp.sum(jnp.sin(params["w"] * x) * params["steps"])

    params = {"w": jnp.ones(3), "steps": jnp.array(2, jnp.int32)}
    report = check_grads(f, params, jnp.arange(3.0), argnums=0)
    assert report.ok
    assert {row.leaf for row in report.rows} == {"params['w']"}
    assert any("params['steps']: int32 leaf" in s for s in report.skipped)
    assert any("x: not in argnums" in s for s in report.skipped)
    assert "not checked: params['steps']" in str(report)


def test_registered_dataclass_inputs_and_dict_outputs():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Layer:
        weight: jax.Array
        scale: jax.Array

    def f(layer, x):
        y = jnp.tanh(layer.weight * x) * layer.scale
        return {"sum": jnp.sum(y), "first": y[0], "count": jnp.array(3)}

    report = check_grads(f, Layer(jnp.ones(3) * 0.5, jnp.array(2.0)), jnp.arange(3.0))
    assert report.ok
    assert {row.leaf for row in report.rows} == {"layer.weight", "layer.scale", "x"}
    assert any("output['count']" in s for s in report.skipped)


def test_jitted_function_and_float64_inputs():
    with jax.enable_x64(True):
        x = jnp.linspace(0.1, 2.0, 6, dtype=jnp.float64)
        report = check_grads(jax.jit(lambda x: jnp.log(x) * jnp.exp(-x)), x)
    assert report.ok and report.dtype == "float64"
    # A float64 check is held to float64 tolerances.
    assert all(row.tolerance < 1e-6 for row in report.rows)


def test_forward_mode_only_and_reverse_mode_only():
    x = jnp.linspace(-1.0, 1.0, 4)
    forward = check_grads(jnp.sin, x, modes="forward")
    reverse = check_grads(jnp.sin, x, modes=("reverse",))
    assert [row.mode for row in forward.rows] == ["forward"]
    assert [row.mode for row in reverse.rows] == ["reverse"]
    assert forward.cost.vjps == 0 and reverse.cost.jvps == 0


def test_custom_vjp_function_is_checked_in_reverse_mode_and_says_forward_is_unavailable():
    @jax.custom_vjp
    def cube(x):
        return x**3

    cube.defvjp(lambda x: (x**3, x), lambda x, ct: (3 * x**2 * ct,))
    report = check_grads(lambda x: jnp.sum(cube(x)), jnp.arange(1.0, 4.0))
    assert report.ok
    assert [row.mode for row in report.rows] == ["reverse"]
    assert any(
        "forward mode at order 1: not available" in s and "cube" in s for s in report.skipped
    )


def test_second_order_checks_all_four_combinations():
    report = check_grads(lambda x: jnp.sum(jnp.sin(x) * x**2), jnp.linspace(-1, 1, 5), order=2)
    assert report.ok
    modes = {row.mode for row in report.rows if row.order == 2}
    assert modes == {
        "forward over forward",
        "reverse over forward",
        "forward over reverse",
        "reverse over reverse",
    }


def test_full_method_compares_every_element():
    x = jnp.linspace(-1.0, 1.0, 7)
    good = check_grads(lambda x: jnp.tanh(x) * jnp.sum(x), x, method="full")
    assert good.ok and good.method == "full"
    # One central difference per element (2 evaluations) plus f(x).
    assert good.cost.function_evaluations == 2 * 7 + 1
    bad = check_grads(wrong_loss, *wrong_args(), method="full", modes="reverse")
    assert bad.verdict == "fail"
    assert bad.worst.path == "params['w'][3]"
    assert "1 Jacobian entry wrong" in next(r.note for r in bad.rows if r.verdict == "fail")


def test_float32_reference_without_float64_is_still_honest():
    x = jnp.linspace(-1.0, 1.0, 6)
    smooth = check_grads(lambda x: jnp.sum(jnp.sin(x) ** 2), x, float64_reference=False)
    assert smooth.reference_dtype == "float32"
    assert smooth.verdict in ("pass", "inconclusive")
    wrong = check_grads(wrong_loss, *wrong_args(), float64_reference=False)
    assert wrong.verdict == "fail"


# ---- kinks: never a false failure


@pytest.mark.parametrize(
    ("name", "f", "x"),
    [
        ("relu at 0", jax.nn.relu, jnp.zeros(1)),
        (
            "relu at 0 among others",
            lambda x: jnp.sum(jax.nn.relu(x) * jnp.arange(1.0, 5.0)),
            jnp.array([0.0, 1.0, 0.0, -1.0]),
        ),
        ("abs at 0", jnp.abs, jnp.array([0.0, 2.0])),
        ("max with ties", jnp.max, jnp.array([1.0, 1.0, -1.0])),
        ("maximum with ties", lambda x: jnp.maximum(x[0], x[1]), jnp.array([0.5, 0.5])),
    ],
)
def test_kinks_pass_as_subgradients_or_are_inconclusive_never_fail(name, f, x):
    for seed in (0, 1, 2):
        report = check_grads(f, x, seed=seed)
        assert report.verdict in ("pass", "inconclusive"), (name, str(report))


def test_kink_report_gives_left_and_right_slopes():
    report = check_grads(jax.nn.relu, jnp.zeros(1))
    notes = " ".join(row.note for row in report.rows)
    assert "kink" in notes and "subgradient" in notes


def test_kink_outside_the_subgradient_range_is_inconclusive_with_slopes():
    @jax.custom_jvp
    def steep_relu(x):
        return jnp.maximum(x, 0.0)

    # At 0 the slope 3 lies outside [0, 1]: at a kink this is inconclusive, not a failure.
    steep_relu.defjvp(lambda p, t: (steep_relu(p[0]), jnp.where(p[0] > 0, 1.0, 3.0) * t[0]))
    report = check_grads(steep_relu, jnp.zeros(1), modes="forward")
    assert report.verdict == "inconclusive"
    assert "not between them" in report.rows[0].note
    assert math.isfinite(report.worst.left_slope) and math.isfinite(report.worst.right_slope)


# ---- bad input


def test_bad_input_errors_name_the_problem():
    x = jnp.arange(3.0)
    with pytest.raises(TypeError, match=r"no differentiable output.*int32"):
        check_grads(lambda x: jnp.argmax(x), x)
    with pytest.raises(TypeError, match="cannot be traced by JAX"):
        check_grads(lambda x: jnp.sin(x) * float(x[0]), x)
    with pytest.raises(ValueError, match=r"input x has 1 NaN/Inf"):
        check_grads(lambda x: jnp.sum(x), jnp.array([1.0, jnp.nan]))
    with pytest.raises(ValueError, match=r"argnums=2 refers to argument\(s\) \[2\].*given 2"):
        check_grads(lambda a, b: a * b, x, x, argnums=2)
    with pytest.raises(TypeError, match="argnums must hold integers"):
        check_grads(lambda a: a, x, argnums="0")
    with pytest.raises(ValueError, match="selects no floating-point input"):
        check_grads(lambda a, n: a * n, x, jnp.array(2), argnums=1)
    with pytest.raises(ValueError, match=r"returns NaN/Inf at the given point.*output\[1\]"):
        check_grads(lambda x: jnp.log(x), jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="method must be one of"):
        check_grads(jnp.sin, x, method="exact")
    with pytest.raises(ValueError, match="modes must be a subset"):
        check_grads(jnp.sin, x, modes=("sideways",))
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        check_grads(jnp.sin, x, order=3)
    with pytest.raises(TypeError, match="f must be callable"):
        check_grads("sin", x)
    with pytest.raises(TypeError, match="complex"):
        check_grads(jnp.sin, x + 1j)
    # A negative rtol once produced a report with a negative "allowed" column; an empty output
    # a NumPy reshape error.
    with pytest.raises(ValueError, match=r"rtol must be a non-negative finite number.*-1\.0"):
        check_grads(jnp.sin, x, rtol=-1.0)
    with pytest.raises(ValueError, match=r"atol must be a non-negative finite number.*nan"):
        check_grads(jnp.sin, x, atol=float("nan"))
    for method in ("directional", "full"):
        with pytest.raises(ValueError, match=r"no output entries.*empty \(output \(0,\)\)"):
            check_grads(lambda x: x[:0], x, method=method)


# ---- the finite-difference estimates themselves


def test_richardson_estimate_and_error_bar_against_exact_derivative():
    for x0 in (-1.3, 0.2, 2.5):
        hs = fd.steps(fd.base_step(np.float64))
        with jax.enable_x64(True):
            plus = jnp.exp(x0 + hs) * jnp.sin(x0 + hs)
            minus = jnp.exp(x0 - hs) * jnp.sin(x0 - hs)
            center = jnp.exp(x0) * jnp.sin(x0)
            d = fd.derivative_from_evaluations(center, plus, minus, jnp.asarray(hs), 2.2e-16)
        exact = math.exp(x0) * (math.sin(x0) + math.cos(x0))
        actual_error = abs(float(d.value) - exact)
        assert actual_error <= float(d.error) + 1e-15
        assert float(d.error) < 1e-9 * max(1.0, abs(exact))
        assert float(d.left) == pytest.approx(exact, rel=1e-7)
        assert float(d.right) == pytest.approx(exact, rel=1e-7)


def test_one_sided_slopes_at_a_kink():
    hs = fd.steps(1e-3)
    with jax.enable_x64(True):
        d = fd.derivative_from_evaluations(
            jnp.asarray(0.0),
            jnp.abs(jnp.asarray(hs)),
            jnp.abs(-jnp.asarray(hs)),
            jnp.asarray(hs),
            2.2e-16,
        )
    assert float(d.left) == pytest.approx(-1.0) and float(d.right) == pytest.approx(1.0)
    assert float(d.value) == pytest.approx(0.0)


def test_host_arrays_are_differenced_in_numpy_with_the_same_values():
    # Localisation differences one equation at a time on the host; in JAX every operation here
    # would compile for each new shape. NumPy in, NumPy out, and the same numbers as jax.numpy.
    rng = np.random.default_rng(0)
    hs = fd.steps(fd.base_step(np.float64))
    center = rng.normal(size=(3, 4))
    plus = center + hs[:, None, None] * 1.5 + hs[:, None, None] ** 2
    minus = center - hs[:, None, None] * 1.5 + hs[:, None, None] ** 2
    minus[1, 2, 3] = np.nan
    host = fd.derivative_from_evaluations(center, plus, minus, hs, 2.2e-16)
    with jax.enable_x64(True):
        device = fd.derivative_from_evaluations(
            *map(jnp.asarray, (center, plus, minus, hs)), 2.2e-16
        )
    for field in ("value", "error", "left", "right", "side_error", "finite", "magnitude"):
        got, want = getattr(host, field), getattr(device, field)
        assert type(got) is np.ndarray, field
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-9, atol=1e-14, err_msg=field)
    assert not host.finite[2, 3] and host.finite.sum() == 11
    np.testing.assert_allclose(host.value[0], 1.5, rtol=1e-9)


def test_localisation_differences_an_equation_without_compiling_its_arithmetic():
    import logging

    from gradkit._locate import _EquationChecker

    compiled = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling "):
                compiled.append(record.getMessage())

    eqn = jax.make_jaxpr(jnp.sin)(jnp.ones((7, 3), jnp.float32)).jaxpr.eqns[0]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(7, 3)), jnp.float32)
    checker = _EquationChecker(seed=0)
    g = checker._restricted(eqn, [x], [0], [0])
    handler, logger = Handler(level=logging.DEBUG), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True), jax.enable_x64(True):
            (derivative,) = checker.finite_difference(g, [x], [checker.tangent_for(x)])
    finally:
        logger.removeHandler(handler)
    assert len(compiled) <= 1, compiled  # sin itself, for this shape; no arithmetic around it
    assert derivative.value.shape == (7, 3) and bool(derivative.finite.all())


def test_finite_difference_grad_matches_the_exact_gradient_within_its_error_bars():
    from gradkit.diagnostics import finite_difference_grad

    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.float32(0.7)}
    x = rng.normal(size=(4, 3))

    def loss(scale, params, x):
        return scale * jnp.sum(jnp.tanh(x @ params["w"] + params["b"]) ** 2)

    value, error = finite_difference_grad(loss, 1.5, params, x, argnums=1)
    with jax.enable_x64(True):
        exact = jax.grad(loss, argnums=1)(1.5, jax.tree.map(np.float64, params), x)
    for name in ("w", "b"):
        assert value[name].dtype == np.float64 and np.shape(value[name]) == np.shape(params[name])
        gap = np.abs(value[name] - np.asarray(exact[name]))
        assert np.all(gap <= error[name] + 1e-13), name
        assert np.all(error[name] < 1e-8), name
    with pytest.raises(TypeError, match=r"args\[0\]\['n'\] is int32"):
        finite_difference_grad(lambda p: p["x"] * p["n"], {"x": 1.0, "n": np.int32(2)})
    with pytest.raises(TypeError, match=r"must return a scalar; got shape \(2,\)"):
        finite_difference_grad(jnp.sin, np.ones(2))
    with pytest.raises(ValueError, match="more than 10,000"):
        finite_difference_grad(jnp.sum, np.ones(10_001))
    with pytest.raises(ValueError, match="argnums must be the position"):
        finite_difference_grad(jnp.sum, np.ones(2), argnums=1)


def test_default_tolerances_follow_the_dtype():
    from gradkit._gradcheck import default_rtol

    assert default_rtol(np.float32) == pytest.approx(4 * math.sqrt(np.finfo(np.float32).eps))
    assert default_rtol(np.float64) < 1e-7 < default_rtol(np.float32) < 2e-3
    assert fd.base_step(np.float64) == pytest.approx(np.finfo(np.float64).eps ** 0.2)


# ---- regressions


def _sin_with_factor(factor):
    @jax.custom_jvp
    def wrong_sin(x):
        return jnp.sin(x)

    wrong_sin.defjvp(lambda p, t: (jnp.sin(p[0]), factor * jnp.cos(p[0]) * t[0]))
    return wrong_sin


@pytest.mark.parametrize("method", ["directional", "full"])
def test_nan_finite_difference_is_inconclusive_for_that_element_only(method):
    with jax.enable_x64(True):
        report = check_grads(jnp.sqrt, jnp.asarray([1e-6, 1.0]), method=method)
    assert report.verdict == "inconclusive", str(report)
    assert any("leaves the domain of f" in row.note for row in report.rows), str(report)
    assert all(row.verdict != "fail" for row in report.rows)


def test_error_bar_larger_than_the_derivative_does_not_pass():
    # AD 0 against FD 0.0013 +- 0.0019: finite differences cannot resolve the derivative.
    with jax.enable_x64(True):
        wrong = _sin_with_factor(0.0)
        report = check_grads(lambda x: jnp.sum(1e8 + 1e-3 * wrong(x)), jnp.linspace(0.1, 1.0, 4))
    assert report.verdict == "inconclusive", str(report)


@pytest.mark.parametrize("method", ["directional", "full"])
def test_large_output_does_not_hide_a_wrong_rule_in_a_small_one(method):
    wrong = _sin_with_factor(2.0)
    report = check_grads(
        lambda x: {"loss": 1e3 * jnp.sum(x**2), "feature": wrong(x)},
        jnp.linspace(0.1, 1.0, 8),
        method=method,
    )
    assert report.verdict == "fail", str(report)
    assert "output['feature']" in (report.worst.output or "")


def test_second_order_of_a_custom_vjp_function_checks_reverse_over_reverse():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.cos(x) * g,))
    report = check_grads(f, jnp.linspace(0.1, 1.0, 4), order=2, modes="reverse")
    assert report.ok, str(report)
    assert {row.mode for row in report.rows} == {"reverse", "reverse over reverse"}
    assert any("reverse over forward mode at order 2: not available" in s for s in report.skipped)


def test_python_ints_bools_and_strings_are_static_arguments():
    x = jnp.linspace(0.1, 1.0, 4)
    assert check_grads(lambda a, n: sum(a[i] for i in range(n)), x, 2).ok
    assert check_grads(lambda a, n: jnp.sum(jnp.tile(a, n)), x, 2).ok

    def reduce(a, how, square):
        y = a**2 if square else a
        return jnp.sum(y) if how == "sum" else jnp.mean(y)

    report = check_grads(reduce, x, "sum", True)
    assert report.ok
    assert any("how: Python str 'sum'" in s for s in report.skipped)
    wrong = _sin_with_factor(-1.0)
    failing = check_grads(lambda a, n: jnp.sum(jnp.tile(wrong(a), n)), x, 3, locate=True)
    assert failing.verdict == "fail"
    assert failing.location.culprit is not None


@pytest.mark.parametrize("x64", [False, True])
def test_kink_inside_the_step_is_inconclusive_not_a_failure(x64):
    with jax.enable_x64(x64):
        for seed in (0, 1, 2):
            report = check_grads(jax.nn.relu, jnp.array([1e-5, -1e-5, 0.3]), seed=seed)
            assert report.verdict in ("pass", "inconclusive"), str(report)
        report = check_grads(jax.nn.relu, jnp.array([1e-5, -1e-5, 0.3]), modes="reverse")
    assert "kink inside the finite-difference step" in report.rows[0].note, str(report)


def test_relu_mlp_near_kinks_does_not_fail_in_float64():
    def mlp(p, x):
        return jnp.mean((jax.nn.relu(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]) ** 2)

    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        p = {
            "W1": jnp.asarray(rng.standard_normal((20, 64)) / np.sqrt(20)),
            "b1": jnp.zeros(64),
            "W2": jnp.asarray(rng.standard_normal((64, 1)) / 8),
            "b2": jnp.zeros(1),
        }
        x = jnp.asarray(rng.standard_normal((32, 20)))
        report = check_grads(mlp, p, x, argnums=0)
    assert report.verdict in ("pass", "inconclusive"), str(report)


# -- matmul precision -------------------------------------------------------------------------
# On recent NVIDIA GPUs JAX multiplies float32 matrices in TF32 by default (10-bit factors):
# a correct float32 MLP then fails a check by ~1e-3 relative. check_grads runs at "highest"
# unless told otherwise. CPUs ignore the setting, so these tests watch the setting itself.


def _precision_seen(**options):
    seen = []

    def f(w, x):
        seen.append(jax.config.jax_default_matmul_precision)
        return jnp.sum(jnp.tanh(x @ w))

    w = jnp.ones((3, 2)) / 3
    x = jnp.arange(6.0).reshape(2, 3) / 6
    report = check_grads(f, w, x, argnums=0, **options)
    assert report.verdict == "pass", str(report)
    return set(seen), report


def test_derivatives_are_checked_with_full_precision_matmuls_by_default():
    seen, report = _precision_seen()
    assert seen == {"highest"}
    assert report.matmul_precision == "highest"
    assert report.to_dict()["matmul_precision"] == "highest"
    assert not report.reduced_matmuls


def test_matmul_precision_is_passed_on_and_none_keeps_the_global_setting():
    seen, report = _precision_seen(matmul_precision="tensorfloat32")
    assert seen == {"tensorfloat32"}
    before = jax.config.jax_default_matmul_precision
    with jax.default_matmul_precision("float32"):
        seen, report = _precision_seen(matmul_precision=None)
    assert seen == {"float32"}
    assert report.matmul_precision is None
    # The global setting is back as it was after the check.
    assert jax.config.jax_default_matmul_precision == before


def test_highest_precision_reaches_the_compiled_dot():
    f = jax.jit(lambda w: jnp.sum(jnp.tanh(w @ w)))
    seen_text = []

    def g(w):
        seen_text.append(f.lower(w).as_text())
        return f(w)

    check_grads(g, jnp.eye(3) / 2)
    assert seen_text and all("HIGHEST" in text for text in seen_text)


def test_unknown_matmul_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="matmul_precision 'fast'"):
        check_grads(jnp.sin, jnp.ones(3), matmul_precision="fast")


def test_reduced_default_is_noted_where_the_platform_rounds_float32_matmuls(monkeypatch):
    from gradkit import _gradcheck

    # Where the platform's default is reduced (a GPU or a TPU), the note says so.
    monkeypatch.setattr(_gradcheck.jax, "default_backend", lambda: "gpu")
    with jax.default_matmul_precision(None):
        assert _gradcheck._reduced_matmul_default("float32")
        assert not _gradcheck._reduced_matmul_default("float64")
    with jax.default_matmul_precision("highest"):
        assert not _gradcheck._reduced_matmul_default("float32")
    monkeypatch.undo()
    if jax.default_backend() == "cpu":
        assert not _gradcheck._reduced_matmul_default("float32")
    monkeypatch.setattr(_gradcheck, "_reduced_matmul_default", lambda dtype: dtype == "float32")
    _, report = _precision_seen(matmul_precision=None)
    assert report.reduced_matmuls and "TF32" in str(report)
    _, report = _precision_seen()
    assert not report.reduced_matmuls and "TF32" not in str(report)


# -- second derivatives next to large first derivatives --------------------------------------


def _steep_tanh(wrong_curvature: float):
    """tanh(10 x) whose JVP rule is 10 sech2(10 x), with sech2's own JVP rule off by
    ``wrong_curvature`` (0: right): right at first order, wrong at second unless 0."""

    @jax.custom_jvp
    def sech2(u):
        return 1.0 - jnp.tanh(u) ** 2

    @sech2.defjvp
    def sech2_jvp(primals, tangents):
        (u,), (du,) = primals, tangents
        y = sech2(u)
        return y, (-2.0 * jnp.tanh(u) * y + wrong_curvature) * du

    @jax.custom_jvp
    def f(x):
        return jnp.tanh(10.0 * x)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), 10.0 * sech2(10.0 * x) * t

    return f


def test_a_zero_second_derivative_next_to_a_large_first_one_passes():
    # The compiled second derivative cancels terms of size |f'| ~ 10: its float32 rounding
    # (~1e-6) once failed against the tolerance of a second derivative of 0.
    report = check_grads(lambda x: jnp.tanh(10.0 * x), jnp.zeros(3), order=2)
    assert report.verdict == "pass", str(report)
    assert any("autodiff's own rounding" in row.note for row in report.rows if row.order == 2)
    assert check_grads(_steep_tanh(0.0), jnp.zeros(3), order=2).verdict == "pass"


def test_a_wrong_second_derivative_at_that_point_still_fails():
    report = check_grads(_steep_tanh(5.0), jnp.zeros(3), order=2)
    assert report.verdict == "fail", str(report)
    assert all(row.verdict == "pass" for row in report.rows if row.order == 1), str(report)
    assert any(row.verdict == "fail" for row in report.rows if row.order == 2), str(report)
    # Also when the error is 1e-4 of the first derivative's size (rounding there: ~1e-6).
    assert check_grads(_steep_tanh(1e-4), jnp.zeros(3), order=2).verdict == "fail"
