"""Benchmark of gradkit.recurrent: truncated BPTT speed, PyTensor scan, and memory.

Workloads (float32, batch 10 sequences, time-major scans):
  A  seed 002 as posted: 10,000 steps, 2 inputs -> 2 classes, softmax cell, mean cross-entropy
     over every step's label; recurrent weights start at 0.
  B  10,000 steps, 32 inputs, tanh RNN with 128 hidden units, a linear read-out and a squared
     error at every step.

Speed: value-and-gradient of the loss with respect to all parameters, for a hand-written
``jax.lax.scan``, gradkit ``Full()``, ``Chunked(k)`` for k in {1, 10, 100}, ``TheanoTail(100)``,
streaming ``tbptt_value_and_grad(k1=k2=100)`` (workload B), and PyTensor's ``scan`` with its C
backend, full and ``truncate_gradient=100``. Every entry is compiled and called once (warm-up)
first; then the entries of one workload are timed in interleaved rounds, each round calling every
entry once (the starting entry rotates from round to round), so that a drift in the machine's
state (frequency, cache, other load) falls on all entries alike instead of on whichever ran last.
The table gives, per entry, the median and the minimum over the rounds; the ratios against the
targets are computed from the minimum, the least-disturbed run. Compile time is reported
separately. Every entry is gated by a gradient check: the
hand-written reference is checked against a float64 central difference along a random direction,
and every other entry against an independently written reference for the same maths (nested
``lax.scan`` with hand-placed ``stop_gradient``); an entry whose gradient is wrong is reported as
WRONG instead of a time.

Memory: peak resident set size (device memory on a GPU) of one value-and-gradient call on
workload B at T = 100,000, each configuration in its own subprocess: full BPTT,
``remat="sqrt"`` and streaming ``tbptt_value_and_grad(k1=k2=100)``.

PyTensor is not a gradkit dependency. Install it next to gradkit to get its columns, e.g. in a
virtual environment that sees the system packages:

    python -m venv --system-site-packages .bench-env && .bench-env/bin/pip install pytensor
    .bench-env/bin/python benchmarks/bench_recurrent.py

Usage:
    python benchmarks/bench_recurrent.py            # full run (several minutes)
    python benchmarks/bench_recurrent.py --quick    # smoke run, T = 1,000, under a minute
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradkit.recurrent import Chunked, TheanoTail, scan, tbptt_value_and_grad

BATCH = 10

# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


class Workload:
    """Data, parameters and the step/loss of one workload (time-major, float32)."""

    def __init__(self, name: str, steps: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.name, self.steps = name, steps
        if name == "A":
            self.inputs, self.hidden = 2, 2
            self.params = {
                "W": rng.standard_normal((2, 2)).astype(np.float32),
                "U": np.zeros((2, 2), np.float32),
                "b": np.zeros(2, np.float32),
            }
            labels = rng.integers(2, size=(steps, BATCH))
            self.targets = np.eye(2, dtype=np.float32)[labels]  # one-hot (T, B, 2)
        else:
            self.inputs, self.hidden = 32, 128
            self.params = {
                "W": (rng.standard_normal((32, 128)) / np.sqrt(32)).astype(np.float32),
                "U": (rng.standard_normal((128, 128)) * 0.9 / np.sqrt(128)).astype(np.float32),
                "b": np.zeros(128, np.float32),
                "v": (rng.standard_normal(128) / np.sqrt(128)).astype(np.float32),
            }
            self.targets = rng.standard_normal((steps, BATCH)).astype(np.float32)
        self.xs = rng.standard_normal((steps, BATCH, self.inputs)).astype(np.float32)

    def activation(self, z):
        return jax.nn.softmax(z, axis=-1) if self.name == "A" else jnp.tanh(z)

    def cell(self, params, h, x):
        return self.activation(x @ params["W"] + h @ params["U"] + params["b"])

    def step_loss(self, params, h, target):
        """Loss of one step's output h (B, hidden), summed over the batch."""
        if self.name == "A":
            return -jnp.sum(target * jnp.log(h))
        return jnp.sum((h @ params["v"] - target) ** 2)

    def normaliser(self) -> float:
        return float(self.steps * BATCH)

    def h0(self, dtype=jnp.float32):
        return jnp.zeros((BATCH, self.hidden), dtype)

    def device_args(self, dtype=jnp.float32):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        return jax.tree.map(cast, self.params), cast(self.xs), cast(self.targets)


