"""Jitted training loops on optax: train state, train step, fit, checkpoints, logging hooks.

:class:`TrainState` bundles what a step changes (params, optimizer state, step count, PRNG key)
as one pytree. :func:`make_train_step` turns ``loss_fn(params, batch)`` and an optax optimizer
into a pure, jitted ``step(state, batch) -> (state, metrics)``. :func:`fit` runs that step over
arrays or any iterable of batches with a progress bar, evaluation, callbacks, TensorBoard
scalars, atomic checkpoints that resume bit for bit, NaN stops and data parallelism, and returns
the final state and a :class:`History`. :func:`tutorial_momentum` is seed 001's momentum rule as
an optax transform.

Host work (progress bar, logging, checkpoints) happens while the next steps already run on the
device: ``fit`` launches up to four steps ahead and handles finished steps two at a time (the
host waits once per pair), so the device does not sit idle waiting for Python.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradkit import _checkpoint, _health, _platform

__all__ = [
    "History",
    "NonFiniteLossError",
    "TrainState",
    "TutorialMomentumState",
    "fit",
    "global_norm",
    "make_train_step",
    "tutorial_momentum",
]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], Any]


# --------------------------------------------------------------------------------------------
# Train state
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step changes, as one pytree.

    Attributes:
      params: the model parameters (any pytree of arrays).
      opt_state: the optax optimizer state for ``params``.
      step: number of steps taken (int32 scalar array).
      key: the run's PRNG key. :func:`fit` derives epoch ``e``'s shuffling order from
        ``jax.random.fold_in(key, e)`` and never changes it, so a resumed run sees the same
        batches.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
      >>> int(state.step)
      0
    """

    params: PyTree
    opt_state: PyTree
    step: jax.Array
    key: jax.Array

    @classmethod
    def create(
        cls,
        params: PyTree,
        optimizer: optax.GradientTransformation,
        *,
        key: jax.Array | None = None,
        seed: int = 0,
    ) -> TrainState:
        """Returns the state at step 0: ``optimizer.init(params)`` and ``key`` (or ``key(seed)``).

        Args:
          params: the initial parameters (any pytree; leaves are converted with ``jnp.asarray``).
          optimizer: the optax transform whose state to create.
          key: the run's PRNG key; default ``jax.random.key(seed)``.
          seed: the seed used when ``key`` is not given.

        Returns:
          A :class:`TrainState` with ``step`` 0 (int32).

        Raises:
          TypeError: if ``optimizer`` is not an optax ``GradientTransformation``.
        """
        _check_optimizer(optimizer)
        # Strongly typed: a weakly typed leaf (a Python float) comes back from the first step
        # strongly typed, and the step would be traced again for the new input types.
        params = jax.tree_util.tree_map(_health._strong_array, params)
        return cls(
            params=params,
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key(seed) if key is None else key,
        )

    def replace(self, **changes: Any) -> TrainState:
        """Returns a copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    TrainState, data_fields=["params", "opt_state", "step", "key"], meta_fields=[]
)


# --------------------------------------------------------------------------------------------
# Optimizer: the tutorial's momentum
# --------------------------------------------------------------------------------------------


class TutorialMomentumState(NamedTuple):
    """State of :func:`tutorial_momentum`: the step count and one velocity per parameter."""

    count: jax.Array
    velocity: PyTree


def tutorial_momentum(
    learning_rate: float | optax.Schedule, momentum: float
) -> optax.GradientTransformation:
    r"""Seed 001's momentum rule (the Theano tutorial's ``gradient_updates_momentum``), exactly.

    With gradient :math:`g_t` of the loss at the current parameters :math:`\theta_t`, learning
    rate :math:`\eta` and momentum :math:`m`, both updates read the *old* velocity:

    .. math::

       \theta_{t+1} = \theta_t - \eta\, v_t, \qquad v_{t+1} = m\, v_t + (1 - m)\, g_t,
       \qquad v_0 = 0.

    How it differs from ``optax.sgd(learning_rate, momentum=m)``, which computes
    :math:`u_{t+1} = m\,u_t + g_t` and :math:`\theta_{t+1} = \theta_t - \eta\,u_{t+1}`:

    * the tutorial damps the gradient by :math:`(1 - m)`, so its velocity is an exponential
      moving *average* of gradients (steady-state step :math:`\eta g`), whereas optax's trace is
      a *sum* (steady-state step :math:`\eta g / (1 - m)`, ten times larger at :math:`m = 0.9`);
    * the tutorial steps with the velocity *before* adding the current gradient, so every step
      lags one gradient behind, and the first step does not move the parameters at all.

    Together: ``tutorial_momentum(lr, m)`` applied to gradients :math:`g_1, g_2, \dots` gives
    exactly the updates of ``optax.sgd(lr * (1 - m), momentum=m)`` applied to
    :math:`0, g_1, g_2, \dots` (tested).

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule of the step count.
      momentum: :math:`m`, with :math:`0 \le m < 1` (0 is plain gradient descent, one step late).

    Returns:
      An optax ``GradientTransformation``; updates keep each parameter's dtype.

    Raises:
      ValueError: if ``momentum`` is outside :math:`[0, 1)` or ``learning_rate`` is negative
        or NaN.
      TypeError: if either is not a real number (``learning_rate`` may also be a schedule).

    Example:
      >>> import jax.numpy as jnp
      >>> opt = tutorial_momentum(0.1, 0.9)
      >>> state = opt.init(jnp.zeros(2))
      >>> updates, state = opt.update(jnp.ones(2), state)
      >>> bool((updates == 0).all())  # the first step uses v_0 = 0
      True
      >>> updates, state = opt.update(jnp.ones(2), state)
      >>> [round(u, 6) for u in updates.tolist()]  # -lr * (1 - m) * g_1
      [-0.01, -0.01]

    References:
      C. Raffel, "Theano tutorial" (2015), ``gradient_updates_momentum``;
      https://github.com/craffel/theano-tutorial
    """
    value = _real_scalar(momentum, "momentum")
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"tutorial_momentum: momentum must be in [0, 1), got {momentum}")
    if not callable(learning_rate):
        value = _real_scalar(learning_rate, "learning_rate", "or an optax schedule")
        if value is not None and not value >= 0.0:
            raise ValueError(f"tutorial_momentum: learning_rate must be >= 0, got {learning_rate}")

    def init_fn(params: PyTree) -> TutorialMomentumState:
        return TutorialMomentumState(
            count=jnp.zeros((), jnp.int32),
            velocity=jax.tree_util.tree_map(jnp.zeros_like, params),
        )

    def update_fn(
        updates: PyTree, state: TutorialMomentumState, params: PyTree | None = None
    ) -> tuple[PyTree, TutorialMomentumState]:
        del params
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
        steps = jax.tree_util.tree_map(lambda v: (-rate * v).astype(v.dtype), state.velocity)
        velocity = jax.tree_util.tree_map(
            lambda v, g: (momentum * v + (1.0 - momentum) * g).astype(v.dtype),
            state.velocity,
            updates,
        )
        count = optax.safe_int32_increment(state.count)
        return steps, TutorialMomentumState(count=count, velocity=velocity)

    return optax.GradientTransformation(init_fn, update_fn)


def _is_real_number(value: Any) -> bool:
    """Whether ``value`` is a concrete real scalar: a Python, NumPy or JAX int or float (not a
    bool, not an array with more than one element)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.number | np.ndarray | jax.Array)
        and np.shape(value) == ()
        and np.asarray(value).dtype.kind in "iuf"
    )


def _real_scalar(value: Any, argument: str, alternative: str = "") -> float | None:
    """Returns ``value`` as a float, ``None`` for a traced scalar; refuses anything else."""
    if isinstance(value, jax.core.Tracer) and jnp.shape(value) == ():
        return None
    if not _is_real_number(value):
        also = f" {alternative}" if alternative else ""
        raise TypeError(
            f"tutorial_momentum: {argument} must be a real number{also}, got {value!r} of type "
            f"{type(value).__name__}"
        )
    return float(value)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def global_norm(tree: PyTree) -> jax.Array:
    r"""The Euclidean norm of all leaves of ``tree`` together, without float underflow or overflow.

    .. math::

       \|g\| = s \sqrt{\textstyle\sum_i (g_i / s)^2}, \qquad s = \max_i |g_i|

    Scaling by the largest entry keeps :math:`(g_i/s)^2` in range: ``optax.tree.norm`` (formerly
    ``optax.global_norm``) squares directly, so gradients below about 1e-19 in float32 square to 0
    and their norm reads 0, and norms above about 1e19 read inf. The plain sum of squares is
    computed first and used when it lies in
    :math:`[\sqrt{\mathrm{tiny}}, \infty)` (then entries lost to underflow change it by less
    than :math:`n\sqrt{\mathrm{tiny}}` relatively); otherwise the scaled form is evaluated, in a
    ``lax.cond`` on a CPU, so the common case costs one pass over the leaves there (on other
    platforms, where a cond costs a round trip to the host, both are computed and one is
    selected). Inf anywhere gives inf, NaN anywhere gives NaN. Half-precision leaves are summed
    in float32.

    Args:
      tree: a pytree of arrays (empty leaves are skipped; a complex entry counts with its
        modulus, as in ``optax.tree.norm``).

    Returns:
      A scalar in the leaves' promoted dtype, at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> print(f'{float(global_norm({"a": jnp.full(4, 1e-30)})):.3g}')  # optax.tree.norm: 0
      2e-30
    """
    leaves = [jnp.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
    leaves = [
        jnp.abs(leaf) if jnp.issubdtype(leaf.dtype, jnp.complexfloating) else leaf
        for leaf in leaves
        if leaf.size
    ]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    leaves = [leaf.astype(dtype) for leaf in leaves]
    plain = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)
    safe = (plain >= jnp.sqrt(jnp.finfo(dtype).tiny)) & jnp.isfinite(plain)

    def scaled(leaves: list[jax.Array]) -> jax.Array:
        largest = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in leaves]))
        scale = jnp.where(jnp.isfinite(largest) & (largest > 0), largest, jnp.ones((), dtype))
        total = sum(jnp.sum(jnp.square(leaf / scale)) for leaf in leaves)
        return jnp.where(jnp.isfinite(largest), scale * jnp.sqrt(total), largest)

    # On a CPU the scaled pass runs only when needed; elsewhere a cond costs a round trip to the
    # host every step (gradkit._platform), and the extra pass is cheap.
    return _platform.cpu_or_accelerator(
        lambda leaves: jax.lax.cond(safe, lambda leaves: jnp.sqrt(plain), scaled, leaves),
        lambda leaves: jnp.where(safe, jnp.sqrt(plain), scaled(leaves)),
        leaves,
    )


