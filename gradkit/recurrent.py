r"""Recurrent scans with explicit truncated-BPTT semantics, remat and masks; RNN/GRU/LSTM cells.

:func:`scan` is ``jax.lax.scan`` with three extra, orthogonal knobs: ``truncate`` (how far a
cotangent may travel back in time), ``remat`` (what the backward pass stores versus recomputes)
and ``mask`` (padded steps). The forward values never depend on ``truncate`` or ``remat``.
The cells :class:`SimpleRNN`, :class:`GRU` and :class:`LSTM` act on one example and are batched
with ``vmap``; :class:`RNN` is a Lasagne-style layer over ``(batch, time, features)`` input.
:func:`tbptt_value_and_grad` is streaming truncated BPTT whose memory grows with the truncation
length, not with the sequence length.

Truncation semantics
--------------------
Write :math:`h_t = f(h_{t-1}, x_t; \theta)` and :math:`L = \sum_s \ell_s`. One rule covers every
mode: **a cotangent may cross at most k applications of the step function; past that it is
dropped**. Steps are counted in processing order (from the end when ``reverse=True``), and masked
steps count.

* :class:`Full` (the default; also ``None``, and any ``k >= T``): exact BPTT.
* :class:`Chunked` ``(k)`` (a plain ``int`` k means this): Williams & Peng TBPTT(k, k); the carry's
  gradient is cut where it enters steps ``k, 2k, ...`` (0-based).
* :class:`Window` ``(k)``: TBPTT(1, k); every output back-propagates exactly k steps, its own
  included, uniformly in s:

  .. math::
     \frac{dL}{d\theta} = \sum_s \sum_{t=s-k+1}^{s} \frac{\partial \ell_s}{\partial h_s}
     \frac{\partial h_s}{\partial h_{s-1}} \cdots \frac{\partial h_{t+1}}{\partial h_t}
     \frac{\partial h_t}{\partial \theta}.

* :class:`TheanoTail` ``(k)``: what Theano's ``scan(truncate_gradient=k)`` and Lasagne's
  ``gradient_steps=k`` compute. Only for reproducing old results.

When the step ignores its carry, every mode except :class:`TheanoTail` gives exactly the
feed-forward gradient. Truncation by itself saves neither memory nor time in JAX; ``remat`` and
:func:`tbptt_value_and_grad` do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun
from jax.typing import ArrayLike

from gradkit._recurrent_window import WindowSpec, gradkit_window_truncation

PyTree = Any
Step = Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "Chunked",
    "Full",
    "SimpleRNN",
    "TheanoTail",
    "Truncation",
    "Window",
    "scan",
    "tbptt_value_and_grad",
]


# --------------------------------------------------------------------------------------------
# Truncation modes
# --------------------------------------------------------------------------------------------


def _check_steps(k: Any, owner: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{owner}(k) needs an integer number of steps k >= 1; got {k!r}")
    if k < 1:
        raise ValueError(
            f"{owner}(k) needs k >= 1 (a cotangent must at least cross the step that produced "
            f"it); got k={k}"
        )
    return int(k)


class Truncation:
    """Base class of the truncation modes :class:`Full`, :class:`Chunked`, :class:`Window`,
    :class:`TheanoTail`."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True, repr=False)
class Full(Truncation):
    """Exact backpropagation through time, identical to ``jax.grad`` of ``jax.lax.scan``.

    Example:
      >>> Full()
      Full()
    """

    def __repr__(self) -> str:
        return "Full()"


@dataclasses.dataclass(frozen=True, repr=False)
class _StepCount(Truncation):
    """A truncation with a number of steps ``k >= 1``, checked on construction."""

    k: int

    def __post_init__(self):
        object.__setattr__(self, "k", _check_steps(self.k, type(self).__name__))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.k})"


@dataclasses.dataclass(frozen=True, repr=False)
class Chunked(_StepCount):
    r"""TBPTT(k, k) of Williams & Peng: the sequence is cut into chunks of k steps.

    The carry's gradient is cut where it enters steps ``k, 2k, ...`` (0-based, in processing
    order), so the output of the j-th step of a chunk back-propagates through j + 1 steps and
    never further than k. ``Chunked(1)`` is the feed-forward gradient of each step. A plain
    ``int`` passed as ``truncate=`` means ``Chunked(k)``.

    Args:
      k: chunk length in steps, ``k >= 1``; ``k >= T`` equals :class:`Full`.

    Raises:
      TypeError: if ``k`` is not an integer.
      ValueError: if ``k < 1``.

    Example:
      >>> Chunked(10)
      Chunked(10)

    References:
      R. J. Williams and J. Peng, "An efficient gradient-based algorithm for on-line training
      of recurrent network trajectories", Neural Computation 2(4), 1990.
    """


@dataclasses.dataclass(frozen=True, repr=False)
class Window(_StepCount):
    r"""TBPTT(1, k): every output back-propagates exactly k steps, its own step included.

    Unlike :class:`Chunked`, the truncation is uniform in time: the loss at every step sees the
    same k-step horizon. This needs a custom VJP (the reverse pass keeps the last k
    carry-adjoints apart, k carry-VJPs per step), so only reverse-mode differentiation
    (``grad``, ``vjp``, and forward-over-reverse) is supported; ``jax.jvp`` raises ``TypeError``.
    The reverse pass stores the carry entering every step (every c-th step with ``remat=c``,
    recomputing the chunk) and recomputes each step's VJP from it.

    Args:
      k: window length in steps, ``k >= 1``; ``k >= T`` equals :class:`Full`.

    Raises:
      TypeError: if ``k`` is not an integer.
      ValueError: if ``k < 1``.

    Example:
      >>> Window(3)
      Window(3)
    """


@dataclasses.dataclass(frozen=True, repr=False)
class TheanoTail(_StepCount):
    r"""Theano's ``scan(truncate_gradient=k)``: only the last k steps of the backward pass run.

    This is what Lasagne's ``gradient_steps=k`` computed. Every loss term at a step before the
    last k contributes **nothing**, not even its direct term, and neither ``init`` nor the inputs
    of those steps receive a gradient. With a loss summed over T steps, the gradient is therefore
    about k/T of the true one even when the recurrence is switched off, which is the surprise in
    the Lasagne report this class exists to reproduce (T = 10,000, k = 1: a gradient 1e-4 of the
    finite difference). It is never the default; use :class:`Chunked` or :class:`Window` for
    truncated BPTT, and this only to reproduce old results.

    Args:
      k: number of backward steps that run, ``k >= 1``; ``k >= T`` equals :class:`Full`.

    Raises:
      TypeError: if ``k`` is not an integer.
      ValueError: if ``k < 1``.

    Example:
      >>> TheanoTail(1)
      TheanoTail(1)
    """