# --------------------------------------------------------------------------------------------
# JAX implementations: hand-written references and gradkit
# --------------------------------------------------------------------------------------------


def hand_full(w: Workload):
    """Plain jax.lax.scan, the code a user would write without gradkit."""

    def loss(params, xs, targets):
        def step(h, inputs):
            x, target = inputs
            h = w.cell(params, h, x)
            return h, w.step_loss(params, h, target)

        _, losses = lax.scan(step, w.h0(xs.dtype), (xs, targets))
        return jnp.sum(losses) / w.normaliser()

    return jax.value_and_grad(loss)


def hand_chunked(w: Workload, k: int):
    """TBPTT(k, k) by hand: an outer scan over chunks, stop_gradient on the carry between them."""

    def loss(params, xs, targets):
        def chunk(h, inputs):
            def step(h, inputs):
                x, target = inputs
                h = w.cell(params, h, x)
                return h, w.step_loss(params, h, target)

            return lax.scan(step, h, inputs)

        n = w.steps // k
        chunks = jax.tree.map(lambda a: a.reshape((n, k, *a.shape[1:])), (xs, targets))

        def outer(h, inputs):
            h, losses = chunk(h, inputs)
            return lax.stop_gradient(h), jnp.sum(losses)

        _, losses = lax.scan(outer, w.h0(xs.dtype), chunks)
        return jnp.sum(losses) / w.normaliser()

    return jax.value_and_grad(loss)


def hand_tail(w: Workload, k: int):
    """Theano's truncate_gradient=k by hand: the first T - k steps run without gradient."""

    def loss(params, xs, targets):
        def run(p, h, xs, targets):
            def step(h, inputs):
                x, target = inputs
                h = w.cell(p, h, x)
                return h, w.step_loss(p, h, target)

            return lax.scan(step, h, (xs, targets))

        split = w.steps - k
        frozen = lax.stop_gradient(params)
        h, early = run(frozen, w.h0(xs.dtype), xs[:split], targets[:split])
        _, late = run(params, lax.stop_gradient(h), xs[split:], targets[split:])
        return (jnp.sum(early) + jnp.sum(late)) / w.normaliser()

    return jax.value_and_grad(loss)


def gradkit_scan(w: Workload, truncate):
    def loss(params, xs, targets):
        def step(h, inputs):
            x, target = inputs
            h = w.cell(params, h, x)
            return h, w.step_loss(params, h, target)

        _, losses = scan(step, w.h0(xs.dtype), (xs, targets), truncate=truncate)
        return jnp.sum(losses) / w.normaliser()

    return jax.value_and_grad(loss)


def gradkit_tbptt(w: Workload, k1: int, k2: int):
    def value_and_grad(params, xs, targets):
        def loss_step(p, h, inputs):
            x, target = inputs
            h = w.cell(p, h, x)
            return h, w.step_loss(p, h, target) / w.normaliser()

        loss, grads, _ = tbptt_value_and_grad(
            loss_step, params, w.h0(xs.dtype), (xs, targets), k1=k1, k2=k2
        )
        return loss, grads

    return value_and_grad


def prepare_jax(fn, args):
    """Compiles fn for args and calls it once; returns (compile seconds, timed call, output)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(*args))  # warm-up

    def call():
        jax.block_until_ready(compiled(*args))

    return compile_s, call, jax.tree.map(np.asarray, out)


def time_interleaved(calls: list, rounds: int) -> list[list[float]]:
    """Times every call once per round, for several rounds; returns the seconds per call.

    Round r starts at call r (mod the number of calls) so that no entry always runs first or
    right after the same neighbour.
    """
    times: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        for i in range(len(calls)):
            j = (r + i) % len(calls)
            start = time.perf_counter()
            calls[j]()
            times[j].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------
# PyTensor
# --------------------------------------------------------------------------------------------


def pytensor_available() -> tuple[bool, str]:
    try:
        import pytensor  # noqa: F401
    except ImportError:
        return False, (
            "PyTensor is not installed, so its columns are skipped. Install it next to gradkit "
            "(it is not a gradkit dependency): python -m venv --system-site-packages .bench-env "
            "&& .bench-env/bin/pip install pytensor, then run this script with "
            ".bench-env/bin/python"
        )
    return True, ""


PYTENSOR_NOTES: set[str] = set()


def prepare_pytensor(w: Workload, truncate_gradient: int):
    """PyTensor scan with the C backend (linker "cvm"), same maths as the JAX versions.

    Returns (compile seconds, timed call, output) like :func:`prepare_jax`.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _prepare_pytensor(w, truncate_gradient)
    for warning in caught:
        if "BLAS" in str(warning.message):
            PYTENSOR_NOTES.add(
                "PyTensor found no BLAS library to link and used its NumPy C-API BLAS fallback "
                "(the default for a pip install; see its BLAS troubleshooting page)"
            )
    return result


