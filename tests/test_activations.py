"""Tests for gradkit.activations: values, derivative conventions, dtypes, masks and the registry."""

import doctest
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradkit.activations as activations
from gradkit.activations import get, with_surrogate_grad

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_erfc = np.vectorize(math.erfc)


def theano_ultra_fast_sigmoid(values):
    """Line-by-line transcription of Theano's UltraFastScalarSigmoid C code (double precision)."""
    out = []
    for v in np.asarray(values, dtype=np.float64).ravel():
        x = 0.5 * float(v)
        if x >= 0:
            if x < 1.7:
                z = 1.5 * x / (1 + x)
            elif x < 3:
                z = 0.935409070603099 + 0.0458812946797165 * (x - 1.7)
            else:
                z = 0.99505475368673
        else:
            xx = -x
            if xx < 1.7:
                z = 1.5 * xx / (1 + xx)
            elif xx < 3:
                z = 0.935409070603099 + 0.0458812946797165 * (xx - 1.7)
            else:
                z = 0.99505475368673
            z = -z
        out.append(0.5 * (z + 1.0))
    return np.asarray(out).reshape(np.shape(values))


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


# name -> (NumPy float64 reference, params, kinks (excluded from finite differences))
REFERENCES = {
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), {}, ()),
    "tanh": (np.tanh, {}, ()),
    "identity": (lambda x: x, {}, ()),
    "ultra_fast_sigmoid": (theano_ultra_fast_sigmoid, {}, (-6.0, -3.4, 3.4, 6.0)),
    "hard_sigmoid": (lambda x: np.clip(x / 6 + 0.5, 0, 1), {}, (-3.0, 3.0)),
    "hard_sigmoid_theano": (lambda x: np.clip(0.2 * x + 0.5, 0, 1), {"slope": 0.2}, (-2.5, 2.5)),
    "hard_tanh": (lambda x: np.clip(x, -1, 1), {}, (-1.0, 1.0)),
    "relu": (lambda x: np.maximum(x, 0), {}, (0.0,)),
    "relu6": (lambda x: np.minimum(np.maximum(x, 0), 6), {}, (0.0, 6.0)),
    "leaky_relu": (lambda x: np.where(x > 0, x, 0.01 * x), {}, (0.0,)),
    "elu": (lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))), {}, (0.0,)),
    "selu": (
        lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
        {},
        (0.0,),
    ),
    "gelu": (lambda x: 0.5 * x * _erfc(-x / np.sqrt(2)), {}, ()),
    "gelu_tanh": (
        lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
        {"approximate": True},
        (),
    ),
    "silu": (lambda x: x / (1 + np.exp(-x)), {}, ()),
    "mish": (lambda x: x * np.tanh(np.log1p(np.exp(x))), {}, ()),
    "softplus": (lambda x: np.log1p(np.exp(x)), {}, ()),
    "log_sigmoid": (lambda x: -np.log1p(np.exp(-x)), {}, ()),
    "softmax": (_np_softmax, {}, ()),
    "log_softmax": (lambda x: np.log(_np_softmax(x)), {}, ()),
}
CASES = sorted(REFERENCES)
ELEMENTWISE = [c for c in CASES if c not in ("softmax", "log_softmax")]

JAX_NN = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "hard_tanh": jax.nn.hard_tanh,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "mish": jax.nn.mish,
    "softplus": jax.nn.softplus,
    "log_sigmoid": jax.nn.log_sigmoid,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
}


def _activation(case):
    name = {"hard_sigmoid_theano": "hard_sigmoid", "gelu_tanh": "gelu"}.get(case, case)
    return get(name, **REFERENCES[case][1])


def _grid():
    return np.concatenate([np.linspace(-12.0, 12.0, 961), [-3.4, 3.4, -2.5, 2.5, 6.0]])


def _elementwise_grad(act):
    return jax.jit(jax.vmap(jax.grad(lambda x: act(x))))


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("case", CASES)
def test_values_match_numpy_reference_in_float64(case):
    reference, _, _ = REFERENCES[case]
    x = _grid().reshape(-1, 42) if case in ("softmax", "log_softmax") else _grid()
    with jax.enable_x64(True):
        got = jax.jit(lambda v: _activation(case)(v))(jnp.asarray(x, jnp.float64))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), reference(x), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("case", CASES)
