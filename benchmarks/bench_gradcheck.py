"""Gradient checkers side by side: gradkit, jax.test_util.check_grads, torch.autograd.gradcheck.

Part 1 -- the corpus (gradkit._corpus): every deliberately wrong derivative rule and every correct
smooth function, in float32 and float64, through each tool. Reported: detection rate (wrong rules
flagged), false-failure rate (correct functions flagged) and wall time.

* gradkit: ``check_grads`` with its defaults (directional, both modes). The smooth functions are
  checked as one pytree function per dtype (one leaf per function), which is how gradkit checks
  many functions at once; its per-leaf verdicts attribute each failure to its function.
* jax: ``jax.test_util.check_grads(f, args, order, modes=("fwd", "rev"))`` per function
  (``modes=("rev",)`` for functions using ``custom_vjp``, which have no forward mode); a failure is
  an ``AssertionError``.
* torch: ``torch.autograd.gradcheck`` (``gradgradcheck`` for second-order bugs) with its defaults
  per function, plus ``check_forward_ad=True`` where the torch function defines a forward-mode
  rule. Each wrong rule is rewritten as the same wrong ``torch.autograd.Function``. Skipped, with a
  message, if torch is not installed.

Part 2 -- MLPs with about 10^3, 10^4 and 10^5 parameters in float64 (two tanh hidden layers,
batch of 8, mean squared output), wall time including compilation:

* gradkit ``method="full"`` (reverse mode, every Jacobian entry) vs
  ``torch.autograd.gradcheck(fast_mode=False)`` (also reverse mode, every entry);
* gradkit directional (both modes, 2 probes per leaf) vs
  ``jax.test_util.check_grads(order=1, modes=("fwd", "rev"))`` and
  ``torch.autograd.gradcheck(fast_mode=True)``.

Usage::

    python benchmarks/bench_gradcheck.py            # full run (several minutes)
    python benchmarks/bench_gradcheck.py --quick    # smoke run: a few bugs, functions, 10^3 MLP
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import test_util as jax_test_util

from gradkit import _corpus
from gradkit._corpus import BUGS, ONE_ELEMENT_INDEX
from gradkit._gradcheck import _custom_vjp_names
from gradkit.diagnostics import check_grads

try:
    import torch
except ImportError:  # torch is optional: its columns are skipped
    torch = None

DTYPES = ("float32", "float64")


def _x64(dtype: str):
    return jax.enable_x64(True) if dtype == "float64" else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# torch versions of the corpus


def _torch_bugs() -> dict[str, tuple[Callable, dict]]:
    """The corpus' wrong rules as torch functions of the flattened JAX arguments."""
    F = torch.autograd.Function
    nn = torch.nn.functional

    def unary(forward, backward, tangent_rule=None):
        class Rule(F):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                ctx.save_for_forward(x)
                return forward(x)

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return backward(x, g)

            if tangent_rule is not None:

                @staticmethod
                def jvp(ctx, t):
                    (x,) = ctx.saved_tensors
                    return tangent_rule(x, t)

        return Rule.apply

    def binary(forward, backward):
        class Rule(F):
            @staticmethod
            def forward(ctx, a, b):
                ctx.save_for_backward(a, b)
                return forward(a, b)

            @staticmethod
            def backward(ctx, g):
                a, b = ctx.saved_tensors
                return backward(a, b, g)

        return Rule.apply

    sin_wrong = unary(torch.sin, lambda x, g: -torch.cos(x) * g)
    exp_two = unary(torch.exp, lambda x, g: 2 * torch.exp(x) * g)
    xsin_missing = unary(lambda x: x * torch.sin(x), lambda x, g: torch.sin(x) * g)
    matvec_t = binary(lambda w, x: w @ x, lambda w, x, g: (torch.outer(g, x), w @ g))

    def one_element_bwd(x, g):
        grad = 2 * x * g
        grad[ONE_ELEMENT_INDEX] *= 3
        return grad

    square_one = unary(lambda x: x * x, one_element_bwd)
    sin_affine = unary(
        torch.sin,
        lambda x, g: torch.cos(x) * g,
        tangent_rule=lambda x, t: torch.cos(x) * t + 0.1 * torch.sin(x),
    )

    class DenseBiasWrong(F):
        @staticmethod
        def forward(ctx, w, b, x):
            ctx.save_for_backward(w, x)
            return x @ w + b

        @staticmethod
        def backward(ctx, g):
            w, x = ctx.saved_tensors
            return x.T @ g, g[0], g @ w.T

    tanh_wrong = unary(torch.tanh, lambda x, g: (1 - torch.tanh(x)) * g)

    def rnn(w, xs):
        h = torch.zeros_like(xs[0])
        total = 0
        for x in xs:
            h = tanh_wrong(w * h + x)
            total = total + torch.sum(h**2)
        return total

    cos_wrong = unary(torch.cos, lambda x, g: torch.sin(x) * g)
    sin_second = unary(torch.sin, lambda x, g: cos_wrong(x) * g)
    sigmoid_missing = unary(torch.sigmoid, lambda x, g: g * torch.sigmoid(x))
    softplus_wrong = unary(nn.softplus, lambda x, g: torch.sigmoid(-x) * g)
    log_power = unary(torch.log, lambda x, g: g / (x * x))
    add_bias_wrong = binary(lambda x, b: x + b, lambda x, b, g: (g, g.mean(0)))
    softmax_missing = unary(lambda x: torch.softmax(x, -1), lambda x, g: torch.softmax(x, -1) * g)
    norm_missing = unary(lambda x: torch.sqrt(torch.sum(x * x)), lambda x, g: x * g)
    lse_unnorm = unary(lambda x: torch.logsumexp(x, 0), lambda x, g: g * torch.exp(x))
    product_wrong = binary(lambda x, y: x * y, lambda x, y, g: (g * y, g * y))

    def arange(n, like):
        return torch.arange(1.0, n + 1.0, dtype=like.dtype)

    return {
        "wrong_sign": (lambda x: sin_wrong(x) * x, {}),
        "factor_of_two": (lambda x: torch.sum(exp_two(x) ** 2), {}),
        "missing_term": (xsin_missing, {}),
        "transposed": (lambda w, x: torch.tanh(matvec_t(w, x)), {}),
        "one_element": (lambda x: torch.sum(torch.sin(square_one(x))), {}),
        "forward_only": (lambda x: torch.sum(sin_affine(x) ** 2), {"check_forward_ad": True}),
        "one_leaf": (lambda b, w, x: torch.tanh(DenseBiasWrong.apply(w, b, x)), {}),
        "inside_scan": (rnn, {}),
        "second_order": (lambda x: torch.sum(sin_second(x)), {"second_order": True}),
        "sigmoid_missing_factor": (sigmoid_missing, {}),
        "inside_jit": (lambda x: torch.sum(softplus_wrong(x) * arange(x.shape[0], x)), {}),
        "wrong_power": (lambda x: log_power(x) * 3.0, {}),
        "wrong_reduction": (lambda x, b: torch.sum(torch.sin(add_bias_wrong(x, b))), {}),
        "softmax_missing_term": (lambda x: torch.sum(softmax_missing(x) * arange(6, x)), {}),
        "norm_missing_division": (norm_missing, {}),
        "logsumexp_unnormalised": (lambda x: lse_unnorm(x) * 2.0, {}),
        "wrong_partner": (lambda x, y: torch.sum(product_wrong(x, y) ** 2), {}),
    }


