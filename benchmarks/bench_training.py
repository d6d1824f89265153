"""Benchmark: gradkit.training.fit against a hand-written jitted optax loop.

An MLP 784-512-512-10 (ReLU, softmax cross-entropy, Adam 1e-3) on random float32 data, batch 128,
500 steps, run side by side in one process:

* ``hand-written loop``: a ``jax.jit`` step ``(params, opt_state, x, y) -> (params, opt_state,
  loss)`` called in a Python loop over batches already on the device; nothing is read back until
  the end. The leanest loop a user would write.
* ``hand-written loop + grad norm``: the same, also returning the gradient's global norm
  (``optax.tree.norm``), the metric ``fit`` records every step besides the loss.
* ``fit (arrays)``: ``fit(loss, params, (x, y), optimizer, steps=..., batch_size=128)``: it
  reshuffles every epoch, gathers the batch inside the compiled step, computes the gradient
  norm, reads every step's metrics back (a few steps late) into the History and checks them
  for NaN.
* ``fit (iterable)``: ``fit`` given the same device batches as the hand-written loop.

A second table measures gradient-health monitoring (issue: its cost must stay small):
the hand-written loop with its optimizer wrapped in ``gradkit.diagnostics.health_monitor(every=1)``
(with and without the log2-magnitude histograms, the most expensive statistic on a CPU) and
``health_monitor(every=100)``, and ``fit(..., health_every=1)`` / ``health_every=100``, each
as a ratio to the same loop without monitoring. A third table compares the monitors again, paired:
each variant's step compiled once, then ``--rounds`` rounds in which every variant runs ``--block``
steps in turn; the overhead is the median over rounds of each round's time relative to the plain
loop's in the same round, which cancels most of the drift of a shared machine; its last row is a
reference, not a monitor: Adam also keeping the plain sums of squares of each gradient,
parameter and update leaf (``squares_only``), the least that reading those three arrays every
step costs any monitor of their norms. A fourth table
pairs ``fit`` with the hand-written loop + grad norm the same way (``--fit-rounds`` rounds, each
``fit`` round a whole call timed after its warm-up steps; ``--fit-only`` runs just these
rounds), and also with two hand-written loops that shuffle like ``fit`` on arrays: one gathering
each batch inside the step from a ``jax.random.permutation`` per epoch, as ``fit`` does, and one
indexing the arrays with a NumPy permutation on the host, the loop most people port from
PyTorch, and ``fit(..., steps_per_call=16)`` on arrays and on the iterable, which runs 16 steps
per call of its compiled program (the rounds then time a multiple of 16 steps, scaled to
``--block``). A fifth, from the same rounds, gives ``fit(..., health_every=100)`` and
``health_every=1`` relative to ``fit`` without them. Both paired tables include an A/A control:
the reference loop compiled a second time and run as a variant of its own. On a quiet machine
its ratio would be exactly 1; its median and quartiles show how far this method's figures move
by chance on the machine at hand.

Throughput excludes compilation and start-up: each run takes ``--warmup`` steps first (the
compile happens there), then the clock starts, and steps/second is ``--steps`` divided by the time
until the run has finished (the hand-written loop blocks on its result; for ``fit`` the clock
starts in a callback when the warm-up's last step has been read back and stops in the callback
of the last timed step, with a few untimed steps queued behind it as in the middle of a run, so
that its start-up and end-of-run work are not counted). The variants
alternate over ``--repeats`` repetitions; the table gives the median and the best repetition, the
best being the one least disturbed by other work on the machine. The compile count is the number
of XLA compilations of the step function seen (via ``jax.log_compiles``) during one run: exactly
one per run for a fixed batch shape.

Compile time (``--compile-only`` runs just this): seconds to lower and compile one training
step (``jax.jit(step).lower(...).compile()``, median of 3) with plain Adam and with Adam wrapped
in ``health_monitor(every=1)`` and ``every=100``, on the ``--compile-sizes`` MLP (default 48
hidden layers of 256: 98 parameter leaves, half of them small biases), as a ratio to plain Adam.

Page faults (in the paired monitor table, and alone with ``--monitor-only``): the process's
minor page faults per step and the compiled step's temporary buffer. XLA:CPU allocates that
buffer on every call; glibc serves allocations above its mmap threshold (at most 32 MiB) with
fresh pages, which the step then faults in, so a step whose temporary buffer passes 32 MiB pays
for its pages on every call.

Run:  python benchmarks/bench_training.py            (full: 500 steps, 5 repeats)
      python benchmarks/bench_training.py --monitor-only --sizes 784,256,...,10
                                                     (the paired monitor rounds alone)
      python benchmarks/bench_training.py --quick    (smoke run, seconds)
      python benchmarks/bench_training.py --compile-only   (compile time only, a minute)
      python benchmarks/bench_training.py --sizes 256,...  (other layer sizes: the README uses
                                                      thirteen 256s then 10, a deep MLP)
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradkit.diagnostics import health_monitor
from gradkit.layers import MLP
from gradkit.training import fit

BATCH = 128
# Steps per call of fit's steps_per_call variants.
CALL = 16
# Steps fit runs past the timed ones (see timed_fit).
_TAIL_STEPS = 4
SIZES = [784, 512, 512, 10]


def squares_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, also keeping each leaf's plain sums of squares of the gradient, parameters and
    update in its state: the least any monitor of gradient, parameter and update norms reads
    every step (no maxima, means, zeros, underflow guard or histograms). A reference for
    ``health_monitor(every=1)``, not a monitor: it is what reading the three arrays costs."""

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(3, p.dtype), params)
        return (inner.init(params), zeros)

    def update_fn(grads, state, params):
        updates, inner_state = inner.update(grads, state[0], params)

        def squares(g, p, u):
            return jnp.stack([jnp.sum(jnp.square(a)) for a in (g, p, u)])

        return updates, (inner_state, jax.tree.map(squares, grads, params, updates))

    return optax.GradientTransformation(init_fn, update_fn)


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


