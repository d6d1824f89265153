"""Activation functions with deliberately chosen, documented derivatives.

Every activation here states its formula and its derivative convention at each kink or boundary,
implements that convention with ``jax.custom_jvp`` where plain autodiff would surprise, and is
registered with metadata (formula, output range, zero-gradient region) that
:mod:`gradkit.diagnostics` reads to count saturated and dead units.

Conventions shared by the whole module:

- **Kinks take the derivative of the closed zero-gradient side.** ``relu'(0) = 0`` (as
  ``jax.nn.relu``); the clip-like functions (:func:`hard_sigmoid`, :func:`hard_tanh`,
  :func:`relu6`) have derivative 0 *at* their boundaries, so their zero-gradient region is closed.
  This matches ``jax.nn.relu6``/``jax.nn.hard_sigmoid`` and PyTorch's ``Hardsigmoid``,
  ``Hardtanh`` and ``ReLU6`` kernels. Theano's ``clip`` did the opposite (its gradient was the
  slope on the closed interval, boundaries included), and plain ``jnp.clip``/``jnp.minimum``/
  ``jnp.maximum`` split ties and give *half* the slope at the boundary.
- **Inputs must be floating point.** Arrays of dtype float16, bfloat16, float32 or float64 and
  Python floats (weakly typed, so they follow JAX's default float) are accepted; the result has
  the input's dtype. Integer, boolean and complex inputs, Python ints and lists raise
  ``TypeError`` naming the function, the argument and the dtype.
- **Everything works under** ``jit``, ``vmap``, ``grad``, ``jvp`` and ``vjp``.

The registry: :func:`get` returns an :class:`Activation` (callable, with ``formula``,
``derivative``, ``output_range``, ``zero_grad_mask`` and ``saturation_mask``); :func:`names`
lists every registered name; :func:`register` adds your own.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from gradkit import activations
  >>> float(jax.grad(activations.ultra_fast_sigmoid)(0.0))  # Theano had no gradient at all
  0.375
  >>> theano_hard = activations.get("hard_sigmoid", slope=0.2)
  >>> theano_hard.zero_grad_mask(jnp.array([-3.0, -2.5, 0.0, 2.5, 3.0]))
  Array([ True,  True, False,  True,  True], dtype=bool)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

__all__ = [
    "SATURATION_THRESHOLD",
    "Activation",
    "elu",
    "gelu",
    "get",
    "hard_sigmoid",
    "hard_tanh",
    "identity",
    "leaky_relu",
    "log_sigmoid",
    "log_softmax",
    "mish",
    "names",
    "register",
    "relu",
    "relu6",
    "selu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "tanh",
    "ultra_fast_sigmoid",
    "with_surrogate_grad",
]

# Default of ``Activation.saturation_mask``: a unit is saturated where |f'(x)| is below this
# fraction of the activation's peak |f'|. The value is sigmoid'(5) / sigmoid'(0), so that for the
# sigmoid the mask is DeepDiagnosis's rule "|pre-activation| >= 5 is saturated" (Wardat et al.,
# ICSE 2022), up to the points +-5 themselves, which fall either side as sigmoid'(+-5) rounds
# in the input's dtype. For tanh the same fraction is reached at |x| ~= 2.5.
SATURATION_THRESHOLD = 4.0 * (1.0 / (1.0 + math.exp(-5.0))) * (1.0 - 1.0 / (1.0 + math.exp(-5.0)))

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

# Theano's UltraFastScalarSigmoid constants (theano/tensor/nnet/sigm.py), all on u = x / 2.
_UFS_KNEE = 1.7  # end of the rational piece 1.5 a / (1 + a)
_UFS_FLAT = 3.0  # start of the constant piece
_UFS_OFFSET = 0.935409070603099
_UFS_SLOPE = 0.0458812946797165
_UFS_CEILING = 0.99505475368673


# --------------------------------------------------------------------------------------------
# Input checking


def _float_input(x: Any, function: str, argument: str = "x") -> jax.Array:
    """Returns ``x`` as a floating-point array, or raises TypeError naming what it got."""
    if isinstance(x, (bool, int)):
        raise TypeError(
            f"{function}: {argument} must be a floating-point array or a Python float; got Python "
            f"{type(x).__name__} {x!r}. Write {float(x)!r} or pass jnp.asarray({x!r}, "
            "jnp.float32)."
        )
    if isinstance(x, (list, tuple)):
        raise TypeError(
            f"{function}: {argument} must be a floating-point array or a Python float; got a "
            f"Python {type(x).__name__}. Convert it first, e.g. jnp.asarray(x, jnp.float32)."
        )
    if isinstance(x, complex):
        raise TypeError(
            f"{function}: {argument} must be real floating point; got Python complex {x!r}."
        )
    if not isinstance(x, float) and not hasattr(x, "dtype"):
        raise TypeError(
            f"{function}: {argument} must be a floating-point array or a Python float; got "
            f"{type(x).__name__}."
        )
    array = jnp.asarray(x)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"{function}: {argument} must have a floating-point dtype (float16, bfloat16, float32 "
            f"or float64); got dtype {array.dtype}. Cast it, e.g. {argument}.astype(jnp.float32)."
        )
    return array


def _param(value: Any, dtype: Any, function: str, argument: str) -> jax.Array | float:
    """Returns a real-valued hyperparameter in the computation dtype (keeps ``x``'s dtype)."""
    if isinstance(value, (bool, complex)) or isinstance(value, (list, tuple, str)):
        raise TypeError(
            f"{function}: {argument} must be a real number or a real array; got "
            f"{type(value).__name__} {value!r}."
        )
    if isinstance(value, (int, float)):
        return float(value)  # weakly typed: keeps x's dtype and weak type
    array = jnp.asarray(value)
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(
            f"{function}: {argument} must be a real number or a real array; got dtype "
            f"{array.dtype}."
        )
    return lax.convert_element_type(array, dtype)


def _normalize_axis(axis: Any, ndim: int, function: str) -> tuple[int, ...]:
    """``axis`` as sorted non-negative ints. A 0-d input is checked as if it had one axis (so
    ``-1`` and ``0`` are accepted) and normalises over nothing: ``()``."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    if not axes or not all(
        isinstance(a, int | np.integer) and not isinstance(a, bool | np.bool_) for a in axes
    ):
        raise TypeError(f"{function}: axis must be an int or a tuple of ints; got {axis!r}.")
    axes = tuple(int(a) for a in axes)
    scalar, ndim = ndim == 0, max(ndim, 1)
    normalized = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{function}: axis {a} is out of range for an input with "
                f"{'0 dimensions (taken as one)' if scalar else f'{ndim} dimension(s)'}; "
                f"expected an axis in [{-ndim}, {ndim - 1}]."
            )
        normalized.append(a % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{function}: axis {axis!r} repeats an axis.")
    return () if scalar else tuple(sorted(normalized))


# --------------------------------------------------------------------------------------------
# Clip-like functions: derivative 1 strictly inside (low, high), 0 at and beyond the boundaries.


@functools.cache
def _make_closed_clip(low: float, high: float) -> Callable[[jax.Array], jax.Array]:
    @jax.custom_jvp
    def clip(z):
        return jnp.clip(z, low, high)

    clip.defjvps(lambda g, ans, z: lax.select((z > low) & (z < high), g, lax.full_like(g, 0)))
    return clip


_clip_unit = _make_closed_clip(0.0, 1.0)
_clip_sign = _make_closed_clip(-1.0, 1.0)
_clip_six = _make_closed_clip(0.0, 6.0)


@jax.custom_jvp
def _relu(x):
    return jnp.maximum(x, 0)


_relu.defjvps(lambda g, ans, x: lax.select(x > 0, g, lax.full_like(g, 0)))


# --------------------------------------------------------------------------------------------
# The activations


@jax.jit
def _sigmoid(x):
    return lax.logistic(x)


def sigmoid(x: ArrayLike) -> jax.Array:
    r"""Logistic sigmoid.

    .. math::
      \sigma(x) = \frac{1}{1 + e^{-x}}, \qquad \sigma'(x) = \sigma(x)\,(1 - \sigma(x)) \le 1/4.

    The derivative is computed as :math:`\sigma(1-\sigma)`, exactly as ``jax.nn.sigmoid`` does, so
    it is **exactly zero** where :math:`\sigma` rounds to 1 (float32: :math:`x \gtrsim 16.64`;
    float64: :math:`x \gtrsim 36.74`) and where :math:`\sigma` underflows (float32:
    :math:`x \lesssim -87.34`, float64: :math:`x \lesssim -708.4` on CPU, which flushes
    subnormals to zero). ``get("sigmoid").zero_grad_mask``
    reports exactly those points.

    Args:
      x: floating-point array (any shape) or Python float.

    Returns:
      :math:`\sigma(x)`, same shape and dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> sigmoid(jnp.array([0.0, 2.0]))
      Array([0.5     , 0.880797], dtype=float32)
    """
    return _sigmoid(_float_input(x, "sigmoid"))


@jax.jit
def _tanh(x):
    return jnp.tanh(x)


def tanh(x: ArrayLike) -> jax.Array:
    r"""Hyperbolic tangent.

    .. math::
      \tanh(x) = \frac{e^{x} - e^{-x}}{e^{x} + e^{-x}}, \qquad \tanh'(x) = 1 - \tanh^2(x).

    The derivative is exactly zero where :math:`\tanh` rounds to :math:`\pm 1` (with XLA's CPU
    kernels: float32 :math:`|x| \gtrsim 8.0`, float64 :math:`|x| \gtrsim 20`).

    Args:
      x: floating-point array or Python float.

    Returns:
      :math:`\tanh(x)`, same shape and dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> tanh(jnp.array([0.0]))
      Array([0.], dtype=float32)
    """
    return _tanh(_float_input(x, "tanh"))


def identity(x: ArrayLike) -> jax.Array:
    r"""The identity, :math:`f(x) = x`, :math:`f'(x) = 1`.

    Used as a linear "activation" and as the surrogate of the straight-through estimator
    (``with_surrogate_grad(forward, identity)``).

    Args:
      x: floating-point array or Python float.

    Returns:
      ``x`` as an array of the same dtype.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> identity(jnp.array([1.5]))
      Array([1.5], dtype=float32)
    """
    return _float_input(x, "identity")


@jax.custom_jvp
def _ultra_fast_sigmoid_core(x):
    a = jnp.abs(0.5 * x)
    rational = 1.5 * a / (1 + a)
    linear = _UFS_OFFSET + _UFS_SLOPE * (a - _UFS_KNEE)
    # Written so that a NaN input falls through to the linear piece and stays NaN.
    z = jnp.where(a < _UFS_KNEE, rational, jnp.where(a >= _UFS_FLAT, _UFS_CEILING, linear))
    z = jnp.where(x < 0, -z, z)
    return 0.5 * (z + 1.0)


@_ultra_fast_sigmoid_core.defjvp
def _ultra_fast_sigmoid_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    a = jnp.abs(0.5 * x)
    rational = 0.375 / jnp.square(1 + a)
    slope = jnp.where(a < _UFS_KNEE, rational, jnp.where(a < _UFS_FLAT, 0.25 * _UFS_SLOPE, 0.0))
    slope = jnp.where(jnp.isnan(x), x, slope)  # the gradient at a NaN is NaN, not a silent 0
    return _ultra_fast_sigmoid_core(x), slope * t


_ultra_fast_sigmoid = jax.jit(_ultra_fast_sigmoid_core)


def ultra_fast_sigmoid(x: ArrayLike) -> jax.Array:
    r"""Theano's ``ultra_fast_sigmoid``: a piecewise approximation of the sigmoid, now with a
    gradient.

    With :math:`a = |x|/2`:

    .. math::
      z(a) = \begin{cases}
        \dfrac{1.5\,a}{1 + a}, & a < 1.7 \\
        0.935409070603099 + 0.0458812946797165\,(a - 1.7), & 1.7 \le a < 3 \\
        0.99505475368673, & a \ge 3
      \end{cases}
      \qquad f(x) = \tfrac12\bigl(\operatorname{sign}(x)\, z(a) + 1\bigr).

    These are the constants of Theano's C code (``UltraFastScalarSigmoid``); in float64 the value
    matches it to within one ulp of 1, 2.2e-16 (XLA may fuse a multiply-add). The derivative is

    .. math::
      f'(x) = \begin{cases}
        \dfrac{0.375}{(1 + |x|/2)^2}, & |x| < 3.4 \\
        0.25 \cdot 0.0458812946797165 = 0.0114703\ldots, & 3.4 \le |x| < 6 \\
        0, & |x| \ge 6.
      \end{cases}

    Notes:
      - :math:`f'(0) = 0.375` (steeper than :math:`\sigma'(0) = 0.25`). Differentiating the
        ``sign(x) * z(|x|/2)`` form naively gives 0 at :math:`x = 0`; a ``custom_jvp`` gives
        the true value.
      - The function **jumps** by about :math:`-0.0045` at :math:`|x| = 3.4` (the rational piece
        ends at 0.94444, the linear piece starts at 0.93541), so it is not monotone there; the
        derivative at :math:`|x| = 3.4` is the linear piece's, whose formula defines the value.
      - The gradient is exactly **zero for** :math:`|x| \ge 6`; the output range is
        :math:`[0.0024726, 0.9975274]`, never 0 or 1.
      - Theano never defined its gradient (``MethodNotDefined: grad``); NaN input gives NaN (value
        and gradient) here, where Theano's C code returned 0.0024726.

    Args:
      x: floating-point array or Python float.

    Returns:
      The approximation, same shape and dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> ultra_fast_sigmoid(jnp.array([0.0, 7.0]))
      Array([0.5       , 0.99752736], dtype=float32)
    """
    return _ultra_fast_sigmoid(_float_input(x, "ultra_fast_sigmoid"))


@jax.jit
def _hard_sigmoid(x, slope, shift):
    return _clip_unit(slope * x + shift)


@functools.partial(jax.jit, static_argnums=1)
def _hard_sigmoid_reciprocal(x, divisor, shift):
    # clip(x / k + b, 0, 1) written as clip(x + b k, 0, k) / k: the test against the boundaries
    # happens before any rounding by 1/k (XLA turns x / k into x * (1/k)), so it is exact.
    return _make_closed_clip(0.0, divisor)(x + shift * divisor) / divisor


def _exact_reciprocal(slope: Any) -> float | None:
    """k if ``slope`` is a Python float equal to 1/k for a whole number k > 0, else None.

    Negative slopes take the general path: ``clip(x + b k, 0, k)`` would need ``low > high``.
    """
    if not isinstance(slope, float) or not slope > 0 or not math.isfinite(slope):
        return None
    k = round(1.0 / slope)
    return float(k) if k > 0 and 1.0 / k == slope else None


def hard_sigmoid(
    x: ArrayLike, *, slope: ArrayLike = 1.0 / 6.0, shift: ArrayLike = 0.5
) -> jax.Array:
    r"""Hard (piecewise-linear) sigmoid.

    .. math::
      f(x) = \operatorname{clip}(s\,x + b,\ 0,\ 1), \qquad
      f'(x) = \begin{cases} s, & 0 < s\,x + b < 1 \\ 0, & \text{otherwise.} \end{cases}

    The default (``slope=1/6, shift=0.5``, i.e. ``relu6(x + 3) / 6``) matches ``jax.nn``,
    PyTorch ``Hardsigmoid`` and Keras 3. Theano, Keras 2 (``tf.keras`` <= 2.15) and ONNX
    ``HardSigmoid`` used ``slope=0.2, shift=0.5``; get it with
    ``hard_sigmoid(x, slope=0.2)`` or ``get("hard_sigmoid", slope=0.2)``.

    The derivative is zero on the **closed** set where :math:`s x + b \le 0` or
    :math:`s x + b \ge 1` (with the defaults :math:`|x| \ge 3`; with Theano's constants
    :math:`|x| \ge 2.5`), as in ``jax.nn`` and PyTorch. Theano's ``clip`` gradient was inclusive
    (0.2 at :math:`x = \pm 2.5`); plain ``jnp.clip`` would give half the slope there. When
    ``slope`` is a Python float equal to :math:`1/k` for a positive whole number :math:`k`
    (1/6, 0.2), ``clip(x + b k, 0, k) / k`` is computed (as ``relu6(x + 3) / 6`` in jax.nn), so
    the boundaries fall exactly on :math:`\pm 3` or :math:`\pm 2.5` in every dtype.

    Args:
      x: floating-point array or Python float.
      slope: :math:`s`, a real scalar or array broadcastable with ``x`` (cast to ``x``'s dtype).
      shift: :math:`b`, likewise.

    Returns:
      ``clip(slope * x + shift, 0, 1)``, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point, or ``slope``/``shift`` are not real numbers.

    Example:
      >>> hard_sigmoid(jnp.array([-1.0, 0.0, 1.0]), slope=0.2)  # Theano's constants
      Array([0.3, 0.5, 0.7], dtype=float32)
    """
    x = _float_input(x, "hard_sigmoid")
    shift = _param(shift, x.dtype, "hard_sigmoid", "shift")
    divisor = _exact_reciprocal(slope)
    if divisor is not None:
        # x * (1/6) + 0.5 is not exactly 0 at x = -3 in float64; x + 3 is.
        return _hard_sigmoid_reciprocal(x, divisor, shift)
    return _hard_sigmoid(x, _param(slope, x.dtype, "hard_sigmoid", "slope"), shift)


@jax.jit
def _hard_tanh(x):
    return _clip_sign(x)


def hard_tanh(x: ArrayLike) -> jax.Array:
    r"""Hard tanh.

    .. math::
      f(x) = \operatorname{clip}(x, -1, 1), \qquad
      f'(x) = \begin{cases} 1, & -1 < x < 1 \\ 0, & |x| \ge 1. \end{cases}

    The derivative at :math:`x = \pm 1` is 0 (closed zero-gradient region), as PyTorch's
    ``hardtanh_backward``; ``jax.nn.hard_tanh`` (a ``where`` chain) gives 1 there and
    ``jnp.clip`` gives 0.5.

    Args:
      x: floating-point array or Python float.

    Returns:
      ``clip(x, -1, 1)``, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> hard_tanh(jnp.array([-2.0, 0.5, 2.0]))
      Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    return _hard_tanh(_float_input(x, "hard_tanh"))


@jax.jit
def _relu_jit(x):
    return _relu(x)


def relu(x: ArrayLike) -> jax.Array:
    r"""Rectified linear unit.

    .. math::
      \mathrm{relu}(x) = \max(x, 0), \qquad
      \mathrm{relu}'(x) = \begin{cases} 1, & x > 0 \\ 0, & x \le 0. \end{cases}

    :math:`\mathrm{relu}'(0) = 0`, as ``jax.nn.relu`` and PyTorch (see Bertoin et al.,
    "Numerical influence of ReLU'(0) on backpropagation", NeurIPS 2021). Plain
    ``jnp.maximum(x, 0)`` would give 0.5 at 0, and so did Theano's ``0.5 * (x + |x|)``.

    Args:
      x: floating-point array or Python float.

    Returns:
      ``max(x, 0)``, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> relu(jnp.array([-1.0, 0.0, 2.0]))
      Array([0., 0., 2.], dtype=float32)
    """
    return _relu_jit(_float_input(x, "relu"))


@jax.jit
def _relu6(x):
    return _clip_six(x)


def relu6(x: ArrayLike) -> jax.Array:
    r"""ReLU capped at 6.

    .. math::
      f(x) = \min(\max(x, 0), 6), \qquad
      f'(x) = \begin{cases} 1, & 0 < x < 6 \\ 0, & x \le 0 \text{ or } x \ge 6. \end{cases}

    The derivative is 0 at both kinks, as ``jax.nn.relu6`` and PyTorch.

    Args:
      x: floating-point array or Python float.

    Returns:
      ``min(max(x, 0), 6)``, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> relu6(jnp.array([-1.0, 3.0, 7.0]))
      Array([0., 3., 6.], dtype=float32)
    """
    return _relu6(_float_input(x, "relu6"))


@jax.jit
def _leaky_relu(x, negative_slope):
    return jnp.where(x > 0, x, negative_slope * x)


def leaky_relu(x: ArrayLike, negative_slope: ArrayLike = 0.01) -> jax.Array:
    r"""Leaky ReLU.

    .. math::
      f(x) = \begin{cases} x, & x > 0 \\ \alpha x, & x \le 0 \end{cases}, \qquad
      f'(x) = \begin{cases} 1, & x > 0 \\ \alpha, & x \le 0. \end{cases}

    :math:`f'(0) = \alpha`, so ``leaky_relu(x, 0.0)`` is :func:`relu` derivative included; this is
    also PyTorch's convention (``jax.nn.leaky_relu`` gives 1 at 0). The default
    :math:`\alpha = 0.01` matches jax.nn and PyTorch; ``keras.activations.leaky_relu`` uses 0.2 and
    ``keras.layers.LeakyReLU`` 0.3. There is no zero-gradient region unless :math:`\alpha = 0`.

    Args:
      x: floating-point array or Python float.
      negative_slope: :math:`\alpha`, a real scalar or array (cast to ``x``'s dtype).

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point, or ``negative_slope`` is not a real number.

    Example:
      >>> leaky_relu(jnp.array([-2.0, 3.0]), negative_slope=0.1)
      Array([-0.2,  3. ], dtype=float32)
    """
    x = _float_input(x, "leaky_relu")
    return _leaky_relu(x, _param(negative_slope, x.dtype, "leaky_relu", "negative_slope"))


@jax.custom_jvp
def _elu_core(x, alpha):
    # The inner where keeps expm1 away from large positive x (its overflow is never selected).
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.where(x > 0, 0.0, x)))


