"""diagnose and HealthReport: verdicts, observability without rewriting the model, fixes, plots.

Parameters and batches are built with NumPy and checked against float64 NumPy backpropagation,
so the only programs compiled are the ones diagnose compiles (once per model and shape).
"""

import itertools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from gradkit import _health
from gradkit.diagnostics import diagnose, layer_boundary, plot_norm_history
from gradkit.layers import MLP


def _cross_entropy(mlp):
    def loss(params, x, y):
        logits = mlp.apply(params, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return loss


def _relu_mlp_backprop(params, x, d_output):
    """float64 NumPy backprop through ``dense_0 .. dense_{L-1}`` (ReLU hidden, linear output).

    ``d_output(out) -> dL/dout``. Returns the parameter gradients and dL/dz of every layer.
    """
    names = sorted(params, key=lambda name: int(name.split("_")[1]))
    p = {n: {k: np.asarray(v, np.float64) for k, v in params[n].items()} for n in names}
    h, inputs, zs = np.asarray(x, np.float64), [], []
    for i, name in enumerate(names):
        inputs.append(h)
        zs.append(h @ p[name]["kernel"] + p[name]["bias"])
        h = zs[-1] if i == len(names) - 1 else np.maximum(zs[-1], 0.0)
    dz = d_output(h)
    grads, dzs = {}, {}
    for i in reversed(range(len(names))):
        name = names[i]
        dzs[name] = dz
        grads[name] = {"kernel": inputs[i].T @ dz, "bias": dz.sum(axis=0)}
        if i:
            dz = (dz @ p[name]["kernel"].T) * (zs[i - 1] > 0)
    return grads, dzs


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree))))


def test_deep_relu_mlp_with_tiny_init_is_vanishing_not_dead():
    # The measured case: 10 layers of width 512, N(0, 1e-3) init, float32.
    sizes = [784] + [512] * 9 + [10]
    mlp = MLP(sizes, "relu")
    rng = np.random.default_rng(0)
    params = {
        f"dense_{i}": {
            "kernel": (1e-3 * rng.standard_normal((a, b))).astype(np.float32),
            "bias": np.zeros(b, np.float32),
        }
        for i, (a, b) in enumerate(itertools.pairwise(sizes))
    }
    x = rng.standard_normal((16, 784)).astype(np.float32)
    y = np.arange(16) % 10

    def d_cross_entropy(logits):
        soft = np.exp(logits - logits.max(axis=1, keepdims=True))
        soft /= soft.sum(axis=1, keepdims=True)
        soft[np.arange(16), y] -= 1.0
        return soft / 16

    grads, _ = _relu_mlp_backprop(params, x, d_cross_entropy)
    kernel = grads["dense_0"]["kernel"]
    # Per-element gradients near 1e-20 but mostly nonzero: tiny, not dead.
    assert np.max(np.abs(kernel)) < 1e-16
    assert np.mean(kernel == 0) < 0.6
    report = diagnose(_cross_entropy(mlp), params, x, y, try_fixes=False)
    first = report.layer("dense_0")
    assert 0 < first.grad_norm < 1e-12
    np.testing.assert_allclose(first.grad_norm, _norm(grads["dense_0"]), rtol=1e-4)
    # The float32 gradient behind the report is as tiny and as rarely exactly zero.
    np.testing.assert_allclose(
        first.grad_max_abs, max(np.max(np.abs(g)) for g in grads["dense_0"].values()), rtol=1e-4
    )
    assert first.grad_zero_fraction < 0.6
    assert "vanishing" in first.symptoms
    assert report.flagged("no gradient") == [] and report.flagged("dead units") == []
    assert report.layer("dense_9").symptoms == []
    (finding,) = [f for f in report.findings if f.symptom == "vanishing"]
    assert finding.layers[0] == "dense_0" and "not a dead network" in finding.message


_TRACES = []  # one entry each time _seed_net runs in Python, i.e. each time it is traced


def _seed_net(params, x):
    _TRACES.append(len(params))
    h = x
    names = sorted(params)
    for i, name in enumerate(names):
        z = h @ params[name]["kernel"] + params[name]["bias"]
        last = i == len(names) - 1
        h = layer_boundary(name, z, None if last else "relu")
        h = h if last else jax.nn.relu(h)
    return h