_TORCH_UNARY = {
    "sin": lambda x: torch.sin(x),
    "cos": lambda x: torch.cos(x),
    "tanh": lambda x: torch.tanh(x),
    "sigmoid": lambda x: torch.sigmoid(x),
    "softplus": lambda x: torch.nn.functional.softplus(x),
    "gauss": lambda x: torch.exp(-0.5 * x * x),
    "log1p_square": lambda x: torch.log1p(x * x),
    "sqrt1p_square": lambda x: torch.sqrt(1.0 + x * x),
    "atan": lambda x: torch.atan(x),
    "x_tanh": lambda x: x * torch.tanh(x),
    "cubic": lambda x: x * x * x / (1.0 + x * x),
    "silu": lambda x: torch.nn.functional.silu(x),
}


def _torch_smooth(steps):
    def function(x):
        for step in steps:
            kind = step[0]
            if kind == "unary":
                x = _TORCH_UNARY[step[1]](x)
            elif kind == "matmul":
                x = x @ torch.as_tensor(step[1], dtype=x.dtype)
            elif kind == "reduce":
                x = torch.sum(x, dim=step[1])
            elif kind == "mix":
                x = x + step[1] * _TORCH_UNARY[step[2]](x) * torch.cos(x)
            elif kind == "softmax":
                x = torch.softmax(x, dim=-1)
            elif kind == "normalise":
                x = x / torch.sqrt(1.0 + torch.mean(x * x))
        return x

    return function