@_elu_core.defjvp
def _elu_core_jvp(primals, tangents):
    # Autodiff of expm1 computes exp(x) as expm1(x) + 1, which rounds to 0 once expm1(x) rounds to
    # -1 (float32 x < -17.3); exp(x) itself stays accurate down to its underflow.
    (x, alpha), (t_x, t_alpha) = primals, tangents
    negative = jnp.where(x > 0, 0.0, x)
    slope = jnp.where(x > 0, 1.0, alpha * jnp.exp(negative))
    d_alpha = jnp.where(x > 0, 0.0, jnp.expm1(negative))
    return _elu_core(x, alpha), slope * t_x + d_alpha * t_alpha


_elu = jax.jit(_elu_core)


def elu(x: ArrayLike, alpha: ArrayLike = 1.0) -> jax.Array:
    r"""Exponential linear unit.

    .. math::
      f(x) = \begin{cases} x, & x > 0 \\ \alpha\,(e^{x} - 1), & x \le 0 \end{cases}, \qquad
      f'(x) = \begin{cases} 1, & x > 0 \\ \alpha\,e^{x}, & x \le 0. \end{cases}

    :math:`f'(0) = \alpha` (the :math:`x \le 0` branch, as jax.nn and PyTorch); for the default
    :math:`\alpha = 1` the derivative is continuous. The derivative is computed as
    :math:`\alpha e^{x}` by a ``custom_jvp``: plain autodiff of ``expm1`` computes
    :math:`e^{x}` as ``expm1(x) + 1``, which is exactly 0 for :math:`x \lesssim -17.3` in float32
    (so ``jax.nn.elu``'s gradient vanishes there); here it underflows only where :math:`e^{x}` does
    (float32 :math:`x \lesssim -87.3`, float64 :math:`x \lesssim -708.4` on CPU, which flushes
    subnormals to zero).

    Args:
      x: floating-point array or Python float.
      alpha: :math:`\alpha`, a real scalar or array (cast to ``x``'s dtype).

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point, or ``alpha`` is not a real number.

    Example:
      >>> elu(jnp.array([0.0, 2.0]))
      Array([0., 2.], dtype=float32)
    """
    x = _float_input(x, "elu")
    return _elu(x, _param(alpha, x.dtype, "elu", "alpha"))


