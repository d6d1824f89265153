"""Tests for gradkit.training's pieces: tutorial_momentum, global_norm, TrainState, the step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradkit.training import (
    TrainState,
    TutorialMomentumState,
    global_norm,
    make_train_step,
    tutorial_momentum,
)


def _numpy_tutorial_momentum(params, grads_sequence, learning_rate, momentum):
    """Seed 001's gradient_updates_momentum, line for line, in float64 NumPy."""
    param = np.array(params, np.float64)
    param_update = param * 0.0
    trajectory = []
    for grad in grads_sequence:
        new_param = param - learning_rate * param_update
        param_update = momentum * param_update + (1.0 - momentum) * grad
        param = new_param
        trajectory.append(param.copy())
    return np.array(trajectory)


def _apply(optimizer, params, grads_sequence):
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    trajectory = []
    for grad in grads_sequence:
        updates, state = update(grad, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(np.asarray(params))
    return np.array(trajectory)


# ---- tutorial_momentum ------------------------------------------------------------------------


@pytest.mark.parametrize(("learning_rate", "momentum"), [(0.01, 0.9), (0.3, 0.0), (0.05, 0.5)])
def test_tutorial_momentum_is_the_seed_rule_exactly(learning_rate, momentum):
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(12, 5))
    start = rng.normal(size=5)
    with jax.enable_x64(True):
        ours = _apply(tutorial_momentum(learning_rate, momentum), jnp.asarray(start), grads)
    reference = _numpy_tutorial_momentum(start, grads, learning_rate, momentum)
    np.testing.assert_allclose(ours, reference, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(ours[0], start)  # the first step uses the zero velocity


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_tutorial_momentum_is_damped_optax_sgd_one_gradient_late(momentum):
    learning_rate = 0.1
    grads = np.random.default_rng(1).normal(size=(15, 3))
    with jax.enable_x64(True):
        start = jnp.asarray([0.5, -1.0, 2.0])
        ours = _apply(tutorial_momentum(learning_rate, momentum), start, grads)
        delayed = np.concatenate([np.zeros((1, 3)), grads[:-1]])
        sgd = optax.sgd(learning_rate * (1.0 - momentum), momentum=momentum or None)
        theirs = _apply(sgd, start, delayed)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)


def test_tutorial_momentum_keeps_dtypes_and_accepts_schedules():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones((), jnp.float32)}
    opt = tutorial_momentum(0.1, 0.9)
    state = opt.init(params)
    assert isinstance(state, TutorialMomentumState)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for _ in range(2):
        updates, state = opt.update(grads, state)
    assert updates["a"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
    assert int(state.count) == 2

    scheduled = tutorial_momentum(lambda count: 0.1 * (count + 1), 0.5)
    state = scheduled.init(jnp.zeros(()))
    steps = []
    for _ in range(3):
        update, state = scheduled.update(jnp.ones(()), state)
        steps.append(float(update))
    # velocities 0, 0.5, 0.75 scaled by the rates 0.1, 0.2, 0.3
    np.testing.assert_allclose(steps, [0.0, -0.1, -0.225], rtol=1e-6)


def test_tutorial_momentum_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        tutorial_momentum(0.1, 1.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got -0.1"):
        tutorial_momentum(0.1, -0.1)
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0, got -1"):
        tutorial_momentum(-1, 0.9)
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0, got nan"):
        tutorial_momentum(float("nan"), 0.9)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got nan"):
        tutorial_momentum(0.1, np.float32("nan"))
    with pytest.raises(TypeError, match=r"momentum must be a real number, got '0.9' of type str"):
        tutorial_momentum(0.1, "0.9")
    with pytest.raises(TypeError, match=r"momentum must be a real number, got True"):
        tutorial_momentum(0.1, True)
    with pytest.raises(TypeError, match=r"learning_rate must be a real number or an optax sched"):
        tutorial_momentum(jnp.ones(2), 0.9)
    # NumPy and JAX scalars are numbers too, and a traced momentum is accepted unchecked
    assert tutorial_momentum(np.float32(0.1), jnp.float32(0.9)) is not None
    opt_state = tutorial_momentum(0.1, 0.5).init(jnp.zeros(2))
    updates = jax.jit(lambda m: tutorial_momentum(0.1, m).update(jnp.ones(2), opt_state)[0])
    np.testing.assert_array_equal(updates(jnp.float32(0.5)), np.zeros(2))


# ---- global_norm ------------------------------------------------------------------------------


def test_global_norm_matches_float64_numpy():
    rng = np.random.default_rng(2)
    tree = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), rng.normal(size=())]}
    tree32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
    np.testing.assert_allclose(global_norm(tree32), np.linalg.norm(flat), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(global_norm)(tree32), np.linalg.norm(flat), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-11, 1e-9, 1.0, 1e18, 1e20, 1e30])
