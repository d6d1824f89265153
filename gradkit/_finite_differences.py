r"""Finite differences with an error bar: steps from the dtype, Richardson extrapolation, kinks.

The gradient checker compares autodiff with the derivatives estimated here. Every estimate comes
with an error bar, so a verdict can say "the finite difference itself is too noisy" instead of
raising a false alarm.

For a function :math:`\varphi(h) = f(x + h v)` evaluated at steps :math:`h_k = h_0 / 2^k`,
:math:`k = 0, \dots, K-1`, the central differences

.. math::

    D_k = \frac{\varphi(h_k) - \varphi(-h_k)}{2 h_k} = \varphi'(0) + a_2 h_k^2 + a_4 h_k^4 + \dots

are combined by Richardson extrapolation (each column of the table removes one more power of
:math:`h^2`). The error bar is the difference between the last two diagonal entries of the table
(a conservative estimate of the truncation error of the final one) plus the rounding error
:math:`\approx \epsilon \, |f| / h_{K-1}`. One-sided differences
:math:`(\varphi(\pm h_k) - \varphi(0)) / (\pm h_k)` are extrapolated the same way (powers of
:math:`h`); at a smooth point both sides agree with the central estimate, at a kink (``relu`` at 0,
``abs`` at 0, ``max`` with ties) they do not, and the two one-sided slopes bound the subgradients.

The functions here work on stacked evaluations in the array library of their inputs: on JAX
arrays (and tracers) they are ``jax.numpy`` code that runs inside the checker's compiled calls;
on NumPy arrays they run in NumPy. Localisation (:mod:`gradkit._locate`) checks one equation at a
time on the host, on outputs of a new shape each time, where compiling every operation for that
shape took far longer than the arithmetic (20 s of a 21 s localisation of a recurrent network).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

#: number of step sizes used by the Richardson table in the directional checks.
DEFAULT_NUM_STEPS = 3
#: ratio between consecutive steps.
STEP_RATIO = 2.0


def machine_epsilon(dtype) -> float:
    """Returns the machine epsilon of a floating dtype."""
    return float(np.finfo(np.dtype(dtype)).eps)


def base_step(dtype, *, extrapolated: bool = True) -> float:
    r"""Returns the relative first step :math:`h_0` for a dtype.

    With Richardson extrapolation over a few halvings the truncation error falls like a high power
    of :math:`h`, so a large first step :math:`h_0 = \epsilon^{1/5}` balances it against rounding
    (:math:`\approx 7\times 10^{-4}` in float64, :math:`0.04` in float32). A single plain central
    difference uses the classical :math:`\epsilon^{1/3}` instead.

    Args:
      dtype: the dtype the finite differences are evaluated in.
      extrapolated: whether the step starts a Richardson table.

    Returns:
      The step, to be multiplied by the scale of the input.
    """
    eps = machine_epsilon(dtype)
    return eps ** (1 / 5) if extrapolated else eps ** (1 / 3)


def input_scale(x: np.ndarray) -> float:
    """Returns the scale a step is relative to: the RMS of ``x``, but at least 1."""
    if x.size == 0:
        return 1.0
    rms = float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))
    return max(rms, 1.0)


def steps(h0: float, num_steps: int = DEFAULT_NUM_STEPS) -> np.ndarray:
    """Returns the decreasing steps ``h0 / STEP_RATIO**k`` for ``k < num_steps``."""
    return h0 / STEP_RATIO ** np.arange(num_steps, dtype=np.float64)


def _namespace(*arrays):
    """``jax.numpy`` if any of ``arrays`` is a JAX array or tracer, else NumPy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _richardson(estimates: jax.Array, power: int) -> tuple[jax.Array, jax.Array]:
    """Extrapolates ``estimates[k]`` (error series in ``h**power``, ``2*power``, ...) to h = 0.

    Args:
      estimates: (steps, ...) difference quotients at steps shrinking by ``STEP_RATIO``.
      power: the leading power of the error series (2 for central, 1 for one-sided differences),
        which is also the increment of the powers that follow.

    Returns:
      ``(estimate, truncation_error)``, each of shape ``estimates.shape[1:]``.
    """
    num = estimates.shape[0]
    row = [estimates[k] for k in range(num)]
    diagonal = [row[0]]
    for j in range(1, num):
        factor = STEP_RATIO ** (power * j)
        row = [row[k] + (row[k] - row[k - 1]) / (factor - 1) for k in range(1, len(row))]
        diagonal.append(row[0])
    xp = _namespace(estimates)
    if num == 1:
        return diagonal[0], xp.zeros_like(diagonal[0])
    return diagonal[-1], xp.abs(diagonal[-1] - diagonal[-2])