def _seed_params(sizes, scale=1e-3, bias=None, seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"dense_{i}"] = {
            "kernel": (scale * rng.standard_normal((a, b))).astype(np.float32),
            "bias": (scale * rng.standard_normal(b) if bias is None else np.full(b, bias)).astype(
                np.float32
            ),
        }
    return params


def _seed_loss(params, x):
    return jnp.mean(jnp.square(x[:, 0] - 2.0 * _seed_net(params, x)[:, 0]))


def _seed_backprop(params, x):
    """float64 NumPy reference for _seed_loss: (loss, param grads, dL/dz per layer)."""
    x = np.asarray(x, np.float64)
    outputs = []

    def d_output(out):
        outputs.append(out)
        return -4.0 * (x[:, :1] - 2.0 * out) / len(x)

    grads, dzs = _relu_mlp_backprop(params, x, d_output)
    return float(np.mean((x[:, 0] - 2.0 * outputs[0][:, 0]) ** 2)), grads, dzs


X = np.random.default_rng(3).uniform(-1.0, 1.0, (32, 1)).astype(np.float32)
SEED_3_LAYER = _seed_params([1, 16, 16, 1])


@pytest.fixture(scope="module")
def seed_report():
    """diagnose of the seed-004 3-layer net (N(0, 1e-3) init) on X, fixes included."""
    return diagnose(_seed_loss, SEED_3_LAYER, X)


def test_plain_function_boundaries_give_cotangents_and_verdicts(seed_report):
    report = seed_report
    assert [la.name for la in report.layers] == ["dense_0", "dense_1", "dense_2"]
    assert report.flagged("vanishing") == ["dense_0"]
    loss, grads, dzs = _seed_backprop(SEED_3_LAYER, X)
    np.testing.assert_allclose(report.loss, loss, rtol=1e-5)
    for name in ("dense_0", "dense_1", "dense_2"):
        # The cotangent at each boundary is dL/dz; the layer's gradient norm is its params'.
        np.testing.assert_allclose(report.layer(name).cotangent_norm, _norm(dzs[name]), 1e-5)
        np.testing.assert_allclose(report.layer(name).grad_norm, _norm(grads[name]), 1e-5)
    z0 = X @ SEED_3_LAYER["dense_0"]["kernel"] + SEED_3_LAYER["dense_0"]["bias"]
    np.testing.assert_allclose(report.layer("dense_0").zero_grad_fraction, np.mean(z0 <= 0))
    np.testing.assert_allclose(
        report.layer("dense_0").dead_fraction, np.mean(np.all(z0 <= 0, axis=0))
    )
    np.testing.assert_allclose(report.layer("dense_0").preactivation_std, np.std(z0), rtol=1e-5)
    # The fixes were tried: the best one clears the flag; re-initialising dense_0 alone does not.
    best = report.recommendations[0]
    assert best.remaining == [] and best.change["dense_0"] > 1e3
    only_first = [r for r in report.recommendations if r.name == "he init (flagged layers)"]
    assert only_first and only_first[0].remaining == ["vanishing: dense_0"]
    assert report.recommendations[-1] is only_first[0]


def test_reinitialisation_draws_he_and_xavier_scales():
    params = {"a": {"kernel": np.ones((64, 32), np.float32), "bias": np.ones(32, np.float32)}}
    paths = {"a/kernel", "a/bias"}
    he = _health._reinit(params, paths, "he", jax.random.key(0))["a"]
    xavier = _health._reinit(params, paths, "xavier", jax.random.key(0), 0.1, {"a"})["a"]
    assert he["kernel"].dtype == jnp.float32 and he["kernel"].shape == (64, 32)
    np.testing.assert_allclose(np.std(he["kernel"]), np.sqrt(2 / 64), rtol=0.05)
    np.testing.assert_allclose(np.std(xavier["kernel"]), np.sqrt(2 / 96), rtol=0.05)
    np.testing.assert_array_equal(he["bias"], 1.0)  # only ReLU layers get the bias
    np.testing.assert_array_equal(xavier["bias"], np.float32(0.1))


def test_two_layer_net_and_fixed_net_are_healthy():
    assert diagnose(_seed_loss, _seed_params([1, 16, 1]), X).ok
    fixed = _seed_params([1, 16, 16, 1], scale=0.3, bias=0.1)
    report = diagnose(_seed_loss, fixed, X)
    assert report.ok and report.recommendations == [] and "No problem found" in str(report)


