"""Tests for gradkit.layers: Dense, MLP, initializers, shape errors, dtype policy, probe taps."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jax_init

from gradkit import _probe, activations, layers
from gradkit.layers import MLP, Dense

KEY = jax.random.key(0)


def _numpy_dense(params, x, activation=lambda z: z):
    kernel = np.asarray(params["kernel"], np.float64)
    bias = np.asarray(params["bias"], np.float64)
    return activation(np.asarray(x, np.float64) @ kernel + bias)


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ---- Dense ------------------------------------------------------------------------------------


def test_dense_init_shapes_and_default_dtype():
    params = Dense(3).init(KEY, (5, 2))
    assert set(params) == {"kernel", "bias"}
    assert params["kernel"].shape == (2, 3) and params["bias"].shape == (3,)
    assert params["kernel"].dtype == jnp.float32 and params["bias"].dtype == jnp.float32
    np.testing.assert_array_equal(params["bias"], np.zeros(3))
    assert Dense(3).init(KEY, 2)["kernel"].shape == (2, 3)  # an int is the feature count


def test_dense_without_bias_has_only_a_kernel():
    layer = Dense(3, use_bias=False)
    params = layer.init(KEY, (2,))
    assert set(params) == {"kernel"}
    x = np.arange(4.0, dtype=np.float32).reshape(2, 2)
    np.testing.assert_allclose(layer.apply(params, x), x @ np.asarray(params["kernel"]), rtol=1e-6)


@pytest.mark.parametrize("shape", [(2,), (7, 2), (3, 4, 2)])
def test_dense_matches_numpy_on_one_example_and_any_batch_shape(shape):
    layer = Dense(3, activation=jnp.tanh)
    params = layer.init(KEY, shape)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    y = jax.jit(layer.apply)(params, x)
    assert y.shape == (*shape[:-1], 3)
    np.testing.assert_allclose(y, _numpy_dense(params, x, np.tanh), rtol=1e-5, atol=1e-6)


def test_dense_vmap_over_examples_equals_batched_apply():
    layer = Dense(4, activation=jax.nn.relu)
    params = layer.init(KEY, (3,))
    x = jax.random.normal(jax.random.key(1), (6, 3))
    np.testing.assert_allclose(
        jax.vmap(layer.apply, in_axes=(None, 0))(params, x), layer.apply(params, x), rtol=1e-6
    )


def test_dense_gradient_matches_float64_finite_differences():
    layer = Dense(2, activation=jnp.tanh)
    with jax.enable_x64(True):
        params = layer.init(KEY, (3,))
        x = jax.random.normal(jax.random.key(2), (4, 3), dtype=jnp.float64)

        def loss(kernel):
            return jnp.sum(layer.apply({"kernel": kernel, "bias": params["bias"]}, x) ** 2)

        grad = jax.grad(loss)(params["kernel"])
        eps = 1e-6
        bumps = eps * jnp.eye(6).reshape(6, 3, 2)  # one central difference per kernel entry
        losses = jax.vmap(loss)
        reference = (losses(params["kernel"] + bumps) - losses(params["kernel"] - bumps)) / (
            2 * eps
        )
        np.testing.assert_allclose(grad, reference.reshape(3, 2), rtol=1e-7, atol=1e-9)


def test_dense_exposes_activation_name_and_layers():
    layer = Dense(2, activation="sigmoid", name="out")
    assert layer.activation == "sigmoid" and layer.layer_name == "out"
    assert layer.layers == (layer,)
    assert Dense(2).layer_name == "dense"
    assert Dense(2).output_shape((9, 5)) == (9, 2)
    assert Dense(2).output_shape(5) == Dense(2).output_shape((5,)) == (2,)
    x = jnp.ones((4, 3, 5))
    assert Dense(2).output_shape(x.shape) == Dense(2).apply(Dense(2).init(KEY, 5), x).shape


def test_activation_names_resolve_through_gradkit_activations():
    layer = Dense(3, activation="sigmoid")
    params = layer.init(KEY, (2,))
    x = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    np.testing.assert_allclose(
        layer.apply(params, x), _numpy_dense(params, x, _np_sigmoid), rtol=1e-6
    )
    assert activations.get("sigmoid") is not None


def test_activation_names_are_looked_up_when_applied_not_when_built(monkeypatch):
    layer = Dense(2, activation="my_custom")  # unknown now: building must not fail
    params = layer.init(KEY, (2,))
    with pytest.raises(ValueError, match=r"Dense layer 'dense'.*unknown activation 'my_custom'"):
        layer.apply(params, jnp.ones(2))
    monkeypatch.setattr(activations, "get", lambda name: lambda z: 2.0 * z)
    x = jnp.array([1.0, 2.0])
    np.testing.assert_allclose(layer.apply(params, x), 2.0 * _numpy_dense(params, x), rtol=1e-6)


def test_dense_rejects_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"features must be at least 1, got 0"):
        Dense(0)
    with pytest.raises(TypeError, match=r"features must be an int, got 2.5"):
        Dense(2.5)
    with pytest.raises(TypeError, match=r"activation must be a gradkit.activations name.*got 3"):
        Dense(2, activation=3)
    with pytest.raises(ValueError, match=r"param_dtype must be a floating dtype, got int32"):
        Dense(2, param_dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"w_init must be an initializer"):
        Dense(2, w_init="glorot")
    with pytest.raises(TypeError, match=r"positional argument"):
        Dense(2, "relu")  # everything after features is keyword-only


# ---- shape errors (Theano's test values) ------------------------------------------------------


def test_shape_error_names_layer_expected_actual_and_the_callers_line():
    mlp = MLP([2, 4, 1], "sigmoid")
    params = mlp.init(KEY)
    with pytest.raises(ValueError) as info:
        mlp.apply(params, jnp.zeros((3, 5)))  # the line the message must name
    message = str(info.value)
    assert "layer 'dense_0'" in message
    assert "(..., 2)" in message and "(3, 5)" in message
    assert "test_layers.py:" in message and "mlp.apply(params, jnp.zeros((3, 5)))" in message


def test_shape_error_is_raised_at_trace_time_under_jit_with_the_users_line():
    layer = Dense(3, name="hidden")
    params = layer.init(KEY, (4,))

    def model(p, x):
        return layer.apply(p, x) * 2.0  # user code calling the layer

    with pytest.raises(ValueError) as info:
        jax.jit(model).trace(params, jax.ShapeDtypeStruct((8, 5), jnp.float32))
    message = str(info.value)
    assert "Dense layer 'hidden'" in message and "(..., 4)" in message and "(8, 5)" in message
    assert "layer.apply(p, x) * 2.0" in message


def test_params_of_another_layer_are_refused():
    with pytest.raises(ValueError, match=r"params\['kernel'\] must have shape \(in, 3\), got"):
        Dense(3).apply(Dense(2).init(KEY, (4,)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"params lack 'bias'"):
        Dense(3).apply({"kernel": jnp.ones((4, 3))}, jnp.ones(4))
    with pytest.raises(ValueError, match=r"params must be the dict init returned"):
        Dense(3).apply([jnp.ones((4, 3))], jnp.ones(4))
    with pytest.raises(ValueError, match=r"input of shape \(\)"):
        Dense(3).apply(Dense(3).init(KEY, 1), jnp.float32(1.0))


# ---- MLP --------------------------------------------------------------------------------------


def test_mlp_layer_sizes_include_the_input_size():
    mlp = MLP([2, 4, 1], ["sigmoid", "sigmoid"])
    params = mlp.init(KEY)
    assert list(params) == ["dense_0", "dense_1"]
    assert params["dense_0"]["kernel"].shape == (2, 4)
    assert params["dense_1"]["kernel"].shape == (4, 1)
    assert [layer.name for layer in mlp.layers] == ["dense_0", "dense_1"]
    assert mlp.activations == ("sigmoid", "sigmoid")
    assert mlp.layer_sizes == (2, 4, 1)


def test_mlp_matches_a_numpy_composition_of_its_layers():
    mlp = MLP([3, 5, 4, 2], [jnp.tanh, jax.nn.relu, None])
    params = mlp.init(KEY, (3,))
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    h = np.tanh(_numpy_dense(params["dense_0"], x))
    h = np.maximum(_numpy_dense(params["dense_1"], h), 0.0)
    expected = _numpy_dense(params["dense_2"], h)
    np.testing.assert_allclose(jax.jit(mlp.apply)(params, x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mlp.apply(params, x[0]), expected[0], rtol=1e-5, atol=1e-6)


def test_mlp_single_activation_is_for_hidden_layers_and_final_activation_for_the_output():
    mlp = MLP([2, 3, 3, 1], jnp.tanh)
    assert mlp.activations == (jnp.tanh, jnp.tanh, None)
    assert MLP([2, 3, 1], "relu", final_activation="sigmoid").activations == ("relu", "sigmoid")
    with pytest.raises(ValueError, match=r"final_activation applies only"):
        MLP([2, 3, 1], ["relu", None], final_activation="sigmoid")


def test_mlp_layers_get_different_keys_and_per_layer_initializers():
    mlp = MLP([3, 3, 3], None, w_init=[layers.constant(1.0), layers.constant(2.0)])
    params = mlp.init(KEY)
    np.testing.assert_array_equal(params["dense_0"]["kernel"], np.ones((3, 3)))
    np.testing.assert_array_equal(params["dense_1"]["kernel"], 2 * np.ones((3, 3)))
    random = MLP([3, 3, 3], None).init(KEY)
    assert not np.allclose(random["dense_0"]["kernel"], random["dense_1"]["kernel"])


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"layer_sizes must list the input size"):
        MLP([4], "relu")
    with pytest.raises(ValueError, match=r"activations must be one value or one per layer \(2\)"):
        MLP([2, 3, 1], ["relu"])
    with pytest.raises(ValueError, match=r"layer_sizes\[1\] must be at least 1"):
        MLP([2, 0, 1], "relu")
    mlp = MLP([2, 3, 1], "relu")
    with pytest.raises(ValueError, match=r"has 5 features but layer_sizes\[0\] is 2"):
        mlp.init(KEY, (10, 5))
    with pytest.raises(ValueError, match=r"params lack \['dense_1'\]"):
        mlp.apply({"dense_0": mlp.init(KEY)["dense_0"]}, jnp.ones(2))


# ---- initializers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (layers.glorot_normal, jax_init.glorot_normal()),
        (layers.glorot_uniform, jax_init.glorot_uniform()),
        (layers.he_normal, jax_init.he_normal()),
        (layers.he_uniform, jax_init.he_uniform()),
        (layers.lecun_normal, jax_init.lecun_normal()),
        (layers.normal(0.3), jax_init.normal(0.3)),
        (layers.constant(1.5), jax_init.constant(1.5)),
        (layers.zeros, jax_init.zeros),
    ],
)
def test_initializers_are_jax_initializers(ours, theirs):
    shape = (16, 8)
    np.testing.assert_array_equal(ours(KEY, shape, jnp.float32), theirs(KEY, shape, jnp.float32))
    assert ours(KEY, shape).dtype == jnp.float32


def test_variance_scaling_initializers_work_called_or_configured():
    direct = layers.he_normal(KEY, (5, 7))
    np.testing.assert_array_equal(layers.he_normal()(KEY, (5, 7)), direct)
    configured = layers.he_normal(in_axis=-1, out_axis=-2)
    np.testing.assert_array_equal(
        configured(KEY, (5, 7)), jax_init.he_normal(in_axis=-1, out_axis=-2)(KEY, (5, 7))
    )
    assert layers.xavier_normal is layers.glorot_normal
    assert layers.xavier_uniform is layers.glorot_uniform
    with pytest.raises(TypeError, match=r"configure first"):
        layers.he_normal(KEY, (2, 2), in_axis=0)
    # jax's dtype keyword configures the default dtype; a dtype at the call still wins.
    configured = layers.glorot_uniform(dtype=jnp.bfloat16)
    expected = jax_init.glorot_uniform(dtype=jnp.bfloat16)(KEY, (5, 7))
    assert configured(KEY, (5, 7)).dtype == jnp.bfloat16
    np.testing.assert_array_equal(configured(KEY, (5, 7)), expected)
    assert configured(KEY, (5, 7), jnp.float32).dtype == jnp.float32
    with pytest.raises(TypeError, match=r"pass a PRNG key first"):
        layers.glorot_uniform(shape=(2, 2))


def test_an_initializer_that_fails_is_named_with_its_layer_and_shape():
    uncalled_factory = layers.Dense(3, w_init=layers.normal, name="hidden")
    with pytest.raises(TypeError, match=r"'hidden': w_init=.*shape \(2, 3\).*normal\(0\.01\)"):
        uncalled_factory.init(KEY, (2,))
    kernel_initializer_on_a_bias = layers.Dense(3, b_init=layers.glorot_uniform)
    with pytest.raises(ValueError, match=r"'dense': b_init=.*shape \(3,\).*at least 2D"):
        kernel_initializer_on_a_bias.init(KEY, (2,))


def test_a_one_layer_mlp_with_a_single_activation_warns_that_it_is_linear():
    with pytest.warns(
        UserWarning, match=r"its one layer is linear; pass final_activation='sigmoid'"
    ):
        linear = layers.MLP([2, 1], "sigmoid")
    assert linear.activations == (None,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layers.MLP([2, 1], "relu", final_activation="sigmoid").activations == ("sigmoid",)
        assert layers.MLP([2, 1], ["sigmoid"]).activations == ("sigmoid",)
        assert layers.MLP([2, 4, 1], "sigmoid").activations == ("sigmoid", None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activations": 3}, r"activations must be a gradkit.activations name.*got 3"),
        ({"activations": "relu", "b_init": 0.1}, r"b_init must be an initializer.*got 0.1"),
        ({"activations": "relu", "w_init": "glorot"}, r"w_init must be an initializer"),
    ],
)
def test_mlp_names_a_per_layer_argument_of_the_wrong_kind(kwargs, message):
    with pytest.raises(TypeError, match=message):
        layers.MLP([2, 4, 1], **kwargs)


def test_initializer_statistics_follow_their_formulas():
    fan_in, fan_out = 400, 300
    w = np.asarray(layers.he_normal(KEY, (fan_in, fan_out)))
    assert abs(w.std() - np.sqrt(2.0 / fan_in)) < 0.02 * np.sqrt(2.0 / fan_in)
    w = np.asarray(layers.glorot_uniform(KEY, (fan_in, fan_out)))
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    w = np.asarray(layers.normal(1e-3)(KEY, (fan_in, fan_out)))
    assert abs(w.std() - 1e-3) < 2e-5


@pytest.mark.parametrize(
    ("initializer", "variance", "uniform"),
    [
        (layers.glorot_normal, lambda fan_in, fan_out: 2.0 / (fan_in + fan_out), False),
        (layers.xavier_uniform, lambda fan_in, fan_out: 2.0 / (fan_in + fan_out), True),
        (layers.he_normal, lambda fan_in, fan_out: 2.0 / fan_in, False),
        (layers.he_uniform, lambda fan_in, fan_out: 2.0 / fan_in, True),
        (layers.lecun_normal, lambda fan_in, fan_out: 1.0 / fan_in, False),
    ],
)
def test_variance_scaling_initializers_have_the_published_variance(initializer, variance, uniform):
    # Glorot & Bengio (2010), He et al. (2015), LeCun et al. (1998): Var(w) from the fans of a
    # (fan_in, fan_out) kernel; the uniform forms are bounded by sqrt(3 Var).
    fan_in, fan_out = 300, 200
    w = np.asarray(initializer(KEY, (fan_in, fan_out)), np.float64)
    expected = variance(fan_in, fan_out)
    assert abs(w.mean()) < 0.02 * np.sqrt(expected)
    np.testing.assert_allclose(w.var(), expected, rtol=0.03)
    if uniform:
        assert np.abs(w).max() <= np.sqrt(3 * expected) * (1 + 1e-6)
        assert np.abs(w).max() > 0.99 * np.sqrt(3 * expected)


# ---- dtype policy -----------------------------------------------------------------------------


def test_dtype_policy_float32_by_default_float64_under_x64():
    mlp = MLP([2, 3, 1], jnp.tanh)
    assert mlp.init(KEY)["dense_0"]["kernel"].dtype == jnp.float32
    assert mlp.apply(mlp.init(KEY), np.ones((4, 2))).dtype == jnp.float32  # float64 NumPy in
    with jax.enable_x64(True):
        params = mlp.init(KEY)
        assert params["dense_0"]["kernel"].dtype == jnp.float64
        assert mlp.apply(params, np.ones((4, 2))).dtype == jnp.float64


def test_param_dtype_and_dtype_overrides():
    layer = Dense(3, param_dtype=jnp.bfloat16, dtype=jnp.float32)
    params = layer.init(KEY, (2,))
    assert params["kernel"].dtype == jnp.bfloat16 and params["bias"].dtype == jnp.bfloat16
    y = layer.apply(params, jnp.ones((4, 2), jnp.bfloat16))
    assert y.dtype == jnp.float32
    half = Dense(3, dtype=jnp.float16).apply(Dense(3).init(KEY, (2,)), jnp.ones(2))
    assert half.dtype == jnp.float16
    promoted = Dense(3).apply(Dense(3, param_dtype=jnp.bfloat16).init(KEY, (2,)), jnp.ones(2))
    assert promoted.dtype == jnp.float32  # computation promotes input with params
    integers = Dense(3).apply(Dense(3).init(KEY, (2,)), jnp.array([1, 2]))
    assert integers.dtype == jnp.float32


def test_the_computation_runs_in_dtype_not_in_the_params_dtype():
    # bfloat16 params and inputs, float32 computation: the products and the sum are float32, so
    # the result is the float64 NumPy value of the same bfloat16 numbers to float32 precision
    # (a bfloat16 computation would be off by about 1e-2).
    layer = Dense(4, param_dtype=jnp.bfloat16, dtype=jnp.float32, b_init=layers.normal(1.0))
    params = layer.init(KEY, (64,))
    x = jax.random.normal(jax.random.key(3), (8, 64), jnp.bfloat16)
    expected = _numpy_dense(
        {name: np.asarray(value, np.float32) for name, value in params.items()},
        np.asarray(x, np.float32),
    )
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), expected, rtol=1e-5, atol=1e-5)
    in_bfloat16 = Dense(4, param_dtype=jnp.bfloat16).apply(params, x)
    assert in_bfloat16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(in_bfloat16, np.float32), expected, rtol=0.05, atol=0.1)


# ---- observability taps -----------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.seen = []

    def tap(self, name, value, *, kind, activation):
        self.seen.append((name, kind, activation, value))
        return value


def test_collector_sees_each_mlp_layers_preactivation_with_name_and_activation():
    mlp = MLP([2, 4, 3, 1], ["relu", jnp.tanh, "sigmoid"])
    params = mlp.init(KEY)
    x = np.random.default_rng(2).normal(size=(5, 2)).astype(np.float32)
    recorder = _Recorder()
    with _probe.collecting(recorder):
        out = mlp.apply(params, x)
    assert [(name, kind) for name, kind, _, _ in recorder.seen] == [
        ("dense_0", "preactivation"),
        ("dense_1", "preactivation"),
        ("dense_2", "preactivation"),
    ]
    assert [act for _, _, act, _ in recorder.seen] == ["relu", jnp.tanh, "sigmoid"]
    z0 = _numpy_dense(params["dense_0"], x)
    np.testing.assert_allclose(recorder.seen[0][3], z0, rtol=1e-5, atol=1e-6)
    z1 = _numpy_dense(params["dense_1"], np.maximum(z0, 0))
    np.testing.assert_allclose(recorder.seen[1][3], z1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, _np_sigmoid(recorder.seen[2][3]), rtol=1e-5)


def test_collector_can_replace_the_preactivation():
    class Zeroing:
        def tap(self, name, value, *, kind, activation):
            return jnp.zeros_like(value) if name == "dense_1" else value

    mlp = MLP([2, 3, 1], [jnp.tanh, None])
    params = mlp.init(KEY)
    with _probe.collecting(Zeroing()):
        out = mlp.apply(params, jnp.ones((2, 2)))
    np.testing.assert_array_equal(out, np.zeros((2, 1)))


def test_outside_a_collector_the_jaxpr_is_exactly_the_plain_computation():
    mlp = MLP([2, 4, 1], [jnp.tanh, jax.nn.sigmoid])
    params = mlp.init(KEY)
    x = jnp.ones((3, 2))

    def plain(p, x):
        h = jnp.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
        return jax.nn.sigmoid(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])

    ours = jax.make_jaxpr(mlp.apply)(params, x)
    reference = jax.make_jaxpr(plain)(params, x)
    assert str(ours) == str(reference)


def test_params_of_another_mlp_are_named_not_blamed_on_the_input():
    key = jax.random.key(0)
    mlp = MLP([2, 4, 1], "tanh")
    # The input fits this MLP; the first kernel is another model's (3 inputs).
    with pytest.raises(
        ValueError, match=r"params\['dense_0'\]\['kernel'\] has shape \(3, 4\).* needs \(2, 4\)"
    ):
        mlp.apply(MLP([3, 4, 1], "tanh").init(key), jnp.ones((5, 2)))
    params = mlp.init(key)
    params["dense_1"] = {"kernel": jnp.ones((5, 1)), "bias": jnp.zeros(1)}
    with pytest.raises(ValueError, match=r"params\['dense_1'\]\['kernel'\] has shape \(5, 1\)"):
        mlp.apply(params, jnp.ones((5, 2)))
    # A bad input is still reported as the input.
    with pytest.raises(ValueError, match=r"expects inputs of shape \(\.\.\., 2\)"):
        mlp.apply(mlp.init(key), jnp.ones((5, 3)))


def test_a_bias_given_to_a_layer_without_one_is_refused_not_ignored():
    params = Dense(3).init(jax.random.key(0), 2)
    params["bias"] = jnp.full(3, 100.0)
    with pytest.raises(ValueError, match=r"params hold a 'bias' but the layer has use_bias=False"):
        Dense(3, use_bias=False).apply(params, jnp.ones(2))
    del params["bias"]
    assert Dense(3, use_bias=False).apply(params, jnp.ones(2)).shape == (3,)


def test_an_initializer_factory_passed_uncalled_is_named():
    with pytest.raises(
        TypeError, match=r"w_init=he_normal returned a function.*w_init=he_normal\(\)"
    ):
        Dense(3, w_init=jax_init.he_normal).init(jax.random.key(0), 2)


def test_variance_scaling_takes_jax_positional_configuration_and_names_a_shape_for_a_key():
    key = jax.random.key(0)
    for ours, theirs in (
        (layers.glorot_uniform, jax_init.glorot_uniform),
        (layers.he_normal, jax_init.he_normal),
    ):
        for axes in ((-2, -1), (0, 1)):
            np.testing.assert_array_equal(ours(*axes)(key, (3, 4)), theirs(*axes)(key, (3, 4)))
    with pytest.raises(TypeError, match=r"first argument is the PRNG key, got \(3, 4\)"):
        layers.glorot_uniform((3, 4))