@jax.jit
def _selu(x):
    return _SELU_SCALE * _elu(x, _SELU_ALPHA)


def selu(x: ArrayLike) -> jax.Array:
    r"""Scaled exponential linear unit.

    .. math::
      f(x) = \lambda \begin{cases} x, & x > 0 \\ \alpha\,(e^{x} - 1), & x \le 0 \end{cases},
      \qquad \lambda = 1.0507009873554805,\ \alpha = 1.6732632423543772.

    :math:`f'(x) = \lambda` for :math:`x > 0` and :math:`\lambda\alpha e^{x}` for :math:`x \le 0`;
    the derivative jumps at 0 and :math:`f'(0) = \lambda\alpha = 1.7581` (the left side), as
    jax.nn and PyTorch. Same constants as jax, PyTorch, Keras and Theano.

    Args:
      x: floating-point array or Python float.

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> selu(jnp.array([1.0]))
      Array([1.050701], dtype=float32)
    """
    return _selu(_float_input(x, "selu"))


@functools.partial(jax.jit, static_argnames="approximate")
def _gelu(x, approximate):
    if approximate:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi)
        return 0.5 * x * (1.0 + jnp.tanh(inner))
    return 0.5 * x * lax.erfc(-x * 0.7071067811865476)  # 1 / sqrt(2)