def _torch_inputs(args, dtype):
    leaves = jax.tree_util.tree_leaves(args)
    return tuple(
        torch.tensor(np.asarray(leaf, np.float64), dtype=getattr(torch, dtype), requires_grad=True)
        for leaf in leaves
    )


def _torch_detects(function, inputs, options) -> tuple[bool, str]:
    options = dict(options)
    second = options.pop("second_order", False)
    check = torch.autograd.gradgradcheck if second else torch.autograd.gradcheck
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return (not check(function, inputs, raise_exception=False, **options)), ""
        except Exception as error:  # report, do not crash the benchmark
            return False, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"


# ---------------------------------------------------------------------------------------------
# part 1: the corpus


def _jax_detects(function, args, order) -> tuple[bool, str]:
    modes = ("fwd", "rev")
    if _custom_vjp_names(jax.make_jaxpr(function)(*args).jaxpr):
        modes = ("rev",)
    try:
        jax_test_util.check_grads(function, args, order=order, modes=modes)
        return False, ""
    except AssertionError:
        return True, ""
    except Exception as error:  # any other error is reported as a miss
        return False, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"


def _record(result: dict, bug: str, found: bool, note: str, start: float) -> None:
    """Adds one wrong rule's outcome (and the time since ``start``) to a tool's tally."""
    result["time"] += time.perf_counter() - start
    result["bugs"] += 1
    result["detected"] += found
    if not found:
        result["notes"].append(f"missed {bug}" + (f" ({note})" if note else ""))


