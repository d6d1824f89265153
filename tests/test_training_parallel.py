"""Data-parallel fit on 4 simulated CPU devices, in a subprocess (XLA flags are per process)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from gradkit.layers import MLP
    from gradkit.training import fit

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = rng.normal(size=(64,)).astype(np.float32)
    model = MLP([5, 16, 1], "tanh")
    params = model.init(jax.random.key(0))
    seen = []

    def loss(p, batch):
        jax.debug.inspect_array_sharding(batch[0], callback=seen.append)
        return jnp.mean((model.apply(p, batch[0])[:, 0] - batch[1]) ** 2)

    common = dict(steps=12, batch_size=16, progress=False, seed=1, health_every=3)
    single, h1 = fit(loss, params, (x, y), optax.adam(1e-2), **common)
    parallel, h4 = fit(loss, params, (x, y), optax.adam(1e-2), data_parallel=True, **common)

    # the batch inside the step is split over the 4 devices along the data axis
    assert len(seen[-1].device_set) == 4, seen[-1]
    assert seen[-1].spec == PartitionSpec("data"), seen[-1].spec
    # params come back replicated on every device
    kernel = parallel.params["dense_0"]["kernel"]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 4
    for a, b in zip(jax.tree_util.tree_leaves(single.params),
                    jax.tree_util.tree_leaves(parallel.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(h1["loss"], h4["loss"], rtol=2e-5)
    # gradient-health statistics are computed on the sharded step too, on the same steps
    for layer in ("dense_0", "dense_1"):
        norms1, norms4 = h1[f"health/{layer}/grad_norm"], h4[f"health/{layer}/grad_norm"]
        np.testing.assert_array_equal(np.isfinite(norms4), np.arange(12) % 3 == 0)
        np.testing.assert_allclose(norms1, norms4, rtol=2e-5)

    # an explicit mesh and an iterable of batches
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    a, _ = fit(loss, params, batches, optax.sgd(0.1), epochs=2, progress=False)
    b, _ = fit(loss, params, batches, optax.sgd(0.1), epochs=2, progress=False, mesh=mesh)
    assert seen[-1].spec == PartitionSpec("batch"), seen[-1].spec
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-6)

    try:
        fit(loss, params, (x, y), optax.sgd(0.1), steps=2, batch_size=10, data_parallel=True)
    except ValueError as error:
        assert "batch_size 10 must be divisible by the 4 devices" in str(error), error
    else:
        raise AssertionError("batch_size 10 on 4 devices was accepted")
    try:
        fit(loss, params, (x[:10], y[:10]), optax.sgd(0.1), steps=2, data_parallel=True)
    except ValueError as error:
        message = "the full batch (batch_size=None: all 10 examples) must be divisible by the 4"
        assert message in str(error), error
    else:
        raise AssertionError("a full batch of 10 on 4 devices was accepted")
    print("DATA PARALLEL OK")
    """
)


def test_data_parallel_fit_matches_the_single_device_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "DATA PARALLEL OK" in completed.stdout