def _as_truncation(truncate: Any) -> Truncation:
    if truncate is None:
        return Full()
    if isinstance(truncate, Truncation):
        return truncate
    if isinstance(truncate, (int, np.integer)) and not isinstance(truncate, bool):
        return Chunked(truncate)
    hint = ""
    if isinstance(truncate, str):
        hint = ' (RNN\'s truncate_mode takes the strings "chunked" and "window")'
    raise TypeError(
        "truncate must be None, an int k (meaning Chunked(k)), or one of Full(), Chunked(k), "
        f"Window(k), TheanoTail(k); got {truncate!r}{hint}"
    )


def _marker(mode: Truncation) -> str:
    """Name scope carried by the equations where ``mode`` drops a cotangent on purpose."""
    return f"gradkit_truncation[{mode!r}]"


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _path(prefix: str, key_path) -> str:
    return prefix + jax.tree_util.keystr(key_path)


def _time_length(xs: PyTree, length: int | None, who: str = "scan") -> int:
    leaves = jax.tree_util.tree_flatten_with_path(xs)[0]
    lengths = {}
    for key_path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{who}: every leaf of xs needs a leading time axis; {_path('xs', key_path)} is a "
                "scalar"
            )
        lengths[_path("xs", key_path)] = shape[0]
    distinct = sorted(set(lengths.values()))
    if len(distinct) > 1:
        listing = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"{who}: the leaves of xs disagree on the number of time steps: {listing}")
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"{who}: length must be a non-negative int; got {length!r}")
        if distinct and distinct[0] != length:
            raise ValueError(
                f"{who}: length={length} but the leaves of xs have {distinct[0]} steps"
            )
        return int(length)
    if not distinct:
        if who == "scan":
            raise ValueError(
                f"{who}: xs has no leaves, so pass length= to say how many steps to run"
            )
        raise ValueError(f"{who}: xs has no leaves: it needs a sequence with a leading time axis")
    return int(distinct[0])


def _resolve_remat(remat: Any, length: int) -> str | int | None:
    if remat is None or remat == "step":
        return remat
    if remat == "sqrt":
        return max(1, round(math.sqrt(length)))
    if isinstance(remat, (int, np.integer)) and not isinstance(remat, bool):
        if remat < 1:
            raise ValueError(f"scan: remat chunk length must be >= 1; got remat={remat}")
        return int(remat)
    raise ValueError(
        f'scan: remat must be None, "step", "sqrt" or an int chunk length >= 1; got {remat!r}'
    )


def _check_unroll(unroll: Any, who: str = "scan") -> int | bool:
    if isinstance(unroll, bool):
        return unroll
    if not isinstance(unroll, (int, np.integer)) or unroll < 1:
        raise ValueError(f"{who}: unroll must be a bool or an int >= 1; got {unroll!r}")
    return int(unroll)


def _aval_text(leaf: Any) -> str:
    return f"{jnp.result_type(leaf).name}{list(jnp.shape(leaf))}"


def _checked(
    step: Step, init: PyTree, who: str = "scan", call: str = "step(carry, x)", output: str = "y"
) -> Step:
    """Wraps ``step`` so that a carry that differs from ``init`` raises a readable error.

    ``who`` is the function the user called, ``call`` how it calls the user's step and
    ``output`` the name of the step's second result, for the messages.
    """
    step_name = call.split("(")[0]
    init_tree = jax.tree.structure(init)
    init_leaves = jax.tree_util.tree_flatten_with_path(init)[0]

    def checked_step(carry, x):
        out = step(carry, x)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(
                f"{who}: {call} must return a pair (new_carry, {output}); got "
                + (
                    f"{type(out).__name__} of length {len(out)}"
                    if isinstance(out, (tuple, list))
                    else f"one {_aval_text(out)}"
                    if hasattr(out, "shape") and hasattr(out, "dtype")
                    else type(out).__name__
                )
            )
        new_carry, y = out
        new_tree = jax.tree.structure(new_carry)
        if new_tree != init_tree:
            raise TypeError(
                f"{who}: {step_name} must return a carry with the same pytree structure as init; "
                f"init is {init_tree} but step returned {new_tree}"
            )
        problems = []
        new_leaves = jax.tree.leaves(new_carry)
        for (key_path, old), new in zip(init_leaves, new_leaves, strict=True):
            same_shape = jnp.shape(old) == jnp.shape(new)
            same_dtype = jnp.result_type(old) == jnp.result_type(new)
            if not (same_shape and same_dtype):
                problems.append(
                    f"{_path('carry', key_path)} is {_aval_text(old)} in init but "
                    f"{_aval_text(new)} after the step"
                )
        if problems:
            raise TypeError(
                f"{who}: {step_name} must return a carry with the same shapes and dtypes as init: "
                + "; ".join(problems)
            )
        # Weakly typed init leaves (Python scalars) must not make lax.scan reject the carry.
        new_carry = jax.tree.map(lambda n, o: lax.convert_element_type(n, o.dtype), new_carry, init)
        return new_carry, y

    return checked_step


