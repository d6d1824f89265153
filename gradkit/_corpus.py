"""Wrong derivative rules and correct smooth functions, for testing gradient checkers.

Used by gradkit's tests and by ``benchmarks/bench_gradcheck.py`` to measure, for any checker,
how many wrong rules it detects and how many correct functions it wrongly rejects.

* :data:`BUGS`: deliberately wrong ``custom_jvp``/``custom_vjp`` rules of every common kind
  (wrong sign, factor of two, missing term, transposed, wrong in one element of a 10^4-vector,
  wrong only in forward mode, wrong only in one leaf of a pytree, wrong inside a ``scan`` body,
  wrong only in the second derivative, ...). The line that is wrong carries a ``# bug: <name>``
  comment, so a localiser can be checked against it (:func:`bug_line`).
* :func:`smooth_functions`: any number of correct smooth functions of random shapes, built from
  random compositions of smooth operations.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Bug:
    """One deliberately wrong derivative rule.

    Attributes:
      name: identifier; the wrong line is marked ``# bug: <name>``.
      kind: the kind of mistake, in words.
      function: the function whose derivative is wrong.
      make_args: ``(dtype, rng) -> args`` builds the point at which to check.
      primitive: the equation a localiser must blame.
      order: the derivative order at which the bug shows (2: only second derivatives).
      modes: the modes in which it shows.
      leaf: for a pytree input, the only leaf whose derivative is wrong.
      torch: whether the same wrong rule can be written as a torch ``autograd.Function``.
    """

    name: str
    kind: str
    function: Callable
    make_args: Callable[[Any, np.random.Generator], tuple]
    primitive: str
    order: int = 1
    modes: tuple[str, ...] = ("forward", "reverse")
    leaf: str | None = None
    torch: bool = True


def bug_line(name: str) -> int:
    """Returns the line number of this module marked ``# bug: <name>``."""
    lines, start = inspect.getsourcelines(inspect.getmodule(bug_line))
    tag = f"# bug: {name}"
    hits = [max(start, 1) + i for i, line in enumerate(lines) if line.rstrip().endswith(tag)]
    if len(hits) != 1:
        raise LookupError(f"expected one line tagged {tag!r}, found {len(hits)}")
    return hits[0]


def _normal(shape, dtype, rng, scale=1.0, shift=0.0):
    return jnp.asarray(rng.standard_normal(shape) * scale + shift, dtype)


# ---------------------------------------------------------------------------------------------
# The wrong rules


@jax.custom_jvp
def sin_wrong_sign(x):
    return jnp.sin(x)


@sin_wrong_sign.defjvp
def _sin_wrong_sign_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sin(x), -jnp.cos(x) * t  # bug: wrong_sign


@jax.custom_vjp
def exp_factor_two(x):
    return jnp.exp(x)


def _exp_fwd(x):
    y = jnp.exp(x)
    return y, y


def _exp_factor_two_bwd(y, ct):
    return (2.0 * y * ct,)  # bug: factor_of_two


exp_factor_two.defvjp(_exp_fwd, _exp_factor_two_bwd)


@jax.custom_jvp
def x_sin_x_missing_term(x):
    return x * jnp.sin(x)


@x_sin_x_missing_term.defjvp
def _x_sin_x_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x * jnp.sin(x), jnp.sin(x) * t  # bug: missing_term


@jax.custom_vjp
def matvec_transposed(w, x):
    return w @ x


def _matvec_fwd(w, x):
    return w @ x, (w, x)


def _matvec_transposed_bwd(residuals, ct):
    w, x = residuals
    return jnp.outer(ct, x), w @ ct  # bug: transposed


matvec_transposed.defvjp(_matvec_fwd, _matvec_transposed_bwd)

ONE_ELEMENT_INDEX = 1234


@jax.custom_vjp
def square_one_element(x):
    return x * x


def _square_fwd(x):
    return x * x, x


def _square_one_element_bwd(x, ct):
    return ((2.0 * x * ct).at[ONE_ELEMENT_INDEX].multiply(3.0),)  # bug: one_element


square_one_element.defvjp(_square_fwd, _square_one_element_bwd)


@jax.custom_jvp
def sin_affine_tangent(x):
    return jnp.sin(x)


@sin_affine_tangent.defjvp
def _sin_affine_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # An affine (not linear) tangent: reverse mode transposes only the linear part.
    return jnp.sin(x), jnp.cos(x) * t + 0.1 * jnp.sin(x)  # bug: forward_only


@jax.custom_vjp
def dense_bias_wrong(w, b, x):
    return x @ w + b


