"""diagnose and HealthReport: verdicts, observability without rewriting the model, fixes, plots."""

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from gradkit import _health
from gradkit.diagnostics import diagnose, layer_boundary
from gradkit.layers import MLP, constant, he_normal, normal


def _cross_entropy(mlp):
    def loss(params, x, y):
        logits = mlp.apply(params, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return loss


def test_deep_relu_mlp_with_tiny_init_is_vanishing_not_dead():
    # The measured case: 10 layers of width 512, N(0, 1e-3) init, float32.
    mlp = MLP([784] + [512] * 9 + [10], "relu", w_init=normal(1e-3))
    params = mlp.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 784))
    y = jnp.arange(16) % 10
    loss = _cross_entropy(mlp)
    grads = jax.grad(loss)(params, x, y)
    kernel = grads["dense_0"]["kernel"]
    reference = np.linalg.norm(np.asarray(kernel, np.float64) * 1e20) / 1e20
    # Per-element gradients near 1e-20 but mostly nonzero: tiny, not dead.
    assert float(jnp.max(jnp.abs(kernel))) < 1e-16
    assert float(jnp.mean(kernel == 0)) < 0.6
    report = diagnose(loss, params, x, y, try_fixes=False)
    first = report.layer("dense_0")
    assert 0 < first.grad_norm < 1e-12
    np.testing.assert_allclose(
        _health._host_combine([reference, float(np.linalg.norm(grads["dense_0"]["bias"]))]),
        first.grad_norm,
        rtol=1e-4,
    )
    assert "vanishing" in first.symptoms
    assert report.flagged("no gradient") == [] and report.flagged("dead units") == []
    assert report.layer("dense_9").symptoms == []
    (finding,) = [f for f in report.findings if f.symptom == "vanishing"]
    assert finding.layers[0] == "dense_0" and "not a dead network" in finding.message


def _seed_net(params, x):
    h = x
    names = sorted(params)
    for i, name in enumerate(names):
        z = h @ params[name]["kernel"] + params[name]["bias"]
        last = i == len(names) - 1
        h = layer_boundary(name, z, None if last else "relu")
        h = h if last else jax.nn.relu(h)
    return h


def _seed_params(sizes, scale=1e-3, bias=None, seed=0):
    params = {}
    key = jax.random.key(seed)
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"dense_{i}"] = {
            "kernel": scale * jax.random.normal(k1, (a, b)),
            "bias": scale * jax.random.normal(k2, (b,)) if bias is None else jnp.full(b, bias),
        }
    return params


def _seed_loss(params, x):
    return jnp.mean(jnp.square(x[:, 0] - 2.0 * _seed_net(params, x)[:, 0]))


X = jax.random.uniform(jax.random.key(3), (32, 1), minval=-1.0, maxval=1.0)


def test_plain_function_boundaries_give_cotangents_and_verdicts():
    params = _seed_params([1, 16, 16, 1])
    report = diagnose(_seed_loss, params, X)
    assert [la.name for la in report.layers] == ["dense_0", "dense_1", "dense_2"]
    assert report.flagged("vanishing") == ["dense_0"]

    # The cotangent at each boundary is dL/dz, checked against jax.grad w.r.t. an added input.
    def loss_with_shift(shift):
        def net(p, x):
            z0 = x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"] + shift
            h = jax.nn.relu(z0)
            h = jax.nn.relu(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
            return h @ p["dense_2"]["kernel"] + p["dense_2"]["bias"]

        return jnp.mean(jnp.square(X[:, 0] - 2.0 * net(params, X)[:, 0]))

    dz0 = jax.grad(loss_with_shift)(jnp.zeros((32, 16)))
    np.testing.assert_allclose(report.layer("dense_0").cotangent_norm, np.linalg.norm(dz0), 1e-5)
    z0 = X @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]
    np.testing.assert_allclose(report.layer("dense_0").zero_grad_fraction, np.mean(z0 <= 0))
    np.testing.assert_allclose(
        report.layer("dense_0").dead_fraction, np.mean(np.all(z0 <= 0, axis=0))
    )
    # The fixes were tried: the best one clears the flag; re-initialising dense_0 alone does not.
    best = report.recommendations[0]
    assert best.remaining == [] and best.change["dense_0"] > 1e3
    only_first = [r for r in report.recommendations if r.name == "he init (flagged layers)"]
    assert only_first and only_first[0].remaining == ["vanishing: dense_0"]
    assert report.recommendations[-1] is only_first[0]


def test_two_layer_net_and_fixed_net_are_healthy():
    assert diagnose(_seed_loss, _seed_params([1, 16, 1]), X).ok
    fixed = _seed_params([1, 16, 16, 1], scale=0.3, bias=0.1)
    report = diagnose(_seed_loss, fixed, X)
    assert report.ok and report.recommendations == [] and "No problem found" in str(report)