@dataclasses.dataclass(frozen=True)
class Derivative:
    """A finite-difference derivative estimate (arrays, any shape).

    Attributes:
      value: the extrapolated central difference.
      error: its error bar (truncation estimate plus rounding).
      left: the extrapolated backward one-sided slope.
      right: the extrapolated forward one-sided slope.
      side_error: the error bar of the one-sided slopes.
      finite: whether every evaluation used was finite.
      magnitude: the largest ``|f|`` among the evaluations (what rounding is relative to).
    """

    value: jax.Array
    error: jax.Array
    left: jax.Array
    right: jax.Array
    side_error: jax.Array
    finite: jax.Array
    magnitude: jax.Array


jax.tree_util.register_dataclass(
    Derivative,
    data_fields=["value", "error", "left", "right", "side_error", "finite", "magnitude"],
    meta_fields=[],
)


def derivative_from_evaluations(
    center: jax.Array,
    plus: jax.Array,
    minus: jax.Array,
    step_sizes: jax.Array,
    eps: float,
    rounding: jax.Array | None = None,
    magnitude: jax.Array | None = None,
) -> Derivative:
    """Turns evaluations ``f(x)``, ``f(x + h_k v)``, ``f(x - h_k v)`` into a :class:`Derivative`.

    Args:
      center: ``f(x)``, shape ``(...)``.
      plus: ``f(x + h_k v)``, shape ``(steps, ...)``.
      minus: ``f(x - h_k v)``, shape ``(steps, ...)``.
      step_sizes: ``h_k``, shape ``(steps,)``, decreasing by ``STEP_RATIO``.
      eps: machine epsilon of the dtype the evaluations were made in.
      rounding: the rounding error of the central difference, if the caller knows it better
        (for a projection, the projection of the elementwise rounding errors); by default it is
        estimated from the evaluations.
      magnitude: the size of ``f`` the rounding is relative to, if the caller knows it better.

    Returns:
      The derivative of ``h -> f(x + h v)`` at 0, elementwise over ``...``.
    """
    xp = _namespace(center, plus, minus, step_sizes)
    h = xp.reshape(step_sizes, (-1,) + (1,) * xp.ndim(center))
    central = (plus - minus) / (2 * h)
    right = (plus - center) / h
    left = (center - minus) / h
    value, truncation = _richardson(central, 2)
    right_value, right_truncation = _richardson(right, 1)
    left_value, left_truncation = _richardson(left, 1)
    if rounding is None:
        rounding = rounding_error(center, plus, minus, step_sizes, eps)
    finite = (
        xp.all(xp.isfinite(plus), axis=0) & xp.all(xp.isfinite(minus), axis=0) & xp.isfinite(center)
    )
    return Derivative(
        value=value,
        error=truncation + rounding,
        left=left_value,
        right=right_value,
        side_error=xp.maximum(left_truncation, right_truncation) + 2 * rounding,
        finite=finite,
        magnitude=_magnitude(center, plus, minus) if magnitude is None else magnitude,
    )


def _magnitude(center, plus, minus):
    xp = _namespace(center, plus, minus)
    return xp.maximum(xp.abs(center), xp.max(xp.maximum(xp.abs(plus), xp.abs(minus)), 0))


def rounding_error(
    center: jax.Array, plus: jax.Array, minus: jax.Array, step_sizes: jax.Array, eps: float
) -> jax.Array:
    r"""Estimates the rounding error of the extrapolated central difference, elementwise.

    Each evaluation carries an error of about :math:`\epsilon |f|`; the smallest step divides it
    and the Richardson weights amplify it by at most about 3, hence :math:`4 \epsilon |f| /
    h_{K-1}`. Values that do not depend on the perturbation are computed bit-identically and cancel
    exactly, so they contribute nothing.

    Args:
      center: ``f(x)``, shape ``(...)``.
      plus: ``f(x + h_k v)``, shape ``(steps, ...)``.
      minus: ``f(x - h_k v)``, shape ``(steps, ...)``.
      step_sizes: ``h_k``, shape ``(steps,)``.
      eps: machine epsilon of the evaluations.

    Returns:
      The error estimate, shape ``(...)``.
    """
    moved = (plus[0] != minus[0]) | (plus[0] != center)
    magnitude = _magnitude(center, plus, minus)
    return _namespace(center, plus, minus, step_sizes).where(
        moved, 4.0 * eps * magnitude / step_sizes[-1], 0.0
    )


def float64_available() -> bool:
    """Whether the default backend computes in float64 when x64 is enabled.

    Some accelerators (and some plugin backends) have no float64; there the finite differences
    fall back to the dtype of the function, with a step and an error bar chosen for that dtype.
    """
    return _float64_available()


