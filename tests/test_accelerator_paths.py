"""The code paths gradkit compiles for GPUs and TPUs, run on the CPU and compared with the CPU's.

Per-step code keeps its ``lax.cond`` on a CPU and selects instead on other platforms, where a
cond costs a round trip to the host (``gradkit._platform``). These tests force the
accelerator paths and check that they compute the same numbers and hold no conditional.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradkit import _health, _platform, training
from gradkit.diagnostics import gradient_stats, health_monitor, latest_health
from gradkit.layers import MLP
from gradkit.training import TrainState, global_norm, make_train_step


@pytest.fixture
def accelerator(monkeypatch):
    """Traces made inside the test take the accelerator paths."""
    monkeypatch.setattr(_platform, "FORCE_ACCELERATOR", True)


def _tree(seed=0):
    # Large leaves (the CPU's one-pass path) and small ones, with zeros and subnormals.
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(96, 80)).astype(np.float32) * np.float32(1e-3)
    kernel[0, :5] = 0.0
    kernel[1, :3] = np.float32(1e-40)  # subnormal: its own histogram bin
    return {
        "dense_0": {"kernel": kernel, "bias": rng.normal(size=(80,)).astype(np.float32)},
        "dense_1": {"kernel": rng.normal(size=(80, 70)).astype(np.float32) * 30},
        "scale": np.float32(-2.5),
    }


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def _has_op(text, op):
    """Whether compiled HLO ``text`` holds operation ``op`` (not just a name containing it)."""
    return f" {op}(" in text


def _assert_same_stats(cpu, accelerator):
    for path, (a, b) in zip(
        jax.tree_util.tree_leaves_with_path(cpu),
        zip(jax.tree_util.tree_leaves(cpu), jax.tree_util.tree_leaves(accelerator), strict=True),
        strict=True,
    ):
        # The CPU's one-pass sums and the exact path differ by rounding only.
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=jax.tree_util.keystr(path[0]))


def test_gradient_stats_on_the_accelerator_path_match_the_cpu_path(monkeypatch):
    grads, params, updates = _tree(0), _tree(1), _tree(2)
    cpu = jax.jit(lambda *a: gradient_stats(*a))(grads, params, updates)
    monkeypatch.setattr(_platform, "FORCE_ACCELERATOR", True)
    accelerated = jax.jit(lambda *a: gradient_stats(*a))(grads, params, updates)
    _assert_same_stats(cpu, accelerated)
    # The histograms are counts: equal, not close.
    for a, b in zip(jax.tree.leaves(cpu), jax.tree.leaves(accelerated), strict=True):
        if a.dtype == jnp.int32:
            np.testing.assert_array_equal(a, b)
    kernel = accelerated["dense_0"]["kernel"]
    assert int(np.sum(kernel.log2_histogram)) == 96 * 80 - 5
    assert int(kernel.log2_histogram[-132 - _health.HISTOGRAM_MIN_EXPONENT]) == 3  # 1e-40


def test_accelerator_statistics_hold_no_conditional_and_no_scatter(accelerator):
    text = _hlo(lambda *a: gradient_stats(*a), _tree(0), _tree(1), _tree(2))
    assert not _has_op(text, "conditional")
    assert not _has_op(text, "scatter")


@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="checks the CPU's compiled program; other backends compile the accelerator paths",
)
def test_cpu_statistics_keep_their_cond_and_scatter():
    # The other side of the choice: if the platform test ever picked the accelerator path on
    # a CPU, the CPU would lose its measured fast path.
    text = _hlo(lambda *a: gradient_stats(*a), _tree(0), _tree(1), _tree(2))
    assert _has_op(text, "conditional")
    assert _has_op(text, "scatter")


def test_accelerator_statistics_count_nonfinite_entries(accelerator):
    g = _tree(3)["dense_0"]["kernel"].copy()
    g[5, 5], g[6, 6], g[7, 7] = np.nan, np.inf, -np.inf
    stats = jax.jit(lambda g: gradient_stats(g))(g)
    assert (int(stats.nan_count), int(stats.posinf_count), int(stats.neginf_count)) == (1, 1, 1)
    finite = np.where(np.isfinite(g), g, 0).astype(np.float64)
    np.testing.assert_allclose(float(stats.norm), np.linalg.norm(finite), rtol=1e-5)
    assert int(np.sum(stats.log2_histogram)) == int(np.sum(np.isfinite(g) & (g != 0)))


@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e25], ids=["plain", "tiny", "huge"])
def test_global_norm_on_the_accelerator_path(scale, monkeypatch):
    tree = jax.tree.map(lambda a: np.float32(a * scale), _tree(4))
    expected = np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(tree)))
    cpu = jax.jit(lambda t: global_norm(t))(tree)
    monkeypatch.setattr(_platform, "FORCE_ACCELERATOR", True)
    accelerated = jax.jit(lambda t: global_norm(t))(tree)
    np.testing.assert_allclose(float(accelerated), expected, rtol=1e-5)
    np.testing.assert_allclose(float(accelerated), float(cpu), rtol=1e-6)
    assert not _has_op(_hlo(lambda t: global_norm(t), tree), "conditional")
    bad = dict(tree, scale=np.float32(np.nan))
    assert np.isnan(float(jax.jit(lambda t: global_norm(t))(bad)))


def _monitor_run(every, steps=7):
    params = jax.tree.map(jnp.asarray, _tree(5))
    tx = health_monitor(every=every, inner=optax.adam(1e-2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for i in range(steps):
        grads = _tree(10 + i)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        monitor = latest_health(state)
        seen.append((int(monitor.stats_step), params, monitor.packed))
    return seen, update


@pytest.mark.parametrize("every", [1, 3])
def test_monitor_on_the_accelerator_path_matches_the_cpu_path(every, monkeypatch):
    cpu, _ = _monitor_run(every)
    monkeypatch.setattr(_platform, "FORCE_ACCELERATOR", True)
    accelerated, update = _monitor_run(every)
    assert [s for s, _, _ in accelerated] == [s for s, _, _ in cpu]
    assert [s for s, _, _ in cpu] == [i - i % every for i in range(7)]
    for (_, p_cpu, s_cpu), (_, p_acc, s_acc) in zip(cpu, accelerated, strict=True):
        # The parameters take the same optimiser steps: the gate does not touch them.
        for a, b in zip(jax.tree.leaves(p_cpu), jax.tree.leaves(p_acc), strict=True):
            np.testing.assert_array_equal(a, b)
        _assert_same_stats(s_cpu, s_acc)
    assert update._cache_size() == 1


def test_accelerator_monitor_step_holds_no_conditional(accelerator):
    params = _tree(5)
    tx = health_monitor(every=100, inner=optax.adam(1e-2))
    text = _hlo(tx.update, _tree(6), tx.init(params), params)
    assert not _has_op(text, "conditional")


def test_train_step_health_every_on_the_accelerator_path(monkeypatch):
    model = MLP([6, 90, 80, 3], "tanh")
    params = model.init(jax.random.key(0), (6,))
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 3)))
    batch = (batch[0], batch[1].astype(np.float32))

    def loss(p, b):
        return jnp.mean((model.apply(p, b[0]) - b[1]) ** 2)

    def run():
        optimizer = optax.sgd(0.1)
        step = make_train_step(loss, optimizer, health_every=2)
        state = TrainState.create(params, optimizer)
        out = []
        for _ in range(4):
            state, metrics = step(state, batch)
            out.append(metrics)
        return state, out, step

    cpu_state, cpu_metrics, _ = run()
    monkeypatch.setattr(_platform, "FORCE_ACCELERATOR", True)
    state, metrics, step = run()
    np.testing.assert_allclose(
        jax.tree.leaves(state.params)[0], jax.tree.leaves(cpu_state.params)[0], rtol=1e-6
    )
    for index, (a, b) in enumerate(zip(cpu_metrics, metrics, strict=True)):
        _assert_same_stats(a["health"], b["health"])
        kernel = b["health"]["dense_0"]["kernel"]
        assert (float(kernel.norm) > 0) == (index % 2 == 0)
    text = step.lower(TrainState.create(params, optax.sgd(0.1)), batch).compile().as_text()
    assert not _has_op(text, "conditional")
    assert training._platform is _platform