def gelu(x: ArrayLike, approximate: bool = False) -> jax.Array:
    r"""Gaussian error linear unit.

    Exact (default):

    .. math::
      f(x) = x\,\Phi(x) = \tfrac12\,x\,\operatorname{erfc}(-x/\sqrt2), \qquad
      f'(x) = \Phi(x) + x\,\varphi(x).

    With ``approximate=True`` the tanh form
    :math:`\tfrac12 x\,(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715 x^3)))` (derivatives differ from the
    exact ones by at most 8.7e-4).

    **Defaults differ between libraries:** ``jax.nn.gelu`` and ``keras.ops.gelu`` default to the
    tanh approximation, PyTorch (``approximate='none'``) and ``keras.activations.gelu`` to the exact
    form. gradkit picks the exact form, so ``gelu(x)`` equals PyTorch's ``F.gelu(x)`` and
    ``jax.nn.gelu(x, approximate=False)``. The function is smooth; its derivative is negative for
    :math:`x < -0.75` (minimum :math:`-0.1289` at :math:`x = -\sqrt2`) and has no zero-gradient
    region apart from isolated points and underflow.

    Args:
      x: floating-point array or Python float.
      approximate: use the tanh approximation (a Python bool, static under jit).

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point or ``approximate`` is not a bool.

    Example:
      >>> gelu(jnp.array([0.0, 1.0]))
      Array([0.       , 0.8413447], dtype=float32)
    """
    if not isinstance(approximate, bool):
        raise TypeError(f"gelu: approximate must be a Python bool; got {approximate!r}.")
    return _gelu(_float_input(x, "gelu"), approximate)


@jax.jit
def _silu(x):
    return x * lax.logistic(x)


def silu(x: ArrayLike) -> jax.Array:
    r"""SiLU, also called swish.

    .. math::
      f(x) = x\,\sigma(x), \qquad f'(x) = \sigma(x)\,\bigl(1 + x\,(1 - \sigma(x))\bigr).

    Smooth; the derivative has a minimum of :math:`-0.0998` at :math:`x \approx -2.40` and a
    maximum of 1.0998 at :math:`x \approx 2.40`.

    Args:
      x: floating-point array or Python float.

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> silu(jnp.array([0.0]))
      Array([0.], dtype=float32)
    """
    return _silu(_float_input(x, "silu"))


@jax.jit
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


def softplus(x: ArrayLike) -> jax.Array:
    r"""Softplus, computed stably as ``logaddexp(x, 0)``.

    .. math::
      f(x) = \log(1 + e^{x}), \qquad f'(x) = \sigma(x).

    Exact for all finite :math:`x` (no overflow for large :math:`x`). Unlike PyTorch, no switch to
    the identity above a threshold (``threshold=20`` there), so the derivative stays
    :math:`\sigma(x)`. It underflows to exactly 0 for very negative :math:`x`.

    Args:
      x: floating-point array or Python float.

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> softplus(jnp.array([0.0, 1000.0]))
      Array([6.931472e-01, 1.000000e+03], dtype=float32)
    """
    return _softplus(_float_input(x, "softplus"))


@jax.jit
def _mish(x):
    return x * jnp.tanh(jnp.logaddexp(x, 0.0))


def mish(x: ArrayLike) -> jax.Array:
    r"""Mish.

    .. math::
      f(x) = x \tanh(\operatorname{softplus}(x)), \qquad
      f'(x) = \tanh(s) + x\,(1 - \tanh^2 s)\,\sigma(x),\ s = \operatorname{softplus}(x).

    Smooth; :math:`f'(0) = \tanh(\log 2) = 0.6`, minimum :math:`-0.1125` at :math:`x \approx -2.26`.

    Args:
      x: floating-point array or Python float.

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> mish(jnp.array([0.0]))
      Array([0.], dtype=float32)
    """
    return _mish(_float_input(x, "mish"))


@jax.jit
def _log_sigmoid(x):
    return -jnp.logaddexp(-x, 0.0)


def log_sigmoid(x: ArrayLike) -> jax.Array:
    r"""Logarithm of the sigmoid, computed stably as ``-softplus(-x)``.

    .. math::
      f(x) = \log \sigma(x) = -\log(1 + e^{-x}), \qquad f'(x) = \sigma(-x) = 1 - \sigma(x).

    Finite for every finite :math:`x` (``log(sigmoid(x))`` is ``-inf`` in float32 below about
    :math:`-87.3`, where :math:`\sigma` underflows: XLA flushes subnormals to zero); use it
    instead of composing ``log`` and :func:`sigmoid`.

    Args:
      x: floating-point array or Python float.

    Returns:
      The activation, same dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point.

    Example:
      >>> log_sigmoid(jnp.array([-200.0]))
      Array([-200.], dtype=float32)
    """
    return _log_sigmoid(_float_input(x, "log_sigmoid"))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax_core(x, axis):
    unnormalized = jnp.exp(x - lax.stop_gradient(jnp.max(x, axis, keepdims=True)))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@_softmax_core.defjvp
def _softmax_core_jvp(axis, primals, tangents):
    (x,), (t,) = primals, tangents
    y = _softmax_core(x, axis)
    return y, y * (t - jnp.sum(y * t, axis, keepdims=True))


_softmax = jax.jit(_softmax_core, static_argnums=1)