def _prepare_pytensor(w: Workload, truncate_gradient: int):
    import pytensor
    import pytensor.tensor as pt
    from pytensor.compile.mode import Mode

    pytensor.config.floatX = "float32"
    shared = {k: pytensor.shared(v, name=k) for k, v in w.params.items()}
    xs = pt.tensor3("xs", dtype="float32")
    targets = pt.tensor3("t", dtype="float32") if w.name == "A" else pt.matrix("t", dtype="float32")
    h0 = pt.zeros((BATCH, w.hidden), dtype="float32")

    def step(x, target, h, W, U, b, *rest):
        z = pt.dot(x, W) + pt.dot(h, U) + b
        if w.name == "A":
            h = pt.special.softmax(z, axis=-1)
            loss = -pt.sum(target * pt.log(h))
        else:
            h = pt.tanh(z)
            loss = pt.sum((pt.dot(h, rest[0]) - target) ** 2)
        return h, loss

    names = list(w.params)
    (_, losses), _ = pytensor.scan(
        step,
        sequences=[xs, targets],
        outputs_info=[h0, None],
        non_sequences=[shared[k] for k in names],
        truncate_gradient=truncate_gradient,
        strict=True,
    )
    loss = pt.sum(losses) / w.normaliser()
    grads = pytensor.grad(loss, [shared[k] for k in names])
    start = time.perf_counter()
    fn = pytensor.function([xs, targets], [loss, *grads], mode=Mode(linker="cvm"))
    compile_s = time.perf_counter() - start
    out = fn(w.xs, w.targets)  # warm-up

    def call():
        fn(w.xs, w.targets)

    result = (np.asarray(out[0]), {k: np.asarray(g) for k, g in zip(names, out[1:], strict=True)})
    return compile_s, call, result


# --------------------------------------------------------------------------------------------
# Gradient checks
# --------------------------------------------------------------------------------------------


def directional_fd_check(w: Workload, grads) -> tuple[bool, float]:
    """<grad, v> against a float64 central difference of the hand-written loss along v."""
    rng = np.random.default_rng(1)
    direction = {k: rng.standard_normal(v.shape) for k, v in w.params.items()}
    with jax.enable_x64():
        params, xs, targets = w.device_args(jnp.float64)
        loss = jax.jit(lambda p: hand_full(w)(p, xs, targets)[0])
        eps = 1e-4
        plus = jax.tree.map(lambda p, d: p + eps * d, params, direction)
        minus = jax.tree.map(lambda p, d: p - eps * d, params, direction)
        fd = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
    ad = sum(float(np.vdot(grads[k].astype(np.float64), direction[k])) for k in direction)
    scale = sum(float(np.linalg.norm(grads[k]) * np.linalg.norm(direction[k])) for k in direction)
    error = abs(ad - fd) / scale
    return error < 1e-4, error


def same_gradient(grads, reference, rtol: float = 2e-3) -> tuple[bool, float]:
    """Largest difference relative to the reference's largest entry, over all leaves."""
    worst = 0.0
    for k, ref in reference.items():
        scale = max(float(np.max(np.abs(ref))), 1e-30)
        worst = max(worst, float(np.max(np.abs(np.asarray(grads[k]) - ref))) / scale)
    return worst < rtol, worst


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------