def test_dead_units_and_positive_bias_fix():
    mlp = MLP([4, 32, 32, 1], "relu", w_init=he_normal, b_init=constant(-10.0))
    params = mlp.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 4))
    loss = lambda p, x: jnp.mean(mlp.apply(p, x) ** 2)  # noqa: E731
    report = diagnose(loss, params, x)
    assert report.layer("dense_0").dead_fraction == 1.0
    assert "dead units" in report.layer("dense_0").symptoms
    assert "no gradient" in report.layer("dense_0").symptoms
    bias_fix = [r for r in report.recommendations if r.name == "bias 0.1"]
    assert bias_fix and "dead units: dense_0" not in "; ".join(bias_fix[0].remaining)


def test_saturated_hard_sigmoid_layer_is_flagged():
    mlp = MLP([2, 8, 1], ["hard_sigmoid", None], w_init=normal(10.0))
    params = mlp.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 2))
    report = diagnose(lambda p, x: jnp.mean(mlp.apply(p, x) ** 2), params, x, try_fixes=False)
    layer = report.layer("dense_0")
    z = x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]
    from gradkit import activations

    expected = np.mean(activations.get("hard_sigmoid").saturation_mask(z))
    np.testing.assert_allclose(layer.saturated_fraction, expected)
    assert expected > 0.5 and "saturated" in layer.symptoms


def test_exploding_and_nonfinite_layers():
    params = _seed_params([1, 16, 16, 1], scale=30.0, seed=1)
    report = diagnose(_seed_loss, params, X)
    grads = jax.grad(_seed_loss)(params, X)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(grads["dense_0"])))
    assert norm > 1e6
    assert "exploding" in report.layer("dense_0").symptoms
    assert any(r.name.startswith("clip by global norm") for r in report.recommendations)
    bad = _seed_params([1, 4, 1])
    bad["dense_0"]["bias"] = bad["dense_0"]["bias"].at[0].set(jnp.nan)
    report = diagnose(_seed_loss, bad, X, try_fixes=False)
    assert report.flagged("nan/inf") == ["dense_0", "dense_1"]
    assert "find_nan_origin" in report.findings[0].message


class _Flax(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(1e-3)
        x = nn.relu(nn.Dense(16, kernel_init=init, bias_init=init)(x))
        x = nn.relu(nn.Dense(16, kernel_init=init, bias_init=init)(x))
        return nn.Dense(1, kernel_init=init, bias_init=init)(x)


def test_flax_linen_model_without_changes():
    model = _Flax()
    variables = model.init(jax.random.key(0), X)

    def loss(variables, x):
        return jnp.mean(jnp.square(x[:, 0] - 2.0 * model.apply(variables, x)[:, 0]))

    report = diagnose(loss, variables, X, activations={"Dense_0": "relu", "Dense_1": "relu"})
    assert [la.name for la in report.layers] == ["Dense_0", "Dense_1", "Dense_2"]
    assert report.layer("Dense_0").param_paths == ["params/Dense_0/bias", "params/Dense_0/kernel"]
    assert report.layer("Dense_0").activation == "relu"
    assert report.flagged("vanishing") == ["Dense_0"]


def test_params_only_fallback_and_bad_input():
    params = _seed_params([1, 16, 16, 1])

    def unmarked(p, x):
        h = x
        for name in ("dense_0", "dense_1"):
            h = jax.nn.relu(h @ p[name]["kernel"] + p[name]["bias"])
        out = h @ p["dense_2"]["kernel"] + p["dense_2"]["bias"]
        return jnp.mean(jnp.square(x[:, 0] - 2.0 * out[:, 0]))

    report = diagnose(unmarked, params, X, try_fixes=False)
    assert [la.name for la in report.layers] == ["dense_0", "dense_1", "dense_2"]
    assert report.layers[0].cotangent_norm is None
    assert report.flagged("vanishing") == ["dense_0"]
    with pytest.raises(ValueError, match="params is an empty pytree"):
        diagnose(unmarked, {}, X)
    with pytest.raises(TypeError, match=r"params\['step'\] has dtype int32"):
        diagnose(unmarked, {**params, "step": jnp.int32(0)}, X)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar loss, got shape \(32,\)"):
        diagnose(lambda p, x: x[:, 0] * p["dense_0"]["bias"][0], params, X)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        layer_boundary("", jnp.ones(2))


def test_report_renders_as_text_dict_html_and_png(tmp_path):
    report = diagnose(_seed_loss, _seed_params([1, 16, 16, 1]), X)
    text = str(report)
    assert "dense_0" in text and "vanishing" in text and "Fixes tried on the same batch" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["symptoms"] == ["vanishing"] and data["ok"] is False
    assert data["thresholds"]["VANISHING_ABSOLUTE"] == _health.VANISHING_ABSOLUTE
    html = report._repr_html_()
    assert html.count("<tr") == 4 and "background:#fdd" in html
    figure = report.plot(tmp_path / "report.png")
    assert len(figure.axes) >= 2
    image = matplotlib.image.imread(tmp_path / "report.png")
    assert image.ndim == 3 and image.shape[1] > 600 and image[..., :3].std() > 0.05