def test_global_norm_does_not_underflow_or_overflow_in_float32(scale):
    values = np.random.default_rng(3).normal(size=100) * scale
    tree = {"g": jnp.asarray(values, jnp.float32)}
    expected = np.linalg.norm(values.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(global_norm(tree), expected, rtol=1e-5)
    if scale == 1e-30:  # the naive sum of squares underflows to zero
        assert float(optax.tree.norm(tree)) == 0.0


def test_global_norm_under_vmap_and_in_half_precision():
    values = np.array([[3.0, 4.0], [3e-30, 4e-30], [3e25, 4e25]], np.float32)
    batched = jax.vmap(global_norm)({"g": jnp.asarray(values)})  # both branches, selected
    np.testing.assert_allclose(batched, [5.0, 5e-30, 5e25], rtol=1e-6)
    half = global_norm({"g": jnp.full(16, 300.0, jnp.float16)})  # 300**2 overflows float16
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, 1200.0, rtol=1e-6)


def test_global_norm_of_complex_leaves_counts_their_moduli():
    rng = np.random.default_rng(5)
    z = (rng.normal(size=6) + 1j * rng.normal(size=6)).astype(np.complex64)
    r = rng.normal(size=3).astype(np.float32)
    expected = np.sqrt(np.sum(np.abs(z.astype(np.complex128)) ** 2) + np.sum(r**2.0))
    np.testing.assert_allclose(global_norm({"z": jnp.asarray(z), "r": r}), expected, rtol=1e-6)
    tiny = global_norm({"z": jnp.full(4, 3e-30 + 4e-30j, jnp.complex64)})
    np.testing.assert_allclose(tiny, 1e-29, rtol=1e-6)
    assert tiny.dtype == jnp.float32


def test_global_norm_propagates_inf_and_nan_and_handles_empty_trees():
    assert float(global_norm({"a": jnp.array([1.0, jnp.inf])})) == np.inf
    assert np.isnan(float(global_norm({"a": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)})))
    assert float(global_norm({})) == 0.0
    assert float(global_norm({"a": jnp.zeros(3)})) == 0.0


# ---- TrainState and make_train_step -----------------------------------------------------------


def _linear_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _setup(n=16, d=3):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(n,)).astype(np.float32)
    params = {"w": jnp.zeros(d), "b": jnp.zeros(())}
    return params, (x, y)


def test_train_state_is_a_pytree_with_step_and_key():
    params, _ = _setup()
    state = TrainState.create(params, optax.adam(1e-3), seed=3)
    leaves = jax.tree_util.tree_leaves(state)
    assert any(leaf is state.step for leaf in leaves)
    assert int(state.step) == 0 and state.step.dtype == jnp.int32
    np.testing.assert_array_equal(
        jax.random.key_data(state.key), jax.random.key_data(jax.random.key(3))
    )
    doubled = jax.tree_util.tree_map(lambda x: x, state)
    assert isinstance(doubled, TrainState)