def softmax(x: ArrayLike, axis: int | tuple[int, ...] = -1) -> jax.Array:
    r"""Softmax along ``axis``, computed stably (the maximum is subtracted first).

    .. math::
      s_i = \frac{e^{x_i}}{\sum_j e^{x_j}}, \qquad
      \frac{\partial s_i}{\partial x_j} = s_i(\delta_{ij} - s_j).

    The derivative is implemented as the JVP :math:`s \odot (t - \langle s, t\rangle)`, like
    ``jax.nn.softmax``. An element whose :math:`s_i` underflows to 0 receives exactly zero
    gradient; that is what ``get("softmax").zero_grad_mask`` reports. A slice whose entries are
    all :math:`-\infty` gives NaN, as in jax.nn.

    Args:
      x: floating-point array, e.g. ``(batch, classes)``.
      axis: the axis or tuple of axes to normalise over (static).

    Returns:
      Probabilities summing to 1 along ``axis``, same shape and dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point or ``axis`` is not an int/tuple of ints.
      ValueError: if ``axis`` is out of range.

    Example:
      >>> softmax(jnp.array([0.0, 0.0]))
      Array([0.5, 0.5], dtype=float32)
    """
    x = _float_input(x, "softmax")
    axis = _normalize_axis(axis, x.ndim, "softmax")
    if x.size == 0:  # nothing to normalise (the maximum of an empty slice is undefined)
        return x
    return _softmax(x, axis)


@functools.partial(jax.jit, static_argnums=1)
def _log_softmax(x, axis):
    shifted = x - lax.stop_gradient(jnp.max(x, axis, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis, keepdims=True))


def log_softmax(x: ArrayLike, axis: int | tuple[int, ...] = -1) -> jax.Array:
    r"""Logarithm of the softmax along ``axis``, computed stably.

    .. math::
      \log s_i = x_i - \max_k x_k - \log \sum_j e^{x_j - \max_k x_k}, \qquad
      \frac{\partial \log s_i}{\partial x_j} = \delta_{ij} - s_j.

    Finite wherever the inputs are finite: ``log(softmax(x))`` gives ``-inf`` values and NaN
    gradients once a probability underflows (e.g. ``[0, 200]`` in float32), this does not. No
    input gets an exactly zero gradient unless ``axis`` has length 1.

    Args:
      x: floating-point array, e.g. ``(batch, classes)``.
      axis: the axis or tuple of axes to normalise over (static).

    Returns:
      Log-probabilities, same shape and dtype as ``x``.

    Raises:
      TypeError: if ``x`` is not floating point or ``axis`` is not an int/tuple of ints.
      ValueError: if ``axis`` is out of range.

    Example:
      >>> log_softmax(jnp.array([0.0, 200.0]))
      Array([-200.,    0.], dtype=float32)
    """
    x = _float_input(x, "log_softmax")
    axis = _normalize_axis(axis, x.ndim, "log_softmax")
    if x.size == 0:
        return x
    return _log_softmax(x, axis)


# --------------------------------------------------------------------------------------------
# Surrogate gradients


def _resolve_callable(function: Any, argument: str) -> Callable[..., jax.Array]:
    if isinstance(function, (str, Activation)) or _registered_name(function) is not None:
        return get(function)  # a registered function brings its metadata (formula, peak)
    if not callable(function):
        raise TypeError(
            f"with_surrogate_grad: {argument} must be a callable, an Activation or a registered "
            f"name; got {type(function).__name__} {function!r}."
        )
    return function


def _keyword_parameters(function: Callable[..., Any]) -> set[str] | None:
    """The keyword parameters ``function(x, **params)`` takes, or None when it takes any (or its
    signature cannot be read)."""
    target = function.function if isinstance(function, Activation) else function
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = set()
    for position, parameter in enumerate(signature.parameters.values()):
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if position == 0 or parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            continue
        names.add(parameter.name)
    return names


def _bound_hint(function: Callable[..., Any], parameter: str, side: str) -> str:
    """How to write ``function`` with ``parameter`` bound, for an error message."""
    if isinstance(function, Activation):
        return f"get({function.name!r}, {parameter}=...)"
    return f"functools.partial({side}, {parameter}=...)"


def with_surrogate_grad(forward: Any, surrogate: Any) -> Activation:
    r"""Wraps ``forward`` so that its derivative is ``surrogate``'s (values stay ``forward``'s).

    .. math::
      f(x) = \mathrm{forward}(x), \qquad f'(x) := \mathrm{surrogate}'(x).

    This is surrogate-gradient training (a hard or step function in the forward pass, a smooth
    derivative in the backward pass). ``surrogate=identity`` gives the straight-through
    estimator; ``with_surrogate_grad("hard_sigmoid", "sigmoid")`` a hard sigmoid that trains like a
    sigmoid. Every derivative of any order comes from ``surrogate``: the JVP rule evaluates
    ``jax.jvp(surrogate, ...)`` and the value through the new function itself, so ``grad``,
    ``jvp``, ``vjp``, ``hessian``, ``jit`` and ``vmap`` compose.

    Args:
      forward: the function used for values: a callable ``f(x, **params)``, an
        :class:`Activation`, or a registered name.
      surrogate: the function whose derivative is used, same kinds as ``forward``. Its value is
        never used.

    Returns:
      An :class:`Activation` (callable as ``f(x, **params)``; keyword parameters are passed to
      both ``forward`` and ``surrogate``; ``f``'s derivative with respect to them is zero, while
      the surrogate slope it uses follows them, so a parameter's gradient of ``grad(f)`` is
      the surrogate's) whose
      ``zero_grad_mask``/``saturation_mask`` describe the surrogate derivative.

    Raises:
      TypeError: if ``forward`` or ``surrogate`` is not callable (when called: if ``x`` is not
        floating point).
      ValueError: if a name is not registered.

    Example:
      >>> ste_hard = with_surrogate_grad(get("hard_sigmoid", slope=0.2), identity)
      >>> float(ste_hard(3.0)), float(jax.grad(ste_hard)(3.0))
      (1.0, 1.0)
    """
    forward_fn = _resolve_callable(forward, "forward")
    surrogate_fn = _resolve_callable(surrogate, "surrogate")
    forward_name = _describe(forward_fn)
    surrogate_name = _describe(surrogate_fn)
    name = f"{forward_name}[grad={surrogate_name}]"

    functions = {"forward": forward_fn, "surrogate": surrogate_fn}
    takes = {side: _keyword_parameters(fn) for side, fn in functions.items()}
    described = {"forward": forward_name, "surrogate": surrogate_name}

    def surrogate_graded(x: ArrayLike, **params: Any) -> jax.Array:
        x = _float_input(x, name)
        for side, other in (("forward", "surrogate"), ("surrogate", "forward")):
            unknown = sorted(set(params) - takes[side]) if takes[side] is not None else []
            if not unknown:
                continue
            message = (
                f"{name}: keyword parameters go to both the forward function and the "
                f"surrogate, and the {side} {described[side]} does not take {unknown} (it "
                f"takes {sorted(takes[side]) or 'none'})"
            )
            if takes[other] is None or unknown[0] in takes[other]:
                message += (
                    f". To set {unknown[0]!r} of the {other} alone, bind it when wrapping: "
                    f"with_surrogate_grad({_bound_hint(functions[other], unknown[0], other)}, "
                    f"...)"
                    if other == "forward"
                    else f". To set {unknown[0]!r} of the {other} alone, bind it when "
                    f"wrapping: with_surrogate_grad(..., "
                    f"{_bound_hint(functions[other], unknown[0], other)})"
                )
            raise TypeError(message)
        # Array-valued parameters (possibly tracers of an enclosing grad or jit) are explicit
        # arguments of the custom JVP: a custom JVP must not close over tracers. Their own
        # tangents are dropped (parameters are not differentiated through f), but the rule's
        # slope is computed from them, so a derivative of the slope with respect to a
        # parameter (grad over alpha of grad over x) is the surrogate's.
        leaves, treedef = jax.tree_util.tree_flatten(params)
        dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]

        def bound(values: Sequence[Any]) -> dict[str, Any]:
            filled = list(leaves)
            for i, value in zip(dynamic, values, strict=True):
                filled[i] = value
            return jax.tree_util.tree_unflatten(treedef, filled)

        @jax.custom_jvp
        def f(x, *values):
            return forward_fn(x, **bound(values))

        @f.defjvp
        def f_jvp(primals, tangents):
            (x, *values), t = primals, tangents[0]
            out = f(x, *values)
            _, slope_times_t = jax.jvp(lambda u: surrogate_fn(u, **bound(values)), (x,), (t,))
            return out, jnp.asarray(slope_times_t).astype(out.dtype)

        return f(x, *(leaves[i] for i in dynamic))

    surrogate_graded.__name__ = name
    forward_entry = forward_fn if isinstance(forward_fn, Activation) else None
    surrogate_entry = surrogate_fn if isinstance(surrogate_fn, Activation) else None
    return Activation(
        name=name,
        function=surrogate_graded,
        formula=forward_entry.formula if forward_entry else f"{forward_name}(x)",
        derivative=(
            f"surrogate: d/dx {surrogate_name}(x)"
            + (f" = {surrogate_entry.derivative}" if surrogate_entry else "")
        ),
        output_range=forward_entry.output_range if forward_entry else (-math.inf, math.inf),
        zero_grad_region=(
            f"where d/dx {surrogate_name}(x) = 0"
            + (f" ({surrogate_entry.zero_grad_region})" if surrogate_entry else "")
        ),
        peak_derivative=_surrogate_peak(surrogate_entry),
    )