def problem(sizes: list[int]):
    """The benchmark's training problem: an MLP of ``sizes`` (ReLU) with its params, Adam 1e-3,
    random float32 inputs and integer labels for 50 batches of ``BATCH`` (as NumPy arrays and as
    device batches), and the softmax cross-entropy ``loss_fn(params, (inputs, labels))``."""
    model = MLP(sizes, "relu")
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    examples = BATCH * 50
    x = rng.normal(size=(examples, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], size=examples).astype(np.int32)
    device_batches = [
        (jnp.asarray(x[i : i + BATCH]), jnp.asarray(y[i : i + BATCH]))
        for i in range(0, examples, BATCH)
    ]

    def loss_fn(params, batch):
        inputs, labels = batch
        logits = model.apply(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return params, optax.adam(1e-3), x, y, device_batches, loss_fn


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


def compile_times(sizes: list[int], repeats: int = 3) -> dict[str, float]:
    """Median seconds to lower and compile one training step, per optimiser variant."""
    model = MLP(sizes, "relu")
    params = model.init(jax.random.key(0))
    inputs = jnp.zeros((BATCH, sizes[0]), jnp.float32)
    labels = jnp.zeros((BATCH,), jnp.int32)

    def loss_fn(params):
        logits = model.apply(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    variants = {
        "plain Adam": optax.adam(1e-3),
        "health_monitor(every=1)": health_monitor(every=1, inner=optax.adam(1e-3)),
        "health_monitor(every=100)": health_monitor(every=100, inner=optax.adam(1e-3)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, tx in variants.items():

            def train_step(params, opt_state, tx=tx):
                grads = jax.grad(loss_fn)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            opt_state = tx.init(params)
            start = time.perf_counter()
            jax.jit(train_step).lower(params, opt_state).compile()  # a fresh jit: no cache
            seconds[name].append(time.perf_counter() - start)
    leaves = jax.tree.leaves(params)
    small = sum(leaf.size <= 4096 for leaf in leaves)
    print(
        f"\nCompile time of one training step: MLP with {len(sizes) - 2} hidden layers "
        f"({sizes[0]} -> {sizes[1]} ... -> {sizes[-1]}), {len(leaves)} parameter leaves "
        f"({small} of at most 4096 entries), median of {repeats}"
    )
    print("| variant | seconds | ratio to plain Adam |")
    print("|---|---:|---:|")
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {value / medians['plain Adam']:.2f} |")
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 repeat")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rounds",
        type=int,
        default=30,
        help="interleaved rounds of the paired health-monitor comparison (default: %(default)s)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=100,
        help="steps per variant and round in that comparison; a multiple of 100 gives "
        "every=100 exactly its share of monitored steps (default: %(default)s)",
    )
    parser.add_argument(
        "--fit-rounds",
        type=int,
        default=20,
        help="interleaved rounds of the paired fit comparison; each fit round compiles its "
        "step afresh (default: %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(size) for size in text.split(",")],
        default=SIZES,
        help="layer sizes of the MLP, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--compile-sizes",
        type=lambda text: [int(size) for size in text.split(",")],
        default=[784, *[256] * 48, 10],
        help="layer sizes of the MLP of the compile-time section (default: 48 hidden layers "
        "of 256)",
    )
    parser.add_argument(
        "--compile-only", action="store_true", help="run only the compile-time section"
    )
    parser.add_argument(
        "--monitor-only",
        action="store_true",
        help="run only the paired health-monitor rounds (with page faults and temporary "
        "memory per variant)",
    )
    parser.add_argument(
        "--fit-only",
        action="store_true",
        help="run only the paired fit rounds (fit against the hand-written loops)",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes
    if args.compile_only:
        compile_times(args.compile_sizes)
        return 0
    if args.quick:
        args.steps, args.warmup, args.repeats, args.rounds, args.fit_rounds = 30, 5, 1, 2, 2

    params, optimizer, x, y, device_batches, loss_fn = problem(sizes)
    examples = len(x)

    def hand_loop(steps: int, warmup: int, with_norm: bool, tx=optimizer) -> float:
        @jax.jit
        def train_step(params, opt_state, inputs, labels):
            loss, grads = jax.value_and_grad(loss_fn)(params, (inputs, labels))
            updates, opt_state = tx.update(grads, opt_state, params)
            metrics = (loss, optax.tree.norm(grads)) if with_norm else loss
            return optax.apply_updates(params, updates), opt_state, metrics

        p, opt_state = params, tx.init(params)
        start = time.perf_counter()
        for i in range(warmup + steps):
            if i == warmup and warmup:
                jax.block_until_ready(p)
                start = time.perf_counter()
            inputs, labels = device_batches[i % len(device_batches)]
            p, opt_state, metrics = train_step(p, opt_state, inputs, labels)
        jax.block_until_ready((p, metrics))
        return time.perf_counter() - start

    def hand_written(steps: int, warmup: int = 0) -> float:
        return hand_loop(steps, warmup, with_norm=False)

    def hand_written_norm(steps: int, warmup: int = 0) -> float:
        return hand_loop(steps, warmup, with_norm=True)

    def timed_fit(
        data, batch_size, steps: int, warmup: int, health_every=None, steps_per_call=1
    ) -> float:
        # Both ends of the clock are callbacks, which fit runs when it has read a step's
        # metrics: at step ``warmup`` and at step ``warmup + steps``, so the interval is the
        # time the steps in between took, with the same read-back lag at both ends. fit takes
        # a few steps more so that the last timed one runs with steps queued behind it, as in
        # the middle of a run, and its end-of-run work is not timed.
        # With steps_per_call=k the callbacks run at the end of each call: both ends are then
        # rounded to multiples of k and the time scaled to ``steps``.
        timed = steps
        if steps_per_call > 1:
            warmup = -(-warmup // steps_per_call) * steps_per_call
            timed = max(1, round(steps / steps_per_call)) * steps_per_call
        marks: dict[int, float] = {0: time.perf_counter()}  # without warm-up: from the call

        def clock(step, state, metrics):
            if step in (warmup, warmup + timed):
                marks[step] = time.perf_counter()

        state, _ = fit(
            loss_fn,
            params,
            data,
            optimizer,
            steps=warmup + timed + _TAIL_STEPS * steps_per_call,
            batch_size=batch_size,
            callbacks=[clock],
            progress=False,
            health_every=health_every,
            steps_per_call=steps_per_call,
        )
        jax.block_until_ready(state)
        return (marks[warmup + timed] - marks[warmup]) * steps / timed

    def fit_arrays(steps: int, warmup: int = 0) -> float:
        return timed_fit((x, y), BATCH, steps, warmup)

    def fit_iterable(steps: int, warmup: int = 0) -> float:
        return timed_fit(device_batches, None, steps, warmup)

    def timed_steps(step, p, opt_state, steps: int) -> tuple[float, object, object]:
        """Seconds for ``steps`` calls of ``step`` over the device batches, and the new state."""
        jax.block_until_ready(p)
        start = time.perf_counter()
        for i in range(steps):
            inputs, labels = device_batches[i % len(device_batches)]
            p, opt_state, out = step(p, opt_state, inputs, labels)
        jax.block_until_ready((p, out))
        return time.perf_counter() - start, p, opt_state

    def paired_monitor_rounds(rounds: int, block: int) -> dict[str, dict]:
        """Seconds per round of ``block`` steps for the plain loop and each monitor.

        Each variant's step is compiled once and keeps its state across rounds; within a round
        the variants run one after the other, so a slow spell on the machine affects the plain
        loop and the monitors alike and the per-round ratios cancel most of it.
        """
        monitors = {
            "plain Adam": optimizer,
            "plain Adam, again (A/A control)": optimizer,
            "health_monitor(every=1)": health_monitor(every=1, inner=optimizer),
            "health_monitor(every=1, histogram=False)": health_monitor(
                every=1, inner=optimizer, histogram=False
            ),
            "health_monitor(every=100)": health_monitor(every=100, inner=optimizer),
            "reference: sums of squares of g, w and the update only": squares_only(optimizer),
        }

        def make_step(tx):
            @jax.jit
            def train_step(params, opt_state, inputs, labels):
                loss, grads = jax.value_and_grad(loss_fn)(params, (inputs, labels))
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            return train_step

        def run_block(name: str) -> float:
            step, p, opt_state = runners[name]
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            elapsed, p, opt_state = timed_steps(step, p, opt_state, block)
            faults[name].append(
                (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / block
            )
            runners[name] = (step, p, opt_state)
            return elapsed

        runners = {name: (make_step(tx), params, tx.init(params)) for name, tx in monitors.items()}
        faults: dict[str, list[float]] = {name: [] for name in monitors}
        temp_mib = {}
        for name, (step, p, opt_state) in runners.items():
            # Compiled once, and the executable is what runs (a jit call would compile again).
            compiled = step.lower(p, opt_state, *device_batches[0]).compile()
            temp_mib[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            runners[name] = (compiled, p, opt_state)
        for name in monitors:  # warm up, and start every monitor's count at the same step
            run_block(name)
        times: dict[str, list[float]] = {name: [] for name in monitors}
        names = list(monitors)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(run_block(name))
        for name in names:
            del faults[name][0]  # the compiling block
        return {"times": times, "faults": faults, "temp_mib": temp_mib}

    def print_paired_monitors(paired: dict) -> None:
        print(
            f"\nThe monitors paired: {args.rounds} rounds of {args.block} steps per variant, "
            "the variants interleaved (order reversed every other round); each round's time "
            "relative to the plain loop's in that round. Page faults: minor page faults of the "
            "process per step (median of rounds); temp: the compiled step's temporary buffer, "
            "allocated on every call"
        )
        print(
            "| variant | overhead per step, median of rounds | quartiles "
            "| best round vs best round | page faults per step | temp MiB |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        times, faults, temp_mib = paired["times"], paired["faults"], paired["temp_mib"]
        plain = np.asarray(times["plain Adam"])
        for name, seconds in times.items():
            if name == "plain Adam":
                overhead = "(reference)", "", ""
            else:
                ratios = np.asarray(seconds) / plain - 1
                low, mid, high = np.percentile(ratios, [25, 50, 75])
                overhead = (
                    f"{mid:+.1%}",
                    f"{low:+.1%} to {high:+.1%}",
                    f"{min(seconds) / plain.min() - 1:+.1%}",
                )
            print(
                f"| {name} | {' | '.join(overhead)} "
                f"| {statistics.median(faults[name]):,.0f} | {temp_mib[name]:.1f} |"
            )

    def hand_runner(shuffle: str | None):
        """A hand-written loop + grad norm as a function of a number of steps, compiled on first
        use and keeping its state across calls (its rounds continue one run).

        ``shuffle``: None takes the device batches in order, like the other tables; ``"device"``
        reshuffles every epoch with ``jax.random.permutation`` and gathers each batch inside the
        step from the arrays on the device, the way ``fit`` does; ``"numpy"`` reshuffles with
        NumPy on the host and passes each batch (``x[order[i:i + 128]]``) to the step, the loop
        most people port from PyTorch.
        """
        per_epoch = examples // BATCH
        state: dict = {}

        def body(params, opt_state, inputs, labels):
            loss, grads = jax.value_and_grad(loss_fn)(params, (inputs, labels))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            return new_params, opt_state, (loss, optax.tree.norm(grads))

        @jax.jit
        def gathering_step(params, opt_state, arrays, order, offset):
            index = jax.lax.dynamic_slice_in_dim(order, offset, BATCH)
            inputs, labels = (a.at[index].get(mode="promise_in_bounds") for a in arrays)
            return body(params, opt_state, inputs, labels)

        permutation = jax.jit(
            lambda epoch: jax.random.permutation(
                jax.random.fold_in(jax.random.key(0), epoch), examples
            ).astype(jnp.int32)
        )
        host_rng = np.random.default_rng(0)

        def run(steps: int) -> float:
            if not state:
                state.update(
                    step=jax.jit(body),
                    params=params,
                    opt_state=optimizer.init(params),
                    number=0,
                    order=None,
                    arrays=(jnp.asarray(x), jnp.asarray(y)),
                )
            p, opt_state, number = state["params"], state["opt_state"], state["number"]
            step, arrays, order = state["step"], state["arrays"], state["order"]
            jax.block_until_ready(p)
            start = time.perf_counter()
            for _ in range(steps):
                epoch, index = divmod(number, per_epoch)
                if shuffle is None:
                    p, opt_state, out = step(p, opt_state, *device_batches[index])
                elif shuffle == "device":
                    if index == 0 or order is None:
                        order = permutation(np.uint32(epoch))
                    offset = np.int32(index * BATCH)
                    p, opt_state, out = gathering_step(p, opt_state, arrays, order, offset)
                else:
                    if index == 0 or order is None:
                        order = host_rng.permutation(examples)
                    rows = order[index * BATCH : (index + 1) * BATCH]
                    p, opt_state, out = step(p, opt_state, x[rows], y[rows])
                number += 1
            jax.block_until_ready((p, out))
            elapsed = time.perf_counter() - start
            state.update(params=p, opt_state=opt_state, number=number, order=order)
            return elapsed

        return run

    def paired_fit_rounds(rounds: int, block: int) -> dict[str, list[float]]:
        """Seconds per round of ``block`` steps for the hand-written loops (with the gradient
        norm) and for ``fit`` (on arrays and on an iterable), interleaved like the monitors.

        Each hand-written step is compiled once and keeps its state across rounds. The loop on
        the device batches runs twice, as two variants compiled separately: their ratio would be
        1 on a quiet machine, so its spread is this method's noise. Each ``fit`` round is a
        whole call (it compiles its step afresh): the clock starts in a callback after
        ``--warmup`` steps and stops in the callback of its last timed step, as in the first table.
        """
        runs = {
            "hand-written loop + grad norm": hand_runner(None),
            "hand-written loop + grad norm, again (A/A control)": hand_runner(None),
            "hand-written loop + grad norm, shuffled on the device": hand_runner("device"),
            "hand-written loop + grad norm, shuffled with NumPy": hand_runner("numpy"),
            "fit (arrays)": lambda steps: fit_arrays(steps, args.warmup),
            "fit (iterable)": lambda steps: fit_iterable(steps, args.warmup),
            f"fit (arrays), steps_per_call={CALL}": lambda steps: timed_fit(
                (x, y), BATCH, steps, args.warmup, steps_per_call=CALL
            ),
            f"fit (iterable), steps_per_call={CALL}": lambda steps: timed_fit(
                device_batches, None, steps, args.warmup, steps_per_call=CALL
            ),
            "fit (arrays), health_every=100": lambda steps: timed_fit(
                (x, y), BATCH, steps, args.warmup, health_every=100
            ),
            "fit (arrays), health_every=1": lambda steps: timed_fit(
                (x, y), BATCH, steps, args.warmup, health_every=1
            ),
        }
        for name, run in runs.items():  # compile the hand-written steps
            if name.startswith("hand"):
                run(2)
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(runs[name](block))
        return times

    def print_paired_fit(paired_fit: dict[str, list[float]]) -> None:
        print(
            f"\nfit paired with the hand-written loops (all + grad norm): {args.fit_rounds} "
            f"rounds of {args.block} steps per variant, interleaved (order reversed every other "
            "round); steps/second relative to the reference's in the same round"
        )
        print("| variant | reference | ratio, median of rounds | quartiles |")
        print("|---|---|---:|---:|")
        batches = "hand-written loop + grad norm"
        comparisons = [
            ("hand-written loop + grad norm, again (A/A control)", batches),
            ("hand-written loop + grad norm, shuffled on the device", batches),
            ("hand-written loop + grad norm, shuffled with NumPy", batches),
            ("fit (arrays)", batches),
            ("fit (iterable)", batches),
            (f"fit (arrays), steps_per_call={CALL}", batches),
            (f"fit (iterable), steps_per_call={CALL}", batches),
            ("fit (arrays)", "hand-written loop + grad norm, shuffled on the device"),
            ("fit (arrays)", "hand-written loop + grad norm, shuffled with NumPy"),
        ]
        for name, reference in comparisons:
            ratios = np.asarray(paired_fit[reference]) / np.asarray(paired_fit[name])
            low, mid, high = np.percentile(ratios, [25, 50, 75])
            print(f"| {name} | {reference} | {mid:.3f} | {low:.3f} to {high:.3f} |")
        print(
            "\nfit's own health monitoring in the same rounds: time per step relative to fit "
            "(arrays) without it in the same round"
        )
        print("| variant | overhead per step, median of rounds | quartiles |")
        print("|---|---:|---:|")
        plain_fit = np.asarray(paired_fit["fit (arrays)"])
        for name in ("fit (arrays), health_every=100", "fit (arrays), health_every=1"):
            ratios = np.asarray(paired_fit[name]) / plain_fit - 1
            low, mid, high = np.percentile(ratios, [25, 50, 75])
            print(f"| {name} | {mid:+.1%} | {low:+.1%} to {high:+.1%} |")

    header = f"gradkit training benchmark: MLP {sizes}, batch {BATCH}, float32, Adam" + (
        ""
        if args.monitor_only or args.fit_only
        else f", {args.steps} timed steps after {args.warmup}, {args.repeats} repeat(s)"
    )
    platform_line = (
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    if args.monitor_only:
        print(header)
        print(platform_line)
        print_paired_monitors(paired_monitor_rounds(args.rounds, args.block))
        return 0
    if args.fit_only:
        print(header)
        print(platform_line)
        print_paired_fit(paired_fit_rounds(args.fit_rounds, args.block))
        return 0

    variants = {
        "hand-written loop": (hand_written, ("train_step",)),
        "hand-written loop + grad norm": (hand_written_norm, ("train_step",)),
        "fit (arrays)": (fit_arrays, ("_indexed_step",)),
        "fit (iterable)": (fit_iterable, ("_constrained_step",)),
    }

    print(header)
    print(platform_line)
    for run, _ in variants.values():  # warm up caches of the eager ops
        run(2)

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (run, _) in variants.items():
            rates[name].append(args.steps / run(args.steps, args.warmup))

    compiles = {
        name: count_step_compiles(lambda run=run: run(args.warmup), names)
        for name, (run, names) in variants.items()
    }
    median = {name: statistics.median(r) for name, r in rates.items()}
    best = {name: max(r) for name, r in rates.items()}
    health_variants = {
        "hand-written loop": hand_written,
        "hand-written loop, health_monitor(every=1)": lambda steps, warmup=0: hand_loop(
            steps, warmup, False, health_monitor(every=1, inner=optimizer)
        ),
        "hand-written loop, health_monitor(every=1, histogram=False)": (
            lambda steps, warmup=0: hand_loop(
                steps, warmup, False, health_monitor(every=1, inner=optimizer, histogram=False)
            )
        ),
        "hand-written loop, health_monitor(every=100)": lambda steps, warmup=0: hand_loop(
            steps, warmup, False, health_monitor(every=100, inner=optimizer)
        ),
        "fit (arrays)": fit_arrays,
        "fit (arrays), health_every=1": lambda steps, warmup=0: timed_fit(
            (x, y), BATCH, steps, warmup, health_every=1
        ),
        "fit (arrays), health_every=100": lambda steps, warmup=0: timed_fit(
            (x, y), BATCH, steps, warmup, health_every=100
        ),
    }
    for name, run in health_variants.items():
        if name not in variants:
            run(2)
    health_rates: dict[str, list[float]] = {name: [] for name in health_variants}
    for _ in range(args.repeats):
        for name, run in health_variants.items():
            health_rates[name].append(args.steps / run(args.steps, args.warmup))

    paired = paired_monitor_rounds(args.rounds, args.block)
    paired_fit = paired_fit_rounds(args.fit_rounds, args.block)

    print()
    lean, same = "hand-written loop", "hand-written loop + grad norm"
    print(
        "| variant | steps/s, median | steps/s, best | ratio to hand-written (median, best) "
        "| ratio to hand-written + grad norm (median, best) | step compilations per run |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in variants:
        print(
            f"| {name} | {median[name]:,.1f} | {best[name]:,.1f} "
            f"| {median[name] / median[lean]:.3f}, {best[name] / best[lean]:.3f} "
            f"| {median[name] / median[same]:.3f}, {best[name] / best[same]:.3f} "
            f"| {compiles[name]} |"
        )
    print(
        "\nall repetitions (steps/s): "
        + "; ".join(f"{name}: {', '.join(f'{r:.0f}' for r in rs)}" for name, rs in rates.items())
    )
    print_paired_fit(paired_fit)
    print("\nGradient-health monitoring: time per step relative to the same loop without it")
    print("| variant | steps/s, median | overhead (median) | overhead (best) |")
    print("|---|---:|---:|---:|")
    for name, rs in health_rates.items():
        base = "fit (arrays)" if name.startswith("fit") else "hand-written loop"
        ref = health_rates[base]
        print(
            f"| {name} | {statistics.median(rs):,.1f} "
            f"| {statistics.median(ref) / statistics.median(rs) - 1:+.1%} "
            f"| {max(ref) / max(rs) - 1:+.1%} |"
        )
    print_paired_monitors(paired)
    compile_times(args.compile_sizes, repeats=1 if args.quick else 3)
    return 0 if all(count == 1 for count in compiles.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
