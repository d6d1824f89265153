"""Seed 004: one more hidden layer with N(0, 1e-3) initialisation and the network stops learning.

The question: a 2-layer ReLU network (1 -> 16 -> 1) learns the identity, estimate = 2 * O2[0, 0]
for one input x ~ U[-1, 1), trained with SGD (learning rate 1e-3) on gradients clipped to
[-4.5, 4.5]; adding a 16-unit hidden layer (1 -> 16 -> 16 -> 1), everything else equal, makes the
estimate converge to a constant. "Any idea what might be wrong with the second example?"

This script rebuilds both networks as posted (every weight and bias drawn from N(0, 1e-3)), asks
gradkit.diagnostics.diagnose for a per-layer verdict, trains both for the post's 10000 steps
(one sample per step, jitted with lax.scan) with a health monitor in the optimiser, then applies
the fix the accepted answer suggests (Xavier initialisation, bias 0.1) and checks that the flag
clears and the training error falls. It writes the reports, a PNG of per-layer gradient norms
over training, the report plots and TensorBoard logs under --out.

Run: python examples/vanishing_gradients.py --out /tmp/seed004
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")

from gradkit.diagnostics import (  # noqa: E402, RUF100
    diagnose,
    health_monitor,
    latest_health,
    layer_boundary,
    log_health,
    plot_norm_history,
)

STEPS = 10_000  # as in the post
MONITOR_EVERY = 100
LEARNING_RATE = 1e-3
CLIP_VALUE = 4.5
DIAGNOSE_SAMPLES = 64  # draws of the single-sample task averaged for diagnose


def init_posted(key: jax.Array, sizes: list[int]) -> dict:
    """Every weight and bias from tf.random_normal_initializer(0, 1e-3), as in the post."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, k_w, k_b = jax.random.split(key, 3)
        params[f"dense_{i}"] = {
            "kernel": 1e-3 * jax.random.normal(k_w, (fan_in, fan_out)),
            "bias": 1e-3 * jax.random.normal(k_b, (fan_out,)),
        }
    return params


def init_fixed(key: jax.Array, sizes: list[int]) -> dict:
    """The accepted answer's fix: xavier_initializer() (Glorot uniform) and bias 0.1."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, k_w = jax.random.split(key)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        params[f"dense_{i}"] = {
            "kernel": jax.random.uniform(k_w, (fan_in, fan_out), minval=-limit, maxval=limit),
            "bias": jnp.full((fan_out,), 0.1, jnp.float32),
        }
    return params


def network(params: dict, inputs: jax.Array) -> jax.Array:
    """ReLU hidden layers, linear output; each pre-activation is marked for diagnose."""
    count = len(params)
    h = inputs
    for i in range(count):
        layer = params[f"dense_{i}"]
        z = h @ layer["kernel"] + layer["bias"]
        if i < count - 1:
            h = jax.nn.relu(layer_boundary(f"dense_{i}", z, "relu"))
        else:
            h = layer_boundary(f"dense_{i}", z)
    return h


def distance(params: dict, inputs: jax.Array) -> jax.Array:
    """The post's loss: (I[0,0] - 2 * O2[0,0])**2 for one sample."""
    estimate = 2.0 * network(params, inputs)[0, 0]
    return jnp.square(inputs[0, 0] - estimate)


def mean_distance(params: dict, inputs: jax.Array) -> jax.Array:
    """The same task averaged over a batch of independent samples (for diagnose and errors)."""
    estimates = 2.0 * network(params, inputs)[:, 0]
    return jnp.mean(jnp.square(inputs[:, 0] - estimates))


def optimiser() -> optax.GradientTransformation:
    # tf.clip_by_value(g, -4.5, 4.5) then plain SGD, wrapped in the health monitor.
    inner = optax.chain(optax.clip(CLIP_VALUE), optax.sgd(LEARNING_RATE))
    return health_monitor(every=MONITOR_EVERY, inner=inner)


def layer_norms(stats: dict) -> dict:
    """Per-layer gradient norm (kernel and bias together) from gradient_stats output."""
    return {
        name: np.hypot(np.asarray(leaf["kernel"].norm), np.asarray(leaf["bias"].norm))
        for name, leaf in stats.items()
    }