def _step_input_shapes(xs: PyTree) -> PyTree:
    """Shapes and dtypes of one step's input (also when xs has no steps)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs)


def _promote_weak_init(step: Step, init: PyTree, xs: PyTree) -> PyTree:
    """Gives weakly typed init leaves (Python scalars) the dtype the step returns, as lax.scan does.

    With float64 enabled a Python ``0.0`` is a weak float64, and a step that computes in float32
    returns a float32 carry; ``lax.scan`` accepts this by promoting the init, and so does
    :func:`scan`. Leaves that are not weakly typed must match exactly (:func:`_checked` says
    where they do not).
    """
    leaves = jax.tree.leaves(init)
    if not any(jax.typeof(leaf).weak_type for leaf in leaves):
        return init
    try:
        out = jax.eval_shape(step, init, _step_input_shapes(xs))
    except Exception:  # the checked step raises the readable error when it runs
        return init
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return init
    if jax.tree.structure(out[0]) != jax.tree.structure(init):
        return init

    def promote(leaf, new):
        if not jax.typeof(leaf).weak_type or jnp.shape(leaf) != new.shape:
            return leaf
        return lax.convert_element_type(leaf, jnp.result_type(leaf, new))

    return jax.tree.map(promote, init, out[0])


def _as_mask(mask: ArrayLike, length: int) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.ndim == 0 or mask.shape[0] != length:
        raise ValueError(
            f"scan: mask must be time-major with {length} steps on its first axis, like xs; got "
            f"mask of shape {tuple(mask.shape)}"
        )
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _expand_mask(m: jax.Array, leaf: Any, what: str, mask_shape: tuple) -> jax.Array:
    shape = jnp.shape(leaf)
    ok = m.ndim <= len(shape)
    if ok:
        expanded = m.shape + (1,) * (len(shape) - m.ndim)
        ok = all(a in (1, b) for a, b in zip(expanded, shape, strict=True))
    if not ok:
        raise ValueError(
            f"scan: mask of shape {mask_shape} does not broadcast against {what} of shape "
            f"{tuple(shape)}: the mask's per-step shape {tuple(m.shape)} must match the leading "
            "(batch) axes of every carry and output leaf"
        )
    return m.reshape(expanded)


def _masked(step: Step, mask_shape: tuple) -> Step:
    def masked_step(carry, x_and_mask):
        x, m = x_and_mask
        new_carry, y = step(carry, x)
        new_carry = jax.tree_util.tree_map_with_path(
            lambda p, n, o: jnp.where(_expand_mask(m, n, _path("carry", p), mask_shape), n, o),
            new_carry,
            carry,
        )
        y = jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.where(
                _expand_mask(m, a, _path("y", p), mask_shape), a, jnp.zeros_like(a)
            ),
            y,
        )
        return new_carry, y

    return masked_step


# --------------------------------------------------------------------------------------------
# Scanning with rematerialisation
# --------------------------------------------------------------------------------------------


def _tree_slice(tree: PyTree, start: int, stop: int) -> PyTree:
    return jax.tree.map(lambda a: a[start:stop], tree)


def _tree_concat(first: PyTree, second: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)


def _remat_scan(body: Step, init, xs, *, remat, reverse: bool, unroll, length: int):
    """``lax.scan`` that stores every carry (``"step"``) or every c-th carry (int c)."""
    if remat is None:
        return lax.scan(body, init, xs, length=length, reverse=reverse, unroll=unroll)
    if remat == "step" or remat == 1:
        return lax.scan(
            jax.checkpoint(body, prevent_cse=False),
            init,
            xs,
            length=length,
            reverse=reverse,
            unroll=unroll,
        )
    c = remat
    n, r = divmod(length, c)
    if n == 0:
        return lax.scan(body, init, xs, length=length, reverse=reverse, unroll=unroll)

    @jax.checkpoint
    def chunk_body(carry, x_chunk):
        return lax.scan(body, carry, x_chunk, length=c, reverse=reverse, unroll=unroll)

    # Full chunks first in processing order; the r leftover steps are processed last.
    main_start = r if reverse else 0
    xs_main = jax.tree.map(
        lambda a: a[main_start : main_start + n * c].reshape((n, c, *a.shape[1:])), xs
    )
    carry, ys_main = lax.scan(chunk_body, init, xs_main, length=n, reverse=reverse)
    ys_main = jax.tree.map(lambda a: a.reshape((n * c, *a.shape[2:])), ys_main)
    if r == 0:
        return carry, ys_main
    rest = (0, r) if reverse else (n * c, length)
    carry, ys_rest = lax.scan(
        body, carry, _tree_slice(xs, *rest), length=r, reverse=reverse, unroll=unroll
    )
    ys = _tree_concat(ys_rest, ys_main) if reverse else _tree_concat(ys_main, ys_rest)
    return carry, ys


def _chunk_cuts(length: int, k: int, reverse: bool) -> np.ndarray:
    """``cuts[p]``: the carry entering array position p has its gradient cut."""
    processing_index = np.arange(length)
    if reverse:
        processing_index = processing_index[::-1]
    return (processing_index % k == 0) & (processing_index > 0)


def _first_step_input(xs: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[0], xs)


def scan(
    step: Step,
    init: PyTree,
    xs: PyTree,
    *,
    truncate: Truncation | int | None = None,
    remat: Literal["step", "sqrt"] | int | None = None,
    mask: ArrayLike | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    length: int | None = None,
) -> tuple[PyTree, PyTree]:
    r"""``jax.lax.scan`` with explicit truncated BPTT, rematerialisation and masks.

    Computes, like ``jax.lax.scan``,

    .. math::
       (h_t, y_t) = \mathrm{step}(h_{t-1}, x_t), \qquad h_{-1} = \mathrm{init},

    and returns ``(h_{T-1}, ys)``. The forward values never depend on ``truncate`` or ``remat``;
    they only change what the reverse pass computes (``truncate``) and stores (``remat``).
    ``step`` may close over the parameters being differentiated
    (``lambda h, x: (jnp.tanh(x @ W + h @ U),) * 2`` inside a loss of ``W`` and ``U``); every
    mode gives the correct truncated gradient with respect to closed-over values.

    **Truncation** (see the module docstring for the maths): a cotangent may cross at most k
    applications of ``step``, counted in processing order (from the end when ``reverse=True``);
    ``None``/:class:`Full` is exact BPTT, an ``int`` k or :class:`Chunked` ``(k)`` is TBPTT(k, k),
    :class:`Window` ``(k)`` is TBPTT(1, k), :class:`TheanoTail` ``(k)`` reproduces Theano.
    The equations that drop a cotangent run inside ``jax.named_scope("gradkit_truncation[<mode>]")``
    so that gradient checkers can report the resulting mismatch as intended.

    **Second derivatives** (``jax.hessian``, forward-over-reverse): :class:`Chunked` and
    :class:`TheanoTail` cut with ``lax.stop_gradient``, which holds the cut values constant in
    every further differentiation too, so differentiating their gradient again gives the
    derivative of the truncated surrogate loss, not of the truncated gradient as a function of
    the inputs. :class:`Window`'s backward pass is ordinary JAX code; differentiating it gives
    the derivative of the truncated gradient itself.

    **Masks**: where ``mask[t]`` is False the carry passes through unchanged and the outputs are
    zero. Masked steps still count toward k: truncation is by position, not by valid steps.

    Args:
      step: ``step(carry, x) -> (new_carry, y)`` over pytrees; ``new_carry`` must have the
        structure, shapes and dtypes of ``init``.
      init: initial carry, a pytree.
      xs: pytree of arrays with a leading time axis ``(time, ...)``; may be ``None`` with
        ``length``.
      truncate: ``None``, an int k, or a :class:`Truncation`.
      remat: ``None`` (store what autodiff needs at every step), ``"step"`` (store only the carry
        at each step and recompute the rest), an int c (store the carry every c steps and
        recompute each chunk of c steps, O(T/c + c) carries), or ``"sqrt"`` (c = round(√T)).
      mask: booleans (or numbers, nonzero meaning True) of shape ``(time, *batch)`` where
        ``batch`` are leading axes of every carry and output leaf, e.g. ``(time,)`` or
        ``(time, batch)``.
      reverse: process the steps from the last to the first, like ``lax.scan``.
      unroll: passed to ``lax.scan``.
      length: number of steps when ``xs`` is ``None``.

    Returns:
      ``(final_carry, ys)`` where ``ys`` stacks the per-step outputs on a leading time axis.

    Raises:
      ValueError: if the leaves of ``xs`` disagree on the number of steps, the mask has the wrong
        shape, or ``remat``/``unroll``/``length`` is invalid.
      TypeError: if ``truncate`` is not a truncation, if ``step`` returns a carry whose
        structure, shape or dtype differs from ``init``, or if :class:`Window` is used under
        forward-mode differentiation.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def loss(w, xs):
      ...     step = lambda h, x: (jnp.tanh(w * h + x),) * 2
      ...     _, hs = scan(step, 0.0, xs, truncate=Chunked(2))
      ...     return hs.sum()
      >>> g = jax.grad(loss)(0.5, jnp.arange(4.0))
      >>> bool(jnp.isfinite(g))
      True
    """
    mode = _as_truncation(truncate)
    n_steps = _time_length(xs, length)
    remat = _resolve_remat(remat, n_steps)
    unroll = _check_unroll(unroll)
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"scan: reverse must be a bool; got {reverse!r}")
    reverse = bool(reverse)
    init = _promote_weak_init(step, jax.tree.map(jnp.asarray, init), xs)
    body = _checked(step, init)
    if mask is not None:
        mask = _as_mask(mask, n_steps)
        body = _masked(body, tuple(mask.shape))
        xs = (xs, mask)
    k = getattr(mode, "k", None)
    if isinstance(mode, Full) or k >= n_steps:
        return _remat_scan(
            body, init, xs, remat=remat, reverse=reverse, unroll=unroll, length=n_steps
        )
    if isinstance(mode, Chunked):
        return _chunked_scan(body, init, xs, mode, remat, reverse, unroll, n_steps)
    if isinstance(mode, TheanoTail):
        return _theano_tail_scan(body, init, xs, mode, remat, reverse, unroll, n_steps)
    return _window_scan(body, init, xs, mode, remat, reverse, unroll, n_steps)


def _chunked_scan(body, init, xs, mode: Chunked, remat, reverse, unroll, n_steps):
    marker = _marker(mode)

    def cut_body(carry, x_and_cut):
        x, cut = x_and_cut
        with jax.named_scope(marker):
            carry = jax.tree.map(lambda h: jnp.where(cut, lax.stop_gradient(h), h), carry)
        return body(carry, x)

    cuts = jnp.asarray(_chunk_cuts(n_steps, mode.k, reverse))
    return _remat_scan(
        cut_body, init, (xs, cuts), remat=remat, reverse=reverse, unroll=unroll, length=n_steps
    )


def _theano_tail_scan(body, init, xs, mode: TheanoTail, remat, reverse, unroll, n_steps):
    k = mode.k
    # Array positions of the steps processed first (no gradient) and of the last k processed.
    early, late = ((k, n_steps), (0, k)) if reverse else ((0, n_steps - k), (n_steps - k, n_steps))
    xs_early, xs_late = _tree_slice(xs, *early), _tree_slice(xs, *late)
    converted, consts = jax.closure_convert(body, init, _first_step_input(xs))
    with jax.named_scope(_marker(mode)):
        frozen = [lax.stop_gradient(c) for c in consts]
        init_frozen = lax.stop_gradient(init)
        xs_frozen = lax.stop_gradient(xs_early)
    carry, ys_early = lax.scan(
        lambda h, x: converted(h, x, *frozen),
        init_frozen,
        xs_frozen,
        length=early[1] - early[0],
        reverse=reverse,
        unroll=unroll,
    )
    carry, ys_late = _remat_scan(
        body, carry, xs_late, remat=remat, reverse=reverse, unroll=unroll, length=k
    )
    ys = _tree_concat(ys_late, ys_early) if reverse else _tree_concat(ys_early, ys_late)
    return carry, ys


def _hoist_closure(fun: Callable, *example_args) -> tuple[Callable, list]:
    """Like ``jax.closure_convert``, but hoists every traced value ``fun`` closes over.

    ``jax.closure_convert`` hoists only the values that may carry a tangent. Another tracer
    (an integer label of the example under ``jax.vmap``, say) would stay inside the converted
    function, which Window's custom VJP takes as a static argument, and escape its
    transformation (UnexpectedTracerError under ``grad(vmap(...))``). Here every tracer becomes
    an argument; integer ones get no cotangent. Concrete values stay closed over.
    """
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*example_args)
    out_tree = jax.tree.structure(out_shape)
    traced = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    fixed = [c for c, t in zip(closed.consts, traced, strict=True) if not t]
    n_args = len(example_args)

    def converted(*args_and_consts):
        args, hoisted = args_and_consts[:n_args], iter(args_and_consts[n_args:])
        kept = iter(fixed)
        consts = [next(hoisted) if t else next(kept) for t in traced]
        out = jaxpr_as_fun(ClosedJaxpr(closed.jaxpr, consts))(*jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, out)

    return converted, [c for c, t in zip(closed.consts, traced, strict=True) if t]


def _window_scan(body, init, xs, mode: Window, remat, reverse, unroll, n_steps):
    if reverse:
        xs = jax.tree.map(lambda a: jnp.flip(a, 0), xs)
    converted, consts = _hoist_closure(body, init, _first_step_input(xs))
    chunk = remat if isinstance(remat, int) else 1
    spec = WindowSpec(step=converted, k=mode.k, chunk=chunk, unroll=unroll, length=n_steps)
    try:
        with jax.named_scope(_marker(mode)):
            final, ys = gradkit_window_truncation(spec, list(consts), init, xs)
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise TypeError(
            f"scan(truncate={mode!r}) defines only a reverse-mode gradient (a custom VJP), so it "
            "cannot run under jax.jvp, jax.jacfwd or jax.linearize; use jax.grad/jax.vjp/"
            "jax.jacrev, or truncate=Chunked(k) or Full(), which support forward mode"
        ) from error
    if reverse:
        ys = jax.tree.map(lambda a: jnp.flip(a, 0), ys)
    return final, ys


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def _resolve_activation(activation: str | Callable) -> Callable:
    if callable(activation):
        return activation
    from gradkit import activations

    return activations.get(activation)


def _uniform(key: jax.Array, shape: tuple, scale: float, dtype) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -scale, scale)


def _check_size(value: Any, name: str, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int; got {value!r}")


def _check_input(x: jax.Array, params: dict, owner: str) -> None:
    expected = params["kernel"].shape[0]
    if jnp.ndim(x) != 1 or jnp.shape(x)[0] != expected:
        raise ValueError(
            f"{owner}.apply acts on one example: x must have shape ({expected},) (input_features,);"
            f" got {tuple(jnp.shape(x))}. Batch with jax.vmap or use RNN for (batch, time, "
            "features) input"
        )


def _check_carry(carry: Any, params: dict, owner: str, pair: bool = False) -> None:
    """Raises a readable error for a carry that is not the cell's state for one example."""
    hidden = params["recurrent_kernel"].shape[0]
    one = f"({hidden},)"
    if pair:
        if not (isinstance(carry, (tuple, list)) and len(carry) == 2):
            got = _aval_text(carry) if hasattr(carry, "shape") else type(carry).__name__
            raise TypeError(
                f"{owner}.apply: carry must be the pair (h, c) of hidden and cell states, each "
                f"{one}; got {got}"
            )
        states = carry
    else:
        states = (carry,)
    for state in states:
        if jnp.shape(state) != (hidden,):
            raise ValueError(
                f"{owner}.apply acts on one example: its carry must have shape {one} "
                f"(hidden_size,); got {tuple(jnp.shape(state))}. Batch with jax.vmap or use RNN"
            )