def test_a_second_call_reuses_the_compiled_analysis_and_takes_the_new_batch(seed_report):
    # Same loss function and shapes: no new trace, even with weakly typed parameters, and the
    # batch is an argument of the compiled analysis, not a constant baked into it.
    traces = len(_TRACES)
    params = _seed_params([1, 16, 16, 1], scale=0.3, seed=5)
    params["dense_1"]["bias"] = jnp.full(16, 0.1)
    assert params["dense_1"]["bias"].weak_type
    x = X[::-1] * 0.5
    report = diagnose(_seed_loss, params, x, try_fixes=False)
    assert len(_TRACES) == traces
    loss, grads, _ = _seed_backprop(params, x)
    np.testing.assert_allclose(report.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(report.layer("dense_1").grad_norm, _norm(grads["dense_1"]), 1e-5)


def test_dead_units_and_positive_bias_fix():
    mlp = MLP([4, 32, 32, 1], "relu")
    rng = np.random.default_rng(0)
    params = {
        f"dense_{i}": {
            "kernel": (np.sqrt(2 / a) * rng.standard_normal((a, b))).astype(np.float32),
            "bias": np.full(b, -10.0, np.float32),
        }
        for i, (a, b) in enumerate(itertools.pairwise([4, 32, 32, 1]))
    }
    x = rng.standard_normal((16, 4)).astype(np.float32)
    report = diagnose(lambda p, x: jnp.mean(mlp.apply(p, x) ** 2), params, x)
    assert report.layer("dense_0").dead_fraction == 1.0
    assert "dead units" in report.layer("dense_0").symptoms
    assert "no gradient" in report.layer("dense_0").symptoms
    bias_fix = [r for r in report.recommendations if r.name == "bias 0.1"]
    assert bias_fix and "dead units: dense_0" not in "; ".join(bias_fix[0].remaining)


def test_saturated_hard_sigmoid_layer_is_flagged():
    mlp = MLP([2, 8, 1], ["hard_sigmoid", None])
    rng = np.random.default_rng(0)
    params = {
        "dense_0": {"kernel": 10.0 * rng.standard_normal((2, 8)), "bias": np.zeros(8)},
        "dense_1": {"kernel": rng.standard_normal((8, 1)), "bias": np.zeros(1)},
    }
    params = jax.tree_util.tree_map(lambda a: a.astype(np.float32), params)
    x = rng.standard_normal((64, 2)).astype(np.float32)
    report = diagnose(lambda p, x: jnp.mean(mlp.apply(p, x) ** 2), params, x, try_fixes=False)
    layer = report.layer("dense_0")
    z = x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]
    from gradkit import activations

    expected = np.mean(activations.get("hard_sigmoid").saturation_mask(z))
    np.testing.assert_allclose(layer.saturated_fraction, expected)
    # jax.nn's hard_sigmoid, relu6(x + 3) / 6, has slope 1/6 strictly inside |z| < 3 and 0 on
    # the closed flat parts: those are its saturated pre-activations.
    np.testing.assert_allclose(layer.saturated_fraction, np.mean(np.abs(z) >= 3))
    np.testing.assert_allclose(layer.zero_grad_fraction, np.mean(np.abs(z) >= 3))
    assert expected > 0.5 and "saturated" in layer.symptoms


def test_exploding_and_nonfinite_layers():
    params = _seed_params([1, 16, 16, 1], scale=30.0, seed=1)
    report = diagnose(_seed_loss, params, X)
    _, grads, _ = _seed_backprop(params, X)
    assert _norm(grads["dense_0"]) > 1e6
    np.testing.assert_allclose(report.layer("dense_0").grad_norm, _norm(grads["dense_0"]), 1e-4)
    assert "exploding" in report.layer("dense_0").symptoms
    assert any(r.name.startswith("clip by global norm") for r in report.recommendations)
    bad = _seed_params([1, 16, 1])
    bad["dense_0"]["bias"][0] = np.nan
    report = diagnose(_seed_loss, bad, X, try_fixes=False)
    assert report.flagged("nan/inf") == ["dense_0", "dense_1"]
    assert "find_nan_origin" in report.findings[0].message
    # A NaN gradient reads as NaN, never as a norm of 0 (its finite entries are all zero here).
    assert all(np.isnan(report.layer(n).grad_norm) for n in ("dense_0", "dense_1"))
    assert np.isnan(report.layer("dense_0").cotangent_norm)
    assert str(report).splitlines()[3].split()[2:4] == ["nan", "nan"]
    # Clipping cannot repair a NaN, so it is not offered.
    report = diagnose(_seed_loss, bad, X)
    assert report.flagged("nan/inf") and report.recommendations == []


