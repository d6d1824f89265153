"""Gradient-health statistics inside the training step (``health_every``) and in ``fit``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradkit import _health, _tensorboard
from gradkit.diagnostics import gradient_stats
from gradkit.layers import MLP
from gradkit.training import TrainState, fit, make_train_step

MODEL = MLP([3, 5, 2], "tanh")


def _loss(params, batch):
    x, y = batch
    return jnp.mean((MODEL.apply(params, x) - y) ** 2)


def _data(n=32):
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(n, 3)).astype(np.float32),
        rng.normal(size=(n, 2)).astype(np.float32),
    )


def _params():
    return MODEL.init(jax.random.key(0), (3,))


def test_step_reports_health_on_every_kth_step_only():
    optimizer = optax.sgd(0.1)
    step = make_train_step(_loss, optimizer, health_every=3)
    state = TrainState.create(_params(), optimizer)
    batch = _data()
    for index in range(5):
        grads = jax.grad(_loss)(state.params, batch)
        state, metrics = step(state, batch)
        kernel = metrics["health"]["dense_0"]["kernel"]
        if index % 3 == 0:
            expected = np.linalg.norm(np.asarray(grads["dense_0"]["kernel"], np.float64))
            np.testing.assert_allclose(float(kernel.norm), expected, rtol=1e-5)
            assert int(np.sum(kernel.log2_histogram)) == grads["dense_0"]["kernel"].size
        else:
            assert float(kernel.norm) == 0.0
            assert int(np.sum(kernel.log2_histogram)) == 0
    assert step._cache_size() == 1  # the gate is evaluated on the device: no retrace


# Square leaves of which four make one run of the every-k branch's statistics.
_SIDE = math.isqrt(_health.SEQUENCE_ELEMENTS // 4) + 1


def test_gated_health_keeps_gradients_and_updates_only_in_temporary_memory():
    # With health_every=k the statistics sit in a lax.cond whose temporaries share the step's
    # temporary buffer, which XLA:CPU allocates on every call (and, past glibc's mmap
    # threshold, page-faults in afresh). Computed in runs, one after another, they add little
    # per leaf beyond the gradients and updates the cond holds (8 bytes per parameter in
    # float32): 10 in all, where computing every leaf's statistics at once took 16. The
    # statistics stay exact.
    def chain(count):
        keys = jax.random.split(jax.random.key(0), count)
        params = {f"w{i}": 0.05 * jax.random.normal(keys[i], (_SIDE, _SIDE)) for i in range(count)}

        def loss(params, x):
            for i in range(count):
                x = jnp.tanh(x @ params[f"w{i}"])
            return jnp.sum(x)

        optimizer = optax.adam(1e-3)
        return loss, params, optimizer, make_train_step(loss, optimizer, health_every=2)

    x = jnp.linspace(-1.0, 1.0, 8 * _SIDE).reshape(8, _SIDE)

    def temp_bytes(count):
        _, params, optimizer, step = chain(count)
        compiled = step.lower(TrainState.create(params, optimizer), x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # 4 leaves make one run of the branch's statistics, 12 leaves three.
    per_parameter = (temp_bytes(12) - temp_bytes(4)) / (8 * _SIDE * _SIDE)
    assert per_parameter <= 12, per_parameter  # 10.0 (8 of them the cond's operands)

    # A loss whose gradient is exactly the batch: the statistics of the step's gradient can be
    # compared bit for bit (histograms) with those of a known array.
    _, params, optimizer, _ = chain(3)
    batch = jax.random.normal(jax.random.key(1), (_SIDE, _SIDE)) * jnp.logspace(-8, 2, _SIDE)

    def linear(params, batch):
        return sum(jnp.vdot(w, batch) for w in params.values())

    step = make_train_step(linear, optimizer, health_every=2)
    _, metrics = step(TrainState.create(params, optimizer), batch)
    expected = gradient_stats({name: batch for name in params})
    for name in params:
        got, want = metrics["health"][name], expected[name]
        np.testing.assert_array_equal(got.log2_histogram, want.log2_histogram)
        for field in ("norm", "max_abs", "std", "zero_fraction"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5)
        # The mean may be near 0: both sums round, in different orders.
        np.testing.assert_allclose(got.mean, want.mean, atol=1e-6 * float(want.max_abs))


def test_health_update_ratio_is_the_applied_update_over_the_params():
    optimizer = optax.sgd(0.5)
    step = make_train_step(_loss, optimizer, health_every=1)
    state = TrainState.create(_params(), optimizer)
    batch = _data()
    before = state.params
    state, metrics = step(state, batch)
    for name in ("kernel", "bias"):
        stats = metrics["health"]["dense_1"][name]
        old = np.asarray(before["dense_1"][name], np.float64)
        update = np.asarray(state.params["dense_1"][name], np.float64) - old
        np.testing.assert_allclose(float(stats.update_norm), np.linalg.norm(update), rtol=1e-4)
        np.testing.assert_allclose(float(stats.param_norm), np.linalg.norm(old), rtol=1e-6)
    kernel = metrics["health"]["dense_1"]["kernel"]
    old = np.asarray(before["dense_1"]["kernel"], np.float64)
    update = np.asarray(state.params["dense_1"]["kernel"], np.float64) - old
    np.testing.assert_allclose(
        float(kernel.update_ratio), np.linalg.norm(update) / np.linalg.norm(old), rtol=1e-4
    )
    # the biases start at zero: a nonzero update of a zero parameter has an infinite ratio
    assert float(metrics["health"]["dense_1"]["bias"].update_ratio) == np.inf


def test_health_describes_the_gradient_before_clipping():
    # Clipping to norm 1e-3 must not make an exploding gradient look tame in the statistics;
    # the update, though, is the clipped one.
    optimizer = optax.sgd(1.0)
    clip = 1e-3
    step = make_train_step(_loss, optimizer, clip_global_norm=clip, health_every=1)
    state = TrainState.create(_params(), optimizer)
    batch = _data()
    grads = jax.grad(_loss)(state.params, batch)
    new_state, metrics = step(state, batch)
    kernel = metrics["health"]["dense_0"]["kernel"]
    raw = np.asarray(grads["dense_0"]["kernel"], np.float64)
    np.testing.assert_allclose(float(kernel.norm), np.linalg.norm(raw), rtol=1e-5)
    np.testing.assert_allclose(float(kernel.max_abs), np.abs(raw).max(), rtol=1e-6)
    total = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert total > 10 * clip  # the clip is active
    applied = np.asarray(new_state.params["dense_0"]["kernel"]) - np.asarray(
        state.params["dense_0"]["kernel"]
    )
    np.testing.assert_allclose(float(kernel.update_norm), np.linalg.norm(applied), rtol=1e-3)
    np.testing.assert_allclose(
        float(kernel.update_norm), clip * np.linalg.norm(raw) / total, rtol=1e-3
    )


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_health_every_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="health_every"):
        make_train_step(_loss, optax.sgd(0.1), health_every=bad)


def test_aux_may_not_shadow_the_health_metric():
    step = make_train_step(
        lambda p, b: (_loss(p, b), {"health": jnp.zeros(())}), optax.sgd(0.1), has_aux=True
    )
    state = TrainState.create(_params(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="reserved metric name 'health'"):
        step(state, _data())


def test_fit_records_layer_norms_and_logs_health_to_tensorboard(tmp_path):
    x, y = _data()
    _, history = fit(
        _loss,
        _params(),
        (x, y),
        optax.sgd(0.1),
        steps=6,
        batch_size=8,
        progress=False,
        log_dir=tmp_path,
        health_every=2,
    )
    norms = history["health/dense_0/grad_norm"]
    assert norms.shape == (6,)
    # Rows are steps 1..6; the statistics belong to the updates that started at steps 0, 2, 4.
    assert all(np.isfinite(norms[[0, 2, 4]])) and all(norms[[0, 2, 4]] > 0)
    assert all(np.isnan(norms[[1, 3, 5]]))
    scalars = _tensorboard.read_scalars(tmp_path)
    logged = scalars["health/dense_0/grad_norm"]
    assert [step for step, _ in logged] == [1, 3, 5]
    np.testing.assert_allclose([v for _, v in logged], norms[[0, 2, 4]], rtol=1e-6)
    assert "health/dense_1/kernel/nan_count" in scalars
    histograms = _tensorboard.read_histograms(tmp_path)
    ((step, histo), *_) = histograms["health/dense_0/kernel/log2_magnitude"]
    assert step == 1 and histo.num == 3 * 5
    assert math.isfinite(float(history["loss"][-1]))


def test_fit_health_step_returns_the_statistics_packed_in_three_buffers():
    # fit reads the statistics back every health step: three arrays for all leaves instead of
    # a dozen per leaf, unpacked on the host into what gradient_stats gives.
    from gradkit import _health
    from gradkit.training import _make_step_body

    params, batch = _params(), tuple(jnp.asarray(a) for a in _data(8))
    optimizer = optax.adam(1e-2)
    layout = []
    body = _make_step_body(
        _loss,
        optimizer,
        has_aux=False,
        clip_global_norm=None,
        check_dtypes=True,
        health_always=True,
        health_layout=layout,
    )
    state = TrainState.create(params, optimizer)
    _, metrics = jax.jit(body)(state, batch)
    assert len(jax.tree_util.tree_leaves(metrics["health"])) == 3
    host = _health._unpack(layout[0], jax.device_get(metrics["health"]))
    grads = jax.grad(_loss)(params, batch)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    want = _health.gradient_stats(grads, params, updates)
    for path, stats in _health.stats_by_path(want).items():
        got = _health.stats_by_path(host)[path]
        np.testing.assert_array_equal(got.log2_histogram, stats.log2_histogram)
        for field in ("norm", "max_abs", "mean", "std", "zero_fraction", "update_ratio"):
            np.testing.assert_allclose(getattr(got, field), getattr(stats, field), rtol=1e-5)