def _check_optimizer(optimizer: Any) -> None:
    if isinstance(optimizer, optax.GradientTransformation):
        return
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return
    hint = ""
    if callable(optimizer) and getattr(optimizer, "__module__", "").startswith("optax"):
        hint = f"; call it first, e.g. optax.{optimizer.__name__}(learning_rate=1e-3)"
    elif isinstance(optimizer, str):
        hint = f"; pass the transform itself, e.g. optax.{optimizer}(learning_rate=1e-3)"
    raise TypeError(
        "optimizer must be an optax GradientTransformation (an object with init and update), "
        f"got {optimizer!r} of type {type(optimizer).__name__}{hint}"
    )


def _floating_dtypes(tree: PyTree) -> set[jnp.dtype]:
    dtypes = set()
    for leaf in jax.tree_util.tree_leaves(tree):
        dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.result_type(leaf)))
        if jnp.issubdtype(dtype, jnp.floating):
            dtypes.add(dtype)
    return dtypes


def _check_dtypes(params: PyTree, batch: PyTree) -> None:
    """Raises when floating data and floating params disagree (the floatX mistake)."""
    param_dtypes = _floating_dtypes(params)
    if len(param_dtypes) != 1:
        return
    (param_dtype,) = param_dtypes
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.result_type(leaf)))
        if jnp.issubdtype(dtype, jnp.floating) and dtype != param_dtype:
            raise TypeError(
                f"the data and the params have different float dtypes: batch"
                f"{jax.tree_util.keystr(path)} is {dtype} but the params are {param_dtype}, so "
                f"every step would compute in {jnp.promote_types(dtype, param_dtype)}. Cast one "
                f"to the other (e.g. x.astype(jnp.{param_dtype})), or pass check_dtypes=False "
                f"if the mix is deliberate"
            )


def _check_state(state: TrainState, optimizer: optax.GradientTransformation) -> None:
    """Raises, at trace time, for params that cannot be differentiated and for an optimiser
    state that another optimiser (or another model) made: both otherwise fail deep inside JAX
    or optax without naming what is wrong."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} has dtype {dtype}: the step differentiates "
                "the loss with respect to every leaf of params, which must be floating point. "
                "Make it a float array, or keep it out of params (close over it in loss_fn, "
                "or put it in the batch)"
            )
    expected = jax.tree_util.tree_structure(jax.eval_shape(optimizer.init, state.params))
    found = jax.tree_util.tree_structure(state.opt_state)
    if found != expected:
        raise TypeError(
            "state.opt_state is not this optimizer's state for these params: "
            f"optimizer.init(params) has the structure {_short(expected)}, state.opt_state "
            f"{_short(found)}. Build the state with TrainState.create(params, optimizer) using "
            "the optimizer given to the step"
        )


def _short(treedef: Any, limit: int = 160) -> str:
    text = str(treedef)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _make_step_body(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool,
    clip_global_norm: float | None,
    check_dtypes: bool,
    health_every: int | None = None,
    health_always: bool = False,
    health_layout: list[Any] | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure (un-jitted) step shared by :func:`make_train_step` and :func:`fit`.

    With ``health_every`` the step computes the health statistics when ``state.step`` is a
    multiple of it (a device-side gate); with ``health_always`` it computes them every time.
    Given a ``health_layout`` list (``fit``), ``metrics["health"]`` holds the statistics packed
    into three arrays and the list receives their static layout: a step then returns three
    buffers instead of a dozen per leaf, and the host reads them back in one transfer.
    """
    # optax's convention for transforms that need the loss (line searches, reduce_on_plateau):
    # chains pass these keyword arguments on to the members that accept them.
    takes_extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def loss_and_aux(params: PyTree, batch: PyTree) -> tuple[jax.Array, dict[str, jax.Array]]:
        out = loss_fn(params, batch)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"with has_aux=True, loss_fn must return (loss, aux), got {type(out).__name__}"
                )
            loss, aux = out
            if not isinstance(aux, Mapping):
                raise TypeError(
                    f"with has_aux=True, aux must be a dict of scalars, got {type(aux).__name__}"
                )
        else:
            loss, aux = out, {}
        if isinstance(out, tuple) and not has_aux:
            raise TypeError(
                f"loss_fn returned a tuple of {len(out)}; return a scalar, or pass has_aux=True "
                f"and return (loss, aux_dict)"
            )
        loss = jnp.asarray(loss)
        if loss.shape != ():
            raise ValueError(
                f"loss_fn must return a scalar, got shape {loss.shape}; reduce it, e.g. with "
                f".mean() or .sum()"
            )
        if not jnp.issubdtype(loss.dtype, jnp.floating):
            raise TypeError(f"loss_fn must return a floating scalar, got dtype {loss.dtype}")
        for name, value in aux.items():
            if jnp.shape(value) != ():
                raise ValueError(
                    f"aux[{name!r}] must be a scalar to go into the metrics, got shape "
                    f"{jnp.shape(value)}"
                )
            if name in _RESERVED_METRICS:
                raise ValueError(f"aux may not use the reserved metric name {name!r}")
        return loss, dict(aux)

    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_state(state, optimizer)
        if check_dtypes:
            _check_dtypes(state.params, batch)
        (loss, aux), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(state.params, batch)
        grad_norm = global_norm(grads)
        raw_grads = grads  # the health statistics describe the gradient before clipping
        if clip_global_norm is not None:
            factor = jnp.minimum(1.0, clip_global_norm / jnp.maximum(grad_norm, 1e-38))
            grads = jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), grads)
        if takes_extra_args:
            updates, opt_state = optimizer.update(
                grads,
                state.opt_state,
                state.params,
                value=loss,
                grad=grads,
                value_fn=lambda params: loss_and_aux(params, batch)[0],
            )
        else:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        if health_always and health_layout is not None:
            layout, metrics["health"] = _health._packed_stats(raw_grads, state.params, updates)
            health_layout[:] = [layout]
        elif health_always:
            metrics["health"] = _health.gradient_stats(raw_grads, state.params, updates)
        elif health_every is not None:
            metrics["health"] = _gated_health(
                state.step % health_every == 0, raw_grads, state.params, updates
            )
        return new_state, metrics

    return step


_RESERVED_METRICS = ("loss", "grad_norm", "health")


def _gated_health(due: jax.Array, grads: PyTree, params: PyTree, updates: PyTree) -> PyTree:
    """:func:`gradkit.diagnostics.gradient_stats` when ``due``, zeros of the same structure
    otherwise; the choice is made on the device: a ``lax.cond`` on a CPU, so skipped steps cost
    little; elsewhere, where a cond costs a round trip to the host, the statistics are
    computed every step and selected."""

    def compute() -> PyTree:
        # The exact, cond-free statistics, leaf after leaf (``branch=False``): what a rarely
        # taken branch should hold (see gradkit.diagnostics.health_monitor).
        return _health._unpack(*_health._packed_stats(grads, params, updates, branch=False))

    def skip() -> PyTree:
        shapes = jax.eval_shape(compute)
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def select() -> PyTree:
        return jax.tree_util.tree_map(
            lambda value: jnp.where(due, value, jnp.zeros_like(value)),
            _health.gradient_stats(grads, params, updates),
        )

    return _platform.cpu_or_accelerator(lambda: jax.lax.cond(due, compute, skip), select)