def _dense_fwd(w, b, x):
    return x @ w + b, (w, x)


def _dense_bias_wrong_bwd(residuals, ct):
    w, x = residuals
    return x.T @ ct, ct[0], ct @ w.T  # bug: one_leaf


dense_bias_wrong.defvjp(_dense_fwd, _dense_bias_wrong_bwd)


def dense_layer(params, x):
    """A dense layer on a dict of parameters; only the bias gradient is wrong."""
    return jnp.tanh(dense_bias_wrong(params["kernel"], params["bias"], x))


@jax.custom_jvp
def tanh_wrong(x):
    return jnp.tanh(x)


@tanh_wrong.defjvp
def _tanh_wrong_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = jnp.tanh(x)
    return y, (1.0 - y) * t  # bug: inside_scan


def rnn_scan(w, xs):
    """A small recurrent scan whose body uses a wrong tanh derivative."""

    def step(h, x):
        h = tanh_wrong(w * h + x)
        return h, h

    _, hs = lax.scan(step, jnp.zeros_like(xs[0]), xs)
    return jnp.sum(hs**2)


@jax.custom_jvp
def cos_wrong(x):
    return jnp.cos(x)


@cos_wrong.defjvp
def _cos_wrong_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.cos(x), jnp.sin(x) * t  # bug: second_order


@jax.custom_jvp
def sin_second_order(x):
    return jnp.sin(x)


@sin_second_order.defjvp
def _sin_second_order_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sin(x), cos_wrong(x) * t


@jax.custom_vjp
def sigmoid_missing_factor(x):
    return jax.nn.sigmoid(x)


def _sigmoid_fwd(x):
    s = jax.nn.sigmoid(x)
    return s, s


def _sigmoid_missing_factor_bwd(s, ct):
    return (ct * s,)  # bug: sigmoid_missing_factor


sigmoid_missing_factor.defvjp(_sigmoid_fwd, _sigmoid_missing_factor_bwd)


def branchy(x):
    """A cond whose taken branch holds a wrong rule."""
    return lax.cond(jnp.sum(x) > -1e9, sigmoid_missing_factor, jnp.tanh, x)


@jax.custom_jvp
def softplus_wrong(x):
    return jnp.logaddexp(x, 0.0)


@softplus_wrong.defjvp
def _softplus_wrong_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.logaddexp(x, 0.0), jax.nn.sigmoid(-x) * t  # bug: inside_jit


@jax.jit
def jitted_softplus_sum(x):
    return jnp.sum(softplus_wrong(x) * jnp.arange(1.0, x.shape[0] + 1.0, dtype=x.dtype))


@jax.custom_jvp
def log_wrong_power(x):
    return jnp.log(x)


@log_wrong_power.defjvp
def _log_wrong_power_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.log(x), t / (x * x)  # bug: wrong_power


@jax.custom_vjp
def add_bias_wrong_reduction(x, b):
    return x + b


def _add_bias_fwd(x, b):
    return x + b, None


def _add_bias_wrong_reduction_bwd(_, ct):
    return ct, jnp.mean(ct, axis=0)  # bug: wrong_reduction


add_bias_wrong_reduction.defvjp(_add_bias_fwd, _add_bias_wrong_reduction_bwd)


@jax.custom_vjp
def softmax_missing_term(x):
    return jax.nn.softmax(x)


def _softmax_fwd(x):
    s = jax.nn.softmax(x)
    return s, s


def _softmax_missing_term_bwd(s, ct):
    return (s * ct,)  # bug: softmax_missing_term


softmax_missing_term.defvjp(_softmax_fwd, _softmax_missing_term_bwd)


@jax.custom_jvp
def norm_missing_division(x):
    return jnp.sqrt(jnp.sum(x * x))


@norm_missing_division.defjvp
def _norm_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sqrt(jnp.sum(x * x)), jnp.sum(x * t)  # bug: norm_missing_division


@jax.custom_vjp
def logsumexp_unnormalised(x):
    return jax.nn.logsumexp(x)


def _logsumexp_fwd(x):
    return jax.nn.logsumexp(x), x


def _logsumexp_unnormalised_bwd(x, ct):
    return (ct * jnp.exp(x),)  # bug: logsumexp_unnormalised


logsumexp_unnormalised.defvjp(_logsumexp_fwd, _logsumexp_unnormalised_bwd)


@jax.custom_jvp
def product_wrong_partner(x, y):
    return x * y


@product_wrong_partner.defjvp
def _product_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    return x * y, tx * y + ty * y  # bug: wrong_partner