def test_values_match_numpy_reference_in_float32(case):
    reference, _, _ = REFERENCES[case]
    x = _grid().reshape(-1, 42) if case in ("softmax", "log_softmax") else _grid()
    got = _activation(case)(jnp.asarray(x, jnp.float32))
    assert got.dtype == jnp.float32
    expected = reference(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", sorted(JAX_NN))
def test_values_match_jax_nn(case):
    x = jnp.asarray(_grid().reshape(-1, 42) if case in ("softmax", "log_softmax") else _grid())
    np.testing.assert_allclose(
        np.asarray(_activation(case)(x)), np.asarray(JAX_NN[case](x)), rtol=1e-6, atol=1e-6
    )


def test_ultra_fast_sigmoid_matches_a_transcription_of_theanos_c_code():
    x = np.concatenate([np.linspace(-8, 8, 4001), [0.0, -0.0, 3.4, -3.4, 6.0, -6.0, 1e-30]])
    with jax.enable_x64(True):
        got = np.asarray(activations.ultra_fast_sigmoid(jnp.asarray(x)))
    # Outputs near 0 are 0.5 (1 - z) with z near 1, so errors are measured in ulps of 1.
    np.testing.assert_allclose(got, theano_ultra_fast_sigmoid(x), rtol=0, atol=np.spacing(1.0))
    x32 = x.astype(np.float32)
    got32 = np.asarray(activations.ultra_fast_sigmoid(jnp.asarray(x32)))
    expected32 = theano_ultra_fast_sigmoid(x32).astype(np.float32)  # Theano's float32 output
    np.testing.assert_allclose(got32, expected32, rtol=0, atol=np.spacing(np.float32(1)))


def test_ultra_fast_sigmoid_jump_and_range_are_as_documented():
    with jax.enable_x64(True):
        below, at = activations.ultra_fast_sigmoid(jnp.asarray([3.4 - 1e-12, 3.4]))
        assert float(at - below) == pytest.approx(0.5 * (0.935409070603099 - 1.5 * 1.7 / 2.7))
        assert float(at - below) == pytest.approx(-0.0045, abs=1e-4)
        low, high = get("ultra_fast_sigmoid").output_range
        values = activations.ultra_fast_sigmoid(jnp.asarray([-1e6, -6.0, 6.0, 1e6]))
        np.testing.assert_allclose(np.asarray(values), [low, low, high, high], rtol=1e-15)
    assert math.isnan(float(activations.ultra_fast_sigmoid(jnp.nan)))  # NaN propagates
    # ... to the gradient too, while the infinities are in the flat region.
    x = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 0.0])
    grads = np.asarray(jax.vmap(jax.grad(activations.ultra_fast_sigmoid))(x))
    assert math.isnan(grads[0]) and list(grads[1:]) == [0.0, 0.0, 0.375]
    mask = get("ultra_fast_sigmoid").zero_grad_mask(x)
    np.testing.assert_array_equal(np.asarray(mask), [False, True, True, False])


@pytest.mark.parametrize("case", CASES)
def test_output_range_bounds_the_values(case):
    x = np.linspace(-50, 50, 20001)
    if case in ("softmax", "log_softmax"):
        x = x.reshape(-1, 3)
    with jax.enable_x64(True):
        values = np.asarray(_activation(case)(jnp.asarray(x)))
    low, high = _activation(case).output_range
    assert np.all(values >= low) and np.all(values <= high)


def test_numerically_stable_forms_stay_finite():
    assert float(activations.log_sigmoid(-200.0)) == -200.0
    assert float(activations.log_sigmoid(-88.0)) == -88.0
    assert float(jnp.log(activations.sigmoid(-88.0))) == -math.inf  # what it replaces
    assert float(activations.softplus(1000.0)) == 1000.0
    np.testing.assert_array_equal(
        np.asarray(activations.log_softmax(jnp.asarray([0.0, 200.0]))), [-200.0, 0.0]
    )
    g = jax.grad(lambda v: activations.log_softmax(v)[0])(jnp.asarray([0.0, 200.0]))
    np.testing.assert_array_equal(np.asarray(g), [1.0, -1.0])
    assert float(jax.grad(activations.log_sigmoid)(-200.0)) == 1.0
    assert float(jax.grad(activations.softplus)(1000.0)) == 1.0


def test_gelu_defaults_to_the_exact_form():
    x = jnp.linspace(-4.0, 4.0, 81)
    np.testing.assert_array_equal(
        np.asarray(activations.gelu(x)), np.asarray(activations.gelu(x, approximate=False))
    )
    assert np.max(np.abs(np.asarray(activations.gelu(x) - jax.nn.gelu(x)))) > 1e-4
    with pytest.raises(TypeError, match="approximate must be a Python bool"):
        activations.gelu(x, approximate="tanh")


def test_softmax_axes_and_errors():
    x = jnp.asarray(np.random.RandomState(0).randn(3, 4, 5), jnp.float32)
    for axis in (0, 1, -1, (0, 2)):
        np.testing.assert_allclose(
            np.asarray(activations.softmax(x, axis=axis)),
            np.asarray(jax.nn.softmax(x, axis=axis)),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            np.asarray(activations.log_softmax(x, axis=axis)),
            np.asarray(jax.nn.log_softmax(x, axis=axis)),
            rtol=1e-6,
            atol=1e-6,
        )
    with pytest.raises(ValueError, match=r"axis 3 is out of range .* 3 dimension"):
        activations.softmax(x, axis=3)
    with pytest.raises(TypeError, match="axis must be an int"):
        activations.log_softmax(x, axis=1.0)
    # NumPy integers are ints; a 0-d input is one value over one axis: -1 or 0, nothing else.
    np.testing.assert_allclose(
        np.asarray(activations.softmax(x, axis=np.int64(1))),
        np.asarray(jax.nn.softmax(x, axis=1)),
        rtol=1e-6,
    )
    scalar = jnp.float32(2.5)
    assert float(activations.softmax(scalar)) == 1.0
    assert float(activations.log_softmax(scalar, axis=0)) == 0.0
    with pytest.raises(ValueError, match=r"axis 5 is out of range .* 0 dimensions"):
        activations.softmax(scalar, axis=5)
    with pytest.raises(ValueError, match=r"axis 1 is out of range"):
        activations.get("log_softmax").derivative_at(scalar, axis=1)


# ---------------------------------------------------------------------------------------------
# Derivatives


@pytest.mark.parametrize("case", ELEMENTWISE)
def test_derivative_matches_float64_central_differences_away_from_kinks(case):
    _, _, kinks = REFERENCES[case]
    x = np.linspace(-9.0, 9.0, 721) + 1e-3  # avoid landing exactly on kinks
    if kinks:
        x = x[np.min(np.abs(x[:, None] - np.asarray(kinks)[None, :]), axis=1) > 1e-3]
    act = _activation(case)
    h = 1e-6
    with jax.enable_x64(True):
        f = jax.jit(lambda v: act(v))
        xs = jnp.asarray(x)
        finite_difference = (np.asarray(f(xs + h)) - np.asarray(f(xs - h))) / (2 * h)
        autodiff = np.asarray(_elementwise_grad(act)(xs))
    np.testing.assert_allclose(autodiff, finite_difference, rtol=1e-6, atol=1e-8)