def test_a_gradient_near_the_float32_maximum_is_exploding_not_ok():
    # Finite entries of about 2e38: the layer's norm overflows to inf (it once came out NaN,
    # which no threshold compares with, and the layer read "ok").
    def net(p, x):
        z0 = layer_boundary("l0", x @ p["l0"]["w"], None)
        z1 = layer_boundary("l1", (z0 * jnp.float32(1e37)) @ p["l1"]["w"], None)
        return jnp.mean(z1)

    params = {"l0": {"w": jnp.full((2, 3), 1e-37)}, "l1": {"w": jnp.full((3, 1), 20.0)}}
    report = diagnose(net, params, jnp.ones((4, 2)), try_fixes=False)
    assert report.layer("l0").grad_norm == np.inf
    assert report.flagged("exploding") == ["l0"]


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
    # Flax's parameters are the seed net's under other names: the same NumPy reference holds.
    as_seed = {f"dense_{i}": dict(variables["params"][f"Dense_{i}"]) for i in range(3)}
    _, grads, dzs = _seed_backprop(as_seed, X)
    for i in range(3):
        layer = report.layer(f"Dense_{i}")
        np.testing.assert_allclose(layer.grad_norm, _norm(grads[f"dense_{i}"]), rtol=1e-4)
        np.testing.assert_allclose(layer.cotangent_norm, _norm(dzs[f"dense_{i}"]), rtol=1e-4)


class _Normalised(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False)(x))
        return nn.Dense(1)(x)


def test_flax_collections_other_than_params_are_not_judged():
    # batch_stats are updated by the forward pass, not by gradients: their gradient is 0 and
    # must not read as "no gradient".
    model = _Normalised()
    variables = model.init(jax.random.key(0), X)
    assert set(variables) == {"params", "batch_stats"}

    def loss(variables, x):
        out, _ = model.apply(variables, x, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out[:, 0] - x[:, 0]))

    report = diagnose(loss, variables, X, try_fixes=False)
    paths = [path for layer in report.layers for path in layer.param_paths]
    assert paths and all(path.startswith("params/") for path in paths)
    assert "params/BatchNorm_0/scale" in paths
    assert report.flagged("no gradient") == []
    # BatchNorm has no boundary of its own; it is listed where the forward pass uses it (it
    # was once appended after the last layer, so "where the problem starts" could skip it).
    assert [layer.name for layer in report.layers] == ["Dense_0", "BatchNorm_0", "Dense_1"]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(8, kernel_init=nn.initializers.normal(0.5))(x))


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block()(x)
        x = Block()(x)
        return nn.Dense(1)(x)


def test_nested_flax_modules_with_the_same_names_get_their_own_parameters():
    # Both blocks hold a "Dense_0": each boundary must get its own block's parameters.
    model = Nested()
    variables = model.init(jax.random.key(0), X)
    report = diagnose(lambda v, x: jnp.mean(model.apply(v, x) ** 2), variables, X, try_fixes=False)
    names = ["Block_0/Dense_0", "Block_1/Dense_0", "Dense_0"]
    assert [la.name for la in report.layers] == names
    for name in names:
        assert report.layer(name).param_paths == [f"params/{name}/bias", f"params/{name}/kernel"]
    as_seed = {
        "dense_0": variables["params"]["Block_0"]["Dense_0"],
        "dense_1": variables["params"]["Block_1"]["Dense_0"],
        "dense_2": variables["params"]["Dense_0"],
    }
    grads, dzs = _relu_mlp_backprop(as_seed, X, lambda out: 2.0 * out / out.size)
    for i, name in enumerate(names):
        np.testing.assert_allclose(report.layer(name).grad_norm, _norm(grads[f"dense_{i}"]), 1e-4)
        np.testing.assert_allclose(
            report.layer(name).cotangent_norm, _norm(dzs[f"dense_{i}"]), rtol=1e-4
        )