def _surrogate_peak(surrogate: Activation | None) -> float | Callable[..., float] | None:
    """The surrogate's peak derivative, evaluated with the parameters bound to the surrogate."""
    if surrogate is None or surrogate.peak_derivative is None:
        return None
    if not callable(surrogate.peak_derivative):
        return surrogate.peak_derivative
    return lambda params: surrogate.peak(**params)


def _describe(function: Callable[..., Any]) -> str:
    if isinstance(function, Activation):
        if function.params:
            bound = ", ".join(f"{k}={v!r}" for k, v in function.params)
            return f"{function.name}({bound})"
        return function.name
    return getattr(function, "__name__", type(function).__name__)


# --------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True, eq=False)
class Activation:
    r"""A registered activation: callable, with its maths and its zero-gradient region.

    Calling it applies ``function`` with the bound ``params`` (keyword arguments given at call
    time override them).

    Attributes:
      name: registry name, e.g. ``"hard_sigmoid"``.
      function: the activation, ``function(x, **params)``.
      formula: the formula as text.
      derivative: the derivative and its convention at kinks, as text.
      output_range: ``(low, high)`` bounds of the output (may be ``-inf``/``inf``; bounds are
        for the default parameters).
      zero_grad_region: where the derivative is exactly zero, as text.
      peak_derivative: the supremum of :math:`|f'|` for the default parameters (``None`` if
        unknown), or a callable ``params -> float`` when it depends on them.
      params: keyword parameters bound by :func:`get`, as sorted ``(name, value)`` pairs.
      elementwise: whether ``f`` acts elementwise (softmax and log_softmax do not).
      jacobian_diagonal: for non-elementwise activations, ``(x, **params) -> d f_i / d x_i``.
      zero_grad_fn: for non-elementwise activations, ``(x, **params) -> bool mask``.

    Example:
      >>> act = get("relu")
      >>> act.output_range
      (0.0, inf)
      >>> act.zero_grad_mask(jnp.array([-1.0, 0.0, 1.0]))
      Array([ True,  True, False], dtype=bool)
    """

    name: str
    function: Callable[..., jax.Array]
    formula: str = ""
    derivative: str = ""
    output_range: tuple[float, float] = (-math.inf, math.inf)
    zero_grad_region: str = ""
    peak_derivative: float | Callable[[Mapping[str, Any]], float] | None = None
    params: tuple[tuple[str, Any], ...] = ()
    elementwise: bool = True
    jacobian_diagonal: Callable[..., jax.Array] | None = dataclasses.field(default=None, repr=False)
    zero_grad_fn: Callable[..., jax.Array] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Activation: name must be a non-empty str; got {self.name!r}.")
        if not callable(self.function):
            raise TypeError(
                f"Activation {self.name!r}: function must be callable; got "
                f"{type(self.function).__name__}."
            )
        low, high = self.output_range
        if not low <= high:
            raise ValueError(
                f"Activation {self.name!r}: output_range must be (low, high) with low <= high; "
                f"got {self.output_range!r}."
            )

    def __call__(self, x: ArrayLike, **params: Any) -> jax.Array:
        return self.function(x, **self._merged(params))

    def _merged(self, params: Mapping[str, Any]) -> dict[str, Any]:
        merged = dict(self.params)
        merged.update(params)
        return merged

    def bind(self, **params: Any) -> Activation:
        """Returns a copy with ``params`` bound (merged with the ones already bound).

        Raises:
          ValueError: if a parameter is not accepted by the activation.
        """
        _check_params(self, params)
        merged = self._merged(params)
        return dataclasses.replace(self, params=tuple(sorted(merged.items())))

    def derivative_at(self, x: ArrayLike, **params: Any) -> jax.Array:
        r"""The derivative gradkit uses, evaluated elementwise: :math:`f'(x)`.

        For elementwise activations this is the VJP with cotangent 1, i.e. exactly what
        ``jax.grad`` computes (conventions at kinks and float underflow included). For softmax
        and log_softmax it is the Jacobian diagonal :math:`\partial f_i / \partial x_i`.

        Args:
          x: floating-point array.
          **params: parameter overrides.

        Returns:
          An array like ``x``.
        """
        merged = self._merged(params)
        if not self.elementwise:
            if self.jacobian_diagonal is None:
                raise ValueError(f"Activation {self.name!r} defines no jacobian_diagonal.")
            return self.jacobian_diagonal(x, **merged)
        x = _float_input(x, f"{self.name}.derivative_at")
        key = tuple(sorted(merged.items()))
        try:
            hash(key)
        except TypeError:  # array-valued parameters: trace without the compilation cache
            return _elementwise_derivative(self.function, key, x)
        return _elementwise_derivative_jit(self.function, key, x)

    def zero_grad_mask(self, x: ArrayLike, **params: Any) -> jax.Array:
        r"""True exactly where gradkit's derivative is exactly zero.

        Includes the declared zero-gradient region (e.g. :math:`x \le 0` for relu) and the points
        where the derivative underflows in ``x``'s dtype (e.g. float32 sigmoid for
        :math:`x \gtrsim 16.64`). For softmax: where input :math:`i` receives zero gradient for
        every cotangent (the Jacobian column is zero).

        Args:
          x: floating-point array of pre-activations.
          **params: parameter overrides.

        Returns:
          A bool array with the shape of ``x``.
        """
        if self.zero_grad_fn is not None:
            return self.zero_grad_fn(x, **self._merged(params))
        return self.derivative_at(x, **params) == 0

    def saturation_mask(
        self, x: ArrayLike, *, threshold: float = SATURATION_THRESHOLD, **params: Any
    ) -> jax.Array:
        r"""True where the unit is saturated: :math:`|f'(x)| < \text{threshold} \cdot \max|f'|`.

        The default threshold, :data:`SATURATION_THRESHOLD` :math:`= \sigma'(5)/\sigma'(0)
        \approx 0.0266`, makes the sigmoid's mask :math:`|x| > 5` (the points :math:`\pm 5`
        themselves fall either side, as :math:`\sigma'(\pm 5)` rounds), DeepDiagnosis's rule
        for saturated sigmoid/tanh units (Wardat et al., ICSE 2022); for tanh it is
        :math:`|x| \gtrsim 2.5`, and for relu it is the dead region :math:`x \le 0`. It always
        contains ``zero_grad_mask``. Non-monotone activations (gelu, silu, mish) are also flagged
        in the thin band where their derivative crosses zero.

        Args:
          x: floating-point array of pre-activations.
          threshold: fraction of the peak derivative, in ``[0, 1]``.
          **params: parameter overrides.

        Returns:
          A bool array with the shape of ``x``.

        Raises:
          ValueError: if ``threshold`` is outside ``[0, 1]`` or the peak derivative is unknown.
        """
        if not isinstance(threshold, jax.core.Tracer):  # a traced threshold cannot be checked
            real = (
                not isinstance(threshold, bool)
                and np.ndim(threshold) == 0
                and np.issubdtype(np.asarray(threshold).dtype, np.number)
                and not np.iscomplexobj(threshold)
            )
            if not real or not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(
                    f"{self.name}.saturation_mask: threshold must be a real number in [0, 1]; "
                    f"got {threshold!r}."
                )
        peak = self.peak(**params)
        slope = jnp.abs(self.derivative_at(x, **params))
        return (slope < threshold * peak) | self.zero_grad_mask(x, **params)

    def peak(self, **params: Any) -> float | jax.Array:
        """The supremum of :math:`|f'|` for the bound parameters (and overrides).

        A float for scalar parameters; an array (one peak per element) for array-valued
        parameters, and for parameters traced by ``jit``, ``vmap`` or ``grad``.
        """
        if self.peak_derivative is None:
            raise ValueError(
                f"Activation {self.name!r} declares no peak_derivative, so saturation is "
                "undefined; pass peak_derivative= when constructing it, or (for a "
                "with_surrogate_grad wrapper, which takes its surrogate's) use a registered "
                "surrogate such as 'sigmoid' or 'tanh', or dataclasses.replace(wrapper, "
                "peak_derivative=...)."
            )
        value = self.peak_derivative
        if callable(value):
            value = value(self._merged(params))
        try:
            return float(value)
        except TypeError:  # an array of several values, or a tracer
            return jnp.asarray(value)


