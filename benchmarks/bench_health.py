"""Overhead of gradkit's health monitor on a 784-512-512-10 MLP training step.

Times one jitted SGD step (batch 128) without monitoring, with
``health_monitor(every=1)`` (with and without histograms) and with ``health_monitor(every=100)``,
and reports each as a ratio to the unmonitored step (median of repeated timings).

Run: python benchmarks/bench_health.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from gradkit.diagnostics import health_monitor
from gradkit.layers import MLP


def make_step(mlp, tx):
    def loss(params, x, y):
        logits = mlp.apply(params, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def time_step(step, params, state, x, y, steps: int, repeats: int) -> float:
    params, state = step(params, state, x, y)  # compile
    jax.block_until_ready(params)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            params, state = step(params, state, x, y)
        jax.block_until_ready(params)
        samples.append((time.perf_counter() - start) / steps)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    steps, repeats = (5, 2) if args.quick else (200, 7)
    mlp = MLP([784, 512, 512, 10], "relu")
    params = mlp.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (128, 784))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    sgd = optax.sgd(1e-3)
    variants = {
        "without monitor": sgd,
        "health_monitor(every=1)": health_monitor(every=1, inner=sgd),
        "health_monitor(every=1, histogram=False)": health_monitor(
            every=1, inner=sgd, histogram=False
        ),
        "health_monitor(every=100)": health_monitor(every=100, inner=sgd),
    }
    times = {}
    for name, tx in variants.items():
        step = make_step(mlp, tx)
        times[name] = time_step(step, params, tx.init(params), x, y, steps, repeats)
    base = times["without monitor"]
    print(
        f"784-512-512-10 MLP, batch 128, SGD; {jax.devices()[0].device_kind}; "
        f"median of {repeats} x {steps} steps"
    )
    print("| variant | ms / step | overhead |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.3f} | {100 * (seconds / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