def speed(workload_name: str, steps: int, rounds: int, with_pytensor: bool):
    """Compiles, checks and times every entry of one workload; returns (rows, times).

    ``times`` maps an entry's key to its minimum time over the rounds (None if its gradient
    check failed), plus ``same_program``.
    """
    w = Workload(workload_name, steps)
    args = w.device_args()
    entries = []  # (key, method, compile_s, call, ok, check)

    def add(key, name, prepared, reference, check_label):
        compile_s, call, (_, grads) = prepared
        ok, err = same_gradient(grads, reference)
        check = f"{'ok' if ok else 'WRONG'} vs {check_label} ({err:.0e})"
        entries.append((key, name, compile_s, call, ok, check))

    hand = prepare_jax(hand_full(w), args)
    fd_ok, fd_err = directional_fd_check(w, hand[2][1])
    fd_check = f"{'ok' if fd_ok else 'WRONG'} vs float64 FD ({fd_err:.0e})"
    entries.append(("hand", "hand-written lax.scan", hand[0], hand[1], fd_ok, fd_check))
    reference = hand[2][1]
    same_program = (
        jax.jit(hand_full(w)).lower(*args).as_text()
        == jax.jit(gradkit_scan(w, None)).lower(*args).as_text()
    )
    add("Full", "gradkit Full()", prepare_jax(gradkit_scan(w, None), args), reference, "hand")
    for k in (1, 10, 100):
        ref_k = jax.tree.map(np.asarray, jax.jit(hand_chunked(w, k))(*args)[1])
        add(
            f"Chunked({k})",
            f"gradkit Chunked({k})",
            prepare_jax(gradkit_scan(w, Chunked(k)), args),
            ref_k,
            f"hand TBPTT({k},{k})",
        )
        if k == 100 and w.name == "B":
            add(
                "tbptt",
                "gradkit tbptt_value_and_grad(k1=k2=100)",
                prepare_jax(gradkit_tbptt(w, 100, 100), args),
                ref_k,
                "hand TBPTT(100,100)",
            )
    tail_ref = jax.tree.map(np.asarray, jax.jit(hand_tail(w, 100))(*args)[1])
    add(
        "TheanoTail(100)",
        "gradkit TheanoTail(100)",
        prepare_jax(gradkit_scan(w, TheanoTail(100)), args),
        tail_ref,
        "hand tail(100)",
    )
    if with_pytensor:
        add("pytensor", "PyTensor scan (C), full", prepare_pytensor(w, -1), reference, "hand")
        add(
            "pytensor100",
            "PyTensor scan (C), truncate_gradient=100",
            prepare_pytensor(w, 100),
            tail_ref,
            "hand tail(100)",
        )

    # Only entries with a correct gradient are timed, all of them in the same rounds.
    timed = [e for e in entries if e[4]]
    runs_per_entry = time_interleaved([e[3] for e in timed], rounds)
    measured = dict(zip((e[0] for e in timed), runs_per_entry, strict=True))
    rows, times = [], {"same_program": same_program}
    for key, name, compile_s, _, _, check in entries:
        runs = measured.get(key)
        rows.append(
            {
                "method": name,
                "compile_s": compile_s,
                "median_ms": statistics.median(runs) * 1e3 if runs else None,
                "min_ms": min(runs) * 1e3 if runs else None,
                "check": check,
            }
        )
        times[key] = min(runs) if runs else None
    return rows, times


def ratio(a, b):
    return None if a is None or b is None else a / b