def _elementwise_derivative(function, params, x):
    _, pullback = jax.vjp(lambda u: function(u, **dict(params)), x)
    return pullback(jnp.ones_like(x))[0]


_elementwise_derivative_jit = jax.jit(_elementwise_derivative, static_argnums=(0, 1))


def _check_params(activation: Activation, params: Mapping[str, Any]) -> None:
    accepted = _ACCEPTED_PARAMS.get(activation.name)
    if accepted is None:  # not a builtin: what its function's signature takes, if it says
        accepted = _keyword_parameters(activation.function)
        if accepted is None:
            return
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"activation {activation.name!r} takes no parameter(s) {unknown}; it accepts "
            f"{sorted(accepted) if accepted else 'none'}."
        )


def _softmax_diagonal(x, axis=-1):
    s = softmax(x, axis)
    return s * (1 - s)


def _log_softmax_diagonal(x, axis=-1):
    return 1 - softmax(x, axis)


def _softmax_zero_grad(x, axis=-1):
    s = softmax(x, axis)
    axes = _normalize_axis(axis, s.ndim, "softmax")
    nonzero = jnp.sum(s != 0, axes, keepdims=True)
    # Column i of the Jacobian, s_j (delta_ij - s_i), is zero iff s_i == 0, or s_i == 1 with every
    # other s_j == 0.
    return (s == 0) | ((s == 1) & (nonzero == 1))


def _log_softmax_zero_grad(x, axis=-1):
    x = _float_input(x, "log_softmax")
    axes = _normalize_axis(axis, x.ndim, "log_softmax")
    size = math.prod(x.shape[a] for a in axes)
    # Column j of the Jacobian, delta_ij - s_j, always has a nonzero entry unless size == 1.
    return jnp.full(x.shape, size == 1)


_ACCEPTED_PARAMS: dict[str, tuple[str, ...]] = {}
_REGISTRY: dict[str, Activation] = {}


def register(activation: Activation, *, overwrite: bool = False) -> Activation:
    """Adds an activation to the registry so :func:`get` finds it by name.

    Args:
      activation: an :class:`Activation`. Its ``function`` must act elementwise unless
        ``elementwise=False`` and ``jacobian_diagonal`` are given.
      overwrite: replace an existing entry of the same name.

    Returns:
      ``activation``.

    Raises:
      TypeError: if ``activation`` is not an :class:`Activation`.
      ValueError: if the name is taken and ``overwrite`` is False.

    Example:
      >>> cube = Activation("my_cube", lambda x: x**3, formula="x**3", derivative="3 x**2")
      >>> _ = register(cube, overwrite=True)
      >>> float(get("my_cube").derivative_at(2.0))
      12.0
    """
    if not isinstance(activation, Activation):
        raise TypeError(
            f"register: activation must be an Activation; got {type(activation).__name__}."
        )
    if activation.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"register: an activation named {activation.name!r} is already registered; pass "
            "overwrite=True to replace it."
        )
    if not activation.elementwise and activation.jacobian_diagonal is None:
        raise ValueError(
            f"register: non-elementwise activation {activation.name!r} needs jacobian_diagonal."
        )
    # A replaced entry's parameter names are not the new function's.
    _ACCEPTED_PARAMS.pop(activation.name, None)
    _REGISTRY[activation.name] = activation
    return activation


def _registered_name(function: Any) -> str | None:
    """The name under which ``function`` (by identity) is registered now, if any: a replaced
    function no longer stands for its old name."""
    return next((name for name, entry in _REGISTRY.items() if entry.function is function), None)


def names() -> list[str]:
    """All registered activation names, sorted.

    Example:
      >>> "ultra_fast_sigmoid" in names()
      True
    """
    return sorted(_REGISTRY)


def get(activation: str | Activation | Callable[..., Any], **params: Any) -> Activation:
    """Looks up an activation by name (or returns the one given), optionally binding parameters.

    Args:
      activation: a registered name, an :class:`Activation` (returned as is, or re-bound if
        ``params`` are given), or one of this module's activation functions (e.g.
        ``activations.relu``).
      **params: keyword parameters to bind, e.g. ``get("hard_sigmoid", slope=0.2)``.

    Returns:
      The :class:`Activation`.

    Raises:
      ValueError: for an unknown name (the message lists close matches) or an unknown parameter.
      TypeError: for anything else.

    Example:
      >>> get("hard_sigmoid", slope=0.2)(jnp.array([1.0]))
      Array([0.7], dtype=float32)
    """
    if isinstance(activation, Activation):
        return activation.bind(**params) if params else activation
    if isinstance(activation, str):
        entry = _REGISTRY.get(activation)
        if entry is None:
            close = difflib.get_close_matches(activation, list(_REGISTRY), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"unknown activation {activation!r}{hint} Known activations: {', '.join(names())}."
            )
        return entry.bind(**params) if params else entry
    name = _registered_name(activation) if callable(activation) else None
    if name is not None:
        return get(name, **params)
    raise TypeError(
        "get: activation must be a registered name, an Activation or a gradkit activation "
        f"function; got {type(activation).__name__} {activation!r}. Wrap your own function in "
        "Activation(name, function, ...) and register() it."
    )