def test_step_equals_a_hand_written_optax_update():
    params, batch = _setup()
    optimizer = optax.adam(0.1)
    step = make_train_step(_linear_loss, optimizer)
    state = TrainState.create(params, optimizer)
    manual_params, manual_opt = params, optimizer.init(params)
    for _ in range(3):
        state, metrics = step(state, batch)
        loss, grads = jax.value_and_grad(_linear_loss)(manual_params, batch)
        updates, manual_opt = optimizer.update(grads, manual_opt, manual_params)
        manual_params = optax.apply_updates(manual_params, updates)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
    chex.assert_trees_all_close(state.params, manual_params, rtol=1e-6)
    assert int(state.step) == 3


def test_step_compiles_once():
    traces = []

    def loss(params, batch):
        traces.append(1)
        return _linear_loss(params, batch)

    params, batch = _setup()
    step = make_train_step(loss, optax.sgd(0.1))
    state = TrainState.create(params, optax.sgd(0.1))
    for _ in range(3):
        state, _ = step(state, batch)
    assert len(traces) == 1
    assert step._cache_size() == 1

    counted = chex.assert_max_traces(n=1)(make_train_step(_linear_loss, optax.sgd(0.1)).__wrapped__)
    jitted = jax.jit(counted)
    state = TrainState.create(params, optax.sgd(0.1))
    for _ in range(3):
        state, _ = jitted(state, batch)


def test_python_scalar_params_do_not_make_the_step_retrace():
    # A Python float becomes a weakly typed array; the first step would hand back a strongly
    # typed one (and an optimizer state to match) and the step would be traced again.
    traces = []

    def loss(params, batch):
        traces.append(1)
        return _linear_loss(params, batch)

    params, batch = _setup()
    params = {"w": params["w"], "b": 0.0}
    step = make_train_step(loss, optax.adam(0.1))
    state = TrainState.create(params, optax.adam(0.1))
    assert not state.params["b"].weak_type
    for _ in range(4):
        state, _ = step(state, batch)
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_aux_metrics_and_gradient_clipping():
    params, batch = _setup()

    def loss(params, batch):
        value = _linear_loss(params, batch)
        return value, {"half": value / 2, "bias": params["b"]}

    clip = 0.05
    optimizer = optax.sgd(1.0)
    step = make_train_step(loss, optimizer, has_aux=True, clip_global_norm=clip)
    state, metrics = step(TrainState.create(params, optimizer), batch)
    np.testing.assert_allclose(metrics["half"], metrics["loss"] / 2, rtol=1e-6)
    assert float(metrics["bias"]) == 0.0

    reference = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(1.0))
    grads = jax.grad(_linear_loss)(params, batch)
    assert float(optax.tree.norm(grads)) > clip  # the clip is active
    updates, _ = reference.update(grads, reference.init(params), params)
    chex.assert_trees_all_close(state.params, optax.apply_updates(params, updates), rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)


def test_optimizers_that_need_the_loss_get_value_grad_and_value_fn():
    # optax.lbfgs refuses to update without value, grad and value_fn; given them, its line
    # search solves this 4-parameter least-squares problem in 8 steps (NumPy's lstsq is the
    # reference).
    params, batch = _setup()
    optimizer = optax.lbfgs()
    step = make_train_step(_linear_loss, optimizer)
    state = TrainState.create(params, optimizer)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    x, y = batch
    design = np.c_[x, np.ones(len(x))].astype(np.float64)
    solution, residual, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
    np.testing.assert_allclose(state.params["w"], solution[:3], atol=1e-4)
    np.testing.assert_allclose(state.params["b"], solution[3], atol=1e-4)
    assert np.all(np.diff(losses) <= 1e-7)  # the line search only accepts decreases
    np.testing.assert_allclose(losses[-1], residual[0] / len(x), rtol=1e-5)


def test_integer_params_and_another_optimizers_state_are_named_at_trace_time():
    # Both once failed deep inside JAX ("grad requires real- or complex-valued inputs") or optax
    # ("'EmptyState' object has no attribute 'mu'") without saying which leaf or which state.
    params, batch = _setup()
    step = make_train_step(lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2), optax.adam(0.1))
    with pytest.raises(
        TypeError,
        match=r"state\.opt_state is not this optimizer's state.*"
        r"ScaleByAdamState.*TrainState\.create",
    ):
        step(TrainState.create(params, optax.sgd(0.1)), batch)
    with_counter = {**params, "count": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"params\['count'\] has dtype int32.*floating point"):
        step(TrainState.create(with_counter, optax.adam(0.1)), batch)
    # A state made by the same optimizer, but for other params, is refused too.
    with pytest.raises(TypeError, match=r"not this optimizer's state for these params"):
        other = TrainState.create({"v": params["w"]}, optax.adam(0.1))
        step(other.replace(params=params), batch)