@dataclasses.dataclass(frozen=True)
class SimpleRNN:
    r"""Elman recurrent cell (Lasagne's ``RecurrentLayer``) acting on one example.

    .. math::
       h_t = \phi(x_t W + h_{t-1} U + b), \qquad y_t = h_t.

    Parameters are ``{"kernel": W (input_features, hidden_size), "recurrent_kernel": U
    (hidden_size, hidden_size), "bias": b (hidden_size,)}``, initialised uniformly in
    ``±1/sqrt(hidden_size)`` like PyTorch; any dict with these entries works, so setting
    ``recurrent_kernel`` to zeros gives a feed-forward layer.

    Args:
      hidden_size: number of hidden units.
      activation: :math:`\phi`, a callable or a name known to ``gradkit.activations.get``
        (``"tanh"``, ``"softmax"``, ...).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cell = SimpleRNN(4)
      >>> params = cell.init(jax.random.key(0), 3)
      >>> h, y = cell.apply(params, cell.initial_carry(), jnp.ones(3))
      >>> h.shape
      (4,)
    """

    hidden_size: int
    activation: str | Callable = "tanh"

    def __post_init__(self):
        _check_size(self.hidden_size, "hidden_size", "SimpleRNN")
        if not (isinstance(self.activation, str) or callable(self.activation)):
            raise TypeError(
                f"SimpleRNN: activation must be a name or a callable; got {self.activation!r}"
            )
        if isinstance(self.activation, str):
            _resolve_activation(self.activation)  # an unknown name fails here, not mid-trace

    def init(self, key: jax.Array, input_features: int, dtype=jnp.float32) -> dict:
        """Returns ``{"kernel", "recurrent_kernel", "bias"}`` for ``input_features`` inputs."""
        _check_size(input_features, "input_features", "SimpleRNN.init")
        scale = 1.0 / math.sqrt(self.hidden_size)
        k1, k2, k3 = jax.random.split(key, 3)
        h = self.hidden_size
        return {
            "kernel": _uniform(k1, (input_features, h), scale, dtype),
            "recurrent_kernel": _uniform(k2, (h, h), scale, dtype),
            "bias": _uniform(k3, (h,), scale, dtype),
        }

    def initial_carry(self, dtype=jnp.float32) -> jax.Array:
        """Zero hidden state ``(hidden_size,)``."""
        return jnp.zeros((self.hidden_size,), dtype)

    def apply(self, params: dict, carry: jax.Array, x: ArrayLike) -> tuple[jax.Array, jax.Array]:
        """One step: returns ``(h_t, h_t)`` for hidden state ``carry`` and input ``x``."""
        _check_input(x, params, "SimpleRNN")
        _check_carry(carry, params, "SimpleRNN")
        phi = _resolve_activation(self.activation)
        h = phi(x @ params["kernel"] + carry @ params["recurrent_kernel"] + params["bias"])
        return h, h