def _builtin(
    name: str,
    function: Callable[..., jax.Array],
    formula: str,
    derivative: str,
    output_range: tuple[float, float],
    zero_grad_region: str,
    peak_derivative: float | Callable[[Mapping[str, Any]], float],
    accepted: tuple[str, ...] = (),
    **extra: Any,
) -> None:
    register(
        Activation(
            name=name,
            function=function,
            formula=formula,
            derivative=derivative,
            output_range=output_range,
            zero_grad_region=zero_grad_region,
            peak_derivative=peak_derivative,
            **extra,
        )
    )
    _ACCEPTED_PARAMS[name] = accepted


def _magnitude(value: Any, at_least: float = 0.0) -> float | jax.Array:
    """``max(at_least, |value|)``: a float for a Python number, else an array (elementwise),
    so that array-valued and traced parameters give a peak too."""
    if isinstance(value, int | float):
        return max(at_least, abs(float(value)))
    return jnp.maximum(at_least, jnp.abs(value))


_INF = math.inf
_UFS_LOW = 0.5 * (1.0 - _UFS_CEILING)

_builtin(
    "sigmoid",
    sigmoid,
    "1 / (1 + exp(-x))",
    "sigmoid(x) * (1 - sigmoid(x)), at most 1/4",
    (0.0, 1.0),
    "none mathematically; in floating point where sigmoid rounds to 1 (float32 x >~ 16.64) or "
    "underflows (float32 x <~ -87.3)",
    0.25,
)
_builtin(
    "tanh",
    tanh,
    "tanh(x)",
    "1 - tanh(x)**2",
    (-1.0, 1.0),
    "none mathematically; in floating point where tanh rounds to +-1 (float32 |x| >~ 8.0)",
    1.0,
)
_builtin("identity", identity, "x", "1", (-_INF, _INF), "none", 1.0)
_builtin(
    "ultra_fast_sigmoid",
    ultra_fast_sigmoid,
    "a = |x|/2; z = 1.5a/(1+a) if a < 1.7, 0.935409070603099 + 0.0458812946797165 (a - 1.7) if "
    "a < 3, else 0.99505475368673; 0.5 (sign(x) z + 1)  (Theano)",
    "0.375 / (1 + |x|/2)**2 for |x| < 3.4 (0.375 at 0); 0.0114703 for 3.4 <= |x| < 6; 0 for "
    "|x| >= 6. The value jumps by -0.0045 at |x| = 3.4",
    (_UFS_LOW, 1.0 - _UFS_LOW),
    "|x| >= 6",
    0.375,
)
_builtin(
    "hard_sigmoid",
    hard_sigmoid,
    "clip(slope * x + shift, 0, 1); default slope 1/6, shift 0.5 (jax.nn, PyTorch, Keras 3); "
    "Theano/Keras 2: slope 0.2",
    "slope where 0 < slope * x + shift < 1, else 0 (0 at the boundaries)",
    (0.0, 1.0),
    "slope * x + shift <= 0 or >= 1 (defaults: |x| >= 3; slope 0.2: |x| >= 2.5)",
    lambda p: _magnitude(p.get("slope", 1.0 / 6.0)),
    ("slope", "shift"),
)
_builtin(
    "hard_tanh",
    hard_tanh,
    "clip(x, -1, 1)",
    "1 for -1 < x < 1, else 0 (0 at x = +-1)",
    (-1.0, 1.0),
    "|x| >= 1",
    1.0,
)
_builtin(
    "relu",
    relu,
    "max(x, 0)",
    "1 for x > 0, 0 for x <= 0 (relu'(0) = 0)",
    (0.0, _INF),
    "x <= 0",
    1.0,
)
_builtin(
    "relu6",
    relu6,
    "min(max(x, 0), 6)",
    "1 for 0 < x < 6, else 0 (0 at x = 0 and x = 6)",
    (0.0, 6.0),
    "x <= 0 or x >= 6",
    1.0,
)
_builtin(
    "leaky_relu",
    leaky_relu,
    "x if x > 0 else negative_slope * x (negative_slope 0.01)",
    "1 for x > 0, negative_slope for x <= 0",
    (-_INF, _INF),
    "none (unless negative_slope = 0: x <= 0)",
    lambda p: _magnitude(p.get("negative_slope", 0.01), at_least=1.0),
    ("negative_slope",),
)
_builtin(
    "elu",
    elu,
    "x if x > 0 else alpha * (exp(x) - 1) (alpha 1)",
    "1 for x > 0, alpha * exp(x) for x <= 0 (alpha at 0)",
    (-1.0, _INF),
    "none mathematically; underflow of exp(x) (float32 x <~ -87.3)",
    lambda p: _magnitude(p.get("alpha", 1.0), at_least=1.0),
    ("alpha",),
)
_builtin(
    "selu",
    selu,
    "scale * (x if x > 0 else alpha * (exp(x) - 1)), scale 1.0507009873554805, "
    "alpha 1.6732632423543772",
    "scale for x > 0, scale * alpha * exp(x) for x <= 0 (1.7581 at 0)",
    (-_SELU_SCALE * _SELU_ALPHA, _INF),
    "none mathematically; underflow of exp(x) (float32 x <~ -87.3)",
    _SELU_SCALE * _SELU_ALPHA,
)
_builtin(
    "gelu",
    gelu,
    "x * Phi(x) = 0.5 x erfc(-x / sqrt(2)); approximate=True: "
    "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))",
    "Phi(x) + x phi(x), minimum -0.1289 at x = -sqrt(2)",
    (-0.1701, _INF),
    "none (isolated zero of the derivative near x = -0.75; underflow for very negative x)",
    lambda p: 1.128993068655481 if p.get("approximate", False) else 1.1289041451825208,
    ("approximate",),
)
_builtin(
    "silu",
    silu,
    "x * sigmoid(x)",
    "sigmoid(x) (1 + x (1 - sigmoid(x))), minimum -0.0998 at x = -2.40",
    (-0.2785, _INF),
    "none (isolated zero of the derivative near x = -1.28; underflow for very negative x)",
    1.0998393201285284,
)
_builtin(
    "mish",
    mish,
    "x * tanh(softplus(x))",
    "tanh(sp) + x (1 - tanh(sp)**2) sigmoid(x), sp = softplus(x); 0.6 at 0",
    (-0.3089, _INF),
    "none (isolated zero of the derivative near x = -1.19; underflow for very negative x)",
    1.0884981612515674,
)
_builtin(
    "softplus",
    softplus,
    "log(1 + exp(x))",
    "sigmoid(x)",
    (0.0, _INF),
    "none mathematically; underflow of sigmoid(x) for very negative x",
    1.0,
)
_builtin(
    "log_sigmoid",
    log_sigmoid,
    "-log(1 + exp(-x))",
    "sigmoid(-x)",
    (-_INF, 0.0),
    "none mathematically; where sigmoid(-x) underflows (very large x)",
    1.0,
)
_builtin(
    "softmax",
    softmax,
    "exp(x_i) / sum_j exp(x_j) along axis",
    "d s_i / d x_j = s_i (delta_ij - s_j)",
    (0.0, 1.0),
    "inputs whose probability underflows to 0 (their Jacobian column is zero)",
    0.25,
    ("axis",),
    elementwise=False,
    jacobian_diagonal=_softmax_diagonal,
    zero_grad_fn=_softmax_zero_grad,
)
_builtin(
    "log_softmax",
    log_softmax,
    "x_i - log sum_j exp(x_j) along axis",
    "d log s_i / d x_j = delta_ij - s_j",
    (-_INF, 0.0),
    "none (unless the axis has length 1)",
    1.0,
    ("axis",),
    elementwise=False,
    jacobian_diagonal=_log_softmax_diagonal,
    zero_grad_fn=_log_softmax_zero_grad,
)