def test_softmax_jacobians_match_float64_central_differences():
    x = np.random.RandomState(1).randn(5) * 3
    with jax.enable_x64(True):
        for fn in (activations.softmax, activations.log_softmax):
            jac = np.asarray(jax.jacrev(fn)(jnp.asarray(x)))
            h = 1e-6
            fd = np.stack(
                [
                    (
                        np.asarray(fn(jnp.asarray(x + h * e)))
                        - np.asarray(fn(jnp.asarray(x - h * e)))
                    )
                    / (2 * h)
                    for e in np.eye(5)
                ],
                axis=1,
            )
            np.testing.assert_allclose(jac, fd, rtol=1e-7, atol=1e-9)


KINK_DERIVATIVES = [
    # (name, params, x, exact derivative)
    ("relu", {}, 0.0, 0.0),
    ("relu", {}, 1e-30, 1.0),
    ("relu6", {}, 0.0, 0.0),
    ("relu6", {}, 6.0, 0.0),
    ("relu6", {}, 5.5, 1.0),
    ("hard_tanh", {}, -1.0, 0.0),
    ("hard_tanh", {}, 1.0, 0.0),
    ("hard_tanh", {}, 0.75, 1.0),
    ("hard_sigmoid", {}, -3.0, 0.0),
    ("hard_sigmoid", {}, 3.0, 0.0),
    ("hard_sigmoid", {"slope": 0.2}, -2.5, 0.0),
    ("hard_sigmoid", {"slope": 0.2}, 2.5, 0.0),
    ("hard_sigmoid", {"slope": 0.2}, 0.0, 0.2),
    ("hard_sigmoid", {"slope": 0.2}, 2.0, 0.2),
    ("ultra_fast_sigmoid", {}, 0.0, 0.375),
    ("ultra_fast_sigmoid", {}, -0.0, 0.375),
    ("ultra_fast_sigmoid", {}, 3.4, 0.25 * 0.0458812946797165),
    ("ultra_fast_sigmoid", {}, -3.4, 0.25 * 0.0458812946797165),
    ("ultra_fast_sigmoid", {}, 6.0, 0.0),
    ("ultra_fast_sigmoid", {}, -6.0, 0.0),
    ("ultra_fast_sigmoid", {}, 2.0, 0.375 / 4.0),
    ("leaky_relu", {}, 0.0, 0.01),
    ("leaky_relu", {"negative_slope": 0.0}, 0.0, 0.0),
    ("elu", {}, 0.0, 1.0),
    ("elu", {"alpha": 0.5}, 0.0, 0.5),
    ("selu", {}, 0.0, SELU_SCALE * SELU_ALPHA),
    ("selu", {}, 1e-30, SELU_SCALE),
    ("identity", {}, 3.0, 1.0),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("name", "params", "x", "expected"), KINK_DERIVATIVES)
def test_derivative_at_kinks_is_exactly_the_documented_value(name, params, x, expected, dtype):
    with jax.enable_x64(dtype == "float64"):
        act = get(name, **params)
        value = jnp.asarray(x, dtype)
        expected = np.asarray(expected, dtype)
        assert np.asarray(jax.grad(act)(value)) == expected
        assert np.asarray(act.derivative_at(value)) == expected


def test_derivative_conventions_differ_from_plain_autodiff_where_documented():
    # These are the surprises the custom derivatives exist to avoid.
    assert float(jax.grad(lambda x: jnp.maximum(x, 0.0))(0.0)) == 0.5
    assert float(jax.grad(lambda x: jnp.clip(0.2 * x + 0.5, 0.0, 1.0))(2.5)) == pytest.approx(0.1)
    assert float(jax.grad(jax.nn.hard_tanh)(1.0)) == 1.0
    assert float(jax.grad(activations.hard_tanh)(1.0)) == 0.0


def test_elu_derivative_is_accurate_where_autodiff_of_expm1_rounds_to_zero():
    x = jnp.asarray([-17.0, -20.0, -40.0, -80.0], jnp.float32)
    grads = jax.jit(jax.vmap(jax.grad(activations.elu)))(x)
    np.testing.assert_allclose(np.asarray(grads), np.exp(np.asarray(x, np.float64)), rtol=1e-6)
    assert np.all(np.asarray(jax.vmap(jax.grad(jax.nn.elu))(x))[1:] == 0)  # what it replaces
    selu_grads = jax.jit(jax.vmap(jax.grad(activations.selu)))(x)
    np.testing.assert_allclose(
        np.asarray(selu_grads),
        SELU_SCALE * SELU_ALPHA * np.exp(np.asarray(x, np.float64)),
        rtol=1e-6,
    )


def test_ultra_fast_sigmoid_second_derivative_follows_the_rule():
    with jax.enable_x64(True):
        x = jnp.asarray([0.5, 1.0, 2.0, 4.0, 7.0])
        second = jax.vmap(jax.grad(jax.grad(activations.ultra_fast_sigmoid)))(x)
        expected = np.where(np.abs(x) < 3.4, -0.375 / (1 + np.abs(x) / 2) ** 3, 0.0)
        np.testing.assert_allclose(np.asarray(second), expected, rtol=1e-12)


def test_parameters_are_differentiable():
    with jax.enable_x64(True):
        g = jax.grad(lambda s: activations.hard_sigmoid(1.0, slope=s, shift=0.5))(0.2)
        assert float(g) == 1.0  # d/ds clip(s*x + b) = x inside the linear piece
        g = jax.grad(lambda a: activations.elu(-1.0, alpha=a))(2.0)
        assert float(g) == pytest.approx(math.expm1(-1.0))