def train(params: dict, key: jax.Array) -> tuple[dict, jax.Array, dict]:
    """STEPS SGD steps on single samples.

    Returns the trained params, the per-step losses and the health monitor's statistics as
    computed at steps 0, MONITOR_EVERY, 2 * MONITOR_EVERY, ... (a gradient_stats pytree with a
    leading axis).
    """
    tx = optimiser()

    def step(carry, step_key):
        params, state = carry
        inputs = jax.random.uniform(step_key, (1, 1), minval=-1.0, maxval=1.0)
        loss, grads = jax.value_and_grad(distance)(params, inputs)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    def chunk(carry, chunk_keys):
        carry, losses = jax.lax.scan(step, carry, chunk_keys)
        # The monitor computed these on the chunk's first step, inside the compiled loop.
        return carry, (losses, latest_health(carry[1]).stats)

    keys = jax.random.split(key, STEPS).reshape(STEPS // MONITOR_EVERY, MONITOR_EVERY)
    (params, _), (losses, stats) = jax.lax.scan(chunk, (params, tx.init(params)), keys)
    return params, losses.reshape(-1), stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="vanishing_gradients_output", help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    diagnose_inputs = jax.random.uniform(
        jax.random.key(1), (DIAGNOSE_SAMPLES, 1), minval=-1.0, maxval=1.0
    )
    grid = jnp.linspace(-1.0, 1.0, 201)[:, None]
    runs = {
        "2-layer, N(0, 1e-3)": init_posted(jax.random.key(0), [1, 16, 1]),
        "3-layer, N(0, 1e-3)": init_posted(jax.random.key(0), [1, 16, 16, 1]),
        "3-layer, Xavier + bias 0.1": init_fixed(jax.random.key(0), [1, 16, 16, 1]),
    }
    train_jit = jax.jit(train)
    results = {}
    summary = {}
    try:
        import tensorboardX
    except ImportError:  # the tensorboard extra is optional
        tensorboardX = None
    for index, (run, params) in enumerate(runs.items()):
        report = diagnose(mean_distance, params, diagnose_inputs, key=jax.random.key(2))
        trained, losses, stats = train_jit(params, jax.random.key(10))
        norms = layer_norms(stats)
        error_before = float(mean_distance(params, grid))
        error_after = float(mean_distance(trained, grid))
        results[run] = (report, losses, norms, error_before, error_after)
        slug = f"run{index}_" + "".join(c if c.isalnum() else "_" for c in run).strip("_")
        (out / f"{slug}_report.txt").write_text(str(report) + "\n")
        report.plot(out / f"{slug}_report.png")
        matplotlib.pyplot.close("all")
        summary[run] = {
            "report": report.to_dict(),
            "error_before": error_before,
            "error_after": error_after,
        }
        if tensorboardX is not None:
            writer = tensorboardX.SummaryWriter(str(out / "tensorboard" / slug))
            # On the host once: indexing device arrays dispatches an operation per entry.
            host_stats, host_losses = jax.device_get((stats, losses))
            for i, step in enumerate(range(0, STEPS, MONITOR_EVERY)):
                log_health(writer, jax.tree_util.tree_map(lambda a, i=i: a[i], host_stats), step)
                chunk_loss = float(np.mean(host_losses[step : step + MONITOR_EVERY]))
                writer.add_scalar("train/loss", chunk_loss, step)
            writer.close()

        print(f"\n=== {run} ===")
        print(report)
        print(
            f"training error (mean squared error on 201 inputs in [-1, 1]): "
            f"{error_before:.4f} before, {error_after:.4f} after {STEPS} SGD steps"
        )

    steps = np.arange(0, STEPS, MONITOR_EVERY)
    histories = {run: (steps, norms) for run, (_, _, norms, _, _) in results.items()}
    flagged = {run: result[0].flagged("vanishing") for run, result in results.items()}
    plot_norm_history(histories, out / "gradient_norms_over_training.png", flagged=flagged)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

    two, three, fixed = (results[run] for run in runs)
    checks = {
        "3-layer net flagged vanishing, starting in its first layer dense_0": (
            three[0].flagged("vanishing")[:1] == ["dense_0"]
        ),
        "2-layer net not flagged vanishing": not two[0].flagged("vanishing"),
        "2-layer net learns (error falls below 0.05)": two[4] < 0.05,
        "3-layer net does not learn (error stays above 0.25, the constant predictor's 1/3)": (
            three[4] > 0.25
        ),
        "fix clears the vanishing flag": not fixed[0].flagged("vanishing"),
        "fix makes the training error fall (below 0.05 and below the broken net's)": (
            fixed[4] < 0.05 and fixed[4] < three[4]
        ),
        "report's best tried fix clears the flag": bool(three[0].recommendations)
        and not three[0].recommendations[0].remaining,
    }
    print()
    for name, passed in checks.items():
        print(f"[{'ok' if passed else 'FAILED'}] {name}")
    first = three[0].layer("dense_0")
    diagnosed = (
        checks["3-layer net flagged vanishing, starting in its first layer dense_0"]
        and checks["2-layer net not flagged vanishing"]
    )
    if diagnosed:
        print(
            f"Verdict: the 3-layer net has vanishing gradients starting in its first layer "
            f"dense_0 (gradient norm {first.grad_norm:.2e} vs "
            f"{three[0].layer('dense_2').grad_norm:.2e} at the output layer); the 2-layer net "
            f"does not."
        )
    else:
        print(
            f"Verdict: NOT the expected diagnosis: the 3-layer net's vanishing layers "
            f"{three[0].flagged('vanishing')}, the 2-layer net's {two[0].flagged('vanishing')}."
        )
    cotangents = [three[0].layer(f"dense_{i}").cotangent_norm for i in (2, 1, 0)]
    shrink = [after / before for before, after in itertools.pairwise(cotangents)]
    print(
        f"Verdict: cause: each N(0, 1e-3) layer multiplies the backward signal by about "
        f"{np.exp(np.mean(np.log(shrink))):.0e} (dL/dz norm "
        f"{' -> '.join(f'{c:.1e}' for c in cotangents)} from the output layer back); the 3-layer "
        f"net's error stays at {three[4]:.3f} (the best constant predicts 1/3) while the 2-layer "
        f"net reaches {two[4]:.4f}."
    )
    best = three[0].recommendations[0].name if three[0].recommendations else "-"
    fixed_ok = (
        checks["fix clears the vanishing flag"]
        and checks["fix makes the training error fall (below 0.05 and below the broken net's)"]
    )
    outcome = (
        f"clears the flag and the error falls from {fixed[3]:.3f} to {fixed[4]:.4f}"
        if fixed_ok
        else f"did NOT work as expected (vanishing layers {fixed[0].flagged('vanishing')}, "
        f"error {fixed[3]:.3f} before and {fixed[4]:.4f} after)"
    )
    print(
        f"Verdict: fix: Xavier init + bias 0.1 {outcome} in {STEPS} steps; best fix tried by "
        f"diagnose on the same batch: {best}."
    )
    print(f"Files written to {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