def test_boundaries_inside_vmap_or_a_nested_jit_fall_back_to_parameter_gradients(seed_report):
    # A tap inside a transformation that loss_fn applies itself cannot be read from outside it;
    # diagnose must not crash, and it judges those layers from their parameter gradients.
    def per_example(p, x):
        return _seed_loss(p, x[None])

    def vmapped(p, x):
        return jnp.mean(jax.vmap(per_example, (None, 0))(p, x))

    for loss in (vmapped, jax.jit(_seed_loss)):
        report = diagnose(loss, SEED_3_LAYER, X, try_fixes=False)
        assert report.unobserved == ["dense_0", "dense_1", "dense_2"]
        assert [la.name for la in report.layers] == ["dense_0", "dense_1", "dense_2"]
        assert all(la.cotangent_norm is None for la in report.layers)
        for name in ("dense_0", "dense_1", "dense_2"):
            np.testing.assert_allclose(
                report.layer(name).grad_norm, seed_report.layer(name).grad_norm, rtol=1e-5
            )
        assert report.flagged("vanishing") == ["dense_0"]
        assert "dense_0, dense_1, dense_2 are inside a vmap" in str(report)


def test_a_boundary_with_exactly_zero_cotangent_has_no_gradient():
    def loss_and_aux(p, x):
        z = x @ p["dense_0"]["kernel"]
        gate = layer_boundary("gate", z)  # its value never reaches the loss's derivative
        return jnp.mean(z**2) + 0.0 * jnp.sum(jax.lax.stop_gradient(gate)), {"z": z}

    params = {"dense_0": {"kernel": np.ones((1, 4), np.float32)}}
    report = diagnose(loss_and_aux, params, X, has_aux=True, try_fixes=False)
    np.testing.assert_allclose(report.loss, np.mean(X**2), rtol=1e-6)  # z is X in 4 columns
    assert report.layer("gate").cotangent_norm == 0.0
    assert report.layer("gate").symptoms == ["no gradient"]
    assert report.layer("dense_0").symptoms == []


def test_the_reference_layer_is_the_last_marked_layer_not_an_unmarked_parameter():
    # An unmarked scalar parameter ("temperature") is listed after the marked layers; with it
    # as the yardstick every layer, output included, would read as vanishing.
    def scaled_loss(p, x):
        return p["temperature"] * _seed_loss(p["net"], x)

    params = {"net": SEED_3_LAYER, "temperature": np.float32(1e-6)}
    report = diagnose(scaled_loss, params, X, try_fixes=False)
    assert [la.name for la in report.layers] == ["dense_0", "dense_1", "dense_2", "temperature"]
    assert report.reference_layer == "dense_2"
    assert report.flagged("vanishing") == ["dense_0"]
    loss, grads, _ = _seed_backprop(SEED_3_LAYER, X)
    np.testing.assert_allclose(report.layer("temperature").grad_norm, loss, rtol=1e-5)
    np.testing.assert_allclose(
        report.layer("dense_2").grad_norm, 1e-6 * _norm(grads["dense_2"]), rtol=1e-5
    )


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
    assert report.unobserved == []
    with pytest.raises(ValueError, match="params is an empty pytree"):
        diagnose(unmarked, {}, X)
    with pytest.raises(TypeError, match=r"params\['step'\] has dtype int32"):
        diagnose(unmarked, {**params, "step": jnp.int32(0)}, X)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar loss, got shape \(32,\)"):
        diagnose(lambda p, x: x[:, 0] * p["dense_0"]["bias"][0], params, X)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        layer_boundary("", jnp.ones(2))
    with pytest.raises(ValueError, match=r"unknown activation 'rleu'.*'relu'"):
        layer_boundary("dense_0", jnp.ones(2), "rleu")
    with pytest.raises(ValueError, match=r"activations\['dense_0'\]: unknown activation 'rleu'"):
        diagnose(unmarked, params, X, activations={"dense_0": "rleu"})
    with pytest.raises(TypeError, match="loss_fn must be callable, got int"):
        diagnose(3, params, X)
    # A misspelt layer name once turned off the activation analysis without a word.
    with pytest.raises(
        ValueError, match=r"activations names layer 'Dense_0'.*did you mean 'dense_0'"
    ):
        diagnose(unmarked, params, X, activations={"Dense_0": "relu"}, try_fixes=False)
    with pytest.raises(TypeError, match=r"returned a tuple of 2.*has_aux=True"):
        diagnose(lambda p, x: (unmarked(p, x), {}), params, X, try_fixes=False)
    with pytest.raises(TypeError, match=r"with has_aux=True, loss_fn must return \(loss, aux\)"):
        diagnose(unmarked, params, X, has_aux=True, try_fixes=False)


