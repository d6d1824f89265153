"""Tests for gradkit.derivatives.expression and its jaxpr-to-sympy interpreter."""

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy
from jax import enable_x64

from gradkit import _symbolic
from gradkit.derivatives import expression


def polynomial(x):
    return x**2 + x**3 + x**4


def logistic_by_hand(x):
    return 1 / (1 + jnp.exp(-x))


# --------------------------------------------------------------------------------------------
# Seed 003: reading the derivative


def test_gradient_of_polynomial_reads_like_the_textbook():
    assert str(expression(jax.grad(polynomial), 1.0)) == "4*x**3 + 3*x**2 + 2*x"
    assert str(expression(polynomial, 1.0)) == "x**4 + x**3 + x**2"


def test_gradient_of_logistic_is_sigmoid_times_one_minus_sigmoid():
    x = sympy.Symbol("x", real=True)
    s = _symbolic.sigmoid(x)
    for f in (jax.nn.sigmoid, logistic_by_hand):
        formula = expression(jax.grad(f), 1.0)
        assert str(formula) == "(1 - sigmoid(x))*sigmoid(x)"
        assert sympy.simplify((formula.sympy - s * (1 - s)).rewrite(sympy.exp)) == 0
        # Theano printed sigmoid(-x)*sigmoid(x): the same function.
        theano = _symbolic.sigmoid(-x) * s
        assert sympy.simplify((formula.sympy - theano).rewrite(sympy.exp)) == 0
        for point in (-3.0, -0.5, 0.0, 1.7):
            np.testing.assert_allclose(formula.evaluate(point), jax.grad(f)(point), rtol=1e-6)


def test_sigmoid_function_derivative_and_values():
    x = sympy.Symbol("x", real=True)
    s = _symbolic.sigmoid(x)
    assert sympy.diff(s, x) == s * (1 - s)
    assert _symbolic.sigmoid(0) == sympy.Rational(1, 2)
    assert s.rewrite(sympy.exp) == 1 / (1 + sympy.exp(-x))
    assert float(_symbolic.sigmoid(sympy.Float(0.3)).evalf()) == pytest.approx(
        1 / (1 + np.exp(-0.3)), rel=1e-15
    )
    assert float(s.subs(x, 2.0).evalf()) == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-15)


# --------------------------------------------------------------------------------------------
# Every rule against jax's own numbers


@jax.custom_vjp
def _sin_with_custom_vjp(x):
    return jnp.sin(x)


_sin_with_custom_vjp.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


def _scan_polynomial(x):
    def step(carry, t):
        return carry * x + t, carry

    return jax.lax.scan(step, x, jnp.arange(1.0, 4.0))


def _cond(x):
    return jax.lax.cond(x > 0.5, jnp.sin, jnp.cos, x)