def _dense_args(dtype, rng):
    params = {"kernel": _normal((3, 4), dtype, rng, 0.5), "bias": _normal((4,), dtype, rng, 0.5)}
    return params, _normal((5, 3), dtype, rng)


BUGS: tuple[Bug, ...] = (
    Bug(
        "wrong_sign",
        "wrong sign",
        lambda x: sin_wrong_sign(x) * x,
        lambda d, r: (_normal((7,), d, r),),
        "custom_jvp_call",
    ),
    Bug(
        "factor_of_two",
        "factor of two",
        lambda x: jnp.sum(exp_factor_two(x) ** 2),
        lambda d, r: (_normal((3, 4), d, r, 0.5),),
        "custom_vjp_call",
    ),
    Bug(
        "missing_term",
        "missing term of the product rule",
        x_sin_x_missing_term,
        lambda d, r: (_normal((6,), d, r),),
        "custom_jvp_call",
    ),
    Bug(
        "transposed",
        "transposed matrix in the backward rule",
        lambda w, x: jnp.tanh(matvec_transposed(w, x)),
        lambda d, r: (_normal((4, 4), d, r, 0.5), _normal((4,), d, r)),
        "custom_vjp_call",
    ),
    Bug(
        "one_element",
        "wrong in one element of a 10^4-vector",
        lambda x: jnp.sum(jnp.sin(square_one_element(x))),
        lambda d, r: (_normal((10_000,), d, r),),
        "custom_vjp_call",
    ),
    Bug(
        "forward_only",
        "wrong only in forward mode (affine tangent)",
        lambda x: jnp.sum(sin_affine_tangent(x) ** 2),
        lambda d, r: (_normal((5,), d, r),),
        "custom_jvp_call",
        modes=("forward",),
    ),
    Bug(
        "one_leaf",
        "wrong only in one leaf of a pytree",
        dense_layer,
        _dense_args,
        "custom_vjp_call",
        leaf="params['bias']",
    ),
    Bug(
        "inside_scan",
        "wrong inside a scan body",
        rnn_scan,
        lambda d, r: (jnp.asarray(0.7, d), _normal((6, 3), d, r)),
        "custom_jvp_call",
    ),
    Bug(
        "second_order",
        "wrong only in the second derivative",
        lambda x: jnp.sum(sin_second_order(x)),
        lambda d, r: (_normal((4,), d, r),),
        "custom_jvp_call",
        order=2,
    ),
    Bug(
        "sigmoid_missing_factor",
        "missing factor (1 - s) inside a cond branch",
        branchy,
        lambda d, r: (_normal((5,), d, r),),
        "custom_vjp_call",
    ),
    Bug(
        "inside_jit",
        "wrong sign of the argument, inside a jitted helper",
        jitted_softplus_sum,
        lambda d, r: (_normal((6,), d, r),),
        "custom_jvp_call",
    ),
    Bug(
        "wrong_power",
        "wrong power (1/x^2 instead of 1/x)",
        lambda x: log_wrong_power(x) * 3.0,
        lambda d, r: (jnp.asarray(r.uniform(0.5, 2.0, (5,)), d),),
        "custom_jvp_call",
    ),
    Bug(
        "wrong_reduction",
        "bias cotangent averaged instead of summed over the batch",
        lambda x, b: jnp.sum(jnp.sin(add_bias_wrong_reduction(x, b))),
        lambda d, r: (_normal((4, 3), d, r), _normal((3,), d, r)),
        "custom_vjp_call",
    ),
    Bug(
        "softmax_missing_term",
        "softmax backward without the subtracted term",
        lambda x: jnp.sum(softmax_missing_term(x) * jnp.arange(1.0, 7.0, dtype=x.dtype)),
        lambda d, r: (_normal((6,), d, r),),
        "custom_vjp_call",
    ),
    Bug(
        "norm_missing_division",
        "norm derivative without the division by the norm",
        norm_missing_division,
        lambda d, r: (_normal((5,), d, r, 1.0, 1.0),),
        "custom_jvp_call",
    ),
    Bug(
        "logsumexp_unnormalised",
        "logsumexp backward not normalised",
        lambda x: logsumexp_unnormalised(x) * 2.0,
        lambda d, r: (_normal((5,), d, r),),
        "custom_vjp_call",
    ),
    Bug(
        "wrong_partner",
        "product rule using the wrong partner",
        lambda x, y: jnp.sum(product_wrong_partner(x, y) ** 2),
        lambda d, r: (_normal((4,), d, r), _normal((4,), d, r, 1.0, 2.0)),
        "custom_jvp_call",
    ),
)