def test_report_dict_is_strict_json_when_the_loss_is_nan():
    params = _seed_params([1, 8, 1])
    params["dense_0"]["kernel"] = np.array(params["dense_0"]["kernel"])
    params["dense_0"]["kernel"][0, 0] = np.nan

    def loss(p, x):
        h = jax.nn.relu(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
        return jnp.mean(jnp.square(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]))

    report = diagnose(loss, params, X, try_fixes=False)
    assert math.isnan(report.loss)
    text = json.dumps(report.to_dict(), allow_nan=False)  # raised ValueError before
    data = json.loads(text)
    assert data["loss"] == "NaN" and math.isnan(float(data["loss"]))


def test_report_renders_as_text_dict_html_and_png(seed_report, tmp_path):
    report = seed_report
    text = str(report)
    assert "dense_0" in text and "vanishing" in text and "Fixes tried on the same batch" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["symptoms"] == ["vanishing"] and data["ok"] is False
    assert data["thresholds"]["VANISHING_ABSOLUTE"] == _health.VANISHING_ABSOLUTE
    assert data["layers"][0]["grad_norm"] == report.layer("dense_0").grad_norm
    assert data["recommendations"][0]["name"] == report.recommendations[0].name
    html = report._repr_html_()
    assert html.count("<tr") == 4 and "background:#fdd" in html
    figure = report.plot(tmp_path / "report.png")
    assert len(figure.axes) >= 2
    image = matplotlib.image.imread(tmp_path / "report.png")
    assert image.ndim == 3 and image.shape[1] > 600 and image[..., :3].std() > 0.05


def test_norm_history_plot_marks_flagged_layers_and_skips_zero_norms(tmp_path):
    steps = [0, 100, 200]
    histories = {
        "broken": (steps, {"dense_0": [1e-9, 0.0, 1e-10], "dense_1": [1e-3, 1e-3, 2e-3]}),
        "fixed": (steps, {"dense_0": [0.1, 0.2, 0.1], "dense_1": [0.3, 0.2, 0.1]}),
    }
    figure = plot_norm_history(histories, tmp_path / "norms.png", flagged={"broken": ["dense_0"]})
    broken, fixed = figure.axes
    assert broken.get_title() == "broken" and broken.get_yscale() == "log"
    lines = {line.get_label(): line for line in broken.get_lines() if line.get_label()[0] != "_"}
    assert set(lines) == {"dense_0 (flagged)", "dense_1"}
    assert lines["dense_0 (flagged)"].get_color() == "red"
    # A zero norm has no place on a log scale: it is a gap, not a point at the axis' bottom.
    assert np.isnan(lines["dense_0 (flagged)"].get_ydata()[1])
    assert all(line.get_color() != "red" for line in fixed.get_lines())
    image = matplotlib.image.imread(tmp_path / "norms.png")
    assert image.ndim == 3 and image.shape[1] > 600 and image[..., :3].std() > 0.05


def test_a_few_batches_are_analysed_as_one():
    # Unit 0 fires for x > 0 only, unit 1 for x < 0 only: each looks dead on a batch of one sign.
    mlp = MLP([1, 2, 1], "relu")
    params = {
        "dense_0": {"kernel": np.array([[1.0, -1.0]], np.float32), "bias": np.zeros(2, np.float32)},
        "dense_1": {
            "kernel": np.array([[0.5], [0.7]], np.float32),
            "bias": np.zeros(1, np.float32),
        },
    }

    def loss(p, x, y):
        return jnp.mean((mlp.apply(p, x) - y) ** 2)

    negative = (-np.linspace(0.5, 2.0, 6, dtype=np.float32)[:, None], np.ones((6, 1), np.float32))
    positive = (np.linspace(0.5, 2.0, 4, dtype=np.float32)[:, None], np.zeros((4, 1), np.float32))
    one = diagnose(loss, params, *negative, try_fixes=False)
    assert one.layer("dense_0").dead_fraction == 0.5
    both = diagnose(loss, params, batches=[negative, positive], try_fixes=False)
    assert both.layer("dense_0").dead_fraction == 0.0
    x, y = (np.concatenate(parts) for parts in zip(negative, positive, strict=True))
    grads, _ = _relu_mlp_backprop(params, x, lambda out: 2 * (out - y) / y.size)
    np.testing.assert_allclose(both.layer("dense_0").grad_norm, _norm(grads["dense_0"]), 1e-5)
    np.testing.assert_allclose(both.loss, float(loss(params, x, y)), rtol=1e-6)
    # Single-argument batches may be given bare.
    bare = diagnose(lambda p, x: jnp.mean(mlp.apply(p, x) ** 2), params, batches=[x[:6], x[6:]])
    assert bare.layer("dense_0").dead_fraction == 0.0