@pytest.mark.parametrize(
    ("slope", "shift"),
    [(-1.0 / 6.0, 0.5), (-0.2, 0.5), (-1.0, 0.25), (0.3, 0.5), (2.0, 0.1), (0.2, 0.0)],
)
def test_hard_sigmoid_any_slope_matches_numpy_values_and_derivative(slope, shift):
    # Negative slopes mirror the function; exact reciprocals 1/k take a separate code path.
    x = np.linspace(-8.0, 8.0, 321) + 1e-3
    z = slope * x + shift
    x = x[(np.abs(z) > 1e-4) & (np.abs(z - 1) > 1e-4)]  # off the boundaries
    z = slope * x + shift
    with jax.enable_x64(True):
        f = functools.partial(activations.hard_sigmoid, slope=slope, shift=shift)
        values = np.asarray(f(jnp.asarray(x)))
        slopes = np.asarray(jax.vmap(jax.grad(f))(jnp.asarray(x)))
    np.testing.assert_allclose(values, np.clip(z, 0, 1), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(slopes, np.where((z > 0) & (z < 1), slope, 0.0))
    assert np.any(slopes != 0) and np.any(slopes == 0)


# ---------------------------------------------------------------------------------------------
# dtypes and input checking


@pytest.mark.parametrize("case", CASES)
def test_dtype_is_preserved(case):
    act = _activation(case)
    dtypes = (jnp.float16, jnp.bfloat16, jnp.float32)

    @jax.jit  # one compilation for the three dtypes
    def values_and_grads(xs):
        return [(act(v), jax.grad(lambda u: act(u).sum())(v)) for v in xs]

    inputs = [jnp.asarray(np.linspace(-4, 4, 12), dtype) for dtype in dtypes]
    for dtype, x, (out, grad) in zip(dtypes, inputs, values_and_grads(inputs), strict=True):
        assert out.dtype == dtype and grad.dtype == dtype, (case, dtype)
        tolerance = 2e-2 if dtype != jnp.float32 else 1e-5
        expected = REFERENCES[case][0](np.asarray(x, np.float32).astype(np.float64))
        np.testing.assert_allclose(
            np.asarray(out.astype(jnp.float32)), expected, rtol=tolerance, atol=tolerance
        )
    with jax.enable_x64(True):
        assert act(jnp.asarray(np.linspace(-4, 4, 12))).dtype == jnp.float64
        assert act(1.5).dtype == jnp.float64  # a Python float follows the default float
    assert act(1.5).dtype == jnp.float32
    if act.elementwise:
        assert act(1.5).weak_type


@pytest.mark.parametrize("name", activations.names())
@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        (jnp.arange(3), "int32"),
        (np.array([True, False]), "bool"),
        (3, "Python int 3"),
        (True, "Python bool True"),
        ([1.0, 2.0], "Python list"),
        (jnp.ones(2, jnp.complex64), "complex64"),
    ],
)
def test_non_float_input_raises_type_error_naming_the_argument(name, bad, shown):
    if name not in REFERENCES and name not in ("gelu", "hard_sigmoid"):
        pytest.skip("user-registered activation")
    with pytest.raises(TypeError, match=rf"{name}: x .*{shown}"):
        get(name)(bad)


def test_type_errors_are_raised_at_trace_time_under_jit():
    with pytest.raises(TypeError, match=r"relu: x must have a floating-point dtype .* int32"):
        jax.jit(activations.relu)(jnp.arange(3))
    with pytest.raises(TypeError, match=r"hard_sigmoid: slope must be a real number"):
        activations.hard_sigmoid(1.0, slope="0.2")


# ---------------------------------------------------------------------------------------------
# jit and vmap


@pytest.mark.parametrize("case", CASES)
def test_jit_and_vmap_agree_with_eager(case):
    act = _activation(case)
    x = jnp.asarray(np.random.RandomState(2).randn(4, 6) * 4, jnp.float32)
    direct = act(x)
    jitted, vmapped = jax.jit(lambda v: (act(v), jax.vmap(lambda row: act(row))(v)))(x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(direct), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(direct), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# zero_grad_mask and saturation_mask


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ELEMENTWISE)
def test_zero_grad_mask_agrees_with_where_jax_grad_is_zero(case, dtype):
    grid = np.concatenate(
        [np.linspace(-800, 800, 4001), np.linspace(-40, 40, 8001), [-3.4, 3.4, 2.5, -2.5]]
    )
    with jax.enable_x64(dtype == "float64"):
        act = _activation(case)
        x = jnp.asarray(grid, dtype)
        actual_zero = np.asarray(_elementwise_grad(act)(x)) == 0
        np.testing.assert_array_equal(np.asarray(act.zero_grad_mask(x)), actual_zero)


def test_zero_grad_mask_matches_the_declared_regions():
    xn = np.linspace(-10.0, 10.0, 2001)
    x = jnp.asarray(xn, jnp.float32)
    expected = {
        ("relu", ()): xn <= 0,
        ("relu6", ()): (xn <= 0) | (xn >= 6),
        ("hard_tanh", ()): np.abs(xn) >= 1,
        ("hard_sigmoid", ()): np.abs(xn) >= 3,
        ("hard_sigmoid", (("slope", 0.2),)): np.abs(xn) >= 2.5,
        ("ultra_fast_sigmoid", ()): np.abs(xn) >= 6,
        ("leaky_relu", ()): np.zeros_like(xn, bool),
        ("gelu", ()): np.zeros_like(xn, bool),
    }
    for (name, params), region in expected.items():
        mask = get(name, **dict(params)).zero_grad_mask(x)
        np.testing.assert_array_equal(np.asarray(mask), region, err_msg=name)