@dataclasses.dataclass(frozen=True)
class GRU:
    r"""Gated recurrent unit acting on one example (PyTorch/Equinox convention).

    .. math::
       r &= \sigma(x W_r + b_r + h U_r + c_r) \\
       z &= \sigma(x W_z + b_z + h U_z + c_z) \\
       n &= \tanh(x W_n + b_n + r \odot (h U_n + c_n)) \\
       h' &= (1 - z) \odot n + z \odot h

    Parameters: ``kernel`` W ``(input_features, 3·hidden)``, ``recurrent_kernel`` U
    ``(hidden, 3·hidden)``, ``bias`` b and ``recurrent_bias`` c ``(3·hidden,)``, gates in the
    order r, z, n (PyTorch's ``weight_ih``/``weight_hh`` transposed). Initialised uniformly in
    ``±1/sqrt(hidden_size)``. The output is the new hidden state.

    Args:
      hidden_size: number of hidden units.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cell = GRU(4)
      >>> params = cell.init(jax.random.key(0), 3)
      >>> cell.apply(params, cell.initial_carry(), jnp.ones(3))[1].shape
      (4,)

    References:
      K. Cho et al., "Learning phrase representations using RNN encoder-decoder for statistical
      machine translation", EMNLP 2014.
    """

    hidden_size: int

    def __post_init__(self):
        _check_size(self.hidden_size, "hidden_size", "GRU")

    def init(self, key: jax.Array, input_features: int, dtype=jnp.float32) -> dict:
        """Returns ``{"kernel", "recurrent_kernel", "bias", "recurrent_bias"}``."""
        _check_size(input_features, "input_features", "GRU.init")
        scale = 1.0 / math.sqrt(self.hidden_size)
        h = self.hidden_size
        k1, k2, k3, k4 = jax.random.split(key, 4)
        return {
            "kernel": _uniform(k1, (input_features, 3 * h), scale, dtype),
            "recurrent_kernel": _uniform(k2, (h, 3 * h), scale, dtype),
            "bias": _uniform(k3, (3 * h,), scale, dtype),
            "recurrent_bias": _uniform(k4, (3 * h,), scale, dtype),
        }

    def initial_carry(self, dtype=jnp.float32) -> jax.Array:
        """Zero hidden state ``(hidden_size,)``."""
        return jnp.zeros((self.hidden_size,), dtype)

    def apply(self, params: dict, carry: jax.Array, x: ArrayLike) -> tuple[jax.Array, jax.Array]:
        """One step: returns ``(h', h')``."""
        _check_input(x, params, "GRU")
        _check_carry(carry, params, "GRU")
        gi = x @ params["kernel"] + params["bias"]
        gh = carry @ params["recurrent_kernel"] + params["recurrent_bias"]
        gi_r, gi_z, gi_n = jnp.split(gi, 3)
        gh_r, gh_z, gh_n = jnp.split(gh, 3)
        r = jax.nn.sigmoid(gi_r + gh_r)
        z = jax.nn.sigmoid(gi_z + gh_z)
        n = jnp.tanh(gi_n + r * gh_n)
        h = (1 - z) * n + z * carry
        return h, h


