"""Benchmark: gradkit.training.fit against a hand-written jitted optax loop.

An MLP 784-512-512-10 (ReLU, softmax cross-entropy, Adam 1e-3) on random float32 data, batch 128,
500 steps, run side by side in one process:

* ``hand-written loop``: a ``jax.jit`` step ``(params, opt_state, x, y) -> (params, opt_state,
  loss)`` called in a Python loop over batches already on the device; nothing is read back until
  the end. The leanest loop a user would write.
* ``fit (arrays)``: ``fit(loss, params, (x, y), optimizer, steps=..., batch_size=128)``: it
  reshuffles every epoch, gathers the batch inside the compiled step, computes the gradient
  norm, reads every step's metrics back (a few steps late) into the History and checks them
  for NaN.
* ``fit (iterable)``: ``fit`` given the same device batches as the hand-written loop.

Throughput excludes compilation and start-up: every variant is timed for ``--steps`` steps and
for ``--short`` steps (each run compiling afresh), and steps/second is
``(steps - short) / (time(steps) - time(short))``. The median over ``--repeats`` interleaved
repetitions is reported. The compile count is the number of XLA compilations of the step
function seen (via ``jax.log_compiles``) during one run: exactly one per run for a fixed batch
shape.

Run:  python benchmarks/bench_training.py            (full: 500 steps, 5 repeats)
      python benchmarks/bench_training.py --quick    (smoke run, seconds)
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradkit.layers import MLP
from gradkit.training import fit

BATCH = 128
SIZES = [784, 512, 512, 10]


class _CompileCounter(logging.Handler):
    """Counts ``jax.log_compiles`` messages that compile a function of a given name."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__(level=logging.DEBUG)
        self.names = names
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling ") and any(f"jit({n})" in message for n in self.names):
            self.count += 1


def count_step_compiles(run, names: tuple[str, ...]) -> int:
    counter = _CompileCounter(names)
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    try:
        with jax.log_compiles(True):
            run()
    finally:
        logger.removeHandler(counter)
    return counter.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 repeat")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.short, args.repeats = 40, 10, 1

    model = MLP(SIZES, "relu")
    params = model.init(jax.random.key(0))
    optimizer = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    examples = BATCH * 50
    x = rng.normal(size=(examples, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=examples).astype(np.int32)
    device_batches = [
        (jnp.asarray(x[i : i + BATCH]), jnp.asarray(y[i : i + BATCH]))
        for i in range(0, examples, BATCH)
    ]

    def loss_fn(params, batch):
        inputs, labels = batch
        logits = model.apply(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def hand_written(steps: int) -> None:
        @jax.jit
        def train_step(params, opt_state, inputs, labels):
            loss, grads = jax.value_and_grad(loss_fn)(params, (inputs, labels))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        p, opt_state = params, optimizer.init(params)
        for i in range(steps):
            inputs, labels = device_batches[i % len(device_batches)]
            p, opt_state, loss = train_step(p, opt_state, inputs, labels)
        jax.block_until_ready((p, loss))

    def fit_arrays(steps: int) -> None:
        state, _ = fit(
            loss_fn, params, (x, y), optimizer, steps=steps, batch_size=BATCH, progress=False
        )
        jax.block_until_ready(state)

    def fit_iterable(steps: int) -> None:
        state, _ = fit(loss_fn, params, device_batches, optimizer, steps=steps, progress=False)
        jax.block_until_ready(state)

    variants = {
        "hand-written loop": (hand_written, ("train_step",)),
        "fit (arrays)": (fit_arrays, ("_indexed_step",)),
        "fit (iterable)": (fit_iterable, ("_constrained_step",)),
    }

    print(
        f"gradkit training benchmark: MLP {SIZES}, batch {BATCH}, float32, Adam, "
        f"{args.steps} steps (minus {args.short}), {args.repeats} repeat(s)"
    )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    for run, _ in variants.values():  # warm up caches of the eager ops
        run(2)

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (run, _) in variants.items():
            start = time.perf_counter()
            run(args.short)
            short = time.perf_counter() - start
            start = time.perf_counter()
            run(args.steps)
            full = time.perf_counter() - start
            rates[name].append((args.steps - args.short) / max(full - short, 1e-9))

    compiles = {
        name: count_step_compiles(lambda run=run: run(args.short), names)
        for name, (run, names) in variants.items()
    }
    baseline = statistics.median(rates["hand-written loop"])
    print()
    print("| variant | steps/s (median) | ratio to hand-written | step compilations per run |")
    print("|---|---:|---:|---:|")
    for name in variants:
        rate = statistics.median(rates[name])
        print(f"| {name} | {rate:,.1f} | {rate / baseline:.3f} | {compiles[name]} |")
    spread = {name: (min(r), max(r)) for name, r in rates.items()}
    print(
        "\nrange over repeats (steps/s): "
        + "; ".join(f"{name}: {lo:,.1f}-{hi:,.1f}" for name, (lo, hi) in spread.items())
    )
    return 0 if all(count == 1 for count in compiles.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