def print_speed_table(workload_name, steps, rows, times):
    print(
        f"\nWorkload {workload_name}, T = {steps:,}, batch {BATCH} "
        f"({'2 -> 2 softmax' if workload_name == 'A' else '32 -> 128 tanh'})"
    )
    print(
        f"| {'method':<42} | {'compile s':>9} | {'run ms (median)':>15} | {'run ms (min)':>12} "
        "| gradient check |"
    )
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 17}|{'-' * 14}|----------------|")
    for r in rows:
        median = "-" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
        least = "-" if r["min_ms"] is None else f"{r['min_ms']:.1f}"
        print(
            f"| {r['method']:<42} | {r['compile_s']:>9.2f} | {median:>15} | {least:>12} "
            f"| {r['check']} |"
        )
    targets = [
        ("gradkit Full / hand lax.scan", ratio(times["Full"], times["hand"]), 1.05),
        *(
            (
                f"gradkit Chunked({k}) / gradkit Full",
                ratio(times[f"Chunked({k})"], times["Full"]),
                1.10,
            )
            for k in (1, 10, 100)
        ),
    ]
    if "pytensor" in times:
        targets += [
            ("gradkit Full / PyTensor full", ratio(times["Full"], times["pytensor"]), 0.5),
            (
                "gradkit TheanoTail(100) / PyTensor truncate_gradient=100",
                ratio(times["TheanoTail(100)"], times["pytensor100"]),
                0.5,
            ),
            (
                "gradkit Chunked(100) / PyTensor truncate_gradient=100",
                ratio(times["Chunked(100)"], times["pytensor100"]),
                0.5,
            ),
        ]
    print(
        "\ngradkit Full() lowers to the same StableHLO program as the hand-written lax.scan: "
        + ("yes" if times["same_program"] else "no")
    )
    print("ratios of the minimum times over the rounds (target):")
    for name, value, target in targets:
        shown = "n/a" if value is None else f"{value:.3f}"
        verdict = "" if value is None else ("met" if value <= target else "NOT met")
        print(f"  {name:<58} {shown:>6}  (<= {target})  {verdict}")


# --------------------------------------------------------------------------------------------
# Memory (one configuration per subprocess)
# --------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def memory_child(config: str, steps: int) -> None:
    """Runs one value-and-gradient call and prints its peak memory as JSON.

    The call is the second one (the first starts the runtime's threads). On the CPU the peak
    is the process's resident set size, its high-water mark reset after compilation and the
    first call where the kernel allows, once the C heap has handed back what they freed; on an
    accelerator, the device's peak bytes in use.
    """
    device = jax.devices()[0]
    # What any JAX process holds before it has data or a program of its own: Python, the
    # imported modules and the runtime with its threads started (by one trivial call).
    jax.block_until_ready(jax.jit(lambda v: v + 1)(jnp.ones(())))
    if device.platform == "cpu":
        _malloc_trim()
        idle = _rss_kib("VmRSS") / 1024
    else:
        idle = device.memory_stats()["bytes_in_use"] / 2**20
    w = Workload("B", steps)
    args = jax.block_until_ready(w.device_args())
    w.xs = w.targets = None  # keep only the device copy of the inputs
    if config == "full":
        fn = gradkit_scan(w, None)
    elif config == "sqrt":

        def fn(params, xs, targets):
            def loss(params):
                def step(h, inputs):
                    x, target = inputs
                    h = w.cell(params, h, x)
                    return h, w.step_loss(params, h, target)

                _, losses = scan(step, w.h0(), (xs, targets), remat="sqrt")
                return jnp.sum(losses) / w.normaliser()

            return jax.value_and_grad(loss)(params)
    else:
        fn = gradkit_tbptt(w, 100, 100)
    compiled = jax.jit(fn).lower(*args).compile()
    # One call first, as in a training loop: the runtime starts its worker threads on the first
    # call, which is start-up cost like compilation, not the call's.
    jax.block_until_ready(compiled(*args))
    if device.platform != "cpu":
        # On an accelerator the activations live in device memory, not in the host's RSS.
        before = device.memory_stats()["bytes_in_use"]
        loss, grads = jax.block_until_ready(compiled(*args))
        peak, reset, unit = device.memory_stats()["peak_bytes_in_use"], True, 2**20
    else:
        # Hand the heap that compilation and the first call freed back to the kernel (glibc
        # keeps it otherwise), so that "before" is what is live: the runtime, the inputs and
        # the compiled program. Before the reset below, which sets the mark to the current RSS.
        _malloc_trim()
        try:  # reset the high-water mark so that compilation does not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            reset = False
        before = _rss_kib("VmRSS")
        loss, grads = jax.block_until_ready(compiled(*args))
        peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        unit = 1024
    print(
        json.dumps(
            {
                "config": config,
                "memory": "host RSS" if device.platform == "cpu" else f"{device.platform} memory",
                "peak_mib": peak / unit,
                "before_mib": before / unit,
                "idle_mib": idle,
                "peak_reset": reset,
                "loss": float(loss),
                "grads": {k: np.asarray(v).ravel()[:64].tolist() for k, v in grads.items()},
            }
        )
    )