def test_non_scalar_loss_is_a_clear_error_at_trace_time():
    params, batch = _setup()
    step = make_train_step(lambda p, b: (b[0] @ p["w"] - b[1]) ** 2, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar, got shape \(16,\).*mean"):
        step(TrainState.create(params, optax.sgd(0.1)), batch)


def test_loss_returning_a_tuple_without_has_aux_and_bad_aux():
    params, batch = _setup()
    state = TrainState.create(params, optax.sgd(0.1))
    step = make_train_step(lambda p, b: (_linear_loss(p, b), {}), optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"pass has_aux=True"):
        step(state, batch)
    step = make_train_step(lambda p, b: (_linear_loss(p, b), 3.0), optax.sgd(0.1), has_aux=True)
    with pytest.raises(TypeError, match=r"aux must be a dict of scalars, got float"):
        step(state, batch)
    step = make_train_step(
        lambda p, b: (_linear_loss(p, b), {"v": p["w"]}), optax.sgd(0.1), has_aux=True
    )
    with pytest.raises(ValueError, match=r"aux\['v'\] must be a scalar.*\(3,\)"):
        step(state, batch)


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        ("adam", r"got 'adam' of type str; pass the transform itself, e\.g\. optax\.adam"),
        (optax.adam, r"call it first, e\.g\. optax\.adam\(learning_rate=1e-3\)"),
        (object(), r"must be an optax GradientTransformation"),
    ],
)
def test_an_optimizer_that_is_not_an_optax_transform_is_refused(optimizer, message):
    with pytest.raises(TypeError, match=message):
        make_train_step(_linear_loss, optimizer)
    with pytest.raises(TypeError, match=message):
        TrainState.create({"w": jnp.zeros(2)}, optimizer)


def test_bad_clip_and_loss_arguments():
    with pytest.raises(ValueError, match=r"clip_global_norm must be a positive number, got 0"):
        make_train_step(_linear_loss, optax.sgd(0.1), clip_global_norm=0)
    for bad in (True, "1.0", jnp.ones(2), np.float32(-1.0), 1j):
        with pytest.raises(ValueError, match=r"clip_global_norm must be a positive number"):
            make_train_step(_linear_loss, optax.sgd(0.1), clip_global_norm=bad)
    # NumPy and JAX scalars are numbers too, and clip like the Python float
    params, batch = _setup()
    results = []
    for clip in (0.05, np.float32(0.05), jnp.float32(0.05)):
        step = make_train_step(_linear_loss, optax.sgd(0.1), clip_global_norm=clip)
        results.append(step(TrainState.create(params, optax.sgd(0.1)), batch)[0].params)
    chex.assert_trees_all_close(results[1], results[0], rtol=1e-6)
    chex.assert_trees_all_close(results[2], results[0], rtol=1e-6)
    with pytest.raises(TypeError, match=r"loss_fn must be callable"):
        make_train_step("loss", optax.sgd(0.1))


def test_data_and_params_of_different_float_dtypes_are_refused():
    with jax.enable_x64(True):
        params = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}
        x = np.ones((4, 3))  # float64 under x64
        y = np.ones(4, np.float32)
        step = make_train_step(_linear_loss, optax.sgd(0.1))
        state = TrainState.create(params, optax.sgd(0.1))
        with pytest.raises(TypeError, match=r"batch\[0\] is float64 but the params are float32"):
            step(state, (x, y))
        lenient = make_train_step(_linear_loss, optax.sgd(0.1), check_dtypes=False)
        new_state, _ = lenient(state, (x, y))
        assert new_state.params["w"].dtype == jnp.float32