@functools.cache
def _float64_available() -> bool:
    try:
        with jax.enable_x64(True):
            one = jnp.asarray(1.0, dtype=jnp.float64)
            total = jax.jit(lambda a: a + 1e-12)(one)
            return total.dtype == jnp.float64 and float(total) != 1.0
    except Exception:
        return False


#: Most input elements :func:`finite_difference_grad` differences one by one.
MAX_GRADIENT_ELEMENTS = 10_000


def finite_difference_grad(fun, *args, argnums: int = 0) -> tuple[PyTree, PyTree]:
    r"""The gradient of a scalar function by finite differences, element by element, with error
    bars: the reference that autodiff is checked against, for small inputs.

    Each element :math:`x_i` of ``args[argnums]`` is moved by :math:`\pm h_k` for the steps of
    :func:`steps` (relative to the RMS of its leaf, at least 1) and the central differences are
    Richardson-extrapolated (this module's docstring); the error bar is the truncation estimate
    plus the rounding error. The function is evaluated in float64 when the backend has it, else
    in the leaves' dtype. Costs ``2 * DEFAULT_NUM_STEPS + 1`` evaluations per element, so it
    refuses more than :data:`MAX_GRADIENT_ELEMENTS` elements; use :func:`check_grads` (random
    directions) for large inputs.

    Args:
      fun: a function returning a scalar.
      *args: its arguments.
      argnums: the position of the argument to differentiate (a pytree of floating arrays).

    Returns:
      ``(gradient, error)``: two pytrees shaped like ``args[argnums]``, NumPy float64 arrays (or
      the leaves' dtype without float64).

    Raises:
      TypeError: if a leaf of the argument is not floating point, or ``fun`` does not return a
        scalar.
      ValueError: for more than :data:`MAX_GRADIENT_ELEMENTS` elements or a bad ``argnums``.

    Example:
      >>> import jax.numpy as jnp
      >>> f = lambda x: jnp.sum(jnp.sin(x))
      >>> value, error = finite_difference_grad(f, jnp.array([0.0, 1.0]))
      >>> [round(float(v), 9) for v in value], bool(error.max() < 1e-9)
      ([1.0, 0.540302306], True)
    """
    if not isinstance(argnums, int) or not -len(args) <= argnums < len(args):
        raise ValueError(
            f"finite_difference_grad: argnums must be the position of one of the {len(args)} "
            f"arguments; got {argnums!r}"
        )
    argnums %= len(args)
    use64 = float64_available()
    with jax.enable_x64(True) if use64 else contextlib.nullcontext():
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(args[argnums])
        leaves = []
        for path, leaf in paths_leaves:
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"finite_difference_grad: args[{argnums}]{jax.tree_util.keystr(path)} is "
                    f"{dtype}; only floating-point leaves can be differentiated"
                )
            leaves.append(np.asarray(leaf, np.float64 if use64 else dtype))
        total = sum(leaf.size for leaf in leaves)
        if total > MAX_GRADIENT_ELEMENTS:
            raise ValueError(
                f"finite_difference_grad: args[{argnums}] has {total:,} elements, more than "
                f"{MAX_GRADIENT_ELEMENTS:,} to difference one by one; use check_grads, which "
                "differences along random directions"
            )

        def scalar(flat):
            full = list(args)
            full[argnums] = jax.tree_util.tree_unflatten(treedef, flat)
            out = fun(*full)
            if jnp.shape(out) != ():
                raise TypeError(
                    f"finite_difference_grad: fun must return a scalar; got shape {jnp.shape(out)}"
                )
            return out

        evaluate = jax.jit(scalar)
        center = np.asarray(evaluate(leaves), np.float64)
        values, errors = [], []
        for index, leaf in enumerate(leaves):
            eps = machine_epsilon(leaf.dtype)
            hs = steps(base_step(leaf.dtype)) * input_scale(leaf)
            value, error = np.zeros(leaf.shape), np.zeros(leaf.shape)
            for element in np.ndindex(leaf.shape):

                def moved_by(h, element=element, index=index, leaf=leaf):
                    moved = leaf.copy()
                    moved[element] += h
                    return float(evaluate([*leaves[:index], moved, *leaves[index + 1 :]]))

                plus = np.array([moved_by(h) for h in hs])
                minus = np.array([moved_by(-h) for h in hs])
                derivative = derivative_from_evaluations(center, plus, minus, hs, eps)
                value[element], error[element] = derivative.value, derivative.error
            values.append(value.astype(leaf.dtype))
            errors.append(error.astype(leaf.dtype))
    return (
        jax.tree_util.tree_unflatten(treedef, values),
        jax.tree_util.tree_unflatten(treedef, errors),
    )