def test_bad_batches_are_refused_with_a_reason():
    mlp = MLP([2, 3, 1], "relu")
    params = mlp.init(jax.random.key(0))

    def loss(p, x, scale=1.0):
        return scale * jnp.mean(mlp.apply(p, x) ** 2)

    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="either \\*batch or batches"):
        diagnose(loss, params, x, batches=[(x,)])
    with pytest.raises(ValueError, match="batches is empty"):
        diagnose(loss, params, batches=[])
    with pytest.raises(ValueError, match=r"cannot be joined along its first axis: shapes"):
        diagnose(loss, params, batches=[(x,), (np.ones((4, 3), np.float32),)])
    with pytest.raises(ValueError, match="another structure"):
        diagnose(loss, params, batches=[(x,), (x, x)])
    with pytest.raises(ValueError, match="is not an array and differs"):
        diagnose(loss, params, batches=[(x, 1.0), (x, 2.0)])


@pytest.mark.parametrize("symptom", ["vanishing", "exploding"])
def test_fixes_are_ranked_by_how_far_they_move_the_gradient_the_right_way(symptom):
    # Two candidate fixes leave the same findings; one moves the sick layer's gradient 100x the
    # helpful way, the other 1000x the harmful way. The helpful one must score higher.
    before = 1e-8 if symptom == "vanishing" else 1e8
    helpful, harmful = (100.0, 1e-3) if symptom == "vanishing" else (1e-2, 1e3)
    sick = _health.LayerHealth("dense_0", grad_norm=before, symptoms=[symptom])
    last = _health.LayerHealth("dense_1", grad_norm=1.0)
    base = _health._Analysis(1.0, [sick, last])
    scores = {}
    for name, factor in (("helpful", helpful), ("harmful", harmful)):
        moved = [_health.LayerHealth("dense_0", grad_norm=before * factor), last]
        scores[name], _ = _health._recommendation(name, "", moved, base, [], [])
    assert scores["helpful"] > 0 > scores["harmful"]


def test_a_small_gradient_is_not_exploding_next_to_a_tinier_last_layer():
    # Flax in train mode with N(0, 1e-3) weights: the last layer's gradient 3e-15, the others
    # 1e-13 to 1e-6. Relative to the last layer they were all "exploding".
    layers = [
        _health.LayerHealth("dense_0", grad_norm=1e-6),
        _health.LayerHealth("dense_1", grad_norm=1e-13),
        _health.LayerHealth("dense_2", grad_norm=3e-15),
    ]
    assert _health._judge(layers, "dense_2") == []
    # Large relative to the last layer and not small itself: still exploding.
    layers = [
        _health.LayerHealth("dense_0", grad_norm=2e-4),
        _health.LayerHealth("dense_1", grad_norm=1e-6),
        _health.LayerHealth("dense_2", grad_norm=1e-6),
    ]
    findings = _health._judge(layers, "dense_2")
    assert [(f.symptom, f.layers) for f in findings] == [("exploding", ["dense_0"])]


def test_the_clipping_counterfactual_scales_layers_without_parameters_too():
    # dense_0 explodes; "act" has no parameters and is judged by its cotangent. Clipping scales
    # every norm by the same factor, so it must not make "act" look exploding next to the rest.
    layers = [
        _health.LayerHealth("dense_0", grad_norm=1e7),
        _health.LayerHealth("act", cotangent_norm=50.0),
        _health.LayerHealth("dense_1", grad_norm=1.0),
    ]
    findings = _health._judge(layers, "dense_1")
    assert [(f.symptom, f.layers) for f in findings] == [("exploding", ["dense_0"])]
    _, recommendation = _health._clipped(_health._Analysis(1.0, layers), findings, "dense_1")
    # relative to the last layer dense_0 still explodes (clipping keeps ratios); "act" joins none
    assert recommendation.remaining == ["exploding: dense_0"]