@dataclasses.dataclass(frozen=True)
class LSTM:
    r"""Long short-term memory cell acting on one example; the carry is ``(h, c)``.

    .. math::
       i, f, g, o &= \sigma(a_i),\ \sigma(a_f),\ \tanh(a_g),\ \sigma(a_o),
       \qquad a = x W + h U + b \\
       c' &= f \odot c + i \odot g, \qquad h' = o \odot \tanh(c')

    Parameters: ``kernel`` W ``(input_features, 4·hidden)``, ``recurrent_kernel`` U
    ``(hidden, 4·hidden)``, ``bias`` b ``(4·hidden,)``, gates in PyTorch's order i, f, g, o.
    Initialised uniformly in ``±1/sqrt(hidden_size)``, then the forget-gate bias is set to
    ``forget_bias`` (1.0 by default, Jozefowicz et al. 2015). The output is ``h'``.

    Args:
      hidden_size: number of hidden units.
      forget_bias: initial value of the forget-gate bias.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cell = LSTM(4)
      >>> params = cell.init(jax.random.key(0), 3)
      >>> (h, c), y = cell.apply(params, cell.initial_carry(), jnp.ones(3))
      >>> h.shape, c.shape
      ((4,), (4,))
    """

    hidden_size: int
    forget_bias: float = 1.0

    def __post_init__(self):
        _check_size(self.hidden_size, "hidden_size", "LSTM")

    def init(self, key: jax.Array, input_features: int, dtype=jnp.float32) -> dict:
        """Returns ``{"kernel", "recurrent_kernel", "bias"}``."""
        _check_size(input_features, "input_features", "LSTM.init")
        scale = 1.0 / math.sqrt(self.hidden_size)
        h = self.hidden_size
        k1, k2, k3 = jax.random.split(key, 3)
        bias = _uniform(k3, (4 * h,), scale, dtype).at[h : 2 * h].set(self.forget_bias)
        return {
            "kernel": _uniform(k1, (input_features, 4 * h), scale, dtype),
            "recurrent_kernel": _uniform(k2, (h, 4 * h), scale, dtype),
            "bias": bias,
        }

    def initial_carry(self, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """Zero ``(h, c)``, each ``(hidden_size,)``."""
        zeros = jnp.zeros((self.hidden_size,), dtype)
        return zeros, zeros

    def apply(
        self, params: dict, carry: tuple[jax.Array, jax.Array], x: ArrayLike
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """One step: returns ``((h', c'), h')``."""
        _check_input(x, params, "LSTM")
        _check_carry(carry, params, "LSTM", pair=True)
        h, c = carry
        a = x @ params["kernel"] + h @ params["recurrent_kernel"] + params["bias"]
        a_i, a_f, a_g, a_o = jnp.split(a, 4)
        c = jax.nn.sigmoid(a_f) * c + jax.nn.sigmoid(a_i) * jnp.tanh(a_g)
        h = jax.nn.sigmoid(a_o) * jnp.tanh(c)
        return (h, c), h


# --------------------------------------------------------------------------------------------
# Lasagne-style layer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RNN:
    r"""A recurrent layer over batched, batch-major input ``(batch, time, features)``.

    Runs ``cell`` over time with :func:`scan`, batched with ``vmap``, like Lasagne's
    ``RecurrentLayer``/``GRULayer``/``LSTMLayer``.

    ``gradient_steps=k`` means :class:`Chunked` ``(k)`` (``truncate_mode="chunked"``) or
    :class:`Window` ``(k)`` (``truncate_mode="window"``): every loss term still contributes,
    back-propagated through at most k steps, and with the recurrence switched off the gradient
    is exactly the feed-forward one. **This is not what Lasagne computed.** Lasagne passed
    ``gradient_steps`` to Theano's ``scan(truncate_gradient=k)``, which runs only the last k
    steps of the backward pass, so every loss term before the last k steps was dropped (a
    gradient about k/T of the true one). To reproduce Lasagne's numbers, pass
    ``truncate=TheanoTail(k)`` explicitly.

    Args:
      cell: a cell with ``init``, ``initial_carry`` and ``apply`` (:class:`SimpleRNN`,
        :class:`GRU`, :class:`LSTM`, or your own).
      gradient_steps: ``-1`` (Lasagne's default, exact BPTT) or a number of steps ``k >= 1``.
      truncate_mode: ``"chunked"`` or ``"window"``, how ``gradient_steps`` truncates.
      truncate: a :class:`Truncation` used instead of ``gradient_steps`` (e.g.
        ``TheanoTail(k)``); give one or the other.
      remat: passed to :func:`scan`.
      backwards: process the sequence from the end (Lasagne's name for ``reverse``).
      only_return_final: return only the output of the last step ``(batch, out)``; with a
        mask, of each sequence's last unmasked step, like Lasagne, whose masked steps carry
        the hidden state forward. A sequence masked throughout gives zeros, whatever
        ``initial_carry`` is (Lasagne returns its ``hid_init`` there: the same for the default
        zero carry).
      unroll: passed to :func:`scan`.

    Raises:
      ValueError: for an invalid ``gradient_steps``, ``truncate_mode``, or both
        ``gradient_steps`` and ``truncate``.
      TypeError: if ``truncate`` is not a truncation (a string such as ``"window"`` belongs in
        ``truncate_mode``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = RNN(SimpleRNN(5), gradient_steps=10)
      >>> params = layer.init(jax.random.key(0), 3)
      >>> layer.apply(params, jnp.ones((2, 7, 3))).shape
      (2, 7, 5)
    """

    cell: Any
    gradient_steps: int = -1
    truncate_mode: Literal["chunked", "window"] = "chunked"
    truncate: Truncation | None = None
    remat: str | int | None = None
    backwards: bool = False
    only_return_final: bool = False
    unroll: int | bool = 1

    def __post_init__(self):
        steps = self.gradient_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise ValueError(f"RNN: gradient_steps must be an int; got {steps!r}")
        if steps == 0 or steps < -1:
            raise ValueError(f"RNN: gradient_steps must be -1 (exact BPTT) or >= 1; got {steps}")
        if self.truncate_mode not in ("chunked", "window"):
            raise ValueError(
                f'RNN: truncate_mode must be "chunked" or "window"; got {self.truncate_mode!r}'
            )
        if self.truncate is not None:
            if steps != -1:
                raise ValueError(
                    f"RNN: give gradient_steps or truncate, not both; got gradient_steps={steps}"
                    f" and truncate={self.truncate!r}"
                )
            _as_truncation(self.truncate)

    @property
    def truncation(self) -> Truncation:
        """The :class:`Truncation` this layer passes to :func:`scan`."""
        if self.truncate is not None:
            return _as_truncation(self.truncate)
        if self.gradient_steps == -1:
            return Full()
        k = int(self.gradient_steps)
        return Chunked(k) if self.truncate_mode == "chunked" else Window(k)

    def init(
        self, key: jax.Array, input_shape: int | Sequence[int | None], dtype=jnp.float32
    ) -> PyTree:
        """Returns the cell's parameters.

        Args:
          key: a PRNG key.
          input_shape: the input's shape ``(batch, time, features)`` (only the last axis
            matters; the others may be ``None``), or the number of features, like the
            ``init`` of gradkit.layers.
          dtype: the parameters' dtype.
        """
        if isinstance(input_shape, Sequence):
            if not input_shape:
                raise ValueError("RNN.init: input_shape is empty; give (batch, time, features)")
            input_shape = input_shape[-1]
        return self.cell.init(key, input_shape, dtype=dtype)

    def apply(
        self,
        params: PyTree,
        xs: ArrayLike,
        *,
        mask: ArrayLike | None = None,
        initial_carry: PyTree | None = None,
    ) -> jax.Array:
        """Runs the layer.

        Args:
          params: the cell's parameters.
          xs: ``(batch, time, features)``.
          mask: ``(batch, time)``; where False the carry is kept and the output is zero
            (``only_return_final`` returns each sequence's last unmasked output).
          initial_carry: the cell's carry with a leading batch axis; zeros by default.

        Returns:
          ``(batch, time, out)`` outputs, or ``(batch, out)`` with ``only_return_final``.

        Raises:
          ValueError: if ``xs`` is not 3-D, has another number of features than the
            parameters of a gradkit cell take, has no time steps with ``only_return_final``,
            ``mask`` is not ``(batch, time)`` or a leaf of ``initial_carry`` has no leading
            axis of the batch size.
        """
        xs = jnp.asarray(xs)
        if xs.ndim != 3:
            raise ValueError(
                f"RNN.apply: xs must be (batch, time, features); got shape {tuple(xs.shape)}"
            )
        if self.only_return_final and xs.shape[1] == 0:
            raise ValueError(
                "RNN.apply: only_return_final=True needs at least one time step to return the "
                f"output of; xs has none (shape {tuple(xs.shape)})"
            )
        batch = xs.shape[0]
        if isinstance(self.cell, (SimpleRNN, GRU, LSTM)):
            # Said here, in the layer's terms: the cell's own check would ask for one example.
            kernel = (
                params["kernel"] if isinstance(params, Mapping) and "kernel" in params else None
            )
            if kernel is not None and jnp.ndim(kernel) == 2 and jnp.shape(kernel)[0] != xs.shape[2]:
                raise ValueError(
                    f"RNN.apply: xs has {xs.shape[2]} features per step (shape "
                    f"{tuple(xs.shape)}), but the {type(self.cell).__name__} parameters take "
                    f"{jnp.shape(kernel)[0]} (kernel {tuple(jnp.shape(kernel))}); initialise "
                    f"the layer with input_features={xs.shape[2]}"
                )
        if initial_carry is None:
            one = self.cell.initial_carry(dtype=xs.dtype)
            # Zeros in the dtype the cell computes in (float64 parameters, float32 input: float64).
            x_example = jax.ShapeDtypeStruct(xs.shape[2:], xs.dtype)
            new = jax.eval_shape(self.cell.apply, params, one, x_example)[0]
            if jax.tree.structure(new) == jax.tree.structure(one):
                one = jax.tree.map(
                    lambda a, n: a.astype(n.dtype) if a.shape == n.shape else a, one, new
                )
            initial_carry = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape)), one)
        else:
            wrong = [
                f"{_path('initial_carry', key_path)} has shape {tuple(jnp.shape(leaf))}"
                for key_path, leaf in jax.tree_util.tree_flatten_with_path(initial_carry)[0]
                if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch
            ]
            if wrong:
                raise ValueError(
                    f"RNN.apply: initial_carry needs a leading batch axis of {batch} (xs is "
                    f"{tuple(xs.shape)}), like the cell's carry for each sequence stacked; "
                    + "; ".join(wrong)
                )
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != xs.shape[:2]:
                raise ValueError(
                    f"RNN.apply: mask must be (batch, time) = {tuple(xs.shape[:2])}; got "
                    f"{tuple(mask.shape)}"
                )
            mask = mask.T
        cell_step = jax.vmap(self.cell.apply, in_axes=(None, 0, 0))
        _, ys = scan(
            lambda carry, x: cell_step(params, carry, x),
            initial_carry,
            jnp.swapaxes(xs, 0, 1),
            truncate=self.truncation,
            remat=self.remat,
            mask=mask,
            reverse=self.backwards,
            unroll=self.unroll,
        )
        if self.only_return_final:
            if mask is None:
                return ys[0] if self.backwards else ys[-1]
            # Each sequence's last step that ran, in processing order (its outputs after that
            # are zero): Lasagne returns the hidden state carried past the padding.
            ran = _as_mask(mask, mask.shape[0])  # as scan reads it: nonzero runs the step
            last = (
                jnp.argmax(ran, axis=0)
                if self.backwards
                else ran.shape[0] - 1 - jnp.argmax(ran[::-1], axis=0)
            )
            return ys[last, jnp.arange(batch)]
        return jnp.swapaxes(ys, 0, 1)