# ---------------------------------------------------------------------------------------------
# Correct smooth functions of random shapes

_UNARY: dict[str, Callable] = {
    "sin": jnp.sin,
    "cos": jnp.cos,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "gauss": lambda x: jnp.exp(-0.5 * x * x),
    "log1p_square": lambda x: jnp.log1p(x * x),
    "sqrt1p_square": lambda x: jnp.sqrt(1.0 + x * x),
    "atan": jnp.arctan,
    "x_tanh": lambda x: x * jnp.tanh(x),
    "cubic": lambda x: x * x * x / (1.0 + x * x),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class SmoothFunction:
    """A correct smooth function of one array, built from a random recipe.

    Attributes:
      name: a readable description of the recipe.
      input_shape: the shape of its argument.
      function: the function.
      steps: the recipe (so other frameworks can rebuild the same function).
    """

    name: str
    input_shape: tuple[int, ...]
    function: Callable[[jax.Array], jax.Array]
    steps: tuple = ()

    def make_args(self, dtype, rng: np.random.Generator) -> tuple:
        return (_normal(self.input_shape, dtype, rng),)


def _random_recipe(rng: np.random.Generator):
    ndim = int(rng.integers(0, 4))
    shape = tuple(int(s) for s in rng.integers(1, 6, size=ndim))
    steps = []
    current = shape
    for _ in range(int(rng.integers(2, 6))):
        choice = rng.choice(["unary", "unary", "matmul", "reduce", "mix", "softmax", "normalise"])
        if choice == "unary":
            steps.append(("unary", str(rng.choice(sorted(_UNARY)))))
        elif choice == "matmul" and current:
            out = int(rng.integers(1, 6))
            matrix = rng.standard_normal((current[-1], out)) / np.sqrt(current[-1])
            steps.append(("matmul", matrix))
            current = (*current[:-1], out)
        elif choice == "reduce" and current:
            axis = int(rng.integers(0, len(current)))
            steps.append(("reduce", axis))
            current = current[:axis] + current[axis + 1 :]
        elif choice == "mix":
            weight = float(rng.uniform(0.2, 1.5))
            steps.append(("mix", weight, str(rng.choice(sorted(_UNARY)))))
        elif choice == "softmax" and current:
            steps.append(("softmax",))
        elif choice == "normalise":
            steps.append(("normalise",))
    return shape, steps


def _apply_recipe(steps, x):
    for step in steps:
        kind = step[0]
        if kind == "unary":
            x = _UNARY[step[1]](x)
        elif kind == "matmul":
            x = x @ jnp.asarray(step[1], x.dtype)
        elif kind == "reduce":
            x = jnp.sum(x, axis=step[1])
        elif kind == "mix":
            x = x + step[1] * _UNARY[step[2]](x) * jnp.cos(x)
        elif kind == "softmax":
            x = jax.nn.softmax(x, axis=-1)
        elif kind == "normalise":
            x = x / jnp.sqrt(1.0 + jnp.mean(x * x))
    return x


def _describe(steps) -> str:
    parts = []
    for step in steps:
        if step[0] == "unary":
            parts.append(step[1])
        elif step[0] == "matmul":
            parts.append(f"matmul{tuple(step[1].shape)}")
        elif step[0] == "reduce":
            parts.append(f"sum(axis={step[1]})")
        elif step[0] == "mix":
            parts.append(f"x+{step[1]:.2f}*{step[2]}*cos")
        else:
            parts.append(step[0])
    return " -> ".join(parts)


def smooth_functions(count: int = 200, seed: int = 0) -> list[SmoothFunction]:
    """Returns ``count`` correct smooth functions of random shapes (deterministic in ``seed``).

    Each is a random composition of 2 to 5 smooth steps (bounded elementwise functions, products
    with cosines, matrix products with fixed random matrices, sums over an axis, softmax and a
    smooth normalisation) on an input of 0 to 3 dimensions of size 1 to 5.

    Args:
      count: how many functions.
      seed: seed of the recipes.

    Returns:
      A list of :class:`SmoothFunction`.
    """
    rng = np.random.default_rng(seed)
    functions = []
    for index in range(count):
        shape, steps = _random_recipe(rng)

        def function(x, steps=steps):
            return _apply_recipe(steps, x)

        function.__name__ = f"smooth_{index}"
        functions.append(
            SmoothFunction(f"smooth_{index}: {_describe(steps)}", shape, function, tuple(steps))
        )
    return functions
