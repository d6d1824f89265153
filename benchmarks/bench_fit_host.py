"""Benchmark: the host side of gradkit.training.fit, setting by setting, against a bare loop.

On a GPU a step of a small model takes less device time than the host needs to launch it, so
what ``fit`` does on the host per step (read the metrics back, check them for NaN, record them,
run callbacks) decides its speed. This script measures ``fit``'s private loop settings one at a
time on the MLP of ``bench_training.py`` (784-512-512-10, batch 128, float32, Adam):

* the depth of the queue of steps in flight (``_MAX_STEPS_IN_FLIGHT_ACCELERATOR``; 4 is the
  CPU's), how a block of metrics comes back (``_STACK_METRICS``: stacked on the device and
  copied at once, or one copy per step) and where array data's batch window is computed
  (``_WINDOW_ON_DEVICE``: from ``state.step`` inside the step, or passed from the host);
* each as steps/second relative to a hand-written jitted loop that computes the gradient norm
  too and reads nothing back, in ``--rounds`` interleaved rounds (order reversed every other
  round) of ``--steps`` steps; each ``fit`` round is a whole call, timed between the callbacks
  of its first and last timed steps.

``--dispatch`` adds what bounds any loop on the machine: the hand-written loop alone, the same
loop reading each step's metrics back 8 steps late, k steps per dispatch in one ``lax.scan``
(k = 4, 16), and a trivial jitted call with and without a ``lax.cond`` inside (microseconds per
step or call). On the CPU ``fit`` keeps 4 steps in flight whatever the depth setting says; the
other two settings apply wherever they are set (the CPU's own are per-step reads and the window
from the host), so there the rows show what the accelerator settings would cost.

Run:  python benchmarks/bench_fit_host.py [--dispatch] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_training import BATCH, SIZES, problem

import gradkit.training as training

SETTINGS = (
    "_MAX_STEPS_IN_FLIGHT_ACCELERATOR",
    "_WINDOW_ON_DEVICE",
    "_STACK_METRICS",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 60 steps")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--dispatch", action="store_true", help="also the dispatch section")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 60, 5
    params, optimizer, x, y, batches, loss_fn = problem(SIZES)

    def body(p, opt_state, inputs, labels):
        loss, grads = jax.value_and_grad(loss_fn)(p, (inputs, labels))
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, jnp.stack([loss, optax.tree.norm(grads)])

    step = jax.jit(body)

    def hand(steps: int, warmup: int = 0, read_back: bool = False) -> float:
        p, opt_state, queue = params, optimizer.init(params), []
        for i in range(warmup):
            p, opt_state, metrics = step(p, opt_state, *batches[i % len(batches)])
        jax.block_until_ready(p)
        start = time.perf_counter()
        for i in range(steps):
            p, opt_state, metrics = step(p, opt_state, *batches[i % len(batches)])
            if read_back:
                queue.append(metrics)
                if len(queue) >= 16:
                    block, queue[:8] = queue[:8], []
                    [np.asarray(m).tolist() for m in block]
        jax.block_until_ready((p, metrics))
        return time.perf_counter() - start

    defaults = {name: getattr(training, name) for name in SETTINGS}

    def fit_with(data, batch_size, **settings):
        def run() -> float:
            marks = {}
            last = args.warmup + args.steps

            def clock(step, state, metrics):
                if step in (args.warmup, last):
                    marks[step] = time.perf_counter()

            for name, value in settings.items():
                setattr(training, name, value)
            try:
                state, _ = training.fit(
                    loss_fn,
                    params,
                    data,
                    optimizer,
                    steps=last + 8,
                    batch_size=batch_size,
                    callbacks=[clock],
                    progress=False,
                )
                jax.block_until_ready(state)
            finally:
                for name, value in defaults.items():
                    setattr(training, name, value)
            return marks[last] - marks[args.warmup]

        return run

    reference = "hand-written loop + grad norm, nothing read back"
    variants = {
        reference: lambda: hand(args.steps, args.warmup),
        "the same, again (A/A control)": lambda: hand(args.steps, args.warmup),
        "fit iterable, depth 4, per-step reads": fit_with(
            batches, None, _MAX_STEPS_IN_FLIGHT_ACCELERATOR=4, _STACK_METRICS=False
        ),
        "fit iterable, depth 16, per-step reads": fit_with(batches, None, _STACK_METRICS=False),
        "fit iterable, depth 16, stacked reads (accelerator default)": fit_with(batches, None),
        "fit iterable, depth 32, stacked reads": fit_with(
            batches, None, _MAX_STEPS_IN_FLIGHT_ACCELERATOR=32
        ),
        "fit arrays, depth 16, stacked reads, window from the host": fit_with(
            (x, y), BATCH, _WINDOW_ON_DEVICE=False
        ),
        "fit arrays, depth 16, stacked reads, window on the device (accelerator default)": fit_with(
            (x, y), BATCH
        ),
    }
    device = jax.devices()[0]
    print(
        f"gradkit fit host-loop benchmark: MLP {SIZES}, batch {BATCH}, float32, Adam; jax "
        f"{jax.__version__} on {device.platform} ({device.device_kind}); {args.rounds} rounds "
        f"of {args.steps} steps per variant"
    )
    for run in variants.values():  # compile, warm the caches
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(variants[name]())
    base = np.asarray(times[reference])
    print("| variant | us/step (median) | steps/s relative to the bare loop, median | quartiles |")
    print("|---|---:|---:|---:|")
    for name, seconds in times.items():
        ratios = base / np.asarray(seconds)
        low, mid, high = np.percentile(ratios, [25, 50, 75])
        per_step = statistics.median(seconds) / args.steps * 1e6
        print(f"| {name} | {per_step:.1f} | {mid:.3f} | {low:.3f} to {high:.3f} |")
    if args.dispatch:
        dispatch(args, params, optimizer, body, batches, hand)
    return 0


def dispatch(args, params, optimizer, body, batches, hand) -> None:
    def per_step(run, n: int) -> float:
        run(20)
        start = time.perf_counter()
        run(n)
        return (time.perf_counter() - start) / n * 1e6

    def scanned(k: int):
        @jax.jit
        def multi(p, opt_state, inputs, labels):
            def one(carry, batch):
                p, opt_state, metrics = body(*carry, *batch)
                return (p, opt_state), metrics

            (p, opt_state), metrics = jax.lax.scan(one, (p, opt_state), (inputs, labels))
            return p, opt_state, metrics

        inputs = jnp.stack([b[0] for b in batches[:k]])
        labels = jnp.stack([b[1] for b in batches[:k]])

        def run(n: int) -> None:
            p, opt_state = params, optimizer.init(params)
            for _ in range(n // k):
                p, opt_state, metrics = multi(p, opt_state, inputs, labels)
            jax.block_until_ready((p, metrics))

        return run

    matrix = jnp.ones((512, 512))
    plain = jax.jit(lambda a, i: a * 1.0001 + 1e-6)
    gated = jax.jit(
        lambda a, i: jax.lax.cond(i % 100 == 0, lambda a: a * 2.0, lambda a: a, a) * 1.0001
    )
    counters = [jnp.int32(i) for i in range(64)]

    def calls(f):
        def run(n: int) -> None:
            a = matrix
            for i in range(n):
                a = f(a, counters[i % len(counters)])
            jax.block_until_ready(a)

        return run

    n = 200 if args.quick else 2000
    print(f"\nDispatch, us per step or call (2 rounds of {n}):")
    print(
        "| round | hand-written loop | the same, reading metrics back | 4 steps per dispatch "
        "| 16 steps per dispatch | trivial jit | trivial jit with a lax.cond |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in range(2):
        figures = [
            per_step(lambda m: hand(m), n),
            per_step(lambda m: hand(m, read_back=True), n),
            per_step(scanned(4), n),
            per_step(scanned(16), n),
            per_step(calls(plain), n),
            per_step(calls(gated), n),
        ]
        print(f"| {r} | " + " | ".join(f"{f:.1f}" for f in figures) + " |")


if __name__ == "__main__":
    sys.exit(main())
