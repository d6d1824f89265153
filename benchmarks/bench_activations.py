"""Forward+backward throughput of gradkit.activations against their jax.nn equivalents.

Each activation is timed as ``jit(grad(lambda x: f(x).sum()))`` on one float32 array (10^7
elements by default; softmax and log_softmax normalise over rows of 1000). The time is the median
of the repeats after a warm-up call; gradkit and jax.nn runs are interleaved so that a busy
machine slows both alike. A second table compares ultra_fast_sigmoid and hard_sigmoid with
sigmoid, forward only and forward+backward, since speed is their only reason to exist.

Run: ``python benchmarks/bench_activations.py`` (``--quick`` for a 10^5-element smoke run).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gradkit import activations

ROW = 1000  # softmax row length

# gradkit name -> (gradkit call, jax.nn equivalent or None)
CASES: dict[str, tuple[Callable, Callable | None]] = {
    "sigmoid": (activations.sigmoid, jax.nn.sigmoid),
    "tanh": (activations.tanh, jnp.tanh),
    "ultra_fast_sigmoid": (activations.ultra_fast_sigmoid, None),
    "hard_sigmoid": (activations.hard_sigmoid, jax.nn.hard_sigmoid),
    "hard_sigmoid (slope 0.2)": (lambda x: activations.hard_sigmoid(x, slope=0.2), None),
    "hard_tanh": (activations.hard_tanh, jax.nn.hard_tanh),
    "relu": (activations.relu, jax.nn.relu),
    "relu6": (activations.relu6, jax.nn.relu6),
    "leaky_relu": (activations.leaky_relu, jax.nn.leaky_relu),
    "elu": (activations.elu, jax.nn.elu),
    "selu": (activations.selu, jax.nn.selu),
    "gelu": (activations.gelu, lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu (approximate)": (
        lambda x: activations.gelu(x, approximate=True),
        lambda x: jax.nn.gelu(x, approximate=True),
    ),
    "silu": (activations.silu, jax.nn.silu),
    "mish": (activations.mish, jax.nn.mish),
    "softplus": (activations.softplus, jax.nn.softplus),
    "log_sigmoid": (activations.log_sigmoid, jax.nn.log_sigmoid),
    "softmax": (activations.softmax, jax.nn.softmax),
    "log_softmax": (activations.log_softmax, jax.nn.log_softmax),
    "identity": (activations.identity, None),
}


def forward_backward(f: Callable) -> Callable:
    return jax.jit(jax.grad(lambda x: f(x).sum()))


def forward_only(f: Callable) -> Callable:
    return jax.jit(f)


def time_interleaved(functions: list[Callable], x: jax.Array, repeats: int) -> list[float]:
    """Median seconds per call of each function, after one warm-up call each."""
    for f in functions:
        jax.block_until_ready(f(x))
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for f, sample in zip(functions, samples, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(f(x))
            sample.append(time.perf_counter() - start)
    return [statistics.median(sample) for sample in samples]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^5 elements, 3 repeats")
    parser.add_argument("--size", type=int, default=None, help="elements (default 10^7)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 9)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="benchmark only these")
    args = parser.parse_args(argv)
    size = args.size or (10**5 if args.quick else 10**7)
    repeats = args.repeats or (3 if args.quick else 9)
    size = max(ROW, size // ROW * ROW)
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only}
    if args.only and len(cases) != len(set(args.only)):
        parser.error(f"unknown name(s) in --only; choose from {sorted(CASES)}")

    x = jnp.asarray(np.random.RandomState(0).randn(size).astype(np.float32) * 3)
    rows = x.reshape(-1, ROW)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or 'cpu'},"
        f" {os.cpu_count()} cores, load average {load:.1f}); {size:.0e} float32 elements,"
        f" median of {repeats} calls after a warm-up"
    )
    print("\nForward+backward, jit(grad(lambda x: f(x).sum())):\n")
    print("| activation | gradkit ms | jax.nn ms | gradkit / jax.nn | gradkit Melem/s |")
    print("|---|---:|---:|---:|---:|")
    worst = 0.0
    for name, (ours, theirs) in cases.items():
        data = rows if name in ("softmax", "log_softmax") else x
        functions = [forward_backward(ours)] + ([forward_backward(theirs)] if theirs else [])
        times = time_interleaved(functions, data, repeats)
        ours_ms = 1e3 * times[0]
        throughput = size / times[0] / 1e6
        if theirs:
            ratio = times[0] / times[1]
            worst = max(worst, ratio)
            print(
                f"| {name} | {ours_ms:.2f} | {1e3 * times[1]:.2f} | {ratio:.2f} | "
                f"{throughput:.0f} |"
            )
        else:
            print(f"| {name} | {ours_ms:.2f} | – | – | {throughput:.0f} |")
    if worst:
        print(f"\nWorst gradkit / jax.nn ratio: {worst:.2f} (target: within 1.2)")

    approximations = [n for n in ("ultra_fast_sigmoid", "hard_sigmoid", "hard_sigmoid (slope 0.2)")]
    if "sigmoid" in cases and any(n in cases for n in approximations):
        print("\nAre the sigmoid approximations faster than sigmoid here?\n")
        print("| activation | forward ms | vs sigmoid | forward+backward ms | vs sigmoid |")
        print("|---|---:|---:|---:|---:|")
        names = ["sigmoid"] + [n for n in approximations if n in cases]
        forward = time_interleaved([forward_only(CASES[n][0]) for n in names], x, repeats)
        both = time_interleaved([forward_backward(CASES[n][0]) for n in names], x, repeats)
        for name, f_time, b_time in zip(names, forward, both, strict=True):
            print(
                f"| {name} | {1e3 * f_time:.2f} | {f_time / forward[0]:.2f} | "
                f"{1e3 * b_time:.2f} | {b_time / both[0]:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