def test_zero_grad_mask_marks_float32_underflow_of_smooth_activations():
    # Independent of the code: float32 exp(x) is 0 below -87.3 (subnormals flushed), tanh rounds
    # to +-1 beyond |x| ~ 8, the normal density phi(x) underflows beyond |x| ~ 13.2.
    x = jnp.asarray([-200.0, -90.0, -80.0, -20.0, 0.0, 7.5, 9.0, 20.0, 90.0], jnp.float32)
    exp_underflow = [True, True, False, False, False, False, False, False, False]
    expected = {
        "tanh": [True, True, True, True, False, False, True, True, True],
        "elu": exp_underflow,  # alpha e^x
        "selu": exp_underflow,
        "softplus": exp_underflow,  # sigmoid(x) ~ e^x
        "silu": exp_underflow,  # sigmoid(x) (1 + x (1 - sigmoid(x)))
        "mish": exp_underflow,
        "log_sigmoid": [False] * 8 + [True],  # sigmoid(-x)
        "gelu": [True, True, True, True, False, False, False, False, False],  # Phi + x phi
        "identity": [False] * 9,
        "leaky_relu": [False] * 9,
    }
    for name, region in expected.items():
        np.testing.assert_array_equal(np.asarray(get(name).zero_grad_mask(x)), region, err_msg=name)


def test_sigmoid_zero_grad_mask_shows_float32_underflow():
    sigmoid = get("sigmoid")
    x = jnp.asarray([0.0, 10.0, 16.5, 16.7, 20.0, -20.0, -80.0, -90.0], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(sigmoid.zero_grad_mask(x)), [False, False, False, True, True, False, False, True]
    )
    with jax.enable_x64(True):
        x64 = jnp.asarray([16.7, 20.0, 36.0, 40.0])
        np.testing.assert_array_equal(
            np.asarray(sigmoid.zero_grad_mask(x64)), [False, False, False, True]
        )


def test_softmax_zero_grad_mask_matches_zero_jacobian_columns():
    rows = np.array(
        [
            [0.0, 1.0, 2.0],
            [0.0, 200.0, -200.0],  # one probability underflows
            [1000.0, 0.0, 0.0],  # one-hot in float32
            [-50.0, 50.0, 0.0],
            [3.0, 3.0, 3.0],
        ],
        np.float32,
    )
    x = jnp.asarray(rows)
    for name, fn in (("softmax", activations.softmax), ("log_softmax", activations.log_softmax)):
        jacobians = jax.vmap(jax.jacrev(fn))(x)  # (row, output, input)
        column_is_zero = np.all(np.asarray(jacobians) == 0, axis=1)
        np.testing.assert_array_equal(np.asarray(get(name).zero_grad_mask(x)), column_is_zero)
    assert np.asarray(get("softmax").zero_grad_mask(x)).any()
    assert np.asarray(get("log_softmax").zero_grad_mask(x[:, :1])).all()  # length-1 axis


def test_saturation_mask_reproduces_the_sigmoid_rule_and_contains_the_zero_grad_mask():
    x = np.linspace(-30, 30, 6001)
    x = x[np.abs(np.abs(x) - 5) > 1e-3]
    with jax.enable_x64(True):
        sigmoid = get("sigmoid")
        np.testing.assert_array_equal(
            np.asarray(sigmoid.saturation_mask(jnp.asarray(x))), np.abs(x) > 5
        )
        tanh_mask = np.asarray(get("tanh").saturation_mask(jnp.asarray(x)))
        np.testing.assert_array_equal(tanh_mask, 1 - np.tanh(x) ** 2 < 0.02659222668316)
    values = jnp.asarray(np.linspace(-100.0, 100.0, 401).reshape(-1, 1), jnp.float32)
    for name in activations.names():
        act = get(name)
        if act.peak_derivative is None:
            continue
        both = jax.jit(lambda v, a=act: (a.zero_grad_mask(v), a.saturation_mask(v)))
        zero, saturated = (np.asarray(m) for m in both(values if act.elementwise else values.T))
        assert np.all(saturated[zero]), name
    with pytest.raises(ValueError, match=r"threshold must be a real number in \[0, 1\]; got 2"):
        get("sigmoid").saturation_mask(jnp.zeros(2), threshold=2)


def test_saturation_mask_takes_array_valued_and_traced_parameters():
    x = jnp.asarray([-1.0, 0.5, 3.0])
    # One negative slope per element: 0 makes x = -1 dead; the peak is max(1, |slope|) each.
    leaky = get("leaky_relu", negative_slope=jnp.asarray([0.0, 0.1, 0.2]))
    np.testing.assert_array_equal(np.asarray(leaky.saturation_mask(x)), [True, False, False])
    np.testing.assert_allclose(np.asarray(leaky.peak()), [1.0, 1.0, 1.0])
    steep = get("leaky_relu", negative_slope=jnp.asarray([40.0, 0.1, 0.2]))
    # peak 40 for the first element: slope 1 for x > 0 would be saturated there (1 < 0.0266*40).
    np.testing.assert_array_equal(
        np.asarray(steep.saturation_mask(jnp.asarray([1.0, 1.0, 1.0]))), [True, False, False]
    )
    # Parameters traced by jit and vmap give the same masks as concrete ones.
    hard = jax.jit(lambda s, u: get("hard_sigmoid", slope=s).saturation_mask(u))
    np.testing.assert_array_equal(np.asarray(hard(0.2, x)), [False, False, True])
    elu = jax.vmap(lambda a: get("elu", alpha=a).saturation_mask(jnp.asarray(-5.0)))
    # elu's slope at -5 is alpha e^-5 = 0.0067 alpha, below 0.0266 * peak: peak max(1, alpha).
    np.testing.assert_array_equal(np.asarray(elu(jnp.asarray([0.5, 2.0]))), [True, True])
    assert isinstance(get("hard_sigmoid", slope=0.2).peak(), float)