def corpus_table(bugs, smooth, dtypes) -> list[dict]:
    rows = []
    torch_bugs = _torch_bugs() if torch is not None else {}
    for dtype in dtypes:
        results = {"gradkit": {}, "jax.test_util.check_grads": {}, "torch.autograd.gradcheck": {}}
        with _x64(dtype):
            jdtype = jnp.dtype(dtype)
            # wrong rules
            for tool in results:
                results[tool] = {
                    "detected": 0,
                    "bugs": 0,
                    "false": 0,
                    "smooth": 0,
                    "time": 0.0,
                    "notes": [],
                }
            for bug in bugs:
                args = bug.make_args(jdtype, np.random.default_rng(0))
                start = time.perf_counter()
                found = check_grads(bug.function, *args, order=bug.order).verdict == "fail"
                _record(results["gradkit"], bug.name, found, "", start)
                start = time.perf_counter()
                found, note = _jax_detects(bug.function, args, bug.order)
                _record(results["jax.test_util.check_grads"], bug.name, found, note, start)
                if bug.name in torch_bugs:
                    function, options = torch_bugs[bug.name]
                    inputs = _torch_inputs(args, dtype)
                    start = time.perf_counter()
                    found, note = _torch_detects(function, inputs, options)
                    _record(results["torch.autograd.gradcheck"], bug.name, found, note, start)
            # correct smooth functions
            rng = np.random.default_rng(1)
            inputs = [f.make_args(jdtype, rng)[0] for f in smooth]

            def batched(*xs):
                return tuple(f.function(x) for f, x in zip(smooth, xs, strict=True))

            start = time.perf_counter()
            report = check_grads(batched, *inputs)
            results["gradkit"]["time_smooth"] = time.perf_counter() - start
            failing = {row.leaf for row in report.rows if row.verdict == "fail"}
            results["gradkit"]["false"] = len(failing)
            results["gradkit"]["smooth"] = len(smooth)
            start = time.perf_counter()
            for f, x in zip(smooth, inputs, strict=True):
                found, _ = _jax_detects(f.function, (x,), 1)
                results["jax.test_util.check_grads"]["false"] += found
            results["jax.test_util.check_grads"]["time_smooth"] = time.perf_counter() - start
            results["jax.test_util.check_grads"]["smooth"] = len(smooth)
            if torch is not None:
                start = time.perf_counter()
                for f, x in zip(smooth, inputs, strict=True):
                    found, _ = _torch_detects(
                        _torch_smooth(f.steps), _torch_inputs((x,), dtype), {}
                    )
                    results["torch.autograd.gradcheck"]["false"] += found
                results["torch.autograd.gradcheck"]["time_smooth"] = time.perf_counter() - start
                results["torch.autograd.gradcheck"]["smooth"] = len(smooth)
        for tool, r in results.items():
            if tool.startswith("torch") and torch is None:
                continue
            rows.append({"dtype": dtype, "tool": tool, **r})
    return rows


def print_corpus_table(rows):
    print(
        "\n| dtype | tool | wrong rules detected | correct functions failed | time, wrong rules | "
        "time, correct functions |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['tool']} | {r['detected']}/{r['bugs']} "
            f"({100 * r['detected'] / max(r['bugs'], 1):.0f}%) | {r['false']}/{r['smooth']} "
            f"({100 * r['false'] / max(r['smooth'], 1):.1f}%) | {r['time']:.1f} s | "
            f"{r.get('time_smooth', float('nan')):.1f} s |"
        )
    for r in rows:
        if r["notes"]:
            print(f"  {r['dtype']} {r['tool']}: " + "; ".join(r["notes"]))


# ---------------------------------------------------------------------------------------------
# part 2: MLP timings


def mlp_width(parameters: int, inputs: int = 8) -> int:
    """Hidden width w of an MLP inputs -> w -> w -> 1 with about ``parameters`` parameters."""
    # inputs*w + w + w*w + w + w + 1 = parameters
    b = inputs + 3
    return max(1, round((-b + math.sqrt(b * b + 4 * (parameters - 1))) / 2))


def mlp_problem(parameters: int, seed: int = 0):
    width, inputs, batch = mlp_width(parameters), 8, 8
    rng = np.random.default_rng(seed)
    shapes = {
        "w0": (inputs, width),
        "b0": (width,),
        "w1": (width, width),
        "b1": (width,),
        "w2": (width, 1),
        "b2": (1,),
    }
    params = {k: rng.standard_normal(s) / math.sqrt(s[0]) for k, s in shapes.items()}
    x = rng.standard_normal((batch, inputs))
    count = sum(int(np.prod(s)) for s in shapes.values())
    return params, x, count