def memory(steps: int):
    results = {}
    for config in ("full", "sqrt", "tbptt"):
        completed = subprocess.run(
            [sys.executable, __file__, "--memory-child", config, "--steps", str(steps)],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            print(completed.stdout + completed.stderr)
            raise SystemExit(f"memory run {config!r} failed")
        results[config] = json.loads(completed.stdout.strip().splitlines()[-1])
    full, sqrt = results["full"], results["sqrt"]
    same = all(
        np.allclose(full["grads"][k], sqrt["grads"][k], rtol=1e-4, atol=1e-7) for k in full["grads"]
    )
    labels = {
        "full": "full BPTT (gradkit Full())",
        "sqrt": 'full BPTT, remat="sqrt"',
        "tbptt": "tbptt_value_and_grad(k1=k2=100)",
    }
    kind = full["memory"]
    print(
        f"\nMemory ({kind}): workload B, T = {steps:,}, one value_and_grad call, "
        "each configuration in a subprocess"
    )
    print(
        f"| {'configuration':<34} | {'peak MiB':>12} | {'idle JAX process':>16} | "
        f"{'peak - idle':>11} | {'before call':>15} | {'peak - before':>13} |"
    )
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 18}|{'-' * 13}|{'-' * 17}|{'-' * 15}|")
    for config, r in results.items():
        print(
            f"| {labels[config]:<34} | {r['peak_mib']:>12.0f} | {r['idle_mib']:>16.0f} | "
            f"{r['peak_mib'] - r['idle_mib']:>11.0f} | {r['before_mib']:>15.0f} | "
            f"{r['peak_mib'] - r['before_mib']:>13.0f} |"
        )
    growth = {c: r["peak_mib"] - r["before_mib"] for c, r in results.items()}
    own = {c: r["peak_mib"] - r["idle_mib"] for c, r in results.items()}
    print(f"  remat='sqrt' gradient equals full BPTT's: {'yes' if same else 'NO'}")
    peak_ratio = results["tbptt"]["peak_mib"] / full["peak_mib"]
    print(
        f"  streaming / full (target <= 0.2): peak {peak_ratio:.3f}; "
        f"peak above an idle JAX process (inputs, program, call) {own['tbptt'] / own['full']:.3f}; "
        f"growth during the call {growth['tbptt'] / growth['full']:.3f}"
    )
    if not full["peak_reset"]:
        print("  (the kernel refused to reset the high-water mark; peaks include compilation)")
    return results


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: T = 1,000, 2 rounds")
    parser.add_argument(
        "--rounds",
        "--repeats",
        type=int,
        default=None,
        help="interleaved timing rounds, each timing every entry once (default 25)",
    )
    parser.add_argument("--no-pytensor", action="store_true", help="skip the PyTensor columns")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed section")
    parser.add_argument("--memory-child", choices=("full", "sqrt", "tbptt"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.steps)
        return 0
    steps = 1_000 if args.quick else 10_000
    memory_steps = 10_000 if args.quick else 100_000
    rounds = args.rounds or (2 if args.quick else 25)
    with_pytensor = not args.no_pytensor
    if with_pytensor:
        with_pytensor, why = pytensor_available()
        if not with_pytensor:
            print(why)
    print(
        f"gradkit recurrent benchmark: jax {jax.__version__} on {jax.default_backend()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), "
        f"{rounds} interleaved timing rounds after a warm-up call per entry; "
        "ratios use each entry's minimum over the rounds"
    )
    if with_pytensor:
        import pytensor

        print(f"PyTensor {pytensor.__version__}, C backend (linker cvm), floatX float32")
    for name in () if args.no_speed else ("A", "B"):
        rows, times = speed(name, steps, rounds, with_pytensor)
        print_speed_table(name, steps, rows, times)
    for note in sorted(PYTENSOR_NOTES):
        print(f"\nNote: {note}.")
    if not args.no_memory:
        memory(memory_steps)
    if jax.default_backend() == "cpu":
        print(
            "\nGPU: not measured (JAX runs on the CPU here); run this script where JAX sees a GPU "
            "for the GPU column."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