# --------------------------------------------------------------------------------------------
# Streaming truncated BPTT
# --------------------------------------------------------------------------------------------


def _check_block(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"tbptt_value_and_grad: {name} must be an int >= 1; got {value!r}")
    if value < 1:
        raise ValueError(f"tbptt_value_and_grad: {name} must be >= 1; got {name}={value}")
    return int(value)


def tbptt_value_and_grad(
    loss_step: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, jax.Array]],
    params: PyTree,
    init: PyTree,
    xs: PyTree,
    *,
    k1: int,
    k2: int | None = None,
    unroll: int | bool = 1,
) -> tuple[jax.Array, PyTree, PyTree]:
    r"""Streaming truncated BPTT(k1, k2): loss, gradient and final carry in O(k2) memory.

    Every k1 steps (a *block*), the losses of those k1 steps are back-propagated k2 steps
    (``k2 >= k1``): the block re-runs the ``k2 - k1`` steps before it from the carry stored
    there, so the gradient of a loss term at position j of a block (0-based) crosses
    ``k2 - k1 + j + 1`` steps. An outer ``lax.scan`` over blocks holds only the carry and the
    accumulated gradient, so memory grows with k2, not with T; the price is recomputing the
    overlap (work × k2/k1). With ``k1 == k2`` the gradient equals ``scan(...,
    truncate=Chunked(k1))``; with ``k1 == 1`` it equals ``truncate=Window(k2)``.

    .. math::
       g = \sum_{b} \frac{\partial}{\partial \theta}
           \sum_{s \in \text{block } b} \ell_s\Big|_{h_{\tau_b - k_2}\ \text{held fixed}},

    where :math:`\tau_b` is the last step of block b.

    Args:
      loss_step: ``loss_step(params, carry, x) -> (new_carry, loss_t)`` with a scalar
        ``loss_t``; put targets in ``x``.
      params: pytree of parameters to differentiate.
      init: initial carry; pass the returned final carry to continue a stream.
      xs: pytree of arrays with a leading time axis.
      k1: steps per block, ``>= 1``.
      k2: steps back-propagated per block, ``>= k1``; defaults to ``k1``.
      unroll: passed to the inner ``lax.scan``.

    Returns:
      ``(loss, grads, final_carry)``: the summed loss :math:`\sum_t \ell_t`, the truncated
      gradient of that sum (a pytree like ``params``, ready for an optax optimiser) and the carry
      after the last step.

    Raises:
      ValueError: if ``k1 < 1`` or ``k2 < k1``, or the leaves of ``xs`` disagree on length.
      TypeError: if a leaf of ``params`` is not floating point, or ``loss_step`` returns a
        carry unlike ``init`` or a non-scalar loss.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def loss_step(w, h, x):
      ...     h = jnp.tanh(w * h + x)
      ...     return h, h**2
      >>> loss, g, h = tbptt_value_and_grad(loss_step, 0.5, 0.0, jnp.ones(10), k1=2, k2=4)
      >>> loss.shape, g.shape
      ((), ())

    References:
      R. J. Williams and J. Peng, Neural Computation 2(4), 1990; I. Sutskever, "Training
      recurrent neural networks", PhD thesis, University of Toronto, 2013, section 2.8.6.
    """
    k1 = _check_block(k1, "k1")
    k2 = k1 if k2 is None else _check_block(k2, "k2")
    if k2 < k1:
        raise ValueError(f"tbptt_value_and_grad: k2 must be >= k1; got k1={k1}, k2={k2}")
    unroll = _check_unroll(unroll, "tbptt_value_and_grad")
    not_float = [
        f"params{jax.tree_util.keystr(path)} is {jnp.result_type(leaf)}"
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not_float:
        raise TypeError(
            "tbptt_value_and_grad differentiates every leaf of params, so they must be floating "
            f"point; {', '.join(not_float)}. Close over integer settings in loss_step instead"
        )
    n_steps = _time_length(xs, None, "tbptt_value_and_grad")
    init = _promote_weak_init(
        lambda carry, x: loss_step(params, carry, x), jax.tree.map(jnp.asarray, init), xs
    )
    n_blocks = -(-n_steps // k1)
    counted = jnp.asarray(np.arange(k2) >= k2 - k1)

    def checked_loss_step(p):
        def step(carry, x):
            out = loss_step(p, carry, x)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                # _checked says what was returned instead
                return out
            new_carry, loss = out
            if jnp.shape(loss) != ():
                raise TypeError(
                    "tbptt_value_and_grad: loss_step must return a scalar loss; got shape "
                    f"{jnp.shape(loss)}"
                )
            return new_carry, loss

        return _checked(step, init, "tbptt_value_and_grad", "loss_step(params, carry, x)", "loss")

    def window_loss(p, start, x_window, valid_window):
        step = checked_loss_step(p)

        def body(carry, inputs):
            x, ok, count = inputs
            new_carry, loss = step(carry, x)
            new_carry = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_carry, carry)
            return new_carry, jnp.where(ok & count, loss, jnp.zeros_like(loss))

        first = (_tree_slice(x_window, 0, k1), valid_window[:k1], counted[:k1])
        rest = (_tree_slice(x_window, k1, k2), valid_window[k1:], counted[k1:])
        middle, losses_first = lax.scan(body, start, first, unroll=unroll)
        end, losses_rest = lax.scan(body, middle, rest, length=k2 - k1, unroll=unroll)
        return losses_first.sum() + losses_rest.sum(), (middle, end)

    block_value_and_grad = jax.value_and_grad(window_loss, has_aux=True)

    def block(state, b):
        start, _, total, grads = state
        # Block b ends at step (b + 1) * k1 - 1 and back-propagates k2 steps. Positions outside
        # [0, T) (before the first step, after the last) read a clipped real input, so the step
        # sees ordinary values, and are masked out: the carry passes through them unchanged.
        positions = b * k1 - (k2 - k1) + jnp.arange(k2)
        valid_window = (positions >= 0) & (positions < n_steps)
        index = jnp.clip(positions, 0, n_steps - 1)
        x_window = jax.tree.map(lambda a: jnp.take(a, index, axis=0), xs)
        (loss, (next_start, end)), g = block_value_and_grad(params, start, x_window, valid_window)
        grads = jax.tree.map(jnp.add, grads, g)
        return (next_start, end, total + loss, grads), None

    zero_grads = jax.tree.map(jnp.zeros_like, params)
    loss_shape = jax.eval_shape(
        lambda x: checked_loss_step(params)(init, x)[1], _step_input_shapes(xs)
    )
    if n_steps == 0:
        return jnp.zeros((), loss_shape.dtype), zero_grads, init
    state = (init, init, jnp.zeros((), loss_shape.dtype), zero_grads)
    (_, final, total, grads), _ = lax.scan(block, state, jnp.arange(n_blocks))
    return total, grads, final
