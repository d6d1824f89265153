"""diagnose's surrogate-gradient counterfactual and the activation hook it relies on."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradkit import _health, _probe, activations
from gradkit.diagnostics import diagnose, layer_boundary
from gradkit.layers import MLP, Dense, constant, he_normal, normal

X = jax.random.normal(jax.random.key(1), (64, 2))


def _np_sigmoid_prime(u):
    s = 1.0 / (1.0 + np.exp(-u))
    return s * (1.0 - s)


def _hard_sigmoid_prime(z):
    """jax.nn's hard_sigmoid: slope 1/6 strictly inside |z| < 3, 0 on the closed flat parts."""
    return np.where(np.abs(z) < 3.0, 1.0 / 6.0, 0.0)


def _hard_sigmoid_surrogate_prime(z):
    """The documented surrogate: (1/6) sigmoid'(2z/3) / sigmoid'(2), equal to 1/6 at |z| = 3."""
    return (1.0 / 6.0) * _np_sigmoid_prime(2.0 * z / 3.0) / _np_sigmoid_prime(2.0)


def _first_layer_grad_norm(params, x, derivative, activation):
    """NumPy backprop of mean((act(x W0 + b0) W1 + b1 - 1)^2) to dense_0, with a given f'."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    z = x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    out = activation(z) @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    d_out = 2.0 * (out - 1.0) / out.size
    d_z = (d_out @ p["dense_1"]["kernel"].T) * derivative(z)
    return math.hypot(np.linalg.norm(x.T @ d_z), np.linalg.norm(d_z.sum(axis=0)))


def _np_hard_sigmoid(z):
    return np.clip(z / 6.0 + 0.5, 0.0, 1.0)


def _mse_to_one(mlp):
    return lambda p, x: jnp.mean((mlp.apply(p, x) - 1.0) ** 2)


def _surrogate(report):
    found = [r for r in report.recommendations if r.name == "surrogate gradient"]
    return found[0] if found else None


# ---- the hook -------------------------------------------------------------------------------


def test_outside_a_collector_the_hook_returns_the_function_and_adds_no_equation():
    assert _probe.activation("dense_0", jnp.tanh) is jnp.tanh

    def marked(w, x):
        return layer_boundary("dense_0", x @ w, "hard_tanh", apply=True)

    def plain(w, x):
        return activations.hard_tanh(x @ w)

    w = jnp.ones((2, 3))
    assert str(jax.make_jaxpr(marked)(w, X)) == str(jax.make_jaxpr(plain)(w, X))
    np.testing.assert_array_equal(marked(w, X), plain(w, X))


def test_a_collector_substitutes_the_activation_of_the_tapped_layer_only():
    layer = Dense(3, activation="relu", name="shared")
    params = layer.init(jax.random.key(0), (2,))
    x = jnp.array([[-1.0, 2.0], [3.0, -4.0]])
    z = x @ params["kernel"] + params["bias"]

    class TapsOnly:  # no activation method: the layer's own activation is used
        def tap(self, name, value, *, kind, activation):
            return value

    with _probe.collecting(TapsOnly()):
        np.testing.assert_array_equal(layer.apply(params, x), np.maximum(z, 0))
    # A shared layer applied twice is two taps, "shared" and "shared#1"; substitute the second.
    recorder = _health._Recorder(substitutes={"shared#1": jnp.tanh})
    with _probe.collecting(recorder):
        first = layer.apply(params, x)
        second = layer.apply(params, x)
    np.testing.assert_array_equal(first, np.maximum(z, 0))
    np.testing.assert_allclose(second, np.tanh(z), rtol=1e-6)
    assert recorder.hooked == {"shared", "shared#1"}


def test_layer_boundary_apply_checks_the_activation():
    with pytest.raises(TypeError, match=r"apply=True needs activation to be .* got None"):
        layer_boundary("dense_0", jnp.ones(2), apply=True)
    with pytest.raises(ValueError, match=r"unknown activation 'hard_sigmod'.*'hard_sigmoid'"):
        layer_boundary("dense_0", jnp.ones(2), "hard_sigmod", apply=True)
    np.testing.assert_allclose(
        layer_boundary("dense_0", jnp.array([-1.0, 1.0]), jnp.tanh, apply=True), np.tanh([-1, 1])
    )


# ---- the surrogates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    [
        ("hard_sigmoid", {}),
        ("hard_sigmoid", {"slope": 0.2}),
        ("hard_sigmoid", {"slope": 0.25, "shift": 0.3}),
        ("hard_tanh", {}),
        ("ultra_fast_sigmoid", {}),
        ("sigmoid", {}),
        ("tanh", {}),
        ("relu", {}),
        ("relu6", {}),
    ],
)
def test_surrogate_keeps_values_and_never_lowers_the_derivative(name, params):
    with jax.enable_x64(True):
        entry = activations.get(name, **params)
        wrapped = activations.with_surrogate_grad(entry, _health._surrogate_for(entry))
        xs = jnp.linspace(-12.0, 12.0, 4801)
        np.testing.assert_array_equal(wrapped(xs), entry(xs))
        true, surrogate = entry.derivative_at(xs), wrapped.derivative_at(xs)
        assert np.all(np.asarray(surrogate) >= np.asarray(true) - 1e-12)
        assert np.all(np.asarray(surrogate) > 0)


def test_surrogate_derivatives_follow_the_documented_formulas():
    with jax.enable_x64(True):

        def slope(name, x, **params):
            entry = activations.get(name, **params)
            wrapped = activations.with_surrogate_grad(entry, _health._surrogate_for(entry))
            return float(jax.grad(wrapped)(jnp.float64(x)))

        # Theano's hard_sigmoid: 0.2 sigmoid'(0.8 x) / sigmoid'(2); 0.2 at the kinks +-2.5.
        for x in (0.0, 1.0, 2.5, -4.0, 10.0):
            expected = 0.2 * _np_sigmoid_prime(0.8 * x) / _np_sigmoid_prime(2.0)
            assert slope("hard_sigmoid", x, slope=0.2) == pytest.approx(expected, rel=1e-12)
        assert slope("hard_sigmoid", 2.5, slope=0.2) == pytest.approx(0.2, rel=1e-12)
        # A shifted hard_sigmoid is centred where slope x + shift = 0.5.
        assert slope("hard_sigmoid", 0.8, slope=0.25, shift=0.3) == pytest.approx(
            0.25 / (4 * _np_sigmoid_prime(2.0)), rel=1e-12
        )
        # hard_tanh: 2.38 tanh'(x) = tanh'(x) / tanh'(1), 1 at the kinks.
        assert slope("hard_tanh", 1.0) == pytest.approx(1.0, rel=1e-12)
        assert slope("hard_tanh", 3.0) == pytest.approx(
            (1 - np.tanh(3.0) ** 2) / (1 - np.tanh(1.0) ** 2), rel=1e-12
        )
        # ultra_fast_sigmoid: its own 0.375 / (1 + |x|/2)^2, continued past |x| = 3.4.
        for x in (0.0, 1.0, 5.0, -8.0):
            assert slope("ultra_fast_sigmoid", x) == pytest.approx(
                0.375 / (1 + abs(x) / 2) ** 2, rel=1e-12
            )
        # sigmoid and tanh: 1.83 peak / (1 + 2 peak |x| / width)^2.
        cover = max(4 * _np_sigmoid_prime(u) * (1 + u / 2) ** 2 for u in np.linspace(0, 10, 100001))
        assert _health._FAST_SIGMOID_COVER == pytest.approx(cover, rel=1e-9)
        assert slope("sigmoid", 10.0) == pytest.approx(cover * 0.25 / 36.0, rel=1e-9)
        assert slope("tanh", -3.0) == pytest.approx(cover / 16.0, rel=1e-9)
        # relu and relu6: 1 on the linear piece, SURROGATE_LEAK where the derivative is 0.
        assert slope("relu", 2.0) == 1.0 and slope("relu", -2.0) == _health.SURROGATE_LEAK
        assert slope("relu6", 7.0) == pytest.approx(_health.SURROGATE_LEAK, rel=1e-12)
        assert slope("relu6", 0.0) == pytest.approx(_health.SURROGATE_LEAK, rel=1e-12)
    assert _health._surrogate_for(activations.get("gelu")) is None
    already = activations.with_surrogate_grad("hard_sigmoid", "sigmoid")
    assert _health._surrogate_for(already) is None


# ---- diagnose -------------------------------------------------------------------------------


def test_hard_sigmoid_layer_with_no_gradient_gets_a_surrogate_that_restores_it():
    # Every hidden pre-activation is on hard_sigmoid's lower flat part: the gradient of dense_0
    # is exactly 0, and only a derivative that is nonzero there can move its weights.
    mlp = MLP([2, 8, 1], ["hard_sigmoid", None], b_init=constant(-10.0))
    params = mlp.init(jax.random.key(0))
    report = diagnose(_mse_to_one(mlp), params, X)
    layer = report.layer("dense_0")
    assert layer.grad_norm == 0.0 and layer.zero_grad_fraction == 1.0
    assert {"no gradient", "saturated"} <= set(layer.symptoms)
    surrogate = report.recommendations[0]  # the only fix that leaves fewer symptoms
    assert surrogate.name == "surrogate gradient"
    assert "no gradient" in surrogate.resolved and "dead units" in surrogate.resolved
    expected = _first_layer_grad_norm(params, X, _hard_sigmoid_surrogate_prime, _np_hard_sigmoid)
    assert expected > 0
    np.testing.assert_allclose(surrogate.grad_norms["dense_0"], expected, rtol=1e-4)
    assert surrogate.baseline_norms == {"dense_0": 0.0} and surrogate.change == {}
    assert "with_surrogate_grad" in surrogate.description
    assert "d/dx 2.38 sigmoid(0.667 (x - 0))" in surrogate.description
    text = str(report)
    assert "1. surrogate gradient" in text
    assert f"dense_0 0 -> {expected:.2e}" in text
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["recommendations"][0]["baseline_norms"] == {"dense_0": 0.0}
    assert "surrogate gradient" in report._repr_html_()


def test_mostly_saturated_hard_sigmoid_layer_gets_a_larger_gradient_from_the_surrogate():
    mlp = MLP([2, 8, 1], ["hard_sigmoid", None], w_init=normal(10.0))
    params = mlp.init(jax.random.key(0))
    report = diagnose(_mse_to_one(mlp), params, X)
    layer = report.layer("dense_0")
    z = np.asarray(X @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    assert 0.5 < np.mean(np.abs(z) >= 3) < 1 and "saturated" in layer.symptoms
    base = _first_layer_grad_norm(params, X, _hard_sigmoid_prime, _np_hard_sigmoid)
    np.testing.assert_allclose(layer.grad_norm, base, rtol=1e-4)
    surrogate = _surrogate(report)
    assert surrogate is not None
    expected = _first_layer_grad_norm(params, X, _hard_sigmoid_surrogate_prime, _np_hard_sigmoid)
    np.testing.assert_allclose(surrogate.grad_norms["dense_0"], expected, rtol=1e-4)
    assert surrogate.change["dense_0"] == pytest.approx(expected / base, rel=1e-4)
    assert surrogate.change["dense_0"] > 1.5
    # Ranked with the other fixes: Xavier re-initialisation clears the saturation on this
    # batch; the surrogate keeps the values, so the pre-activations stay far out.
    assert [r.name for r in report.recommendations] == ["xavier init", "surrogate gradient"]
    assert surrogate.remaining == ["saturated: dense_0"]


def test_saturated_sigmoid_layer_gets_heavy_tailed_surrogate():
    mlp = MLP([2, 8, 1], ["sigmoid", None], w_init=normal(20.0))
    params = mlp.init(jax.random.key(0))
    report = diagnose(_mse_to_one(mlp), params, X)
    assert "saturated" in report.layer("dense_0").symptoms
    surrogate = _surrogate(report)
    cover = _health._FAST_SIGMOID_COVER

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    expected = _first_layer_grad_norm(
        params, X, lambda z: cover * 0.25 / (1 + np.abs(z) / 2) ** 2, sigmoid
    )
    np.testing.assert_allclose(surrogate.grad_norms["dense_0"], expected, rtol=1e-4)
    assert surrogate.change["dense_0"] > 1.0


def test_dead_relu_layers_get_a_leaky_surrogate():
    mlp = MLP([4, 32, 32, 1], "relu", w_init=he_normal, b_init=constant(-10.0))
    params = mlp.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 4))
    traces = []

    def loss(p, x):
        traces.append(None)
        return jnp.mean(mlp.apply(p, x) ** 2)

    report = diagnose(loss, params, x)
    assert report.flagged("dead units") == ["dense_0", "dense_1"]
    # One trace to find the layers, one compiled program for the batch, every re-initialisation
    # and the surrogate (selected inside the program, not compiled again).
    assert len(traces) == 2 and len(report.recommendations) >= 4
    surrogate = _surrogate(report)
    assert surrogate.baseline_norms == {"dense_0": 0.0, "dense_1": 0.0}
    assert surrogate.grad_norms["dense_0"] > 0 and surrogate.grad_norms["dense_1"] > 0
    assert surrogate.remaining == []

    # Reference: jax.grad of the network with relu values and leaky_relu's slope, written with
    # stop_gradient (the value is relu's, the derivative the leaky part's).
    def surrogate_net(p, x):
        h = x
        for name in ("dense_0", "dense_1"):
            z = h @ p[name]["kernel"] + p[name]["bias"]
            leak = jnp.maximum(z, 0) + _health.SURROGATE_LEAK * jnp.minimum(z, 0)
            h = leak + jax.lax.stop_gradient(jnp.maximum(z, 0) - leak)
        return jnp.mean((h @ p["dense_2"]["kernel"] + p["dense_2"]["bias"]) ** 2)

    grads = jax.grad(surrogate_net)(params, x)
    for name in ("dense_0", "dense_1"):
        expected = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads[name])))
        np.testing.assert_allclose(surrogate.grad_norms[name], expected, rtol=1e-4)


def test_healthy_networks_and_other_symptoms_get_no_surrogate():
    mlp = MLP([2, 8, 1], ["hard_sigmoid", None])
    params = mlp.init(jax.random.key(0))
    healthy = diagnose(_mse_to_one(mlp), params, X)
    assert healthy.ok and healthy.recommendations == []
    assert healthy.layer("dense_0").zero_grad_fraction < 0.05
    # Vanishing gradients in a deep ReLU net with a tiny init: fixes are tried, but the units
    # are not dead, so no surrogate is among them.
    deep = MLP([4, 16, 16, 16, 1], "relu", w_init=normal(1e-3))
    deep_params = deep.init(jax.random.key(0))
    report = diagnose(lambda p, x: jnp.mean(deep.apply(p, x) ** 2), deep_params, jnp.ones((8, 4)))
    assert report.flagged("vanishing") and report.recommendations
    assert report.flagged("dead units") == [] and _surrogate(report) is None


def test_plain_functions_get_the_surrogate_only_when_the_boundary_applies_the_activation():
    mlp = MLP([2, 8, 1], ["hard_sigmoid", None], b_init=constant(-10.0))
    params = mlp.init(jax.random.key(0))

    def loss(apply):
        def f(p, x):
            z = x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
            h = layer_boundary("dense_0", z, "hard_sigmoid", apply=apply)
            h = h if apply else activations.hard_sigmoid(h)
            return jnp.mean((h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"] - 1.0) ** 2)

        return f

    applied = diagnose(loss(True), params, X)
    np.testing.assert_allclose(
        _surrogate(applied).grad_norms["dense_0"],
        _surrogate(diagnose(_mse_to_one(mlp), params, X)).grad_norms["dense_0"],
        rtol=1e-6,
    )
    marked_only = diagnose(loss(False), params, X)
    assert "saturated" in marked_only.layer("dense_0").symptoms
    assert _surrogate(marked_only) is None