def jax_mlp(params, x):
    h = jnp.tanh(x @ params["w0"] + params["b0"])
    h = jnp.tanh(h @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"]) ** 2)


def torch_mlp(x):
    def loss(w0, b0, w1, b1, w2, b2):
        h = torch.tanh(x @ w0 + b0)
        h = torch.tanh(h @ w1 + b1)
        return torch.mean((h @ w2 + b2) ** 2)

    return loss


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return time.perf_counter() - start, out


def mlp_table(sizes, torch_slow_max: int) -> list[dict]:
    rows = []
    for size in sizes:
        params, x, count = mlp_problem(size)
        row = {"parameters": count}
        with jax.enable_x64(True):
            jparams = {k: jnp.asarray(v) for k, v in params.items()}
            jx = jnp.asarray(x)
            t, report = timed(
                check_grads, jax_mlp, jparams, jx, argnums=0, method="full", modes="reverse"
            )
            row["gradkit full"] = t
            row["gradkit full verdict"] = report.verdict
            t, report = timed(check_grads, jax_mlp, jparams, jx, argnums=0)
            row["gradkit directional"] = t
            row["gradkit directional verdict"] = report.verdict
            t, _ = timed(
                jax_test_util.check_grads,
                jax_mlp,
                (jparams, jx),
                order=1,
                modes=("fwd", "rev"),
            )
            row["jax check_grads"] = t
        if torch is not None:
            tparams = [
                torch.tensor(params[k], dtype=torch.float64, requires_grad=True)
                for k in ("w0", "b0", "w1", "b1", "w2", "b2")
            ]
            loss = torch_mlp(torch.tensor(x, dtype=torch.float64))
            if count <= torch_slow_max:
                t, _ = timed(torch.autograd.gradcheck, loss, tparams, fast_mode=False)
                row["torch slow"] = t
            t, _ = timed(torch.autograd.gradcheck, loss, tparams, fast_mode=True)
            row["torch fast"] = t
        rows.append(row)
        print(
            f"  measured {count} parameters: "
            + ", ".join(
                f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items()
                if k != "parameters"
            ),
            flush=True,
        )
    return rows


def print_mlp_table(rows):
    print(
        "\n| parameters | gradkit full | torch gradcheck (fast_mode=False) | speed-up | "
        "gradkit directional | jax check_grads | torch gradcheck (fast_mode=True) | "
        "directional / jax | directional / torch fast |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        full, directional, jax_time = (
            r["gradkit full"],
            r["gradkit directional"],
            r["jax check_grads"],
        )
        slow, fast = r.get("torch slow"), r.get("torch fast")
        slow_text = "-" if slow is None else f"{slow:.2f} s"
        speedup = "-" if slow is None else f"{slow / full:.1f}x"
        fast_text = "-" if fast is None else f"{fast:.2f} s"
        fast_ratio = "-" if fast is None else f"{directional / fast:.2f}"
        print(
            f"| {r['parameters']:,} | {full:.2f} s | {slow_text} | {speedup} | "
            f"{directional:.2f} s | {jax_time:.2f} s | {fast_text} | "
            f"{directional / jax_time:.2f} | {fast_ratio} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small corpus, 10^3 MLP")
    parser.add_argument("--json", help="write the measurements to this file")
    parser.add_argument("--skip-corpus", action="store_true")
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument(
        "--torch-slow-max",
        type=int,
        default=200_000,
        help="largest MLP run through torch's slow gradcheck (it grows ~N^2)",
    )
    args = parser.parse_args(argv)
    print(
        f"jax {jax.__version__}, torch {torch.__version__ if torch else 'not installed'}, "
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}"
    )
    if torch is None:
        print("torch is not installed: its columns are skipped (pip install torch)")
    results = {}
    if not args.skip_corpus:
        bugs = BUGS[:4] if args.quick else BUGS
        smooth = _corpus.smooth_functions(8 if args.quick else 200)
        print(f"\nPart 1: {len(bugs)} wrong rules and {len(smooth)} correct functions per dtype")
        rows = corpus_table(bugs, smooth, DTYPES)
        print_corpus_table(rows)
        results["corpus"] = rows
    if not args.skip_mlp:
        sizes = [1_000] if args.quick else [1_000, 10_000, 100_000]
        print("\nPart 2: MLPs in float64, wall time including compilation")
        rows = mlp_table(sizes, args.torch_slow_max)
        print_mlp_table(rows)
        results["mlp"] = rows
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