PEAKS = {
    "sigmoid": (lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2, {}),
    "ultra_fast_sigmoid": (lambda x: 0.375 / (1 + np.abs(x) / 2) ** 2 * (np.abs(x) < 3.4), {}),
    "gelu": (
        lambda x: 0.5 * _erfc(-x / np.sqrt(2)) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi),
        {},
    ),
    "silu": (lambda x: (1 + np.exp(-x) + x * np.exp(-x)) / (1 + np.exp(-x)) ** 2, {}),
    "selu": (lambda x: np.where(x > 0, SELU_SCALE, SELU_SCALE * SELU_ALPHA * np.exp(x)), {}),
    "hard_sigmoid": (lambda x: 0.2 * (np.abs(x) < 2.5), {"slope": 0.2}),
    "leaky_relu": (lambda x: np.where(x > 0, 1.0, 3.0), {"negative_slope": 3.0}),
}


@pytest.mark.parametrize("name", sorted(PEAKS))
def test_peak_derivative_matches_a_dense_numpy_grid(name):
    derivative, params = PEAKS[name]
    x = np.linspace(-10, 10, 400001)
    assert get(name, **params).peak() == pytest.approx(np.max(np.abs(derivative(x))), rel=1e-8)


def test_mish_peak_derivative_matches_finite_differences():
    x = np.linspace(-10, 10, 200001)
    mish = x * np.tanh(np.log1p(np.exp(x)))
    assert get("mish").peak() == pytest.approx(np.max(np.gradient(mish, x)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Surrogate gradients


def test_surrogate_value_is_forwards_and_derivative_is_surrogates():
    hard = get("hard_sigmoid", slope=0.2)
    f = with_surrogate_grad(hard, "sigmoid")
    x = jnp.linspace(-6.0, 6.0, 49)
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(hard(x)))
    s = np.asarray(jax.nn.sigmoid(x))
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(f))(x)), s * (1 - s), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(jax.grad(f)))(x)), s * (1 - s), rtol=1e-6
    )
    _, tangent = jax.jvp(f, (x,), (2 * jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(tangent), 2 * s * (1 - s), rtol=1e-6)
    _, pullback = jax.vjp(f, x)
    np.testing.assert_allclose(np.asarray(pullback(jnp.ones_like(x))[0]), s * (1 - s), rtol=1e-6)
    assert f.output_range == hard.output_range
    assert not np.asarray(f.zero_grad_mask(x)).any()  # sigmoid' > 0 where hard_sigmoid' == 0


def test_straight_through_estimator_has_unit_derivative():
    step = with_surrogate_grad(lambda x: jnp.where(x > 0, 1.0, 0.0).astype(x.dtype), "identity")
    x = jnp.asarray([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(np.asarray(step(x)), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(jax.vmap(jax.grad(step))(x)), [1.0, 1.0, 1.0])
    assert float(jax.grad(jax.grad(step))(0.5)) == 0.0


def test_surrogate_higher_derivatives_follow_the_surrogate():
    with jax.enable_x64(True):
        f = with_surrogate_grad("hard_sigmoid", "sigmoid")
        x = jnp.asarray([-2.0, -0.3, 0.0, 1.0, 4.0])
        s = 1 / (1 + np.exp(-np.asarray(x)))
        d1, d2 = s * (1 - s), s * (1 - s) * (1 - 2 * s)
        second = jax.vmap(jax.grad(jax.grad(f)))(x)
        np.testing.assert_allclose(np.asarray(second), d2, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(
            np.asarray(jax.vmap(jax.hessian(f))(x)), d2, rtol=1e-12, atol=1e-15
        )
        # Mixed second order: (f^2)'' = 2 f'^2 + 2 f f'' with f' and f'' from the surrogate.
        squared = jax.vmap(jax.grad(jax.grad(lambda v: f(v) ** 2)))(x)
        value = np.clip(np.asarray(x) / 6 + 0.5, 0, 1)
        np.testing.assert_allclose(
            np.asarray(squared), 2 * d1**2 + 2 * value * d2, rtol=1e-12, atol=1e-15
        )


def test_surrogate_passes_keyword_parameters_to_both_functions():
    f = with_surrogate_grad(activations.hard_sigmoid, activations.hard_sigmoid)
    assert float(f(1.0, slope=0.2)) == pytest.approx(0.7)
    assert float(jax.grad(lambda x: f(x, slope=0.2))(1.0)) == pytest.approx(0.2)
    assert float(jax.grad(lambda x: f(x, slope=0.5))(0.5)) == pytest.approx(0.5)


def test_surrogate_parameters_may_be_traced_and_are_not_differentiated():
    f = with_surrogate_grad("elu", "elu")
    with jax.enable_x64(True):
        x = jnp.float64(-1.0)
        # f's own derivative in a parameter is zero, under grad, jvp and jit.
        assert float(jax.grad(lambda a: f(x, alpha=a))(2.0)) == 0.0
        _, tangent = jax.jvp(lambda a: f(x, alpha=a), (2.0,), (1.0,))
        assert float(tangent) == 0.0
        assert float(jax.jit(jax.grad(lambda a: f(x, alpha=a)))(2.0)) == 0.0
        # The slope follows the parameter: d/dalpha of f'(x) = d/dalpha (alpha e^x) = e^x.
        slope = jax.grad(lambda a: jax.grad(lambda u: f(u, alpha=a))(x))
        assert float(slope(2.0)) == pytest.approx(math.exp(-1.0), rel=1e-12)
        # A parameter vmapped over: one slope per value.
        hard = with_surrogate_grad("hard_sigmoid", "hard_sigmoid")
        slopes = jax.vmap(lambda s: jax.grad(lambda u: hard(u, slope=s))(0.1))(
            jnp.asarray([0.1, 0.2, 0.5])
        )
        np.testing.assert_allclose(np.asarray(slopes), [0.1, 0.2, 0.5], rtol=1e-12)


def test_surrogate_derivative_has_the_input_dtype_whatever_the_surrogate_returns():
    sign_ste = with_surrogate_grad(jnp.sign, lambda u: jnp.tanh(u).astype(jnp.float32))
    grad = jax.grad(sign_ste)(jnp.float16(0.5))
    assert grad.dtype == jnp.float16
    assert float(grad) == pytest.approx(1 - math.tanh(0.5) ** 2, rel=1e-3)


def test_surrogate_peak_uses_the_parameters_bound_to_the_surrogate():
    # The peak of |f'| is the surrogate's, with the surrogate's own bound parameters.
    f = with_surrogate_grad("sigmoid", get("hard_sigmoid", slope=0.2))
    assert f.peak() == pytest.approx(0.2)
    g = with_surrogate_grad("hard_tanh", get("leaky_relu", negative_slope=3.0))
    assert g.peak() == pytest.approx(3.0)
    h = with_surrogate_grad(activations.hard_sigmoid, activations.hard_sigmoid)
    assert h.peak(slope=0.5) == pytest.approx(0.5)  # call-time parameters reach the surrogate
    x = jnp.asarray([-1.0, 0.5, 2.0])
    # leaky_relu's slope 1 for x > 0 is below 3 * 0.5: saturated; slope 3 for x <= 0 is not.
    np.testing.assert_array_equal(
        np.asarray(g.saturation_mask(x, threshold=0.5)), [False, True, True]
    )


def test_surrogate_works_under_vmap_of_a_network():
    f = with_surrogate_grad(get("hard_sigmoid", slope=0.2), "sigmoid")

    def loss(w, x):
        return jnp.sum(f(x @ w))

    w = jnp.ones((3, 2))
    xs = jnp.asarray(np.random.RandomState(3).randn(5, 4, 3), jnp.float32)
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, xs)
    pre = np.asarray(xs @ w)
    s = 1 / (1 + np.exp(-pre))
    expected = np.einsum("bni,bnj->bij", np.asarray(xs), s * (1 - s))
    np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-5, atol=1e-6)


def test_surrogate_rejects_non_callables_and_bad_input():
    with pytest.raises(TypeError, match="surrogate must be a callable"):
        with_surrogate_grad("relu", 3)
    with pytest.raises(ValueError, match="unknown activation 'sigmoidd'"):
        with_surrogate_grad("sigmoidd", "relu")
    f = with_surrogate_grad("relu", "softplus")
    with pytest.raises(TypeError, match=r"relu\[grad=softplus\]: x .*int32"):
        f(jnp.arange(2))


# ---------------------------------------------------------------------------------------------
# Registry


def test_names_lists_every_contract_name_sorted():
    contract = {
        "sigmoid", "ultra_fast_sigmoid", "hard_sigmoid", "hard_tanh", "relu", "relu6",
        "leaky_relu", "elu", "selu", "gelu", "silu", "mish", "softplus", "log_sigmoid",
        "softmax", "log_softmax", "tanh", "identity",
    }  # fmt: skip
    listed = activations.names()
    assert contract <= set(listed)
    assert listed == sorted(listed)
    for name in contract:
        act = get(name)
        assert act.name == name and act.formula and act.derivative and act.zero_grad_region
        assert getattr(activations, name) is act.function


def test_get_accepts_activations_and_functions_and_binds_parameters():
    relu = get("relu")
    assert get(relu) is relu
    assert get(activations.relu) is relu
    theano = get("hard_sigmoid", slope=0.2)
    assert theano.params == (("slope", 0.2),)
    assert float(theano(1.0)) == pytest.approx(0.7)
    assert float(theano(1.0, slope=0.1)) == pytest.approx(0.6)  # call-time override
    assert get(theano, shift=0.0).params == (("shift", 0.0), ("slope", 0.2))
    assert theano.peak() == pytest.approx(0.2)


def test_get_errors_name_close_matches_and_accepted_parameters():
    with pytest.raises(
        ValueError, match=r"unknown activation 'hard_sigmod'; did you mean 'hard_sigmoid'"
    ):
        get("hard_sigmod")
    with pytest.raises(ValueError, match=r"'hard_sigmoid' takes no parameter\(s\) \['alpha'\]"):
        get("hard_sigmoid", alpha=1.0)
    with pytest.raises(TypeError, match="get: activation must be a registered name"):
        get(42)
    with pytest.raises(TypeError, match="must be a registered name"):
        get(lambda x: x)


def test_register_adds_user_activations_and_refuses_duplicates():
    cube = activations.Activation(
        "test_cube", lambda x: x**3, formula="x**3", derivative="3 x**2", peak_derivative=None
    )
    activations.register(cube, overwrite=True)
    assert "test_cube" in activations.names()
    assert get("test_cube") is cube
    np.testing.assert_array_equal(
        np.asarray(cube.zero_grad_mask(jnp.asarray([-1.0, 0.0, 2.0]))), [False, True, False]
    )
    with pytest.raises(ValueError, match="already registered"):
        activations.register(cube)
    with pytest.raises(ValueError, match="declares no peak_derivative"):
        cube.saturation_mask(jnp.zeros(1))
    with pytest.raises(TypeError, match="register: activation must be an Activation"):
        activations.register("relu")
    with pytest.raises(ValueError, match=r"output_range must be \(low, high\)"):
        activations.Activation("bad", lambda x: x, output_range=(1.0, 0.0))


@pytest.fixture
def restored_registry(monkeypatch):
    """Lets a test replace registry entries, built-in ones included, and undoes it after."""
    for table in ("_REGISTRY", "_ACCEPTED_PARAMS"):
        monkeypatch.setattr(activations, table, dict(getattr(activations, table)))


def test_a_replaced_function_no_longer_stands_for_the_name(restored_registry):
    def cube(x):
        return x**3

    activations.register(activations.Activation("test_replaced", cube))
    activations.register(activations.Activation("test_replaced", lambda x: 10 * x), overwrite=True)
    # cube is the user's own function again: not the entry's, so not looked up by it.
    with pytest.raises(TypeError, match="must be a registered name"):
        get(cube)
    straight_through = with_surrogate_grad(cube, activations.identity)
    assert float(straight_through(2.0)) == 8.0
    assert float(jax.grad(straight_through)(2.0)) == 1.0


def test_replacing_a_built_in_drops_its_parameter_names(restored_registry):
    def scaled_relu(x, scale=1.0):
        return scale * jnp.maximum(x, 0.0)

    with pytest.raises(ValueError, match="takes no parameter"):
        get("relu", scale=2.0)
    activations.register(activations.Activation("relu", scaled_relu), overwrite=True)
    assert float(get("relu", scale=2.0)(3.0)) == 6.0
    assert get(scaled_relu).function is scaled_relu
    with pytest.raises(TypeError, match="must be a registered name"):
        get(activations.relu)  # the built-in function was replaced


def test_module_doctests_pass():
    results = doctest.testmod(activations, extraglobs={"jnp": jnp, "jax": jax})
    assert results.attempted > 20 and results.failed == 0


def test_a_parameter_one_side_of_a_surrogate_does_not_take_is_named_with_the_wrapper():
    wrapped = with_surrogate_grad(get("hard_sigmoid", slope=0.2), get("sigmoid"))
    # Parameters go to both sides: sigmoid has no slope. Without the check the forward pass
    # ran and only the gradient failed, with sigmoid's own message.
    with pytest.raises(
        TypeError,
        match=r"hard_sigmoid.*\[grad=sigmoid\].*surrogate sigmoid "
        r"does not take \['slope'\].*get\('hard_sigmoid', slope=\.\.\.\)",
    ):
        wrapped(jnp.ones(3), slope=0.5)
    with pytest.raises(
        TypeError,
        match=r"forward hard_sigmoid.* does not take \['bogus'\] "
        r"\(it takes \['shift', 'slope'\]\)$",
    ):
        wrapped(jnp.ones(3), bogus=1.0)
    # A parameter both sides take still reaches both.
    both = with_surrogate_grad("leaky_relu", "leaky_relu")
    np.testing.assert_allclose(both(jnp.array([-1.0]), negative_slope=0.1), [-0.1])
    np.testing.assert_allclose(
        jax.grad(lambda x: both(x, negative_slope=0.1))(-1.0), 0.1, rtol=1e-6
    )


def test_saturation_threshold_takes_numpy_jax_and_traced_scalars():
    sigmoid = get("sigmoid")
    x = jnp.linspace(-8.0, 8.0, 5)
    expected = np.asarray(sigmoid.saturation_mask(x, threshold=0.1))
    for threshold in (np.float32(0.1), jnp.float32(0.1), np.float64(0.1)):
        np.testing.assert_array_equal(sigmoid.saturation_mask(x, threshold=threshold), expected)
    traced = jax.jit(lambda t: sigmoid.saturation_mask(x, threshold=t))(0.1)
    np.testing.assert_array_equal(traced, expected)
    for bad in (1.5, -0.1, True, "0.1", np.ones(2)):
        with pytest.raises(ValueError, match="threshold must be a real number in"):
            sigmoid.saturation_mask(x, threshold=bad)


def test_softmax_of_an_empty_array_is_empty_like_jax_nn():
    for fn, reference in (
        (activations.softmax, jax.nn.softmax),
        (activations.log_softmax, jax.nn.log_softmax),
    ):
        for shape in ((0,), (3, 0)):
            out = fn(jnp.zeros(shape))
            assert out.shape == reference(jnp.zeros(shape)).shape == shape
    assert jax.grad(lambda x: activations.softmax(x).sum())(jnp.zeros(0)).shape == (0,)


def test_a_surrogate_without_a_peak_says_how_to_get_a_saturation_mask():
    wrapped = with_surrogate_grad(jnp.sign, jax.nn.sigmoid)
    with pytest.raises(ValueError, match=r"registered surrogate such as 'sigmoid'"):
        wrapped.saturation_mask(jnp.ones(3))
    np.testing.assert_array_equal(
        with_surrogate_grad(jnp.sign, "sigmoid").saturation_mask(jnp.array([0.0, 9.0])),
        [False, True],
    )


def test_binding_a_parameter_a_custom_activation_does_not_take_is_refused():
    def scaled(x, alpha=1.0):
        return alpha * x

    custom = activations.Activation("scaled_for_test", scaled)
    np.testing.assert_allclose(get(custom, alpha=2.0)(jnp.ones(2)), [2.0, 2.0])
    # Was accepted, and failed only when called.
    with pytest.raises(ValueError, match=r"'scaled_for_test' takes no parameter\(s\) \['beta'\]"):
        get(custom, beta=2.0)
    # A function taking **params binds anything, as before.
    loose = activations.Activation("loose_for_test", lambda x, **params: x)
    assert get(loose, anything=1.0).params == (("anything", 1.0),)
