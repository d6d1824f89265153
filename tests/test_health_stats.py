"""gradient_stats, health_monitor and log_health against NumPy references."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradkit import _health, _health_plot
from gradkit.diagnostics import (
    HISTOGRAM_EXPONENTS,
    HealthMonitorState,
    gradient_stats,
    health_monitor,
    latest_health,
    log_health,
)

_stats_jit = jax.jit(gradient_stats)


def _reference(g):
    """Float64 NumPy statistics of the finite entries, and the frexp histogram."""
    g = np.asarray(g, dtype=np.float64).ravel()
    finite = g[np.isfinite(g)]
    nonzero = np.abs(finite[finite != 0])
    _, exponent = np.frexp(nonzero)
    bins = np.clip(exponent - HISTOGRAM_EXPONENTS[0], 0, len(HISTOGRAM_EXPONENTS) - 1)
    return {
        "norm": np.sqrt(np.sum(finite**2)),
        "max_abs": np.max(np.abs(finite), initial=0.0),
        "mean": finite.mean(),
        "std": finite.std(),
        "zero_fraction": np.mean(g == 0),
        "nan_count": np.isnan(g).sum(),
        "posinf_count": (g == np.inf).sum(),
        "neginf_count": (g == -np.inf).sum(),
        "log2_histogram": np.bincount(bins, minlength=len(HISTOGRAM_EXPONENTS)),
    }


def _check_against_reference(stats, g, rtol=2e-6):
    ref = _reference(g)
    for field in ("norm", "max_abs", "std"):
        np.testing.assert_allclose(getattr(stats, field), ref[field], rtol=rtol, err_msg=field)
    np.testing.assert_allclose(stats.mean, ref["mean"], rtol=1e-4, atol=1e-6 * ref["max_abs"])
    np.testing.assert_allclose(stats.zero_fraction, ref["zero_fraction"], rtol=1e-6)
    for field in ("nan_count", "posinf_count", "neginf_count", "log2_histogram"):
        np.testing.assert_array_equal(getattr(stats, field), ref[field], err_msg=field)


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(7, 5)).astype(np.float32) * np.float32(3.0)
    kernel[0, :2] = 0.0
    bias = (rng.normal(size=(5,)) * 1e-3).astype(np.float32)
    return {"dense_0": {"kernel": kernel, "bias": bias}, "scale": np.float32(-2.5)}


def test_stats_match_numpy_reference_under_jit():
    grads = _grads()
    stats = _stats_jit(grads)
    for path in (("dense_0", "kernel"), ("dense_0", "bias")):
        _check_against_reference(stats[path[0]][path[1]], grads[path[0]][path[1]])
    _check_against_reference(stats["scale"], grads["scale"])


def test_nonfinite_entries_are_counted_never_dropped():
    g = np.array([1.0, -2.0, np.nan, np.inf, -np.inf, -np.inf, 0.0, 1e-30, 3.0], np.float32)
    stats = _stats_jit({"w": g})["w"]
    _check_against_reference(stats, g)
    assert (int(stats.nan_count), int(stats.posinf_count), int(stats.neginf_count)) == (1, 1, 2)
    all_nan = _stats_jit({"w": np.full(4, np.nan, np.float32)})["w"]
    assert int(all_nan.nan_count) == 4 and float(all_nan.norm) == 0.0


def test_norm_does_not_underflow_for_tiny_float32_gradients():
    # Gradients of about 1e-20 (a 10-layer ReLU net with N(0, 1e-3) init): the squares are
    # subnormal, which XLA:CPU flushes to zero (GPUs keep a few of their bits).
    g = np.random.default_rng(1).normal(size=(784, 32)).astype(np.float32) * np.float32(1e-20)
    if jax.default_backend() == "cpu":
        assert float(jnp.linalg.norm(jnp.asarray(g))) == 0.0
    stats = _stats_jit({"w": g})["w"]
    _check_against_reference(stats, g, rtol=1e-5)
    assert float(stats.norm) > 1e-19


@pytest.mark.parametrize("size", [3, 5000], ids=["exact path", "one-pass path"])
def test_statistics_of_gradients_near_the_float32_maximum_are_finite(size):
    # Entries of 2**127 and more: a scale of 2**128 would be inf and its inverse a subnormal
    # that CPUs flush to 0, making the norm, mean and std inf * 0 = NaN.
    g = np.resize(np.array([2e38, -1e38, 3e38], np.float32), size)
    stats = _stats_jit({"w": g})["w"]
    ref = _reference(g)
    np.testing.assert_allclose(stats.mean, ref["mean"], rtol=1e-4)
    np.testing.assert_allclose(stats.std, ref["std"], rtol=1e-4)
    assert float(stats.max_abs) == np.float32(3e38)
    assert float(stats.norm) == np.inf  # the true norm, above 3.4e38, overflows float32
    one = _stats_jit({"w": np.array([2e38], np.float32)})["w"]
    assert (float(one.norm), float(one.mean), float(one.std)) == (np.float32(2e38),) * 2 + (0.0,)
    np.testing.assert_allclose(_health.safe_norm(jnp.array([1e38, 1e38])), 1.41421e38, rtol=1e-5)


def test_histogram_bins_are_fixed_and_cover_float32_extremes():
    g = np.array(
        [np.finfo(np.float32).max, np.float32(2.0**-149), 1.0, 0.75, 0.5, -0.5], np.float32
    )
    hist = np.asarray(_stats_jit({"w": g})["w"].log2_histogram)
    exponent_of = dict(zip(HISTOGRAM_EXPONENTS.tolist(), hist.tolist(), strict=True))
    # frexp: 1.0 = 0.5 * 2**1; 0.75, 0.5 and -0.5 have exponent 0.
    assert exponent_of[1] == 1 and exponent_of[0] == 3
    assert exponent_of[128] == 1 and exponent_of[-148] == 1
    assert hist.sum() == 6


@pytest.mark.parametrize("size", [2**16 - 1, 2**16, 257 * 257])  # scatter; pairs, even; odd
def test_large_histograms_count_every_entry(size):
    # From 2**16 entries on, a CPU histogram scatters pairs of entries into a table; the
    # uncounted ones (zeros, NaN, +-Inf) share its extra bin, including as the odd one out.
    rng = np.random.default_rng(size)
    g = (rng.normal(size=size) * 10.0 ** rng.integers(-40, 38, size=size)).astype(np.float32)
    g[rng.integers(0, size, 50)] = 0.0
    g[:4] = [np.nan, np.inf, -np.inf, np.float32(2.0**-149)]
    g[-1] = np.nan  # the odd size's last entry pairs with the padding
    stats = _stats_jit({"w": g})["w"]
    ref = _reference(g)
    np.testing.assert_array_equal(stats.log2_histogram, ref["log2_histogram"])
    assert int(np.sum(stats.log2_histogram)) == np.sum(np.isfinite(g) & (g != 0))
    np.testing.assert_allclose(stats.zero_fraction, ref["zero_fraction"], rtol=1e-6)
    assert int(stats.nan_count) == 2


def test_zero_fraction_without_a_pass_of_its_own_matches_numpy():
    # With histograms, the one-pass path takes the zeros from them (all entries finite there).
    g = np.random.default_rng(3).normal(size=_LARGE).astype(np.float32)
    g[::3] = 0.0
    g[1, :4] = np.float32(1e-40)  # subnormal, not zero
    for histogram in (True, False):
        stats = jax.jit(functools.partial(gradient_stats, histogram=histogram))({"w": g})["w"]
        np.testing.assert_allclose(stats.zero_fraction, np.mean(g == 0), rtol=1e-6)


def test_update_ratio_and_norms_match_numpy():
    grads = _grads()
    params = jax.tree_util.tree_map(lambda g: np.asarray(g) * 2 + 1, grads)
    updates = jax.tree_util.tree_map(lambda g: np.asarray(g) * -1e-3, grads)
    stats = jax.jit(gradient_stats)(grads, params, updates)
    kernel = stats["dense_0"]["kernel"]
    ref_param = np.linalg.norm(np.asarray(params["dense_0"]["kernel"], np.float64))
    ref_update = np.linalg.norm(np.asarray(updates["dense_0"]["kernel"], np.float64))
    np.testing.assert_allclose(kernel.param_norm, ref_param, rtol=1e-6)
    np.testing.assert_allclose(kernel.update_norm, ref_update, rtol=1e-6)
    np.testing.assert_allclose(kernel.update_ratio, ref_update / ref_param, rtol=1e-6)
    assert gradient_stats(grads)["scale"].update_ratio is None


def test_histogram_can_be_skipped():
    grads = _grads()
    stats = gradient_stats(grads, histogram=False)["dense_0"]["kernel"]
    assert stats.log2_histogram is None
    _check_against_reference(
        stats._replace(log2_histogram=_reference(grads["dense_0"]["kernel"])["log2_histogram"]),
        grads["dense_0"]["kernel"],
    )


def test_vmap_over_a_batch_of_gradients():
    batch = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    stats = jax.vmap(lambda g: gradient_stats({"w": g})["w"])(batch)
    for i in range(3):
        np.testing.assert_allclose(stats.norm[i], np.linalg.norm(batch[i]), rtol=1e-6)


def test_float64_under_x64():
    with jax.enable_x64(True):
        g = np.array([1e-200, 3e-200, -2e-200])
        stats = gradient_stats({"w": jnp.asarray(g)})["w"]
        assert stats.norm.dtype == jnp.float64
        np.testing.assert_allclose(stats.norm, 1e-200 * np.sqrt(14.0), rtol=1e-12)
        huge = gradient_stats({"w": jnp.array([1e308, 1e308])})["w"]
        np.testing.assert_allclose(huge.norm, 1e308 * np.sqrt(2.0), rtol=1e-12)
        assert float(huge.mean) == 1e308 and float(huge.std) == 0.0


def test_half_precision_gradients_are_summarised_in_float32():
    g = np.array([3e-5, -2.0, 0.0, 1024.0, 7e-8, np.inf], np.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        half = jnp.asarray(g, dtype)
        stats = _stats_jit({"w": half})["w"]
        assert stats.norm.dtype == jnp.float32 and stats.log2_histogram.dtype == jnp.int32
        # The reference is the half-precision values themselves (7e-8 is a float16 subnormal).
        _check_against_reference(stats, np.asarray(half.astype(jnp.float32)))


def test_std_of_gradients_with_a_large_common_offset():
    g = (1.0 + 1e-4 * np.random.default_rng(4).standard_normal(10_000)).astype(np.float32)
    stats = _stats_jit({"w": g})["w"]
    np.testing.assert_allclose(stats.std, np.std(g.astype(np.float64)), rtol=1e-2)


def test_bad_input_errors_name_the_path():
    with pytest.raises(ValueError, match="grads is an empty pytree"):
        gradient_stats({})
    with pytest.raises(TypeError, match=r"grads\['layer'\]\['count'\] has dtype int32"):
        gradient_stats({"layer": {"count": jnp.arange(3), "w": jnp.ones(3)}})
    grads = {"a": jnp.ones(3), "b": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"grads\['b'\]\['kernel'\] has no counterpart in params"):
        gradient_stats(grads, params={"a": jnp.ones(3), "b": {"bias": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match=r"updates\['a'\] has shape \(4,\) but grads\['a'\]"):
        gradient_stats(grads, updates={"a": jnp.ones(4), "b": {"kernel": jnp.ones((2, 2))}})


def test_monitor_passes_updates_through_unchanged():
    grads = _grads()
    tx = health_monitor(every=3)
    state = tx.init(grads)
    updates, state = jax.jit(tx.update)(grads, state, grads)
    chex.assert_trees_all_equal(updates, grads)
    np.testing.assert_allclose(
        state.stats["dense_0"]["kernel"].norm, np.linalg.norm(grads["dense_0"]["kernel"]), 1e-6
    )


def test_monitor_computes_every_k_steps_inside_jit_without_retracing():
    params = {"w": jnp.ones(4)}
    tx = health_monitor(every=3, inner=optax.sgd(0.5))
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, scale):
        return tx.update({"w": jnp.full(4, scale)}, state, params)

    sgd_state = optax.sgd(0.5).init(params)
    seen = []
    for i in range(7):
        scale = jnp.float32(i + 1)
        updates, state = step(state, scale)
        expected, sgd_state = optax.sgd(0.5).update({"w": jnp.full(4, scale)}, sgd_state)
        chex.assert_trees_all_close(updates, expected)
        seen.append((int(state.stats_step), float(state.stats["w"].norm)))
    # Statistics from updates 0, 3 and 6 (gradient norms 2*1, 2*4, 2*7), held in between.
    assert [s for s, _ in seen] == [0, 0, 0, 3, 3, 3, 6]
    np.testing.assert_allclose([n for _, n in seen], [2, 2, 2, 8, 8, 8, 14], rtol=1e-6)
    np.testing.assert_allclose(state.stats["w"].update_ratio, 0.5 * 7 * 2 / 2, rtol=1e-6)
    assert int(state.count) == 7


def test_monitor_without_params_marks_param_norm_unknown():
    tx = health_monitor(every=1, inner=optax.sgd(1.0))
    state = tx.init({"w": jnp.ones(2)})
    _, state = tx.update({"w": jnp.ones(2)}, state)
    assert np.isnan(state.stats["w"].param_norm) and np.isnan(state.stats["w"].update_ratio)
    np.testing.assert_allclose(state.stats["w"].update_norm, np.sqrt(2.0), rtol=1e-6)


def test_latest_health_finds_the_state_in_a_chain():
    params = {"w": jnp.ones(2)}
    tx = optax.chain(optax.clip(1.0), health_monitor(every=1), optax.sgd(0.1))
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full(2, 5.0)}, state, params)
    found = latest_health(state)
    assert isinstance(found, HealthMonitorState)
    # The monitor sits after the clipping, so it sees the clipped gradients.
    np.testing.assert_allclose(found.stats["w"].norm, np.sqrt(2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="holds no HealthMonitorState"):
        latest_health(optax.sgd(0.1).init(params))


def test_monitor_rejects_bad_every():
    with pytest.raises(ValueError, match="every must be a positive integer, got 0"):
        health_monitor(every=0)
    with pytest.raises(ValueError, match=r"got 2\.5"):
        health_monitor(every=2.5)


def test_monitor_rejects_gradients_of_another_structure_than_its_state():
    # The statistics are stored by leaf position: grads with an extra leaf once had its
    # statistics filed under another leaf's name (every=1) or failed inside the cond (every=3).
    params = {"w": jnp.ones(3)}
    grads = {"v": jnp.full(2, 100.0), "w": jnp.ones(3)}
    for every in (1, 3):
        tx = health_monitor(every=every)
        state = tx.init(params)
        with pytest.raises(ValueError, match=r"1 leaves; got 2\): grads\['v'\] is not among"):
            tx.update(grads, state, grads)
        with pytest.raises(ValueError, match=r"grads has no \['w'\]"):
            tx.update({"x": jnp.ones(3)}, state)


@pytest.mark.parametrize("every", [1, 2])
def test_monitor_passes_extra_arguments_to_the_inner_optimizer(every):
    # optax.lbfgs needs value, grad and value_fn; reduce_on_plateau needs value. Wrapped in
    # the monitor they once failed with "missing required keyword-only arguments".
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
    y = x @ jnp.array([1.0, -2.0, 0.5])

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    params = {"b": jnp.zeros(()), "w": jnp.zeros(3)}
    for inner in (
        optax.lbfgs(),
        optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1)),
    ):
        monitored = health_monitor(every=every, inner=inner)
        results = []
        for tx in (inner, monitored):
            p, state = params, tx.init(params)

            @jax.jit
            def step(p, state, tx=tx):
                value, grad = jax.value_and_grad(loss)(p)
                updates, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=loss)
                return optax.apply_updates(p, updates), state

            for _ in range(4):
                p, state = step(p, state)
            results.append(p)
        chex.assert_trees_all_equal(results[0], results[1])
        health = latest_health(state)
        assert int(health.stats_step) == (3 if every == 1 else 2)
        assert float(health.stats["w"].update_norm) > 0


def test_log_health_writes_scalars_and_histograms_that_read_back(tmp_path):
    tensorboardx = pytest.importorskip("tensorboardX")
    from gradkit import _tensorboard

    grads = _grads()
    grads["dense_0"]["bias"][1] = np.nan
    writer = tensorboardx.SummaryWriter(str(tmp_path))
    for step in (0, 10):
        log_health(writer, gradient_stats(grads, grads, grads), step)
    writer.close()
    scalars = _tensorboard.read_scalars(tmp_path)
    kernel = np.asarray(grads["dense_0"]["kernel"], np.float64)
    ((s0, norm0), (s1, _)) = scalars["health/dense_0/kernel/norm"]
    assert (s0, s1) == (0, 10)
    np.testing.assert_allclose(norm0, np.linalg.norm(kernel), rtol=1e-6)
    assert scalars["health/dense_0/bias/nan_count"][0][1] == 1.0
    assert scalars["health/dense_0/kernel/update_ratio"][0][1] == pytest.approx(1.0)
    bias = np.asarray(grads["dense_0"]["bias"], np.float64)
    layer_norm = np.sqrt(np.sum(kernel**2) + np.nansum(bias**2))
    np.testing.assert_allclose(scalars["health/dense_0/grad_norm"][0][1], layer_norm, rtol=1e-6)
    histograms = _tensorboard.read_histograms(tmp_path)
    (step, histo), _ = histograms["health/dense_0/kernel/log2_magnitude"]
    ref = _reference(kernel)["log2_histogram"]
    nonzero = np.flatnonzero(ref)
    assert step == 0 and histo.num == np.count_nonzero(kernel)
    np.testing.assert_array_equal(histo.bucket, ref[nonzero[0] : nonzero[-1] + 1])
    np.testing.assert_array_equal(
        histo.bucket_limit, HISTOGRAM_EXPONENTS[nonzero[0] : nonzero[-1] + 1]
    )


def test_log_health_leaves_out_the_undefined_update_ratio_of_zero_params(tmp_path):
    tensorboardx = pytest.importorskip("tensorboardX")
    from gradkit import _tensorboard

    params = {"bias": jnp.zeros(3), "kernel": jnp.ones((2, 3))}
    updates = {"bias": jnp.full(3, 0.1), "kernel": jnp.full((2, 3), 0.1)}
    stats = gradient_stats(updates, params, updates)
    assert math.isinf(float(stats["bias"].update_ratio))  # the statistic itself stays as it is
    writer = tensorboardx.SummaryWriter(str(tmp_path))
    log_health(writer, stats, 0)
    writer.close()
    scalars = _tensorboard.read_scalars(tmp_path)
    assert "health/bias/update_ratio" not in scalars and "health/bias/update_norm" in scalars
    assert scalars["health/kernel/update_ratio"][0][1] == pytest.approx(0.1)


def test_log_health_rejects_other_pytrees():
    with pytest.raises(TypeError, match=r"stats\['w'\] is ArrayImpl, not LeafStats"):
        log_health(object(), {"w": jnp.ones(2)}, 0)


def test_safe_norm_helpers():
    np.testing.assert_allclose(_health.combine_norms(jnp.array([3e-30, 4e-30])), 5e-30, rtol=1e-6)
    assert float(_health.safe_norm(jnp.zeros(3))) == 0.0


def test_std_with_an_offset_and_a_nan_entry():
    g = (1.0 + 1e-4 * np.random.default_rng(5).standard_normal(1_000)).astype(np.float32)
    g[17] = np.nan
    stats = _stats_jit({"w": g})["w"]
    finite = np.delete(g, 17).astype(np.float64)
    np.testing.assert_allclose(stats.std, np.std(finite), rtol=1e-2)
    np.testing.assert_allclose(stats.mean, np.mean(finite), rtol=1e-6)
    assert int(stats.nan_count) == 1


def test_complex_leaves_are_refused_with_their_path():
    with pytest.raises(TypeError, match=r"grads\['z'\] has dtype complex64.*real leaves"):
        gradient_stats({"z": jnp.ones(3, jnp.complex64)})


def test_an_empty_leaf_has_zero_statistics():
    stats = gradient_stats({"empty": jnp.zeros((0, 4)), "w": jnp.ones(2)})["empty"]
    for field in ("norm", "max_abs", "mean", "std", "zero_fraction"):
        assert float(getattr(stats, field)) == 0.0, field
    assert int(jnp.sum(stats.log2_histogram)) == 0


def test_monitor_accepts_gradients_in_another_dtype_than_its_state():
    with jax.enable_x64(True):
        params = {"w": jnp.ones(3, jnp.float32)}
        tx = health_monitor(every=1)
        state = tx.init(params)
        _, state = tx.update({"w": jnp.full(3, 2.0, jnp.float64)}, state, params)
        assert state.stats["w"].norm.dtype == jnp.float32
        np.testing.assert_allclose(float(state.stats["w"].norm), 2.0 * np.sqrt(3.0), rtol=1e-6)


# Leaves larger than FAST_PATH_MIN_SIZE take the one-pass sums when they are provably accurate
# and the exact path otherwise; both must agree with the float64 reference.
_LARGE = (96, 64)
assert _LARGE[0] * _LARGE[1] > _health.FAST_PATH_MIN_SIZE


def _large(seed=0, scale=1.0, offset=0.0):
    g = np.random.default_rng(seed).standard_normal(_LARGE) * scale + offset
    return g.astype(np.float32)


@pytest.mark.parametrize(
    "case",
    [
        "ordinary",  # fast path
        "with_zeros",  # fast path, exact zeros counted
        "tiny",  # squares underflow: exact path
        "huge",  # squares overflow: exact path
        "offset",  # |mean| >> std: exact path (the one-pass variance would cancel)
        "nonfinite",  # masks and counts: exact path
        "all_zero",  # fast path, every statistic 0
    ],
)
def test_large_leaves_match_the_reference_on_every_path(case):
    g = {
        "ordinary": _large(),
        "with_zeros": np.where(_large(1) > 0.5, _large(2), 0).astype(np.float32),
        "tiny": _large(3, scale=1e-20),
        "huge": _large(4, scale=1e25),
        "offset": _large(5, scale=1e-3, offset=1.0),
        "nonfinite": _large(6),
        "all_zero": np.zeros(_LARGE, np.float32),
    }[case]
    if case == "nonfinite":
        g[3, 4], g[10, 0], g[50, 60] = np.nan, np.inf, -np.inf
    stats = _stats_jit({"w": g})["w"]
    _check_against_reference(stats, g, rtol=1e-5)
    if case == "offset":
        np.testing.assert_allclose(stats.std, np.std(g.astype(np.float64)), rtol=1e-3)


def test_large_leaf_param_and_update_norms_on_both_paths():
    grads = {"w": _large(7)}
    for params, updates in [
        ({"w": _large(8)}, {"w": _large(9, scale=1e-3)}),  # fast
        ({"w": _large(10, scale=1e-21)}, {"w": _large(11, scale=1e20)}),  # exact
    ]:
        stats = jax.jit(gradient_stats)(grads, params, updates)["w"]
        ref_p = np.linalg.norm(params["w"].astype(np.float64))
        ref_u = np.linalg.norm(updates["w"].astype(np.float64))
        np.testing.assert_allclose(stats.param_norm, ref_p, rtol=1e-5)
        np.testing.assert_allclose(stats.update_norm, ref_u, rtol=1e-5)
        with np.errstate(over="ignore"):  # 1e41 overflows float32 to inf, as it should
            ratio = np.float32(ref_u / ref_p)
        np.testing.assert_allclose(stats.update_ratio, ratio, rtol=1e-5)


def test_monitor_state_packs_statistics_into_a_few_buffers():
    # However many leaves, the statistics are three arrays: cheap to carry through a jitted
    # step and to copy on the steps that keep the previous ones.
    params = {f"layer_{i}": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)} for i in range(5)}
    state = health_monitor(every=10, inner=optax.adam(1e-3)).init(params)
    adam_leaves = len(jax.tree_util.tree_leaves(optax.adam(1e-3).init(params)))
    assert len(jax.tree_util.tree_leaves(state)) == 2 + 3 + adam_leaves
    assert set(state.stats) == set(params)
    # A pytree: it round-trips through flatten/unflatten and jit, and prints without the arrays.
    leaves, treedef = jax.tree_util.tree_flatten(state)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    chex.assert_trees_all_equal(rebuilt.stats, state.stats)
    assert "leaves=10" in repr(jax.jit(lambda s: s)(state))


def test_monitor_every_k_reports_the_update_actually_applied():
    params = {"w": jnp.asarray(_large(12)), "b": jnp.ones(3)}
    grads = {"w": jnp.asarray(_large(13)), "b": jnp.full(3, 0.5)}
    inner = optax.adam(1e-2)
    tx = health_monitor(every=2, inner=inner)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(3):
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        if i % 2 == 0:  # a monitored step: the statistics describe this update
            for name in ("w", "b"):
                np.testing.assert_allclose(
                    state.stats[name].update_norm, np.linalg.norm(updates[name]), rtol=1e-5
                )
    assert int(state.stats_step) == 2


def test_module_doctests_pass():
    import doctest

    for module in (_health, _health_plot):
        results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert results.attempted > 0 and results.failed == 0, module.__name__


def _layered(seed, layers=6):
    """Gradients of ``layers`` same-shaped dense layers plus a head, with NaN, Inf and zeros."""
    rng = np.random.default_rng(seed)
    tree = {
        f"layer_{i}": {
            "kernel": (rng.normal(size=(9, 4)) * 10.0 ** (-3 * i)).astype(np.float32),
            "bias": rng.normal(size=4).astype(np.float32),
        }
        for i in range(layers)
    }
    tree["layer_1"]["kernel"][2, 3] = np.nan
    tree["layer_2"]["bias"][0] = -np.inf
    tree["layer_3"]["kernel"][:] = 0.0
    tree["head"] = rng.normal(size=(4, 3)).astype(np.float32)
    return tree


def test_monitor_branch_statistics_match_gradient_stats():
    # health_monitor(every > 1) computes inside its branch by the exact path (no per-leaf
    # conds); the values must be those of gradient_stats, including NaN/Inf counts, zeros and
    # tiny magnitudes.
    grads, params = _layered(3), _layered(4)
    tx = health_monitor(every=100, inner=optax.sgd(0.5))
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    expected = gradient_stats(grads, params, updates)
    for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]:
        got = _health_leaf(state.stats, path)
        want = _health_leaf(expected, path)
        for field in ("log2_histogram", "nan_count", "posinf_count", "neginf_count"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        for field in ("norm", "max_abs", "mean", "std", "zero_fraction", "update_ratio"):
            np.testing.assert_allclose(
                getattr(got, field), getattr(want, field), rtol=1e-6, err_msg=f"{path} {field}"
            )
    _check_against_reference(state.stats["layer_1"]["kernel"], grads["layer_1"]["kernel"])
    _check_against_reference(state.stats["layer_2"]["bias"], grads["layer_2"]["bias"])


def _health_leaf(stats, path):
    for key in path:
        stats = stats[key.key]
    return stats


def test_exact_statistics_take_four_reductions_with_or_without_norms():
    # For a small leaf, one reduction per pass (maxima, counts, scaled sums, deviations),
    # however many of the parameter and update norms come along: the exact path runs inside
    # lax.cond branches, whose every operation costs time on XLA:CPU even when skipped.
    def reductions(*leaves):
        jaxpr = jax.make_jaxpr(_health._exact_leaf_stats)(*leaves).jaxpr
        return [e.primitive.name for e in jaxpr.eqns if e.primitive.name.startswith("reduce_")]

    g = jnp.ones((6, 5))
    assert len(reductions(g)) == 4
    assert len(reductions(g, g, g)) == 4


def _branch_stats(grads, params=None, updates=None, histogram=True):
    """The statistics health_monitor computes inside its every-k branch (exact path)."""
    layouts = []

    def packed(grads, params, updates):
        layout, result = _health._packed_stats(
            grads, params, updates, histogram=histogram, branch=False
        )
        layouts.append(layout)
        return result

    result = jax.jit(packed)(grads, params, updates)
    return _health._unpack(layouts[0], result)


def _assert_same_stats(got, want, rtol=1e-5):
    for path, leaf in jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_leaf_stats)[0]:
        other = _health_leaf(got, path)
        for field in ("nan_count", "posinf_count", "neginf_count", "log2_histogram"):
            np.testing.assert_array_equal(getattr(other, field), getattr(leaf, field))
        for field in _health._FLOAT_FIELDS:
            if getattr(leaf, field) is None:
                assert getattr(other, field) is None, (path, field)
                continue
            assert getattr(other, field).dtype == getattr(leaf, field).dtype, (path, field)
            np.testing.assert_allclose(
                np.asarray(getattr(other, field), np.float64),
                np.asarray(getattr(leaf, field), np.float64),
                rtol=rtol,
                atol=0,
                err_msg=f"{path} {field}",
            )


def _is_leaf_stats(node):
    return isinstance(node, _health.LeafStats)


def _mixed_tree(seed):
    """Leaves of every kind the statistics must handle: large and small, tiny and huge
    magnitudes, non-finite entries, zeros, an empty leaf, a scalar and bfloat16 gradients."""
    rng = np.random.default_rng(seed)
    nonfinite = _large(seed + 1)
    nonfinite[3, 4], nonfinite[10, 0], nonfinite[50, 60] = np.nan, np.inf, -np.inf
    return {
        "large": _large(seed),
        "offset": _large(seed + 2, scale=1e-3, offset=1.0),
        "tiny": (rng.normal(size=(5000,)) * 1e-20).astype(np.float32),
        "huge": (rng.normal(size=(3, 7)) * 1e30).astype(np.float32),
        "nonfinite": nonfinite,
        "zeros": np.zeros((4, 4), np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float32(-2.5),
        "bias": rng.normal(size=(13,)).astype(np.float32),
        "half": jnp.asarray(rng.normal(size=(6, 6)), jnp.bfloat16),
    }


def test_branch_statistics_match_gradient_stats_on_mixed_trees():
    # The branch takes the exact path without per-leaf conds (variadic passes for large leaves);
    # leaf by leaf, the values must be gradient_stats' (NaN/Inf counts, histograms and empty
    # leaves included), with and without params and updates, with and without histograms.
    grads, params, updates = _mixed_tree(20), _mixed_tree(30), _mixed_tree(40)
    updates["tiny"] = updates["tiny"] * np.float32(1e-15)
    for args in [(grads,), (grads, params), (grads, params, updates), (grads, None, updates)]:
        want = jax.jit(gradient_stats)(*args)
        got = _branch_stats(*args)
        _assert_same_stats(got, want)
        if len(args) == 1:
            _check_against_reference(got["nonfinite"], grads["nonfinite"], rtol=1e-5)
            _check_against_reference(got["tiny"], grads["tiny"], rtol=1e-5)
    plain = _branch_stats(grads, histogram=False)
    assert all(
        leaf.log2_histogram is None
        for leaf in jax.tree_util.tree_leaves(plain, is_leaf=_is_leaf_stats)
    )


def _same_shape_tree(seed, count):
    """``count`` small (6, 5) float32 leaves interleaved with other shapes and dtypes, some
    entries non-finite, zero or tiny."""
    rng = np.random.default_rng(seed)
    tree = {}
    for i in range(count):
        leaf = rng.normal(size=(6, 5)).astype(np.float32) * np.float32(10.0 ** -(3 * i))
        if i in (1, 2, 4):
            leaf[0, i] = {1: np.nan, 2: np.inf, 4: -np.inf}[i]
        if i % 2 == 0:
            leaf[2] = 0.0
        tree[f"block{i}"] = {"scale": leaf, "other": rng.normal(size=(7,)).astype(np.float32)}
    tree["half"] = jnp.asarray(rng.normal(size=(6, 5)), jnp.bfloat16)
    return tree


@pytest.mark.parametrize("branch", [True, False])
def test_small_leaves_of_one_shape_share_a_program_and_keep_their_statistics(branch):
    # Leaves of one small shape and dtype are stacked and computed by one vmapped program;
    # each must get exactly the statistics it gets alone, in its own place in the tree.
    grads, params, updates = (_same_shape_tree(seed, 5) for seed in (60, 61, 62))

    def packed(grads, params, updates):
        layout, result = _health._packed_stats(grads, params, updates, branch=branch)
        return _health._unpack(layout, result)

    together = jax.jit(packed)(grads, params, updates)
    flat = [jax.tree.leaves(t) for t in (grads, params, updates)]
    for stats, g, p, u in zip(
        jax.tree.leaves(together, is_leaf=_is_leaf_stats), *flat, strict=True
    ):
        alone = jax.jit(packed)({"leaf": g}, {"leaf": p}, {"leaf": u})["leaf"]
        _assert_same_stats({"leaf": stats}, {"leaf": alone}, rtol=1e-6)
    assert int(together["block1"]["scale"].nan_count) == 1
    assert int(together["block2"]["scale"].posinf_count) == 1
    assert int(together["block4"]["scale"].neginf_count) == 1
    assert float(together["block2"]["scale"].zero_fraction) == pytest.approx(5 / 30)
    assert float(together["block3"]["scale"].norm) > 0  # 1e-9 entries: no underflow

    # The program does not grow with the number of such leaves (compile time grows with it).
    def size(count):
        tree = _same_shape_tree(0, count)
        return len(jax.make_jaxpr(lambda t: _health._packed_stats(t, branch=branch)[1])(tree).eqns)

    assert size(16) < 1.2 * size(4), (size(4), size(16))


def test_branch_statistics_with_leaves_of_several_dtypes():
    # Leaves of several compute dtypes, and a float32 gradient of a float64 parameter.
    with jax.enable_x64(True):
        rng = np.random.default_rng(50)
        grads = {
            "a": rng.normal(size=(30, 7)).astype(np.float32),
            "b": rng.normal(size=(9,)) * 1e-200,
            "c": rng.normal(size=(5, 5)).astype(np.float32),
            "d": rng.normal(size=(4,)),
        }
        params = {key: np.ones_like(value) for key, value in grads.items()}
        params["c"] = params["c"].astype(np.float64)  # a float32 gradient of a float64 param
        want = jax.jit(gradient_stats)(grads, params)
        got = _branch_stats(grads, params)
        _assert_same_stats(got, want)
        assert float(got["b"].norm) > 0  # 1e-200 survives in float64


def test_exact_statistics_of_a_large_leaf_read_it_in_four_fused_passes():
    # Each pass over a large leaf is one variadic reduction (XLA:CPU fuses its element-wise
    # inputs into the loop instead of materialising one leaf-sized temporary per statistic,
    # which would enlarge a cond branch's memory on every step, taken or not).
    g = jnp.ones(_LARGE)
    jaxpr = jax.make_jaxpr(_health._exact_leaf_stats)(g, g, g).jaxpr
    over_leaf = [
        e
        for e in jaxpr.eqns
        if e.primitive.name.startswith("reduce")
        and any(getattr(v.aval, "size", 0) >= g.size for v in e.invars)
    ]
    assert len(over_leaf) == 4
    assert all(e.primitive.name == "reduce" and len(e.invars) >= 4 for e in over_leaf)


# Square leaves of which four make one run of the every-k branch's statistics.
_SIDE = math.isqrt(_health.SEQUENCE_ELEMENTS // 4) + 1


def test_monitor_branch_temporaries_do_not_grow_with_the_number_of_large_leaves():
    # health_monitor(every > 1) computes its leaves in runs, one after another (each run in a
    # cond of its own, chained on the previous run's counts), so the runs' temporaries share
    # memory. All at once they took 8 bytes per parameter of the step's temporary buffer,
    # which XLA:CPU allocates on every call, taken or not, and past glibc's mmap threshold
    # page-faults in afresh (+17.5% per step on a 3.4M-parameter MLP).
    def temp_bytes(count):
        params = {f"w{i}": jnp.ones((_SIDE, _SIDE)) for i in range(count)}
        tx = health_monitor(every=2, inner=optax.adam(1e-3))
        update = jax.jit(tx.update).lower(params, tx.init(params), params).compile()
        return update.memory_analysis().temp_size_in_bytes

    # 4 leaves make one run of the branch's statistics, 12 leaves three.
    per_parameter = (temp_bytes(12) - temp_bytes(4)) / (8 * _SIDE * _SIDE)
    assert per_parameter < 1.0, per_parameter


@jax.tree_util.register_pytree_node_class
class _CallableModel:
    """A pytree node that is also callable, like an Equinox module."""

    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return x @ self.w

    def tree_flatten(self):
        return (self.w,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


@pytest.mark.parametrize("every", [1, 2])
def test_monitor_takes_params_and_updates_that_are_callable_pytrees(every):
    # The branch may compute the updates from a function; a pytree that is itself callable
    # (an Equinox module) must still be read as the updates, not called.
    params = _CallableModel(jnp.ones((_SIDE, 4)))
    grads = _CallableModel(jnp.full((_SIDE, 4), 0.5))
    tx = health_monitor(every=every, inner=optax.sgd(0.1))
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates.w, -0.05)
    stats = state.stats.w
    np.testing.assert_allclose(stats.norm, 0.5 * np.sqrt(_SIDE * 4), rtol=1e-6)
    np.testing.assert_allclose(stats.update_ratio, 0.05, rtol=1e-6)


def test_monitor_branch_runs_before_the_optimizer_update():
    # With every > 1 the inner optimiser reads its inputs through an optimisation barrier
    # placed after the statistics' cond, so the cond does not keep the gradients alive after
    # the update (which slows every training step on XLA:CPU, monitored or not).
    # (On other platforms there is no cond to order: see tests/test_accelerator_paths.py.)
    params = {"w": jnp.ones(4), "b": jnp.ones(2)}
    tx = health_monitor(every=5, inner=optax.adam(1e-3))
    closed = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
    (switch,) = [e for e in closed.jaxpr.eqns if e.params.get("branches_platforms")]
    cpu = switch.params["branches"][switch.params["branches_platforms"].index(("cpu",))].jaxpr
    eqns = cpu.eqns
    names = [e.primitive.name for e in eqns]
    cond, barrier = names.index("cond"), names.index("optimization_barrier")
    assert cond < barrier
    assert set(eqns[cond].outvars) <= set(eqns[barrier].invars)
    # The branch's inputs are the switch's, less the platform index.
    outer = closed.jaxpr.invars[:2]  # the gradients
    grads = [b for b, v in zip(cpu.invars, switch.invars[1:], strict=True) if v in outer]
    assert len(grads) >= 2  # (closed over by the cond, and passed in)
    later = [v for e in eqns[barrier + 1 :] for v in e.invars]
    assert not any(v is g for v in later for g in grads)


@pytest.mark.parametrize("shape", [(7, 5), _LARGE])  # the exact and the one-pass paths
def test_subnormal_entries_are_binned_by_their_exponent(shape):
    # The histogram reads float32 exponents from the bits, so subnormals land in their own bins
    # (XLA:CPU's frexp, with denormals flushed, put them all in the first). They are not zeros
    # (XLA:CPU compares them equal to 0; the zeros are read from the bits), on every path: with
    # or without histograms, and in the monitor's branch.
    g = np.random.default_rng(60).normal(size=shape).astype(np.float32)
    g.ravel()[:6] = [1e-40, -1e-44, 3e-39, 0.0, 0.0, np.float32(2.0**-149)]
    ref = _reference(g)
    assert ref["log2_histogram"][:24].sum() == 4  # the four subnormals, below 2**-126
    with_histogram = _stats_jit({"w": g})["w"]
    np.testing.assert_array_equal(with_histogram.log2_histogram, ref["log2_histogram"])
    branch = _branch_stats({"w": g})["w"]
    np.testing.assert_array_equal(branch.log2_histogram, ref["log2_histogram"])
    without = jax.jit(functools.partial(gradient_stats, histogram=False))({"w": g})["w"]
    assert round(float(with_histogram.zero_fraction) * g.size) == 2
    np.testing.assert_allclose(with_histogram.zero_fraction, ref["zero_fraction"], rtol=1e-6)
    np.testing.assert_array_equal(without.zero_fraction, with_histogram.zero_fraction)
    np.testing.assert_array_equal(branch.zero_fraction, with_histogram.zero_fraction)


def test_fast_statistics_read_a_large_gradient_in_one_fused_pass():
    # Outside the fallback cond, max |g|, sum g, sum g**2 and the zero count of a large leaf are
    # one variadic reduction: on XLA:CPU four separate reductions cost a training step about
    # 8% more with health_monitor(every=1) on the benchmark MLP (benchmarks/bench_training.py).
    g = jnp.ones(_LARGE)
    jaxpr = jax.make_jaxpr(lambda g: _health._fast_leaf_stats(g, None, None))(g).jaxpr
    over_leaf = [
        e
        for e in jaxpr.eqns
        if e.primitive.name.startswith("reduce")
        and any(getattr(v.aval, "size", 0) >= g.size for v in e.invars)
    ]
    assert [(e.primitive.name, len(e.invars)) for e in over_leaf] == [("reduce", 8)]


def test_leaves_beyond_a_float32_sequential_sum_keep_their_statistics():
    # XLA:CPU adds a variadic reduction's row up sequentially; in one row a float32 sum of 2**25
    # squares of +-1 stops growing at 2**24 (the norm read 4096, not 5793). Rows are at most
    # ROW_WIDTH long on both paths, padded with zeros that no statistic counts.
    n = 2**25
    alternating = jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0).reshape(2**20, 32)  # fast path
    ones = jnp.ones((n + 3,), jnp.float32)  # zero variance: the exact path; last row padded
    for g, mean, std in [(alternating, 0.0, 1.0), (ones, 1.0, 0.0)]:
        for stats in (jax.jit(gradient_stats)({"w": g})["w"], _branch_stats({"w": g})["w"]):
            np.testing.assert_allclose(stats.norm, np.sqrt(g.size), rtol=1e-6)
            np.testing.assert_allclose(stats.mean, mean, atol=1e-6)
            np.testing.assert_allclose(stats.std, std, atol=1e-6)
            assert float(stats.zero_fraction) == 0.0
            assert float(stats.max_abs) == 1.0
            assert int(stats.log2_histogram.sum()) == g.size