CASES = {
    "grad polynomial": (jax.grad(polynomial), (1.3,)),
    "trigonometric": (lambda x: jnp.sin(x) * jnp.cos(x) + jnp.tan(x / 3), (0.7,)),
    "inverse and hyperbolic": (
        lambda x: jnp.tanh(x) + jnp.arcsinh(x) + jnp.arctan(x) + jnp.sinh(x) * jnp.cosh(x),
        (0.4,),
    ),
    "arcsin arccos arctanh": (
        lambda x: jnp.arcsin(x) * jnp.arccos(x) + jnp.arctanh(x) + jnp.arccosh(x + 2),
        (0.3,),
    ),
    "exp and log": (
        lambda x: jnp.log1p(x) + jnp.expm1(x) + jnp.exp2(x) + jnp.log(x) * jnp.exp(-x),
        (1.6,),
    ),
    "roots": (lambda x: jnp.sqrt(x) + jax.lax.rsqrt(x) + jnp.cbrt(x - 2) + jnp.square(x), (1.5,)),
    "grad roots": (jax.grad(lambda x: jnp.sqrt(x) * jnp.log(x) + jax.lax.rsqrt(x)), (2.5,)),
    "logistic": (jax.nn.sigmoid, (0.8,)),
    "softplus": (jax.nn.softplus, (-0.6,)),
    "grad softplus": (jax.grad(jax.nn.softplus), (0.9,)),
    "gelu": (jax.nn.gelu, (0.9,)),
    "grad gelu": (jax.grad(jax.nn.gelu), (-0.4,)),
    "grad relu positive": (jax.grad(jax.nn.relu), (0.9,)),
    "grad relu negative": (jax.grad(jax.nn.relu), (-0.9,)),
    "leaky where": (lambda x: jnp.where(x > 0, x, 0.1 * x), (-2.0,)),
    "abs sign max min": (
        lambda x, y: jnp.maximum(x, y) * jnp.minimum(x, 2 * y) + jnp.abs(x) * jnp.sign(y),
        (-0.3, 0.8),
    ),
    "clip inside": (lambda x: jnp.clip(x, -1.0, 1.0) * x, (0.5,)),
    "clip outside": (lambda x: jnp.clip(x, -1.0, 1.0) * x, (3.0,)),
    "pow": (lambda x, y: x**y, (1.7, 2.3)),
    "grad pow": (jax.grad(lambda x, y: x**y, argnums=(0, 1)), (1.7, 2.3)),
    "arctan2 and division": (lambda x, y: jnp.arctan2(x, y) + x / y, (0.4, -1.1)),
    "erf": (lambda x: jax.scipy.special.erf(x) + jax.scipy.special.erfc(x / 2), (0.3,)),
    "matrix product": (
        lambda x, W: jnp.tanh(x @ W),
        (jnp.array([0.3, -0.2]), jnp.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])),
    ),
    "grad matrix": (
        jax.grad(lambda x, W: jnp.sum(jnp.tanh(x @ W) ** 2), argnums=1),
        (jnp.array([0.3, -0.2]), jnp.array([[0.5, -1.0], [1.5, 0.25]])),
    ),
    "batched matmul": (
        lambda a, b: jnp.einsum("bij,bjk->bik", a, b),
        (jnp.arange(8.0).reshape(2, 2, 2) / 7, jnp.arange(8.0).reshape(2, 2, 2)[::-1] / 5),
    ),
    "reductions": (
        lambda x: jnp.mean(x**2) + jnp.max(x) * jnp.min(x) + jnp.prod(x),
        (jnp.array([0.5, -1.5, 2.0]),),
    ),
    "reshape transpose": (
        lambda x: (x.reshape(2, 2).T @ x.reshape(2, 2)).sum(axis=0),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "slices concat rev pad": (
        lambda x: jnp.concatenate([x[1:], x[:1] * 2, x[::-1], jnp.pad(x[::2], (1, 2))]),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "cumsum and cumprod": (
        lambda x: jnp.cumsum(x) + jnp.cumprod(x[::-1]),
        (jnp.array([1.0, -2.0, 0.5]),),
    ),
    "static dynamic slice": (
        lambda x: jax.lax.dynamic_slice(x, (1,), (2,)) * 2,
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "dynamic update slice": (
        lambda x: jax.lax.dynamic_update_slice(x, x[:2] ** 2, (2,)),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "split and expand": (
        lambda x: jnp.split(x, 2)[1] * jnp.expand_dims(x[:2], 0),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "cond true": (_cond, (0.9,)),
    "cond false": (_cond, (0.1,)),
    "grad cond": (jax.grad(_cond), (0.9,)),
    "scan": (_scan_polynomial, (0.7,)),
    "grad scan": (jax.grad(lambda x: _scan_polynomial(x)[0]), (0.7,)),
    "custom vjp": (jax.grad(lambda x: _sin_with_custom_vjp(x) ** 2), (0.6,)),
    "stop gradient": (lambda x: jax.lax.stop_gradient(x) * x**2, (1.2,)),
    "conversions": (
        lambda x: (x > 0).astype(jnp.float32) * x + x.astype(jnp.int32) + jnp.logical_not(x < 0),
        (-2.7,),
    ),
    "logical": (
        lambda x, y: jnp.where((x > 0) & (y > 0) | (x > 2), x * y, x + y),
        (1.5, -0.5),
    ),
    "jit inside": (jax.jit(lambda x: jnp.sin(x) ** 2), (0.3,)),
    "pytree argument": (
        lambda p: p["w"] * jnp.sum(p["b"] ** 2),
        ({"w": 1.5, "b": jnp.array([0.5, -1.0])},),
    ),
    "pytree output": (lambda x: {"s": jnp.sin(x), "pair": (x, x**2)}, (0.4,)),
    "iota": (lambda x: x * jnp.arange(3.0), (0.5,)),
    "gather at constant indices": (
        lambda x: x[jnp.array([2, 0, 2])] * x[jnp.array([[0], [3]])].sum(),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "grad of a gather is a scatter-add": (
        jax.grad(lambda x: jnp.sum(x[jnp.array([0, 2, 2])] ** 2)),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "take along axis and its grad": (
        lambda x: (
            jnp.take_along_axis(x.reshape(2, 2), jnp.array([[1], [0]]), axis=1),
            jax.grad(
                lambda v: jnp.sum(jnp.take_along_axis(v.reshape(2, 2), jnp.array([[1]]), 1) ** 3)
            )(x),
        ),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "scatters": (
        lambda x: (
            x.at[jnp.array([0, 2])].set(x[1] ** 2)
            + x.at[jnp.array([1, 1])].multiply(x[0])
            + x.at[jnp.array([0])].min(-x[2])
            + x.at[jnp.array([2])].max(x[0])
            + x.at[jnp.array([3, 3, 0])].add(jnp.array([1.0, -x[0], x[3]]))
            + x.at[1].subtract(x[2])
        ),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "out-of-bounds index modes": (
        lambda x: jnp.stack(
            [
                x.at[5].get(mode="fill", fill_value=-1.5),
                x.at[-9].get(mode="clip"),
                x.at[jnp.array([9])].get(mode="clip")[0],
                x.at[jnp.array([7, 1])].add(x[0], mode="drop")[1],
            ]
        ),
        (jnp.array([1.0, -2.0, 0.5, 3.0]),),
    ),
    "round half to even and away from zero": (
        lambda x: jnp.round(x * 1.25) * x + jax.lax.round(x * 1.25) + jnp.round(x, 1),
        (jnp.array([2.0, -2.0, 0.4, -0.6]),),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_formula_evaluates_to_the_functions_value(name):
    f, args = CASES[name]
    formula = expression(f, *args)
    with enable_x64():
        args64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=jnp.float64), args)
        reference = f(*args64)
    got = formula.evaluate(*args)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(reference)
    for value, expected in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference), strict=True
    ):
        np.testing.assert_allclose(value, np.asarray(expected, dtype=np.float64), rtol=2e-6)


# --------------------------------------------------------------------------------------------
# How formulas read


def test_exact_strings():
    assert str(expression(jax.grad(jax.nn.relu), 1.0)) == "Piecewise((1, x > 0), (0, True))"
    assert str(expression(jax.nn.relu, 1.0)) == "Max(0, x)"
    assert (
        str(expression(lambda x, W: x @ W, jnp.ones(2), jnp.ones((2, 2))))
        == "[W[0, 0]*x[0] + W[1, 0]*x[1], W[0, 1]*x[0] + W[1, 1]*x[1]]"
    )
    assert str(expression(jax.grad(lambda x, y: x**2 + y**2, (0, 1)), 1.0, 1.0)) == "(2*x, 2*y)"
    assert str(expression(lambda x: jnp.where(x > 0, x, 0.1 * x), 1.0)) == (
        "Piecewise((x, x > 0), (x/10, True))"
    )
    assert str(expression(jax.hessian(lambda x: jnp.sum(x**3)), jnp.ones(2))) == (
        "[[6*x[0], 0], [0, 6*x[1]]]"
    )
    assert str(expression(lambda x: jax.lax.cond(x > 0, jnp.sin, jnp.cos, x), 1.0)) == (
        "Piecewise((cos(x), x <= 0), (sin(x), True))"
    )


def test_simplify_false_keeps_the_traced_form():
    def f(x):
        return x * (x + 1)

    assert str(expression(f, 1.0, simplify=False)) == "x*(x + 1)"
    assert str(expression(f, 1.0)) == "x**2 + x"


def test_constants_are_written_as_a_person_would():
    assert str(expression(lambda x: 0.5 * x, 1.0)) == "x/2"
    assert str(expression(lambda x: x / 3.0, 1.0)) == "x/3"
    assert str(expression(lambda x: 0.044715 * x, 1.0)) == "0.044715*x"
    assert str(expression(lambda x: x + 2.0, 1.0)) == "x + 2"
    assert str(expression(lambda x: x * jnp.inf, 1.0)) == "oo*x"
    with enable_x64():
        assert str(expression(lambda x: x * np.pi, jnp.float64(1.0))) == "3.141592653589793*x"


@pytest.mark.parametrize("constant", [0.007, 0.0123, 1.5e-5, 1e-30, 1e30, 0.044715, 3e8])
def test_constants_print_short_and_evaluate_to_their_value(constant):
    # Short decimals are shown as written but keep the float32 value: evaluating the formula
    # reproduces the function's output to float32 precision.
    formula = expression(lambda x: constant * x, 1.0)
    shown = str(formula).removesuffix("*x")
    assert float(shown) == pytest.approx(constant, rel=1e-12), shown
    assert len(shown.replace("e+", "e").replace("e-", "e")) <= len(repr(constant)) + 2, shown
    np.testing.assert_allclose(formula.evaluate(1.0), np.float32(constant), rtol=1e-7)


def test_constants_are_not_padded_with_zeros_anywhere():
    assert str(expression(jax.grad(lambda x: 0.007 * x), 1.0)) == "0.007"
    assert str(expression(lambda x: (0.007, x), 1.0)) == "(0.007, x)"
    assert str(expression(lambda x: (0.007 * x,), 1.0)) == "(0.007*x,)"
    assert str(expression(lambda x: {"a": [x, 0.007]}, 1.0)) == "{'a': [x, 0.007]}"
    # bfloat16 constants are shown with the shortest decimal that rounds to them in bfloat16.
    assert str(expression(lambda x: 0.007 * x, jnp.bfloat16(1.0))) == "0.007*x"
    assert str(expression(lambda x: 1e30 * x, 1.0)) == "1.0e+30*x"  # not 1000000015047466...


def test_variable_names():
    def f(weight, bias):
        return weight * bias

    assert str(expression(f, 1.0, 2.0)) == "bias*weight"
    assert set(expression(f, 1.0, 2.0).variables) == {"weight", "bias"}
    assert str(expression(lambda *args: args[0] - args[1], 1.0, 2.0)) == "x0 - x1"
    assert str(expression(f, 1.0, 2.0, names=["a", "b"])) == "a*b"
    assert str(expression(functools.partial(f, 3.0), 2.0)) == "3*bias"
    pytree = expression(lambda p: p["w"] * p["b"][1], {"w": 1.0, "b": jnp.ones(2)})
    assert list(pytree.variables) == ["p['b'][0]", "p['b'][1]", "p['w']"]
    assert str(pytree) == "p['b'][1]*p['w']"
    with pytest.raises(ValueError, match="names must be 2 non-empty strings"):
        expression(f, 1.0, 2.0, names=["a"])


def test_symbols_are_real_and_integer_inputs_are_integers():
    formula = expression(lambda x, n: x * n, 1.0, 2)
    assert formula.variables["x"].is_real
    assert formula.variables["n"].is_integer
    # Real symbols let sympy simplify sqrt(x**2) to |x|.
    assert str(expression(lambda x: jnp.sqrt(x**2), 1.0)) == "Abs(x)"


def test_latex():
    formula = expression(jax.grad(jax.nn.sigmoid), 1.0)
    assert formula._repr_latex_().startswith("$")
    assert r"\sigma\left(x\right)" in formula.latex()
    matrix = expression(lambda x: 2 * x, jnp.ones(2))
    assert "x_{0}" in matrix.latex()
    assert "x_{1}" in matrix.latex()


def test_evaluate_checks_the_number_of_inputs():
    formula = expression(lambda x: 2 * x, jnp.ones(2))
    with pytest.raises(ValueError, match=r"has 2 input element\(s\) \(x\[0\], x\[1\]\), got 3"):
        formula.evaluate(jnp.ones(3))


def test_repr():
    assert repr(expression(jax.grad(polynomial), 1.0)) == "Expression(4*x**3 + 3*x**2 + 2*x)"


# --------------------------------------------------------------------------------------------
# What it cannot do, said clearly


def test_unsupported_primitive_names_it_and_the_source_line():
    def uses_sort(x):
        return jnp.sort(x) * x

    with pytest.raises(NotImplementedError, match="primitive 'sort'") as info:
        expression(uses_sort, jnp.ones(3))
    assert "test_symbolic.py" in str(info.value)
    assert "uses_sort" in str(info.value)
    assert isinstance(info.value, _symbolic.UnsupportedPrimitiveError)


def test_unused_forward_values_need_no_rule():
    # The gradient's jaxpr computes sort's forward value and drops it; only live equations run.
    def f(x):
        return jnp.sum(x**2) + jax.lax.stop_gradient(jnp.sort(x)[0])

    assert str(expression(jax.grad(f), jnp.ones(2))) == "[2*x[0], 2*x[1]]"


def test_long_scan_is_refused():
    def f(x):
        return jax.lax.scan(lambda c, _: (c * x, None), x, None, length=100)[0]

    with pytest.raises(NotImplementedError, match="scan of length 100"):
        expression(f, 1.0)


def test_large_arrays_are_refused():
    with pytest.raises(ValueError, match=r"argument x has shape \(2000,\)"):
        expression(lambda x: jnp.sum(x), jnp.ones(2000))
    with pytest.raises(ValueError, match="broadcast_in_dim makes an array of shape"):
        expression(lambda x: jnp.sum(jnp.broadcast_to(x, (50, 50))), 1.0)


def test_missing_sympy_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sympy", None)
    monkeypatch.delitem(sys.modules, "gradkit._symbolic")
    with pytest.raises(ImportError, match=re.escape('pip install "gradkit[symbolic]"')):
        expression(polynomial, 1.0)


def test_closure_constants_are_read_and_large_ones_refused():
    W = jnp.array([[1.0, 2.0], [3.0, 0.5]])
    assert str(expression(lambda x: W @ x, jnp.ones(2))) == "[x[0] + 2*x[1], 3*x[0] + x[1]/2]"
    big = jnp.linspace(0.0, 1.0, 5000)
    with pytest.raises(ValueError, match=r"uses a constant of shape \(5000,\)"):
        expression(lambda x: jnp.sum(x * big), 1.0)


def test_expression_type_is_exported_lazily():
    from gradkit import derivatives

    assert derivatives.Expression is _symbolic.Expression
    assert isinstance(expression(polynomial, 1.0), derivatives.Expression)
    with pytest.raises(AttributeError, match="no attribute 'Expresion'"):
        derivatives.Expresion  # noqa: B018


# --------------------------------------------------------------------------------------------
# Values a formula must not get wrong, and programs it must read


def test_integer_bitwise_operations_are_refused_not_read_as_logic():
    # n & 2 is 2 for n = 3; read as a logical and it would be 1 and the formula x*(n & 2) wrong.
    for f, args in [
        (lambda x, n: x * (n & 2), (1.0, 3)),
        (lambda x, n: x * (n | 4), (1.0, 3)),
        (lambda x, n: x * (n ^ 1), (1.0, 3)),
        (lambda n: ~n, (3,)),
    ]:
        with pytest.raises(NotImplementedError, match="bitwise"):
            expression(f, *args)
    # Logical operations on booleans still have their rules.
    formula = expression(lambda x, y: jnp.where((x > 0) & ~(y > 0), x, y), 1.0, 2.0)
    assert formula.evaluate(1.0, -1.0) == 1.0
    assert formula.evaluate(1.0, 2.0) == 2.0


def test_checkpointed_functions_are_read_through():
    def f(x):
        return jnp.sin(x) * x

    assert str(expression(jax.checkpoint(f), 1.0)) == "x*sin(x)"
    assert str(expression(jax.grad(jax.checkpoint(f)), 1.0)) == "x*cos(x) + sin(x)"


def test_isfinite_of_a_formula_that_can_be_infinite_is_kept():
    def safe_log(x):
        return jnp.where(jnp.isfinite(jnp.log(x)), jnp.log(x), 0.0)

    formula = expression(safe_log, 1.0)
    assert "isfinite(log(x))" in str(formula)
    for x in (0.0, -1.0, 2.0):
        np.testing.assert_allclose(formula.evaluate(x), safe_log(x), rtol=1e-6)
    # Where the formula is finite for every finite input the check is true (logsumexp's check
    # of its maximum), so the formula stays readable.
    assert str(expression(jax.nn.logsumexp, jnp.ones(2))) == "log(exp(a[0]) + exp(a[1]))"
    assert str(expression(lambda x: jnp.where(jnp.isfinite(x * x + 1), x, 0.0), 1.0)) == "x"
    assert str(expression(lambda x: jnp.where(jnp.isfinite(x + jnp.pi), x, 0.0), 1.0)) == "x"
    # exp overflows in floating point: its guard is kept.
    guarded = expression(lambda x: jnp.where(jnp.isfinite(jnp.exp(x)), jnp.exp(x), 0.0), 1.0)
    assert "isfinite(exp(x))" in str(guarded)


def test_isfinite_inside_a_logical_condition_is_kept():
    # sympy's logic simplification would read log(x) as a truth-table variable and drop the test.
    def f(x):
        return jnp.where(jnp.isfinite(jnp.log(x)) & (x > 1), x, 0.0)

    formula = expression(f, 1.0)
    assert "isfinite(log(x))" in str(formula)
    for x in (0.0, 0.5, 2.0):
        assert formula.evaluate(x) == f(x)


def test_evaluate_falls_back_to_float64_through_isfinite_and_booleans():
    # At x = 0 sympy has no real value (zoo); NumPy's float64 arithmetic gives JAX's answer,
    # also through an isfinite() condition and a boolean argument.
    def f(x):
        return jnp.where(jnp.isfinite(jnp.log(x)), jnp.log(x), 0.0) + 1 / x

    assert expression(f, 1.0).evaluate(0.0) == np.inf
    np.testing.assert_allclose(expression(f, 1.0).evaluate(2.0), np.log(2.0) + 0.5)
    chosen = expression(lambda x, b: jnp.where(b, jnp.log(x), 0.0), 1.0, True)
    assert chosen.evaluate(0.0, True) == -np.inf
    assert chosen.evaluate(0.0, False) == 0.0


@pytest.mark.parametrize(
    ("f", "x"),
    [(jnp.log, 0.0), (jnp.log, -1.0), (jnp.sqrt, -1.0), (lambda x: 1 / x, 0.0)],
)
def test_evaluate_gives_jax_infinities_and_nans(f, x):
    with enable_x64():
        want = f(jnp.float64(x))
    got = expression(f, 1.0).evaluate(x)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_evaluate_takes_boolean_arguments():
    formula = expression(lambda x, b: jnp.where(b, x, -x), 1.0, True)
    assert formula.evaluate(2.0, True) == 2.0
    assert formula.evaluate(2.0, False) == -2.0


@pytest.mark.parametrize(
    ("constant", "shown"), [(0.3, "3*x/10"), (0.9, "9*x/10"), (1.7, "17*x/10"), (0.15, "3*x/20")]
)
def test_bfloat16_constants_are_the_simplest_fraction_that_rounds_to_them(constant, shown):
    # bfloat16's 0.3 is also 28/93 to its 8 bits; the author wrote 3/10.
    assert str(expression(lambda x: jnp.bfloat16(constant) * x, jnp.bfloat16(1.0))) == shown
    assert str(expression(lambda x: constant * x, 1.0)) == shown


@pytest.mark.parametrize(
    ("constant", "dtype", "shown"),
    [
        (1.23, jnp.bfloat16, "1.23*x"),
        (12345.678, jnp.float32, "12345.678*x"),
        (-0.75, None, "-3*x/4"),
    ],
)
def test_decimals_that_only_happen_to_round_to_a_fraction_stay_decimals(constant, dtype, shown):
    # bfloat16's 1.23 is also 27/22, float32's 12345.678 also 382716/31: the constant's spacing
    # is too coarse to tell those fractions from their neighbours.
    if dtype is None:
        assert str(expression(lambda x: constant * x, 1.0)) == shown
    else:
        assert str(expression(lambda x: dtype(constant) * x, dtype(1.0))) == shown


def test_repeated_names_are_refused():
    with pytest.raises(ValueError, match="'a' given twice"):
        expression(lambda x, y: x - y, 1.0, 2.0, names=["a", "a"])


def test_debug_prints_are_not_part_of_the_formula():
    def f(x):
        jax.debug.print("x = {}", x)
        return 2 * x

    assert str(expression(f, 1.0)) == "2*x"
    # Also inside a jit, whose call then has the print's effect and no output used.
    printed = jax.jit(f)
    assert str(expression(lambda x: printed(x) + 1, 1.0)) == "2*x + 1"

    def prints_in_a_loop(x):
        def body(carry, step):
            jax.debug.print("{}", step)
            return carry, None

        jax.lax.scan(body, x, jnp.arange(100.0))  # too long to unroll: must not be read
        return 3 * x

    assert str(expression(prints_in_a_loop, 1.0)) == "3*x"


def test_large_formulas_skip_sympy_simplify(monkeypatch):
    # A 4x4 tanh layer's gradient took minutes in sympy.simplify; above the operation budget the
    # formula keeps its traced (or sigmoid) form and is still correct.
    def loss(W, x):
        return jnp.sum(jnp.tanh(W @ x) ** 2)

    W, x = np.linspace(-1, 1, 16).reshape(4, 4), np.linspace(0.5, -0.5, 4)
    real_simplify = sympy.simplify
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return real_simplify(*args, **kwargs)

    monkeypatch.setattr(sympy, "simplify", counted)
    formula = expression(jax.grad(loss), jnp.ones((4, 4)), jnp.ones(4))
    assert calls == []
    size = sum(sympy.count_ops(e) for e in sympy.flatten(formula.sympy.tolist()))
    assert size > _symbolic.SIMPLIFY_MAX_OPS
    with enable_x64():
        want = jax.grad(loss)(jnp.asarray(W), jnp.asarray(x))
    np.testing.assert_allclose(formula.evaluate(W, x), want, rtol=1e-12)
    # Small formulas are still simplified.
    small = jax.grad(lambda x: jnp.tanh(x) ** 2)
    assert str(expression(small, 1.0, simplify=False)) == (
        "2*(1 - tanh(x))*tanh(x)**2 + 2*(1 - tanh(x))*tanh(x)"
    )
    assert str(expression(small, 1.0)) == "2*tanh(x)/cosh(x)**2"
    assert len(calls) == 1


def test_a_nan_or_inf_guard_is_refused_not_dropped_from_the_formula():
    # sympy folds u != u and |u| == oo to False: the formula read sqrt(x), NaN at -1 where the
    # function gives 0.
    guarded = [
        lambda x: jnp.where(jnp.isnan(jnp.sqrt(x)), 0.0, jnp.sqrt(x)),
        lambda x: jnp.nan_to_num(jnp.log(x)),
        lambda x: jnp.where(jnp.isinf(jnp.log(x)), 0.0, x),
    ]
    for f in guarded:
        with pytest.raises(
            _symbolic.UnsupportedPrimitiveError, match="exact arithmetic but not for every"
        ):
            expression(f, 0.5)
    # jax's own NaN passthroughs test inputs (softplus: isnan(x)): those fold, as before.
    assert str(expression(jax.nn.softplus, 0.5)) == "log(exp(x) + 1)" or expression(
        jax.nn.softplus, 0.5
    ).evaluate(0.5) == pytest.approx(float(jax.nn.softplus(0.5)))
    # A comparison that depends on the variable stays a condition.
    e = expression(lambda x: jnp.where(x == 2.0, 1.0, x), 1.0)
    assert [float(e.evaluate(v)) for v in (2.0, 3.0)] == [1.0, 3.0]


def test_complex_infinity_folded_while_tracing_evaluates_to_nan():
    for f in (lambda x: x / (x - x), lambda x: jnp.log(x - x)):
        assert np.isnan(expression(f, 2.0).evaluate(2.0))


def test_stack_and_remainders_have_formulas_that_evaluate_like_the_function():
    # jnp.stack is its own primitive; % and fmod use XLA's rem (the dividend's sign). Both
    # had no rule ("primitive 'stack' has no symbolic rule").
    points = [-3.5, -2.0, -0.5, 0.0, 0.5, 3.5, 4.0]
    functions = [
        lambda x: jnp.stack([x, x**2]),
        lambda x: x % 2.0,
        lambda x: jnp.fmod(x, 2.0),
        lambda x: jnp.remainder(x, -1.5),
    ]
    for f in functions:
        e = expression(f, 1.0)
        for point in points:
            np.testing.assert_allclose(e.evaluate(point), f(point), atol=1e-6)
    assert str(expression(lambda x: jnp.stack([x, x**2]), 2.0)) == "[x, x**2]"


def test_gathers_at_an_integer_input_are_a_piecewise_over_its_values():
    # x[i], and the integer-label cross-entropy (take_along_axis): no rule for 'gather' or a
    # dynamic_slice at a traced index before; now one formula for every label, with JAX's value
    # for labels out of bounds (NaN from the fill mode; the gradient then drops the label).
    x = jnp.array([1.0, -2.0, 0.5, 3.0])

    def pick(x, i):
        return x[i] * 2

    formula = expression(pick, x, 1)
    assert formula.variables["i"].is_integer
    assert "Piecewise" in str(formula)
    for i in (-7, -5, -4, -1, 0, 1, 3, 4, 9):
        np.testing.assert_allclose(formula.evaluate(x, i), pick(x, i))
        np.testing.assert_allclose(
            expression(jax.grad(pick), x, 1).evaluate(x, i), jax.grad(pick)(x, i)
        )

    optax = pytest.importorskip("optax")

    def loss(z, label):
        return optax.softmax_cross_entropy_with_integer_labels(z, label)

    z = jnp.array([0.5, -1.0, 2.0])
    value, grad = expression(loss, z, 0), expression(jax.grad(loss), z, 0)
    for label in (-4, -3, -1, 0, 1, 2, 3, 7):
        with enable_x64():
            z64 = z.astype(jnp.float64)
            expected, expected_grad = loss(z64, label), jax.grad(loss)(z64, label)
        np.testing.assert_allclose(value.evaluate(z, label), expected, rtol=1e-12)
        np.testing.assert_allclose(grad.evaluate(z, label), expected_grad, rtol=1e-12)
    assert np.isnan(value.evaluate(z, 3))
    assert str(expression(lambda x: x[jnp.array([2, 0])], jnp.ones(3))) == "[x[2], x[0]]"


@pytest.mark.parametrize(
    "f",
    [
        lambda x, i: x[i + 100],  # in bounds only for i in -104..-97
        lambda x, i: x[jnp.array([i - 7, 2 * i + 1, 3 - i])],
        lambda x, i: x[jnp.clip(i, 1, 2)] + x[jnp.abs(i)] * x[jnp.maximum(i, 2) - 1],
        lambda x, i: jnp.take(x, i, mode="clip"),
        lambda x, i: jnp.take(x, i - 2, mode="fill", fill_value=-1.0),
        lambda x, i: x.at[jnp.array([i, i + 1])].add(jnp.array([1.0, 2.0])),
    ],
)
def test_piecewise_linear_indices_are_right_for_every_integer(f):
    # Offsets, slopes, clamps and wrapping: the formula is checked far beyond the bounds too.
    x = jnp.array([1.0, -2.0, 0.5, 3.0])
    formula = expression(f, x, 0)
    for i in [*range(-106, -95), *range(-12, 12), -50, 50, -(10**6), 10**6]:
        np.testing.assert_allclose(formula.evaluate(x, i), f(x, i), err_msg=f"i = {i}")


def test_dynamic_update_slice_at_an_integer_input():
    x = jnp.array([1.0, -2.0, 0.5, 3.0])

    def put(x, i):
        return jax.lax.dynamic_update_slice(x, x[:2] ** 2, (i,))

    formula = expression(put, x, 0)
    for i in (-3, 0, 1, 2, 3, 6):
        np.testing.assert_allclose(formula.evaluate(x, i), put(x, i))


def test_indices_that_no_formula_covers_are_refused_with_the_reason():
    x = jnp.ones(4)
    with pytest.raises(_symbolic.UnsupportedPrimitiveError, match="depend on i, j"):
        expression(lambda x, i, j: x.reshape(2, 2)[i, j], x, 0, 1)
    # Wrapping around, or a square: the element taken changes again and again with i.
    for index in (lambda i: i % 4, lambda i: i * i, lambda i: i // 2):
        with pytest.raises(_symbolic.UnsupportedPrimitiveError, match="not piecewise-linear in i"):
            expression(lambda x, i, index=index: x[jnp.array([index(i)])], x, 0)
    # A float input turned into an index takes non-integer values too.
    with pytest.raises(_symbolic.UnsupportedPrimitiveError, match="single integer input"):
        expression(lambda x, t: x[jnp.array([t.astype(jnp.int32)])], x, 1.5)


def test_rint_is_round_half_to_even_with_zero_derivative():
    t = sympy.Symbol("t", real=True)
    assert [_symbolic.rint(sympy.Rational(v, 2)) for v in (-5, -3, -1, 1, 3, 5)] == [
        -2,
        -2,
        0,
        0,
        2,
        2,
    ]
    assert _symbolic.rint(sympy.Float(2.6)) == 3
    assert sympy.diff(_symbolic.rint(t**2), t) == 0
    assert str(expression(lambda x: jnp.round(x), 1.0)) == "rint(x)"
    assert expression(jax.grad(lambda x: jnp.round(x) * x), 2.5).evaluate(2.5) == 2.0


def test_equality_of_booleans_is_equivalence_and_integer_remainders_read():
    # (x > 0) == (y > 0) compared booleans with sympy's Eq, and jnp's integer % and // (which
    # compare two sign tests) crashed inside sympy ("BooleanAtom not allowed in this context").
    def f(x, y):
        return jnp.where((x > 0) == (y > 0), x, y) + jnp.where((x > 0) != (y < 1), 1.0, 2.0)

    formula = expression(f, 1.0, 2.0)
    for x, y in ((1.0, 2.0), (-1.0, 2.0), (1.0, -2.0), (-1.0, 0.5)):
        np.testing.assert_allclose(formula.evaluate(x, y), f(x, y))
    remainder = expression(lambda i: i % 4, 1)
    floor_division = expression(lambda i: i // 3 + i // -2, 1)
    for i in (-5, -4, -1, 0, 3, 7):
        assert remainder.evaluate(i) == i % 4
        assert floor_division.evaluate(i) == i // 3 + i // -2
    halves = expression(lambda x: x // 2.0 + x // -1.5, 1.0)
    for x in (-3.5, -2.0, -0.5, 0.0, 2.5, 3.9):
        assert halves.evaluate(x) == x // 2.0 + x // -1.5


def test_boolean_arrays_indexed_at_an_integer_input_stay_truth_values():
    # A Piecewise of True and False read as a number: where(mask[i], x, 0) came out as "x".
    mask = jnp.array([True, False, True, False])
    functions = [
        lambda x, i: jnp.where(mask[i], x, 0.0),
        lambda x, i: mask[i] * x,
        lambda x, i: jnp.where(mask.at[i].get(mode="fill") & (x > 0), x, -x),
        lambda x, i: jnp.where(jnp.zeros(4, bool).at[i].set(True)[2], x, 2 * x),
        jax.grad(lambda x, i: jnp.where(mask[i], x * x, 0.0)),
    ]
    for f in functions:
        formula = expression(f, 1.0, 0)
        for i in (-7, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6):
            for x in (1.5, -2.0):
                np.testing.assert_allclose(formula.evaluate(x, i), f(x, i), err_msg=f"i = {i}")