def _validate_step_arguments(loss_fn: Any, optimizer: Any, clip_global_norm: float | None) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}")
    _check_optimizer(optimizer)
    if clip_global_norm is not None and not (
        _is_real_number(clip_global_norm) and clip_global_norm > 0
    ):
        raise ValueError(f"clip_global_norm must be a positive number, got {clip_global_norm!r}")


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    clip_global_norm: float | None = None,
    check_dtypes: bool = True,
    health_every: int | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]:
    r"""Returns a jitted, pure ``step(state, batch) -> (state, metrics)``.

    One step computes the loss and its gradient at ``state.params``, the gradient's global norm
    (see :func:`global_norm`), optionally rescales the gradient to norm at most
    ``clip_global_norm``, applies ``optimizer`` and increments ``state.step``. It compiles once
    per batch shape and dtype: calling it again with a same-shaped batch does not retrace.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, or ``-> (scalar, aux)`` with ``has_aux``,
        where ``aux`` is a dict of scalars that is added to the metrics.
      optimizer: an optax ``GradientTransformation``; create the state with
        ``TrainState.create(params, optimizer)``. An ``optax.GradientTransformationExtraArgs``
        (every optax chain, ``optax.lbfgs``, ``optax.contrib.reduce_on_plateau``) also receives
        ``value`` (the loss), ``grad`` (the gradient it is given) and ``value_fn`` (the loss on
        this batch as a function of the params), as optax's line searches expect.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      clip_global_norm: if set, gradients are scaled by :math:`\min(1, c / \|g\|)` before the
        optimizer (same rule as ``optax.clip_by_global_norm``, without adding optimizer state).
      check_dtypes: raise if floating data and params have different dtypes (default True).
      health_every: if set to k, the metrics also hold ``"health"``: the per-leaf
        :func:`gradkit.diagnostics.gradient_stats` of this step's gradients (before clipping, so
        ``clip_global_norm`` cannot hide an exploding layer), params and the updates applied
        (underflow-safe norms, NaN/Inf counts, log2-magnitude histograms, update/param ratios),
        computed inside the step when ``state.step`` (before the update) is a multiple of k and
        zeros otherwise. The gate is evaluated on the device, so nothing retraces: on a CPU a
        :func:`jax.lax.cond`, and the other steps cost about what a plain step does; on a GPU
        or TPU the statistics are computed every step and kept when due (a cond costs a round
        trip to the host there; see :func:`gradkit.diagnostics.health_monitor`; :func:`fit`
        gates on the host). For any other optax loop, use
        :func:`gradkit.diagnostics.health_monitor`.

    Returns:
      ``step(state, batch) -> (new_state, metrics)`` with metrics ``"loss"`` (at the params
      before the update), ``"grad_norm"`` (before clipping), the aux entries, and ``"health"``
      with ``health_every``.

    Raises:
      TypeError: if ``optimizer`` is not an optax transform or ``loss_fn`` is not callable; at
        trace time, if data and params dtypes differ, ``aux`` is not a dict, a leaf of
        ``state.params`` is not floating point, or ``state.opt_state`` does not have the
        structure ``optimizer.init(state.params)`` would give (a state made by another
        optimizer, or for another model).
      ValueError: at trace time, if ``loss_fn`` does not return a scalar.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> loss = lambda p, b: jnp.mean((b[0] * p["w"] - b[1]) ** 2)
      >>> step = make_train_step(loss, optax.sgd(0.1))
      >>> state = TrainState.create({"w": jnp.zeros(())}, optax.sgd(0.1))
      >>> state, metrics = step(state, (jnp.ones(4), 2 * jnp.ones(4)))
      >>> float(metrics["loss"]), round(float(state.params["w"]), 6)
      (4.0, 0.4)
    """
    _validate_step_arguments(loss_fn, optimizer, clip_global_norm)
    if health_every is not None:
        health_every = _positive_int(health_every, "health_every")
    body = _make_step_body(
        loss_fn,
        optimizer,
        has_aux=has_aux,
        clip_global_norm=clip_global_norm,
        check_dtypes=check_dtypes,
        health_every=health_every,
    )
    return jax.jit(body)


# --------------------------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------------------------


class History:
    """Per-step training metrics and per-evaluation metrics, as NumPy arrays.

    Train metrics (``loss``, ``grad_norm`` and any aux) are recorded every step; ``steps[i]`` is
    the step count *after* the update whose loss is ``history["loss"][i]`` (the loss itself is
    measured at the params before that update, as the step computes it). Evaluation metrics are
    recorded at ``eval_steps``.

    Example:
      >>> h = History()
      >>> h.record(1, {"loss": 2.0}); h.record(2, {"loss": 1.0})
      >>> h["loss"].tolist(), h.steps.tolist()
      ([2.0, 1.0], [1, 2])
    """

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._train: dict[str, list[float]] = {}
        self._eval_steps: list[int] = []
        self._eval: dict[str, list[float]] = {}

    @staticmethod
    def _append(store: dict[str, list[float]], length: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            column = store.get(name)
            if column is None:  # a metric seen first now: NaN for the earlier entries
                column = store[name] = [math.nan] * length
            column.append(float(value))
        if len(values) != len(store):  # metrics missing from this entry get NaN
            for column in store.values():
                if len(column) == length:
                    column.append(math.nan)

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        """Appends one step's train metrics."""
        self._append(self._train, len(self._steps), metrics)
        self._steps.append(int(step))

    def record_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Appends one evaluation's metrics."""
        self._append(self._eval, len(self._eval_steps), metrics)
        self._eval_steps.append(int(step))

    @property
    def steps(self) -> np.ndarray:
        """Step numbers of the train metrics, ``(n,)`` int."""
        return np.asarray(self._steps, dtype=np.int64)

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """Train metrics, name to ``(n,)`` array."""
        return {name: np.asarray(values) for name, values in self._train.items()}

    @property
    def eval_steps(self) -> np.ndarray:
        """Step numbers of the evaluations, ``(m,)`` int."""
        return np.asarray(self._eval_steps, dtype=np.int64)

    @property
    def eval_metrics(self) -> dict[str, np.ndarray]:
        """Evaluation metrics, name to ``(m,)`` array."""
        return {name: np.asarray(values) for name, values in self._eval.items()}

    def _lookup(self, name: str) -> tuple[bool, str]:
        """``(is_eval, metric)`` for a name of :meth:`__getitem__`."""
        if name in self._train:
            return False, name
        if name in self._eval:
            return True, name
        if name.startswith("eval/") and name[len("eval/") :] in self._eval:
            return True, name[len("eval/") :]
        raise KeyError(
            f"no metric {name!r}; train metrics {sorted(self._train)}, "
            f"eval metrics {sorted(self._eval)}"
        )

    def __getitem__(self, name: str) -> np.ndarray:
        """A metric's values: a train metric, else an eval metric of that name; ``"eval/<name>"``
        is the eval metric even when a train metric has the same name (an ``eval_fn``
        returning ``{"loss": ...}``: ``h["loss"]`` is the training loss, ``h["eval/loss"]``
        the evaluation's)."""
        is_eval, metric = self._lookup(name)
        return np.asarray((self._eval if is_eval else self._train)[metric])

    def __len__(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        last = {name: values[-1] for name, values in self._train.items() if values}
        return (
            f"History({len(self)} steps, train={sorted(self._train)}, eval={sorted(self._eval)}, "
            f"last={last})"
        )

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Returns arrays and JSON metadata that :meth:`from_arrays` turns back into a History."""
        arrays = {"history_steps": self.steps, "history_eval_steps": self.eval_steps}
        train_names, eval_names = sorted(self._train), sorted(self._eval)
        for index, name in enumerate(train_names):
            arrays[f"history_train_{index}"] = np.asarray(self._train[name], np.float64)
        for index, name in enumerate(eval_names):
            arrays[f"history_eval_{index}"] = np.asarray(self._eval[name], np.float64)
        return arrays, {"history_train": train_names, "history_eval": eval_names}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> History:
        """Rebuilds a History from :meth:`to_arrays`'s output."""
        history = cls()
        history._steps = [int(s) for s in arrays["history_steps"]]
        history._eval_steps = [int(s) for s in arrays["history_eval_steps"]]
        for index, name in enumerate(metadata["history_train"]):
            history._train[name] = [float(v) for v in arrays[f"history_train_{index}"]]
        for index, name in enumerate(metadata["history_eval"]):
            history._eval[name] = [float(v) for v in arrays[f"history_eval_{index}"]]
        return history

    def plot(self, names: Sequence[str] | None = None, *, path: str | Path | None = None) -> Any:
        """Plots each metric against the step, one panel per metric (needs matplotlib).

        Each panel shows the steps where the metric was recorded (NaN entries are left out);
        gradient norms (``grad_norm``, ``health/<layer>/grad_norm``) use a log scale when
        positive.

        Args:
          names: the metrics to plot, as :meth:`__getitem__` takes them (``"eval/loss"`` for
            an eval metric named like a train one); default all train then all eval metrics.
          path: if given, the figure is also saved there (PNG, SVG, … by extension).

        Returns:
          The matplotlib ``Figure``.

        Raises:
          ImportError: without matplotlib (``pip install "gradkit[plot]"``).
          KeyError: for an unknown metric name.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                'History.plot needs matplotlib: pip install "gradkit[plot]"'
            ) from error
        if names is None:
            panels = [(False, name) for name in self._train]
            panels += [(True, name) for name in self._eval]
        else:
            panels = [self._lookup(name) for name in names]
        if not panels:
            raise ValueError("History.plot: there is nothing to plot yet")
        figure, axes = plt.subplots(
            len(panels), 1, figsize=(6.4, 2.2 * len(panels)), sharex=True, squeeze=False
        )
        for axis, (is_eval, name) in zip(axes[:, 0], panels, strict=True):
            values = np.asarray((self._eval if is_eval else self._train)[name])
            steps = self.eval_steps if is_eval else self.steps
            # Metrics recorded every k steps (health/...) are NaN in between: plot the recorded
            # points only, or isolated points between NaNs would draw no line at all.
            recorded = np.isfinite(values)
            steps, values = steps[recorded], values[recorded]
            marker = "o" if len(values) <= 50 else None
            axis.plot(steps, values, marker=marker, markersize=3)
            axis.set_ylabel(f"eval {name}" if is_eval else name)
            if name.endswith("grad_norm") and values.size and np.all(values > 0):
                axis.set_yscale("log")
            axis.grid(True, alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=100)
        return figure


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` when a step's loss or gradient norm is NaN or infinite, or when
    its update makes the params non-finite although both were finite (an optimizer dividing by
    zero or overflowing).

    Attributes:
      step: the step number (1-based) whose loss, gradient or update was not finite.
      state: the state *before* that step (its params are the last finite ones; pass them with
        ``batch`` to ``gradkit.diagnostics.find_nan_origin`` to find the operation responsible).
      batch: the batch of that step.
      history: the metrics recorded so far (up to the previous step for a non-finite loss or
        gradient; including the step for a non-finite update, whose metrics were finite).
      checkpoint: the newest checkpoint left in ``checkpoint_dir`` (``None`` without one); the
        failing state is never written.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        state: TrainState,
        batch: PyTree,
        history: History,
        checkpoint: Path | None,
    ):
        super().__init__(message)
        self.step = step
        self.state = state
        self.batch = batch
        self.history = history
        self.checkpoint = checkpoint


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray | jax.Array)


def _array_dataset(data: Any) -> PyTree | None:
    """Returns ``data`` as a pytree of arrays if it is one (array, tuple or dict of arrays)."""
    if _is_array(data):
        return data
    if isinstance(data, tuple | Mapping):
        leaves = jax.tree_util.tree_leaves(data)
        if leaves and all(_is_array(leaf) for leaf in leaves):
            return data
    return None


def _looks_like_listed_arrays(data: Any) -> bool:
    """Whether ``data`` is a tuple or dict of lists of plain numbers (``(x.tolist(),
    y.tolist())``): arrays in disguise, not batches."""
    parts = list(data.values()) if isinstance(data, Mapping) else data
    if not isinstance(data, tuple | Mapping) or not parts:
        return False

    def numeric(item: Any) -> bool:
        if isinstance(item, list):
            return bool(item) and all(numeric(element) for element in item[:8])
        return isinstance(item, int | float | np.number) and not isinstance(item, bool)

    return all(isinstance(part, list) and numeric(part) for part in parts)


def _check_not_mixed(data: Any) -> None:
    """Refuses the data that look like arrays of examples but would be iterated as batches.

    A tuple or dict holding arrays next to other values (``(x, y.tolist())``, ``{"x": x,
    "scale": 2.0}``) is not an array dataset, and iterating it would hand each part to the loss
    as a whole batch. A list of a few arrays sharing their leading axis but not their per-example
    shape or dtype (``[x, y]``) is the inputs and labels of one dataset, not batches, which
    share both.
    """
    if isinstance(data, tuple | Mapping):
        leaves = jax.tree_util.tree_flatten_with_path(data)[0]
        arrays = [path for path, leaf in leaves if _is_array(leaf)]
        others = [(path, leaf) for path, leaf in leaves if not _is_array(leaf)]
        if others and (arrays or isinstance(data, Mapping)):
            path, leaf = others[0]
            raise TypeError(
                f"data is a {type(data).__name__} of arrays, the examples to train on, but "
                f"data{jax.tree_util.keystr(path)} is {type(leaf).__name__}, not an array; "
                "convert every part to an array (np.asarray) sharing the leading example axis"
                + (
                    ""
                    if isinstance(data, Mapping)
                    else ", or pass a list of batches to iterate over"
                )
            )
    if isinstance(data, list) and 1 < len(data) <= 8 and all(_is_array(part) for part in data):
        shapes = [np.shape(part) for part in data]
        dtypes = {np.dtype(part.dtype) for part in data}
        lengths = {shape[0] if shape else None for shape in shapes}
        if len(lengths) == 1 and None not in lengths:
            if len({shape[1:] for shape in shapes}) > 1 or len(dtypes) > 1:
                described = ", ".join(
                    f"{np.dtype(part.dtype).name}{list(np.shape(part))}" for part in data
                )
                raise TypeError(
                    f"data is a list of {len(data)} arrays ({described}) sharing their leading "
                    "axis but not their shapes or dtypes: they look like the parts of one "
                    "dataset (inputs, labels), but fit takes a list as an iterable of batches, "
                    "each array a whole batch; pass them as a tuple, e.g. (x, y), to train on "
                    "their rows as examples"
                )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class _Batches:
    """Where the batches come from: shuffled slices of arrays, or an iterable."""

    def __init__(self, data: Any, batch_size: int | None, shuffle: bool, mesh_size: int):
        self.arrays = _array_dataset(data)
        self.mesh_size = mesh_size
        if self.arrays is not None:
            leaves = jax.tree_util.tree_leaves(self.arrays)
            lengths = {int(np.shape(leaf)[0]) if np.ndim(leaf) else 0 for leaf in leaves}
            if len(lengths) != 1 or 0 in lengths:
                shapes = [tuple(np.shape(leaf)) for leaf in leaves]
                raise ValueError(
                    "data arrays must share a non-empty leading (example) axis, got shapes "
                    f"{shapes}"
                )
            (self.size,) = lengths
            self.batch_size = (
                self.size if batch_size is None else _positive_int(batch_size, "batch_size")
            )
            if self.batch_size > self.size:
                raise ValueError(
                    f"batch_size {self.batch_size} is larger than the data ({self.size} "
                    f"examples); use batch_size <= {self.size} (or None for the full batch)"
                )
            self.steps_per_epoch = self.size // self.batch_size
            self.shuffle = shuffle
        else:
            if not isinstance(data, Iterable) or isinstance(data, str | bytes):
                raise TypeError(
                    "data must be arrays (an array, or a tuple or dict of arrays sharing their "
                    f"leading axis) or an iterable of batches, got {type(data).__name__}"
                )
            if _looks_like_listed_arrays(data):
                raise TypeError(
                    "data is a tuple or dict of Python lists of numbers, which fit would take "
                    "for an iterable of batches; convert them to arrays (np.asarray) to train "
                    "on them as examples"
                )
            _check_not_mixed(data)
            if batch_size is not None:
                raise ValueError(
                    "batch_size applies to array data; an iterable already yields batches "
                    "(pass batch_size=None)"
                )
            self.iterable = data
            self.batch_size = None
            self.steps_per_epoch = len(data) if hasattr(data, "__len__") else None
            if self.steps_per_epoch == 0:
                raise ValueError("fit: data yielded no batches (it is empty)")
        if self.batch_size is not None and self.batch_size % mesh_size:
            what = (
                f"batch_size {self.batch_size}"
                if batch_size is not None
                else f"the full batch (batch_size=None: all {self.batch_size} examples)"
            )
            raise ValueError(
                f"{what} must be divisible by the {mesh_size} devices of the mesh's data axis"
            )


def _is_true(value: Any) -> bool:
    """Whether a callback's result asks to stop: ``True`` as a Python, NumPy or JAX boolean
    (``None`` and every other value continue)."""
    if value is True:
        return True
    if isinstance(value, np.bool_ | np.ndarray | jax.Array):
        return np.shape(value) == () and np.asarray(value).dtype == bool and bool(value)
    return False


def _iterate(data: Iterable, skip: int) -> Iterator[Any]:
    """Yields batches from ``data`` pass after pass, after skipping ``skip`` batches."""
    seen = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if seen >= skip:
                yield batch
            seen += 1
        if empty:
            return
        if iter(data) is data:  # a one-shot iterator is exhausted after its pass
            return


def fit(
    loss_fn: LossFn,
    params: PyTree,
    data: Any,
    optimizer: optax.GradientTransformation,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    eval_fn: Callable[[PyTree], Any] | None = None,
    eval_every: int | None = None,
    callbacks: Sequence[Callable[..., Any]] = (),
    progress: bool = True,
    log_dir: str | Path | None = None,
    log_every: int = 1,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = 3,
    resume: bool = True,
    mesh: Mesh | None = None,
    data_parallel: bool = False,
    seed: int = 0,
    has_aux: bool = False,
    clip_global_norm: float | None = None,
    check_dtypes: bool = True,
    health_every: int | None = None,
    steps_per_call: int = 1,
) -> tuple[TrainState, History]:
    """Trains ``params`` to minimise ``loss_fn`` with ``optimizer``; returns ``(state, history)``.

    Each step is :func:`make_train_step`'s step, compiled once. With array data, each epoch's
    order is ``jax.random.permutation(fold_in(key(seed), epoch), n)`` and the batch is gathered
    inside the compiled step, so a run is a deterministic function of ``seed``; the last
    ``n % batch_size`` examples of each epoch's order are left out so every batch has the same
    shape.

    Everything checkable is checked before the first step: the optimizer type, ``steps`` /
    ``epochs``, ``batch_size`` against the data, data against params dtypes, the checkpoint
    folder; a non-scalar loss is reported when the first step is traced, before any update.

    Checkpoints (``checkpoint_dir``) are ``.npz`` files, never pickles, written atomically (to a
    temporary file, then renamed) every ``checkpoint_every`` steps, at the end, and when the run
    is interrupted (``KeyboardInterrupt`` writes one, then re-raises). With ``resume=True`` a run
    continues from the newest checkpoint, and a run interrupted at step n and resumed ends with
    bit-for-bit the parameters of an uninterrupted run (same device and software). A checkpoint
    of a different model or optimizer is refused with the list of differences. A NaN or infinite
    loss or gradient norm, or an update that makes the params non-finite, stops the run with
    :class:`NonFiniteLossError`; params are checked on the host before every checkpoint and a
    non-finite state is never written, so the newest checkpoint is the last good one.

    The host runs ahead of the device: it launches the next steps while earlier ones compute,
    and reads their metrics back a few steps late (a NaN still stops the run at its own step, a
    callback still sees the state of its step). Each step launched and not yet handled keeps its
    state alive: 4 at most on a CPU; on a GPU or TPU up to 16, while they take less than 256 MiB
    together (a larger model keeps 4), and there a block's metrics come back in one copy.

    Data parallelism uses JAX's sharding: with ``mesh`` (or ``data_parallel=True``, a 1-D mesh
    over ``jax.devices()``) the batch is split along the mesh's first axis and params and
    optimizer state are replicated; XLA inserts the gradient all-reduce. On several hosts, call
    ``jax.distributed.initialize()`` in every process first, build the mesh over
    ``jax.devices()`` (all hosts' devices), and give each process an iterable yielding its own
    slice of each global batch: ``fit`` assembles them with
    ``jax.make_array_from_process_local_data``. (Array data is placed whole on every device,
    which suits data that fits on one host.)

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux_dict)`` with
        ``has_aux``). ``batch`` has the structure of ``data`` (for arrays) or of each batch.
      params: initial parameters (any pytree of float arrays).
      data: arrays (an array, a tuple or a dict of arrays with a common leading axis), shuffled
        and batched on the fly; or any other iterable of batches (a list, a generator, a data
        loader), used as is and re-iterated for more passes when it can be. A list is always
        an iterable of batches: inputs and labels go in a tuple, ``(x, y)``, not ``[x, y]``
        (a short list of arrays sharing their leading axis but not their shapes or dtypes is
        refused as the likely mistake, as are a tuple or dict mixing arrays with lists or
        numbers).
      optimizer: an optax ``GradientTransformation``.
      steps: total number of steps (counting steps already done when resuming). Exactly one of
        ``steps`` and ``epochs``.
      epochs: number of passes over the data.
      batch_size: examples per step for array data (``None``: the whole data, full batch).
      shuffle: reshuffle array data every epoch (``False`` keeps the given order).
      eval_fn: ``eval_fn(params) -> scalar or dict of scalars``, called every ``eval_every``
        steps and after the last step (jit it yourself if it is heavy).
      eval_every: evaluation interval in steps (``None``: only after the last step).
      callbacks: each is called as ``callback(step, state, metrics)`` after every step, where
        ``metrics`` holds this step's floats (and ``eval_<name>`` at evaluation steps); a
        callback returning ``True`` (a Python, NumPy or JAX boolean) stops training after that
        step. With ``steps_per_call`` above 1, after the last step of each call instead.
      progress: show a tqdm progress bar (notebook-aware) with step, loss and steps/s.
      log_dir: write TensorBoard scalars there (``train/loss``, ``train/grad_norm``,
        ``train/<aux>``, ``eval/<name>``); needs tensorboardX.
      log_every: TensorBoard interval in steps.
      checkpoint_dir: folder for checkpoints (``None``: no checkpoints).
      checkpoint_every: checkpoint interval in steps (``None``: only at the end and on
        interrupt).
      keep_checkpoints: how many newest checkpoints to keep (``None``: all).
      resume: continue from the newest checkpoint in ``checkpoint_dir``. With ``False`` a folder
        that already holds checkpoints is refused rather than overwritten.
      mesh: a ``jax.sharding.Mesh`` for data parallelism.
      data_parallel: use a mesh over all ``jax.devices()`` (ignored when ``mesh`` is given).
      seed: seed of the run's PRNG key (shuffling order). A resumed run keeps the key of its
        checkpoint, and warns when ``seed`` would have given another.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux scalars join the metrics.
      clip_global_norm: clip gradients to this global norm (see :func:`make_train_step`).
      check_dtypes: refuse data whose float dtype differs from the params' (default True).
      health_every: every k steps, compute gradient-health statistics inside the step (see
        :func:`make_train_step`), record each layer's gradient norm in the history as
        ``health/<layer>/grad_norm`` and, with ``log_dir``, write the per-leaf statistics and
        log2-magnitude histograms with :func:`gradkit.diagnostics.log_health`. ``fit`` knows
        the step number on the host, so it compiles the step twice, with and without the
        statistics, and runs the plain one in between: those steps cost exactly what they cost
        without monitoring (a device-side ``lax.cond`` would keep XLA from fusing the update).
      steps_per_call: run this many steps per call of the compiled program, in a
        :func:`jax.lax.scan` (default 1). On a GPU, where launching a step of a small model
        takes the host longer than the device takes to run it, this is what makes ``fit``
        faster than a loop that launches one step at a time (README, "On a GPU"). Calls start
        at steps that are multiples of k; steps outside such a run of k (after resuming from
        another step, at the end) run one by one, with a second compiled program. The history
        keeps every step's metrics, but ``eval_fn``, callbacks and checkpoints see the state
        only at the end of each call: callbacks run once per call, for its last step, and
        ``eval_every`` and ``checkpoint_every`` must be multiples of k. A non-finite loss stops
        the run at its own step as usual (the steps of its call before it are replayed one by
        one from the call's start to rebuild the error's state). With ``health_every`` the k
        steps of a call that would hold a monitored step run one by one instead, callbacks
        after each (with ``health_every=100`` and k = 16, 16 steps in 100; with
        ``health_every <= k``, all of them, and ``fit`` warns). Not with data parallelism. The
        states equal those of ``steps_per_call=1`` up to rounding (XLA
        may compile the scanned step differently); a run resumed from a checkpoint at a
        multiple of k ends bit for bit as the uninterrupted run with the same k.

    Returns:
      ``(state, history)``: the final :class:`TrainState` and the :class:`History` (including
      the steps before a resume).

    Raises:
      TypeError: for an optimizer that is not an optax transform, non-callable callbacks, or
        data whose float dtype differs from the params'.
      ValueError: for a bad ``steps``/``epochs``/``batch_size``, empty data, a non-scalar loss
        or ``eval_fn`` result, or a checkpoint folder holding another model's checkpoints (or
        any, with ``resume=False``).
      NonFiniteLossError: when a step's loss or gradient norm is not finite.
      KeyboardInterrupt: re-raised after writing a final checkpoint.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> x = np.linspace(-1, 1, 64, dtype=np.float32); y = 3 * x
      >>> loss = lambda p, b: jnp.mean((p["w"] * b[0] - b[1]) ** 2)
      >>> state, history = fit(loss, {"w": jnp.zeros(())}, (x, y), optax.sgd(0.5),
      ...                      steps=50, batch_size=16, progress=False)
      >>> round(float(state.params["w"]), 3), len(history)
      (3.0, 50)
    """
    _validate_step_arguments(loss_fn, optimizer, clip_global_norm)
    if (steps is None) == (epochs is None):
        raise ValueError(
            f"pass exactly one of steps and epochs, got steps={steps}, epochs={epochs}"
        )
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"callbacks must be callables, got {callback!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable as eval_fn(params), got {eval_fn!r}")
    eval_every = None if eval_every is None else _positive_int(eval_every, "eval_every")
    log_every = _positive_int(log_every, "log_every")
    if checkpoint_every is not None:
        checkpoint_every = _positive_int(checkpoint_every, "checkpoint_every")
    if keep_checkpoints is not None:
        keep_checkpoints = _positive_int(keep_checkpoints, "keep_checkpoints")
    if health_every is not None:
        health_every = _positive_int(health_every, "health_every")
    steps_per_call = _positive_int(steps_per_call, "steps_per_call")
    if steps_per_call > 1:
        _check_steps_per_call(
            steps_per_call,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            parallel=mesh is not None or data_parallel,
        )
        if health_every is not None and health_every <= steps_per_call:
            warnings.warn(
                f"fit: with health_every={health_every} every call of steps_per_call="
                f"{steps_per_call} steps would hold a monitored step, so all steps run one by "
                "one; steps_per_call speeds up only runs with health_every well above it",
                stacklevel=2,
            )

    if mesh is None and data_parallel:
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
    mesh_size = int(mesh.shape[mesh.axis_names[0]]) if mesh is not None else 1
    batches = _Batches(data, batch_size, shuffle, mesh_size)

    if epochs is not None:
        epochs = _positive_int(epochs, "epochs")
        total = None if batches.steps_per_epoch is None else epochs * batches.steps_per_epoch
    else:
        total = _positive_int(steps, "steps")

    state = TrainState.create(params, optimizer, seed=seed)
    if batches.arrays is not None:
        # Converted once: the run uses these device arrays (a second conversion of NumPy data
        # would hold it on the device twice).
        batches.arrays = jax.tree_util.tree_map(jnp.asarray, batches.arrays)
        if check_dtypes:
            _check_dtypes(state.params, batches.arrays)

    history = History()
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if checkpoint_dir is not None:
        newest = _checkpoint.latest_checkpoint(checkpoint_dir)
        if newest is not None and not resume:
            raise ValueError(
                f"checkpoint_dir {checkpoint_dir} already holds checkpoints (newest {newest.name})"
                "; pass resume=True to continue that run, or use an empty folder"
            )
        if newest is not None:
            fresh_key = state.key
            state, extra, metadata = _checkpoint.restore(newest, state)
            if not np.array_equal(jax.random.key_data(state.key), jax.random.key_data(fresh_key)):
                warnings.warn(
                    f"fit: the run in {checkpoint_dir} was started with another PRNG key than "
                    f"seed={seed} gives; resuming continues it with its own key (its shuffling "
                    "order), so it ends as that run would have. To train with this seed, use "
                    "another checkpoint_dir",
                    stacklevel=2,
                )
            if "history_steps" in extra:  # a checkpoint written by fit (not bare save)
                history = History.from_arrays(extra, metadata)

    writer = None
    if log_dir is not None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError(
                'log_dir needs tensorboardX: pip install "gradkit[tensorboard]"'
            ) from error
        writer = SummaryWriter(str(log_dir))

    step_options = dict(
        has_aux=has_aux, clip_global_norm=clip_global_norm, check_dtypes=check_dtypes
    )
    body = _make_step_body(loss_fn, optimizer, **step_options)
    health_layout: list[Any] = []
    health_body = (
        None
        if health_every is None
        else _make_step_body(
            loss_fn, optimizer, health_always=True, health_layout=health_layout, **step_options
        )
    )
    run = _Run(
        body=body,
        health_body=health_body,
        batches=batches,
        state=state,
        history=history,
        total=total,
        epochs=epochs,
        mesh=mesh,
        eval_fn=eval_fn,
        eval_every=eval_every,
        callbacks=tuple(callbacks),
        writer=writer,
        log_every=log_every,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        progress=progress,
        health_every=health_every,
        health_layout=health_layout,
        steps_per_call=steps_per_call,
    )
    try:
        return run.execute()
    finally:
        if writer is not None:
            writer.close()


def _check_steps_per_call(
    k: int,
    *,
    eval_every: int | None,
    checkpoint_every: int | None,
    parallel: bool,
) -> None:
    """Refuses the options that need a state inside a call of ``k`` steps, before any work."""
    for name, every in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if every is not None and every % k:
            raise ValueError(
                f"{name}={every} is not a multiple of steps_per_call={k}: the state exists on "
                f"the host only at the end of each call of {k} steps; use a multiple of {k}, "
                "or steps_per_call=1"
            )
    if parallel:
        raise ValueError(
            f"steps_per_call={k} does not shard its stacked batches over a mesh; for data "
            "parallelism (mesh= or data_parallel=True) use steps_per_call=1"
        )


# Steps launched and not yet handled on the host, at most. When there are this many, the host
# waits once, for the newest of the oldest _STEPS_PER_READ, and handles those together while the
# device runs the others. Waking once per block rather than once per step measured 1-2% faster
# on the MLP benchmark (2 CPU cores). The queue stays short because every unhandled step keeps
# its state alive (a callback or a NaN report may need it), and live states cost time as well as
# memory: in a bare loop on that benchmark, keeping 4, 6 or 8 states alive was 1%, 2% or 5%
# slower than keeping none (the allocator hands out fresh pages instead of recycling buffers).
_MAX_STEPS_IN_FLIGHT = 4
_STEPS_PER_READ = 2
# On a GPU (or TPU) a step of a small model takes less time than the host needs to launch it,
# and each wait for the device drains its queue: there the queue is deeper, up to this many
# steps, as long as the states it keeps alive stay under _IN_FLIGHT_BYTES (a large model keeps
# the CPU's depth; its steps are long enough that a short queue costs it nothing).
_MAX_STEPS_IN_FLIGHT_ACCELERATOR = 16
_IN_FLIGHT_BYTES = 256 * 2**20
# Where each step's batch window starts, for array data: the host passes it (an int32) on the
# CPU, where deriving it from state.step inside the step measured ~4% slower on the MLP
# benchmark; on an accelerator the step derives it, which spares a host-to-device copy per step.
# None: by platform.
_WINDOW_ON_DEVICE: bool | None = None
# Reading a block of steps' metrics back: on an accelerator they are stacked on the device and
# copied to the host at once; on the CPU they already are in host memory. None: by platform.
_STACK_METRICS: bool | None = None


@jax.jit
def _stack_metrics(metrics: tuple[jax.Array, ...]) -> jax.Array:
    return jnp.stack(metrics)


def _queue_depth(platform: str, state_bytes: int) -> tuple[int, int]:
    """(steps in flight at most, steps handled per wait) for a state of ``state_bytes``."""
    if platform == "cpu":
        return _MAX_STEPS_IN_FLIGHT, _STEPS_PER_READ
    fits = _IN_FLIGHT_BYTES // max(state_bytes, 1)
    depth = max(_MAX_STEPS_IN_FLIGHT, min(_MAX_STEPS_IN_FLIGHT_ACCELERATOR, fits))
    return depth, max(1, depth // 2)


def _non_finite_paths(params: PyTree) -> list[str]:
    """The pytree paths of the float leaves of ``params`` holding NaN or Inf (on the host)."""
    return [path for path, _ in _health.non_finite_leaves(params)]


class _Pending(NamedTuple):
    """A launched step. Its states carry ``key=None``: the compiled step never sees the key."""

    step: int
    before: TrainState
    after: TrainState
    metrics: jax.Array  # the step's metrics, stacked in the order of _Run.metric_names
    health: Any  # the step's packed gradient statistics (health_every steps only)
    batch: PyTree | None  # the iterable's batch as given; None for array data (re-gathered)
    # Steps in this call (steps_per_call): ``step`` is the last one's number, ``before`` the
    # state before the first, ``metrics`` (steps, names) and ``batch`` a list of the batches.
    steps: int = 1


class _Run:
    """The host side of :func:`fit`: one object per call, holding the loop's state."""

    def __init__(
        self,
        *,
        body,
        health_body,
        batches,
        state,
        history,
        total,
        epochs,
        mesh,
        steps_per_call=1,
        **options,
    ):
        self.batches = batches
        self.steps_per_call = steps_per_call
        self.history = history
        self.total = total
        self.epochs = epochs
        self.options = options
        directory = options["checkpoint_dir"]
        self.last_checkpoint = (
            None if directory is None else _checkpoint.latest_checkpoint(directory)
        )
        self.replicated = self.batch_sharding = None
        if mesh is not None:
            self.replicated = NamedSharding(mesh, PartitionSpec())
            self.batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
            state = jax.device_put(state, self.replicated)
        self.start = int(state.step)
        self.key = state.key  # constant during a run: kept out of the compiled step
        # The newest state whose metrics were finite. The host holds no other reference to the
        # initial state, so its buffers are freed once the first step is handled.
        self.good = state
        self.consumed: _Pending | None = None  # the step that produced self.good
        self.verified: _Pending | None = None  # the newest step whose params were found finite
        self.passed = 0
        self.checkpointed_step = int(state.step)
        self.queue: collections.deque[_Pending] = collections.deque()
        if batches.arrays is not None:
            self.arrays = jax.tree_util.tree_map(jnp.asarray, batches.arrays)
            if self.replicated is not None:
                self.arrays = jax.device_put(self.arrays, self.replicated)
            size = batches.size
            # One dispatch per epoch: fold_in and permutation traced together.
            self.shuffled_order = jax.jit(
                lambda key, epoch: jax.random.permutation(
                    jax.random.fold_in(key, epoch), size
                ).astype(jnp.int32)
            )
        platform = jax.devices()[0].platform if mesh is None else mesh.devices.flat[0].platform
        self.window_on_device = (
            platform != "cpu" if _WINDOW_ON_DEVICE is None else bool(_WINDOW_ON_DEVICE)
        ) or steps_per_call > 1  # a call of several steps finds each one's window itself
        state_bytes = sum(
            leaf.nbytes for leaf in jax.tree_util.tree_leaves(state) if hasattr(leaf, "nbytes")
        )
        self.in_flight, self.per_read = _queue_depth(platform, state_bytes)
        if steps_per_call > 1:
            # The queue holds calls: as many steps ahead as with one step per call, but at
            # least two calls, so that the device runs one while the host handles the other.
            self.in_flight = max(2, -(-self.in_flight // steps_per_call))
            self.per_read = max(1, self.in_flight // 2)
        self.orders: tuple[int, jax.Array] | None = None  # (first epoch, stacked orders)
        self.stack_metrics = platform != "cpu" if _STACK_METRICS is None else bool(_STACK_METRICS)
        self.step_fn = self._compile(body)
        self.call_fn = None if steps_per_call == 1 else self._compile_call(body, steps_per_call)
        # Steps whose number is a multiple of health_every run this one instead.
        self.health_step_fn = None if health_body is None else self._compile(health_body)

    def _with_key(self, state: TrainState) -> TrainState:
        return TrainState(state.params, state.opt_state, state.step, self.key)

    # -- compiled pieces ----------------------------------------------------------------------

    def _compile(self, body):
        """The jitted step for ``body``: on a batch, or on the arrays and an index window."""

        def _constrained_step(state: TrainState, batch: PyTree):
            return self._constrained(body, state, batch)

        # The window's offset comes from the host, or on an accelerator from state.step (see
        # _WINDOW_ON_DEVICE): epoch e's steps are e * per_epoch ... (e + 1) * per_epoch - 1.
        def _indexed_step(state: TrainState, arrays: PyTree, order: jax.Array, offset: jax.Array):
            return self._constrained(body, state, self._gather(arrays, order, offset))

        def _windowed_step(state: TrainState, arrays: PyTree, order: jax.Array):
            per_epoch, size = self.batches.steps_per_epoch, self.batches.batch_size
            offset = jax.lax.rem(state.step, jnp.int32(per_epoch)) * jnp.int32(size)
            return self._constrained(body, state, self._gather(arrays, order, offset))

        if self.batches.arrays is None:
            return jax.jit(_constrained_step)
        return jax.jit(_windowed_step if self.window_on_device else _indexed_step)

    def _compile_call(self, body, k: int):
        """The jitted program of ``k`` steps in a ``lax.scan``: ``(state, *args) -> (state,
        metrics of shape (k, names), None)``, on ``k`` stacked batches, or on the arrays and
        the stacked orders of the epochs the call may span (see :meth:`_call_arguments`)."""

        def scanned(state, steps_input, batch_of):
            def one(state, step_input):
                new_state, metrics, _ = self._constrained(body, state, batch_of(state, step_input))
                return new_state, metrics

            new_state, metrics = jax.lax.scan(one, state, steps_input, length=k)
            return new_state, metrics, None

        def _stacked_call(state: TrainState, batches: PyTree):
            return scanned(state, batches, lambda state, batch: batch)

        def _windowed_call(state: TrainState, arrays: PyTree, orders: jax.Array):
            per_epoch, size = self.batches.steps_per_epoch, self.batches.batch_size
            first_epoch = state.step // jnp.int32(per_epoch)

            def batch_of(state, _):
                epoch, index = jnp.divmod(state.step, jnp.int32(per_epoch))
                order = orders[epoch - first_epoch]
                return self._gather(arrays, order, index * jnp.int32(size))

            return scanned(state, None, batch_of)

        if self.batches.arrays is None:
            return jax.jit(_stacked_call)
        return jax.jit(_windowed_call)

    def _constrained(self, body, state: TrainState, batch: PyTree):
        if self.batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
        new_state, metrics = body(state, batch)
        if self.replicated is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, self.replicated)
        health = metrics.pop("health", None)
        # One array instead of a dict: reading the metrics back is then a single transfer.
        self.metric_names = tuple(sorted(metrics))
        values = [jnp.asarray(metrics[name]) for name in self.metric_names]
        dtype = jnp.result_type(jnp.float32, *values)
        return new_state, jnp.stack([value.astype(dtype) for value in values]), health

    def _gather(self, arrays: PyTree, order: jax.Array, offset: Any) -> PyTree:
        size = self.batches.batch_size
        if size == self.batches.size and not self.batches.shuffle:
            return arrays
        index = jax.lax.dynamic_slice_in_dim(order, offset, size)
        # order is a permutation of the examples and offset + size <= len(order): the indices
        # are in bounds, and saying so spares the gather the masking of out-of-bounds rows
        # (measured: ~3% of the MLP benchmark's step on XLA:CPU).
        return jax.tree_util.tree_map(
            lambda leaf: leaf.at[index].get(mode="promise_in_bounds"), arrays
        )

    # -- batches ------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> jax.Array:
        if not self.batches.shuffle:
            return jnp.arange(self.batches.size, dtype=jnp.int32)
        return self.shuffled_order(self.key, np.uint32(epoch))

    def _step_inputs(self) -> Iterator[tuple[tuple[Any, ...], PyTree | None]]:
        """Yields each step's extra arguments to the compiled step and its batch as given."""
        start = self.start
        if self.batches.arrays is not None:
            per_epoch, size = self.batches.steps_per_epoch, self.batches.batch_size
            for epoch in range(start // per_epoch, -(-self.total // per_epoch)):
                order = self._epoch_order(epoch)
                first = max(start, epoch * per_epoch)
                last = min(self.total, (epoch + 1) * per_epoch)
                if self.window_on_device:
                    arguments = (self.arrays, order)
                    for _ in range(first, last):
                        yield arguments, None
                    continue
                for step in range(first, last):
                    yield (self.arrays, order, np.int32((step - epoch * per_epoch) * size)), None
            return
        limit = self.total
        if limit is None and self.epochs is not None and self.batches.steps_per_epoch is None:
            # An iterable of unknown length: count passes ourselves.
            yield from self._passes(start)
            return
        for step, batch in enumerate(_iterate(self.batches.iterable, start), start):
            if limit is not None and step >= limit:
                return
            yield (self._place(batch),), batch

    def _calls(self) -> Iterator[tuple[int, tuple[Any, ...], Any]]:
        """Yields ``(steps, arguments, batch)`` per call: one step (the arguments and batch of
        :meth:`_step_inputs`), or ``steps_per_call`` steps starting at a multiple of it
        (:meth:`_call_arguments`, and the list of their batches)."""
        k = self.steps_per_call
        if k == 1:
            for args, batch in self._step_inputs():
                yield 1, args, batch
            return
        health_every = self.options["health_every"]
        number = self.start  # the step about to be taken (state.step before it)
        group: list[tuple[tuple[Any, ...], Any]] = []
        for args, batch in self._step_inputs():
            if not group and number % k:
                yield 1, args, batch  # up to the next multiple of k, one by one
            else:
                group.append((args, batch))
                if len(group) == k:
                    first = number + 1 - k
                    if health_every is not None and -first % health_every < k:
                        # A monitored step among them: it is a program of its own, so these
                        # k steps run one by one.
                        yield from ((1, args, batch) for args, batch in group)
                    else:
                        yield k, self._call_arguments(first, group), [b for _, b in group]
                    group = []
            number += 1
        for args, batch in group:  # the data ended within a call's steps
            yield 1, args, batch

    def _call_arguments(self, first: int, group: list[tuple[tuple[Any, ...], Any]]):
        """The arguments of the call of ``len(group)`` steps from step ``first`` on."""
        if self.batches.arrays is None:
            batches = [args[0] for args, _ in group]
            host = all(
                isinstance(leaf, np.ndarray | np.generic | int | float)
                for leaf in jax.tree_util.tree_leaves(batches)
            )
            stack = np.stack if host else jnp.stack  # one copy to the device for host data
            try:
                return (jax.tree_util.tree_map(lambda *leaves: stack(leaves), *batches),)
            except ValueError as error:
                raise ValueError(
                    f"steps_per_call={len(group)} stacks the batches of steps {first + 1} to "
                    f"{first + len(group)}, and they differ in structure or shape ({error}); "
                    "give batches of one shape, or use steps_per_call=1"
                ) from error
        # The orders of every epoch the call may span, stacked once per first epoch.
        per_epoch = self.batches.steps_per_epoch
        epoch = first // per_epoch
        if self.orders is None or self.orders[0] != epoch:
            count = (len(group) - 1) // per_epoch + 2
            stacked = jnp.stack([self._epoch_order(epoch + i) for i in range(count)])
            self.orders = (epoch, stacked)
        return self.arrays, self.orders[1]

    def _single(self, pending: _Pending, index: int) -> tuple[_Pending, _Pending | None]:
        """Step ``index`` of a call of several steps, and the step before it within the call
        (None for the first), as one-step records: their states replayed from the call's start
        with the one-step program."""
        first = pending.step - pending.steps  # state.step before the call
        state, previous, current = pending.before, None, None
        for i in range(index + 1):
            step = first + i
            if self.batches.arrays is None:
                batch = pending.batch[i]
                args = (self._place(batch),)
            else:
                batch = None
                args = (self.arrays, self._epoch_order(step // self.batches.steps_per_epoch))
            after, metrics, _ = self.step_fn(state, *args)
            previous, current = current, _Pending(step + 1, state, after, metrics, None, batch)
            state = after
        return current, previous

    def _passes(self, start: int):
        self.passed = 0  # batches the passes gave, skipped ones included
        for epoch in range(self.epochs):
            before = self.passed
            for batch in self.batches.iterable:
                if self.passed >= start:
                    yield (self._place(batch),), batch
                self.passed += 1
            if self.passed == before and epoch > 0:
                warnings.warn(
                    f"fit: pass {epoch + 1} of {self.epochs} over the data gave no batches, so "
                    f"training stops after {epoch} pass(es): a one-shot iterator (such as a "
                    "generator) is exhausted after its first pass. For several epochs pass an "
                    "object that starts a new pass on every iter() (a list, or a loader class)",
                    stacklevel=5,
                )
                return

    def _batch(self, pending: _Pending) -> PyTree:
        """The batch of a launched step, on the host."""
        if self.batches.arrays is None:
            return pending.batch
        epoch, index = divmod(pending.step - 1, self.batches.steps_per_epoch)
        offset = index * self.batches.batch_size
        return jax.device_get(self._gather(self.arrays, self._epoch_order(epoch), offset))

    def _place(self, batch: PyTree) -> PyTree:
        if self.batch_sharding is None:
            return batch
        sharding = self.batch_sharding
        for leaf in jax.tree_util.tree_leaves(batch):
            rows = np.shape(leaf)[0] if np.ndim(leaf) else 0
            global_rows = rows * jax.process_count()
            if global_rows % self.batches.mesh_size:
                raise ValueError(
                    f"a batch with leading axis {global_rows} cannot be split over the "
                    f"{self.batches.mesh_size} devices of the mesh's data axis"
                )
        if jax.process_count() > 1:
            return jax.tree_util.tree_map(
                lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)),
                batch,
            )
        return jax.device_put(batch, sharding)

    # -- the loop -----------------------------------------------------------------------------

    def execute(self) -> tuple[TrainState, History]:
        options = self.options
        start = self.start
        if self.total is not None and start >= self.total:
            # Already trained (a resumed run that had finished, or was interrupted within its
            # last steps): only what the end of a run adds, such as the final evaluation.
            if start > self.total:
                warnings.warn(
                    f"fit: the checkpoint in {options['checkpoint_dir']} is at step {start}, past "
                    f"the {self.total} steps asked for; returning its state without training "
                    "(use another checkpoint_dir to train a new run)",
                    stacklevel=3,
                )
            self._finish(_progress_bar(False, self.total, start), final_eval=True)
            return self.good, self.history
        bar = _progress_bar(options["progress"], self.total, start)
        queue = self.queue
        self.stopped = False
        number = start  # counted on the host: reading state.step would wait for the device
        carry = TrainState(self.good.params, self.good.opt_state, self.good.step, None)
        step_fn, health_step_fn = self.step_fn, self.health_step_fn
        health_every = options["health_every"]
        try:
            for steps, args, batch in self._calls():
                if steps > 1:
                    after, metrics, health = self.call_fn(carry, *args)
                elif health_step_fn is not None and number % health_every == 0:
                    after, metrics, health = health_step_fn(carry, *args)
                else:
                    after, metrics, health = step_fn(carry, *args)
                number += steps
                queue.append(_Pending(number, carry, after, metrics, health, batch, steps))
                carry = after
                if len(queue) >= self.in_flight:
                    self._consume(self.per_read, bar)
                    if self.stopped:
                        break
            while queue and not self.stopped:
                self._consume(len(queue), bar)
            if number == start and (start == 0 or self.total is not None):
                raise ValueError("fit: data yielded no batches")
        except KeyboardInterrupt:
            try:
                while queue:
                    self._consume(len(queue), bar, run_callbacks=False)
            except NonFiniteLossError:
                pass
            self._finish(bar, final_eval=False)
            where = f"; checkpoint {self.last_checkpoint}" if self.last_checkpoint else ""
            print(
                f"fit: interrupted after step {int(self.good.step)}{where}",
                file=sys.stderr,
            )
            raise
        except BaseException:
            bar.close()
            raise
        if self.total is not None and number < self.total and not self.stopped:
            warnings.warn(
                f"fit: the data ran out after {number - start} batches; stopping at step "
                f"{number} of {self.total}",
                stacklevel=3,
            )
        if self.total is None and self.passed < start:
            # epochs= over an iterable of unknown length, resumed: its passes are counted, not
            # known, so a checkpoint past them means the data is shorter than it was.
            warnings.warn(
                f"fit: {self.epochs} passes over the data gave {self.passed} batches, fewer "
                f"than the {start} steps already taken; the data is shorter than in the run "
                f"that wrote the checkpoint",
                stacklevel=3,
            )
        self._finish(bar, final_eval=True)
        return self.good, self.history

    def _consume(self, count: int, bar: Any, *, run_callbacks: bool = True) -> None:
        """Host work for the oldest ``count`` queued steps, in order, after one wait for them.

        A step leaves the queue just before its own host work, so after an exception (a NaN
        stop, a callback's KeyboardInterrupt) the queue holds exactly the unhandled steps.
        """
        queue = self.queue
        block = [queue[i] for i in range(min(count, len(queue)))]
        if any(pending.steps > 1 for pending in block):
            # Calls of several steps: one wait, then one read per call (not per step).
            block[-1].metrics.block_until_ready()
            rows = [np.asarray(pending.metrics).tolist() for pending in block]
        elif self.stack_metrics and len(block) > 1:
            # On an accelerator each copy to the host costs about as much as launching a step
            # (an H200: ~150 us a step for per-step reads): the block's metrics are stacked on
            # the device and come back in one copy.
            rows = np.asarray(_stack_metrics(tuple(p.metrics for p in block))).tolist()
        else:
            # On the CPU the arrays are already in host memory. Each step needs the state of the
            # one before it, so once the newest step of the block has finished, all of them
            # have: one wait, then reads of finished arrays only.
            block[-1].metrics.block_until_ready()
            rows = [np.asarray(pending.metrics).tolist() for pending in block]
        loss, grad_norm = self.metric_names.index("loss"), self.metric_names.index("grad_norm")
        for pending, read in zip(block, rows, strict=True):
            queue.popleft()
            step_rows = read if pending.steps > 1 else [read]
            for index, row in enumerate(step_rows):
                if not (math.isfinite(row[loss]) and math.isfinite(row[grad_norm])):
                    if pending.steps > 1:
                        # The state before this step exists only on the way through the call.
                        pending, previous = self._single(pending, index)
                        if previous is not None:
                            self.consumed = previous
                    raise self._non_finite_error(pending, row[loss], row[grad_norm], bar)
                if index < len(step_rows) - 1:  # a step inside a call: its metrics only
                    self._record(pending.step - len(step_rows) + 1 + index, row, None, bar)
            self._handle(pending, step_rows[-1], bar, run_callbacks)
            if self.stopped:
                return

    def _handle(self, pending: _Pending, row: list[float], bar: Any, run_callbacks: bool) -> None:
        """Host work for one finished step with finite metrics: history, logs, progress bar,
        evaluation, callbacks, checkpoint."""
        options = self.options
        step = pending.step
        values = self._record(step, row, pending.health, bar)
        self.good = state = self._with_key(pending.after)
        self.consumed = pending
        eval_every = options["eval_every"]
        if eval_every is not None and step % eval_every == 0:
            values.update(self._evaluate(step))
        if run_callbacks:
            for callback in options["callbacks"]:
                if _is_true(callback(step, state, dict(values))):
                    self.stopped = True
        every = options["checkpoint_every"]
        if every is not None and step % every == 0:
            self._save()

    def _record(self, step: int, row: list[float], health: Any, bar: Any) -> dict[str, float]:
        """A finished step's metrics into the history, the log and the progress bar."""
        options = self.options
        values = dict(zip(self.metric_names, row, strict=True))
        writer = options["writer"]
        if health is not None:
            # The statistics are of the gradient taken at the params before this update. One
            # transfer for the whole pytree, then host work on NumPy arrays only.
            packed = jax.device_get(health)
            health = _health._unpack(options["health_layout"][0], packed)
            stats = _health.stats_by_path(health)
            layer_norms = {
                f"health/{layer}/grad_norm": norm
                for layer, norm in _health.layer_norms(stats).items()
            }
            if writer is not None:
                _health.log_health(writer, health, step)
            self.history.record(step, {**values, **layer_norms})
        else:
            self.history.record(step, values)
        if writer is not None and step % options["log_every"] == 0:
            for name, value in values.items():
                writer.add_scalar(f"train/{name}", value, step)
        bar.advance(step, values["loss"])
        return values

    def _non_finite_error(
        self, pending: _Pending, loss: float, grad_norm: float, bar: Any
    ) -> NonFiniteLossError:
        bar.close()
        step = pending.step
        previous = self.consumed
        if previous is not None and previous.step == step - 1:
            bad = _non_finite_paths(pending.before.params)
            if bad:  # the loss is fine, the previous update is not
                return self._update_error(previous, bad)
        last = self.history["loss"][-1] if len(self.history) else None
        return NonFiniteLossError(
            f"training stopped at step {step}: the loss is {loss} and the gradient norm "
            f"{grad_norm} (previous loss: {last}); {self._kept()}. The error's .state (params "
            "before this step) and .batch reproduce it, e.g. with "
            "gradkit.diagnostics.find_nan_origin(loss_fn, error.state.params, error.batch).",
            step=step,
            state=self._with_key(pending.before),
            batch=self._batch(pending),
            history=self.history,
            checkpoint=self.last_checkpoint,
        )

    def _evaluate(self, step: int) -> dict[str, float]:
        result = jax.device_get(self.options["eval_fn"](self.good.params))
        single = not isinstance(result, Mapping)
        if single:
            result = {"eval": result}
        values = {}
        for name, value in result.items():
            array = np.asarray(value)
            if array.shape != () or array.dtype.kind not in "biuf":
                what = "its result" if single else f"result[{name!r}]"
                raise ValueError(
                    f"eval_fn must return a real scalar or a dict of them; at step {step} "
                    f"{what} is {array.dtype} of shape {array.shape} (reduce it, e.g. with "
                    f".mean())"
                )
            values[name] = float(array)
        self.history.record_eval(step, values)
        writer = self.options["writer"]
        if writer is not None:
            for name, value in values.items():
                writer.add_scalar(f"eval/{name}", value, step)
        return {f"eval_{name}": value for name, value in values.items()}

    def _kept(self) -> str:
        if self.last_checkpoint:
            return f"the newest checkpoint, {self.last_checkpoint}, is the last good one"
        return "no checkpoint was written"

    def _update_error(self, pending: _Pending, bad: list[str]) -> NonFiniteLossError:
        """The error for a step whose loss and gradient were finite but whose update was not."""
        if pending.steps > 1:  # the call's last step did it
            pending, _ = self._single(pending, pending.steps - 1)
        return NonFiniteLossError(
            f"training stopped at step {pending.step}: its update made the params non-finite "
            f"({', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}) although its loss and "
            "gradient were finite (the optimizer divided by zero, e.g. eps=0 with a zero "
            f"gradient, or overflowed); {self._kept()}. The error's .state (params before that "
            "step) and .batch reproduce it.",
            step=pending.step,
            state=self._with_key(pending.before),
            batch=self._batch(pending),
            history=self.history,
            checkpoint=self.last_checkpoint,
        )

    def _verify_params(self) -> None:
        """Raises if the newest handled update made the params non-finite (its loss and
        gradient were finite, or it would have stopped the run already); checked when the
        params are about to be kept (a checkpoint, the end of the run), once per step."""
        if self.consumed is None or self.consumed is self.verified:
            return
        bad = _non_finite_paths(self.good.params)
        if bad:
            raise self._update_error(self.consumed, bad)
        self.verified = self.consumed

    def _save(self) -> None:
        directory = self.options["checkpoint_dir"]
        step = int(self.good.step)
        if directory is None or step == self.checkpointed_step:
            return
        self._verify_params()  # never write non-finite params as a checkpoint
        arrays, metadata = self.history.to_arrays()
        self.last_checkpoint = _checkpoint.save(
            directory,
            step,
            self.good,
            extra_arrays=arrays,
            extra_metadata=metadata,
            keep=self.options["keep_checkpoints"],
        )
        self.checkpointed_step = step

    def _finish(self, bar: Any, *, final_eval: bool) -> None:
        try:
            # The last update's params are returned (and evaluated) only if they are finite,
            # with or without a checkpoint folder.
            self._verify_params()
            step = int(self.good.step)
            eval_steps = self.history.eval_steps
            if (
                final_eval
                and self.options["eval_fn"] is not None
                and not (eval_steps.size and eval_steps[-1] == step)
            ):
                self._evaluate(step)
            self._save()
        finally:
            bar.close()
            if self.options["writer"] is not None:
                self.options["writer"].flush()


class _ProgressBar:
    """tqdm with step, loss and steps/s; the loss text is refreshed at most 5 times a second."""

    def __init__(self, enabled: bool, total: int | None, start: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.shown = start
        self.last_text = 0.0
        self.loss: float | None = None

    def advance(self, step: int, loss: float) -> None:
        if self.bar is None:
            return
        self.loss = loss
        now = time.monotonic()
        if now - self.last_text > 0.2:
            self.bar.set_postfix_str(f"loss={loss:.4g}", refresh=False)
            self.last_text = now
        self.bar.update(step - self.shown)
        self.shown = step

    def close(self) -> None:
        if self.bar is not None:
            if self.loss is not None:  # the final line shows the last loss, not a stale one
                self.bar.set_postfix_str(f"loss={self.loss:.4g}", refresh=False)
            self.bar.close()
            self.bar = None


def _progress_bar(enabled: bool, total: int | None, start: int) -> _ProgressBar:
    return _ProgressBar(enabled, total, start)
