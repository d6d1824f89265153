"""In-jit gradient statistics, the optax health monitor, and TensorBoard health logging.

:func:`gradient_stats` turns a gradient pytree into a small pytree of per-leaf statistics that is
cheap to compute inside a jitted step; :func:`health_monitor` is an optax transformation that keeps
the latest statistics in its state every ``k`` steps; :func:`log_health` writes them to TensorBoard
on the host; :func:`diagnose` runs one forward/backward pass with every layer boundary observed and
turns the statistics into per-layer verdicts with tested fixes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

PyTree = Any

#: Exponent range of the log2-magnitude histogram. With ``|g| = m * 2**e`` and ``m`` in
#: ``[0.5, 1)`` (:func:`jax.numpy.frexp`), bin ``e`` counts the entries with
#: ``2**(e - 1) <= |g| < 2**e``. The range covers every finite nonzero float32 (the smallest
#: subnormal 2**-149 has e = -148, the largest float32 has e = 128), so the bins are the same at
#: every step and for every float32 tensor; float64 magnitudes outside it are counted in the first
#: or last bin.
HISTOGRAM_MIN_EXPONENT = -148
HISTOGRAM_MAX_EXPONENT = 128
HISTOGRAM_EXPONENTS = np.arange(HISTOGRAM_MIN_EXPONENT, HISTOGRAM_MAX_EXPONENT + 1)


class LeafStats(NamedTuple):
    r"""Statistics of one gradient leaf (a pytree node, so it can be returned from ``jit``).

    Every statistic except the three counts is taken over the *finite* entries; NaN, +Inf and
    -Inf entries are counted in ``nan_count``, ``posinf_count`` and ``neginf_count`` and never
    silently dropped.

    Attributes:
      norm: the Euclidean norm, computed as :math:`m \lVert g / m \rVert_2` with
        :math:`m = \max |g|`, so gradients of size 1e-20 do not underflow to 0 in float32.
      max_abs: :math:`\max |g|`.
      mean: the mean entry.
      std: the standard deviation of the entries.
      zero_fraction: the fraction of entries (of all entries) that are exactly zero.
      nan_count: the number of NaN entries (int32).
      posinf_count: the number of +Inf entries (int32).
      neginf_count: the number of -Inf entries (int32).
      log2_histogram: ``(len(HISTOGRAM_EXPONENTS),)`` int32 counts of the finite nonzero entries
        by binary exponent (see :data:`HISTOGRAM_EXPONENTS`).
      param_norm: the norm of the matching parameter leaf, or ``None`` without ``params``.
      update_norm: the norm of the matching update leaf, or ``None`` without ``updates``.
      update_ratio: ``update_norm / param_norm`` (cs231n's rule of thumb is about 1e-3), or
        ``None`` unless both ``params`` and ``updates`` were given.
    """

    norm: jax.Array
    max_abs: jax.Array
    mean: jax.Array
    std: jax.Array
    zero_fraction: jax.Array
    nan_count: jax.Array
    posinf_count: jax.Array
    neginf_count: jax.Array
    log2_histogram: jax.Array
    param_norm: jax.Array | None = None
    update_norm: jax.Array | None = None
    update_ratio: jax.Array | None = None


def _is_stats(node: Any) -> bool:
    return isinstance(node, LeafStats)


def path_name(path: tuple[Any, ...]) -> str:
    """Returns ``"dense_0/kernel"`` for the key path ``('dense_0', 'kernel')``."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _check_floating(argument: str, tree: PyTree) -> list[tuple[Any, jax.Array]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(
            f"{argument} is an empty pytree (it has no array leaves); gradient statistics need at "
            "least one floating-point array"
        )
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if dtype == jax.dtypes.float0 or not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{argument}{jax.tree_util.keystr(path)} has dtype {dtype}; gradient statistics "
                "need floating-point leaves (an integer or float0 leaf usually means the gradient "
                "was taken with respect to a non-differentiable input)"
            )
    return leaves


def _check_same_structure(
    reference_name: str,
    reference: list[tuple[Any, jax.Array]],
    other_name: str,
    other: PyTree,
) -> list[jax.Array]:
    other_leaves = jax.tree_util.tree_flatten_with_path(other)[0]
    ref_paths = [jax.tree_util.keystr(p) for p, _ in reference]
    other_paths = [jax.tree_util.keystr(p) for p, _ in other_leaves]
    if ref_paths != other_paths:
        missing = [p for p in ref_paths if p not in set(other_paths)]
        extra = [p for p in other_paths if p not in set(ref_paths)]
        if missing:
            detail = f"{reference_name}{missing[0]} has no counterpart in {other_name}"
        elif extra:
            detail = f"{other_name}{extra[0]} has no counterpart in {reference_name}"
        else:
            detail = "the leaves are in a different order"
        raise ValueError(
            f"{other_name} must have the same pytree structure as {reference_name}: {detail} "
            f"({len(ref_paths)} leaves in {reference_name}, {len(other_paths)} in {other_name})"
        )
    values = []
    for (path, ref_leaf), (_, leaf) in zip(reference, other_leaves, strict=True):
        if jnp.shape(leaf) != jnp.shape(ref_leaf):
            raise ValueError(
                f"{other_name}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)} but "
                f"{reference_name}{jax.tree_util.keystr(path)} has shape {jnp.shape(ref_leaf)}"
            )
        values.append(leaf)
    return values


def safe_norm(x: jax.Array) -> jax.Array:
    r"""The Euclidean norm of the finite entries of ``x`` without underflow or overflow.

    .. math::
        \lVert x \rVert_2 = m \sqrt{\textstyle\sum_i (x_i / m)^2}, \qquad m = \max_i |x_i|,

    and 0 when every entry is 0. In float32 a plain ``sqrt(sum(x**2))`` of entries near 1e-20 is
    exactly 0 because the squares underflow; this one is not.
    """
    x = jnp.asarray(x)
    x = x.astype(_compute_dtype(x.dtype))
    finite = jnp.isfinite(x)
    magnitude = jnp.where(finite, jnp.abs(x), 0)
    scale = jnp.max(magnitude, initial=0)
    safe_scale = jnp.where(scale > 0, scale, 1)
    return scale * jnp.sqrt(jnp.sum(jnp.square(magnitude / safe_scale)))


def combine_norms(norms: jax.Array) -> jax.Array:
    """The norm of a concatenation, from the norms of its parts, without underflow."""
    return safe_norm(jnp.asarray(norms))


def _moments(
    x: jax.Array, finite: jax.Array | None, max_abs: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """Norm, max magnitude, mean and std of the finite entries of ``x``."""
    if max_abs is None:
        max_abs = jnp.max(jnp.where(finite, jnp.abs(x), 0), initial=0)
    safe_scale = jnp.where(max_abs > 0, max_abs, 1)
    scaled = x / safe_scale if finite is None else jnp.where(finite, x / safe_scale, 0)
    count = x.size if finite is None else jnp.maximum(jnp.sum(finite, dtype=x.dtype), 1)
    # Scaled by the max so entries near 1e-20 keep a nonzero square in float32.
    sum_squares = jnp.sum(jnp.square(scaled))
    scaled_mean = jnp.sum(scaled) / count
    norm = max_abs * jnp.sqrt(sum_squares)
    variance = jnp.maximum(sum_squares / count - jnp.square(scaled_mean), 0)
    return norm, max_abs, max_abs * scaled_mean, max_abs * jnp.sqrt(variance)


def _histogram(x: jax.Array) -> jax.Array:
    magnitude = jnp.abs(x)
    _, exponent = jnp.frexp(magnitude)
    bins = jnp.clip(exponent - HISTOGRAM_MIN_EXPONENT, 0, len(HISTOGRAM_EXPONENTS) - 1)
    counted = ((magnitude > 0) & (magnitude < jnp.inf)).astype(jnp.int32)
    return jnp.zeros(len(HISTOGRAM_EXPONENTS), jnp.int32).at[bins.ravel()].add(counted.ravel())


def _leaf_stats(g: jax.Array, histogram: bool = True) -> LeafStats:
    g = jnp.asarray(g)
    x = g.astype(_compute_dtype(g.dtype))
    size = max(x.size, 1)
    zero_int = jnp.zeros([], jnp.int32)

    def all_finite(x, raw_max):
        return (*_moments(x, None, raw_max), zero_int, zero_int, zero_int)

    def some_nonfinite(x, raw_max):
        del raw_max
        finite = jnp.isfinite(x)
        return (
            *_moments(x, finite),
            jnp.sum(jnp.isnan(x), dtype=jnp.int32),
            jnp.sum(x == jnp.inf, dtype=jnp.int32),
            jnp.sum(x == -jnp.inf, dtype=jnp.int32),
        )

    # max|x| is NaN or Inf exactly when some entry is; the common all-finite case skips the masks.
    raw_max = jnp.max(jnp.abs(x), initial=0)
    norm, max_abs, mean, std, nan_count, posinf_count, neginf_count = lax.cond(
        jnp.isfinite(raw_max), all_finite, some_nonfinite, x, raw_max
    )
    if histogram:
        counts = _histogram(x)
        nonzero = jnp.sum(counts) + nan_count + posinf_count + neginf_count
        zero_fraction = (x.size - nonzero).astype(x.dtype) / size
    else:
        counts = None
        zero_fraction = jnp.sum(x == 0, dtype=x.dtype) / size
    return LeafStats(
        norm=norm,
        max_abs=max_abs,
        mean=mean,
        std=std,
        zero_fraction=zero_fraction,
        nan_count=nan_count,
        posinf_count=posinf_count,
        neginf_count=neginf_count,
        log2_histogram=counts,
    )


def gradient_stats(
    grads: PyTree,
    params: PyTree | None = None,
    updates: PyTree | None = None,
    *,
    histogram: bool = True,
) -> PyTree:
    r"""Per-leaf gradient statistics, cheap enough to compute inside a jitted training step.

    For each gradient leaf :math:`g` this computes an underflow-safe norm
    :math:`m \lVert g/m \rVert_2` with :math:`m = \max|g|`, the max magnitude, mean, standard
    deviation, fraction of exact zeros, NaN and ±Inf counts, and a histogram of
    :math:`\log_2 |g|` over fixed bins (:data:`HISTOGRAM_EXPONENTS`, computed with
    :func:`jax.numpy.frexp`, so histograms of different steps line up). With ``params`` and
    ``updates`` it also gives the parameter norm, the update norm and the update/parameter ratio
    :math:`\lVert \Delta w \rVert / \lVert w \rVert`.

    Args:
      grads: a pytree of floating-point arrays.
      params: optional pytree with the same structure and shapes as ``grads``.
      updates: optional pytree with the same structure and shapes as ``grads`` (the step actually
        applied, e.g. the output of an optax optimiser).
      histogram: compute the log2-magnitude histogram (the most expensive statistic on CPU:
        one scatter-add per entry); ``log2_histogram`` is ``None`` when False.

    Returns:
      A pytree with the structure of ``grads`` whose leaves are :class:`LeafStats`.

    Raises:
      ValueError: if ``grads`` has no leaves, or ``params``/``updates`` differ from it in
        structure or shape (the message names the path).
      TypeError: if a leaf is not floating point (the message names the path).

    Example:
      >>> import jax.numpy as jnp
      >>> stats = gradient_stats({"w": jnp.full((4,), 1e-20)})
      >>> float(stats["w"].norm)  # a plain float32 norm would be 0.0
      2e-20
    """
    leaves_with_path = _check_floating("grads", grads)
    treedef = jax.tree_util.tree_structure(grads)
    grad_leaves = [leaf for _, leaf in leaves_with_path]
    param_leaves = (
        _check_same_structure("grads", leaves_with_path, "params", params)
        if params is not None
        else None
    )
    update_leaves = (
        _check_same_structure("grads", leaves_with_path, "updates", updates)
        if updates is not None
        else None
    )
    out = []
    for i, g in enumerate(grad_leaves):
        stats = _leaf_stats(g, histogram)
        param_norm = update_norm = ratio = None
        if param_leaves is not None:
            param_norm = safe_norm(param_leaves[i]).astype(stats.norm.dtype)
        if update_leaves is not None:
            update_norm = safe_norm(update_leaves[i]).astype(stats.norm.dtype)
        if param_norm is not None and update_norm is not None:
            ratio = jnp.where(
                param_norm > 0,
                update_norm / jnp.where(param_norm > 0, param_norm, 1),
                jnp.where(update_norm > 0, jnp.inf, 0.0),
            )
        out.append(
            stats._replace(param_norm=param_norm, update_norm=update_norm, update_ratio=ratio)
        )
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# The optax monitor.


class HealthMonitorState(NamedTuple):
    """State of :func:`health_monitor`.

    Attributes:
      count: the number of updates seen so far (int32).
      stats_step: the update index (0-based) at which ``stats`` were computed, -1 before the first.
      stats: the latest :func:`gradient_stats` pytree.
      inner_state: the state of the wrapped optimiser (``optax.EmptyState()`` without one).
    """

    count: jax.Array
    stats_step: jax.Array
    stats: PyTree
    inner_state: optax.OptState


def health_monitor(
    every: int = 1,
    inner: optax.GradientTransformation | None = None,
    *,
    histogram: bool = True,
) -> optax.GradientTransformation:
    r"""An optax transformation that keeps gradient-health statistics in its state.

    Every ``every`` updates (the first one included) it computes :func:`gradient_stats` of the
    incoming gradients and stores them in :attr:`HealthMonitorState.stats`; in between it keeps
    the previous statistics. The choice is made inside the compiled step with :func:`jax.lax.cond`,
    so there is no host synchronisation and nothing to recompile.

    Without ``inner`` the transformation passes the updates through unchanged (put it first in an
    ``optax.chain`` to see the raw gradients). With ``inner`` it wraps that optimiser: its output
    is the inner optimiser's, and the statistics also hold the update norms and the
    update/parameter ratios :math:`\lVert \Delta w \rVert/\lVert w \rVert`. Parameter norms are
    NaN for steps whose ``update`` call received no ``params``.

    Args:
      every: compute the statistics on updates 0, k, 2k, ... (a positive int).
      inner: an optional optimiser to wrap.
      histogram: also keep the log2-magnitude histograms (see :func:`gradient_stats`).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`HealthMonitorState`; find it
      in a chained state with :func:`latest_health`.

    Raises:
      ValueError: if ``every`` is not a positive integer.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = health_monitor(every=10, inner=optax.sgd(0.1))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
      >>> float(state.stats["w"].update_ratio)
      0.2...
    """
    if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    every = int(every)

    def _stats(grads, params, updates):
        return gradient_stats(
            grads, params, updates if inner is not None else None, histogram=histogram
        )

    def init_fn(params):
        shapes = jax.eval_shape(lambda p: _stats(p, p, p), params)
        stats = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        inner_state = inner.init(params) if inner is not None else optax.EmptyState()
        return HealthMonitorState(
            count=jnp.zeros([], jnp.int32),
            stats_step=jnp.full([], -1, jnp.int32),
            stats=stats,
            inner_state=inner_state,
        )

    def update_fn(updates, state, params=None):
        grads = updates
        if inner is not None:
            new_updates, inner_state = inner.update(grads, state.inner_state, params)
        else:
            new_updates, inner_state = updates, state.inner_state

        def compute():
            if params is not None:
                return _stats(grads, params, new_updates)
            # No params this step: keep the state's structure, mark what is unknown as NaN.
            stats = _stats(grads, grads, new_updates)
            return jax.tree_util.tree_map(
                lambda s: s._replace(
                    param_norm=jnp.full_like(s.param_norm, jnp.nan),
                    update_ratio=None
                    if s.update_ratio is None
                    else jnp.full_like(s.update_ratio, jnp.nan),
                ),
                stats,
                is_leaf=_is_stats,
            )

        due = state.count % every == 0
        stats = lax.cond(due, compute, lambda: state.stats)
        stats_step = jnp.where(due, state.count, state.stats_step)
        new_state = HealthMonitorState(
            count=state.count + 1, stats_step=stats_step, stats=stats, inner_state=inner_state
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def latest_health(opt_state: optax.OptState) -> HealthMonitorState:
    """Finds the :class:`HealthMonitorState` inside a (possibly chained or nested) optax state.

    Raises:
      ValueError: if ``opt_state`` holds no health monitor state.
    """
    nodes = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda node: isinstance(node, HealthMonitorState)
    )
    for node in nodes:
        if isinstance(node, HealthMonitorState):
            return node
    raise ValueError(
        "opt_state holds no HealthMonitorState; build the optimiser with "
        "gradkit.diagnostics.health_monitor(...)"
    )


# ---------------------------------------------------------------------------------------------
# TensorBoard.

_SCALAR_FIELDS = (
    "norm",
    "max_abs",
    "mean",
    "std",
    "zero_fraction",
    "nan_count",
    "posinf_count",
    "neginf_count",
    "param_norm",
    "update_norm",
    "update_ratio",
)


def stats_by_path(stats: PyTree) -> dict[str, LeafStats]:
    """Returns ``{"dense_0/kernel": LeafStats, ...}`` with host (NumPy) values."""
    if isinstance(stats, HealthMonitorState):
        stats = stats.stats
    pairs = jax.tree_util.tree_flatten_with_path(stats, is_leaf=_is_stats)[0]
    result = {}
    for path, node in pairs:
        if not isinstance(node, LeafStats):
            raise TypeError(
                f"stats{jax.tree_util.keystr(path)} is {type(node).__name__}, not LeafStats; "
                "pass the output of gradient_stats or a HealthMonitorState"
            )
        result[path_name(path) or "value"] = LeafStats(
            *(None if field is None else np.asarray(jax.device_get(field)) for field in node)
        )
    if not result:
        raise ValueError("stats is an empty pytree; pass the output of gradient_stats")
    return result


def layer_of(path: str) -> str:
    """The layer a parameter path belongs to: its parent path (``"dense_0/kernel"`` ->
    ``"dense_0"``), or the path itself for a top-level leaf."""
    head, _, _ = path.rpartition("/")
    return head or path


def log_health(writer: Any, stats: PyTree, step: int, *, prefix: str = "health") -> None:
    """Writes gradient-health statistics to TensorBoard (needs the ``tensorboard`` extra).

    For each leaf ``path`` (e.g. ``dense_0/kernel``) it writes the scalars
    ``{prefix}/{path}/{statistic}`` for every :class:`LeafStats` field that is present, and the
    histogram ``{prefix}/{path}/log2_magnitude`` of :math:`\\log_2|g|` (bucket upper limits are
    the bin exponents). For each layer (the parent path) it writes ``{prefix}/{layer}/grad_norm``,
    the norm of all its leaves together. Runs on the host; call it every few steps, not inside
    ``jit``.

    Args:
      writer: a ``tensorboardX.SummaryWriter`` (anything with ``add_scalar`` and
        ``add_histogram_raw``).
      stats: the output of :func:`gradient_stats`, or a :class:`HealthMonitorState`.
      step: the global step to record.
      prefix: the tag prefix.

    Raises:
      TypeError: if ``stats`` holds something other than :class:`LeafStats`.
    """
    by_path = stats_by_path(stats)
    layers: dict[str, list[float]] = {}
    for path, leaf in by_path.items():
        for field in _SCALAR_FIELDS:
            value = getattr(leaf, field)
            if value is not None:
                writer.add_scalar(f"{prefix}/{path}/{field}", float(value), step)
        layers.setdefault(layer_of(path), []).append(float(leaf.norm))
        if leaf.log2_histogram is None:
            continue
        counts = np.asarray(leaf.log2_histogram, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            continue
        nonzero = np.flatnonzero(counts)
        # Each entry is represented by its bin's centre in log2 units, e - 0.5.
        centres = HISTOGRAM_EXPONENTS.astype(np.float64) - 0.5
        writer.add_histogram_raw(
            tag=f"{prefix}/{path}/log2_magnitude",
            min=float(HISTOGRAM_EXPONENTS[nonzero[0]] - 1),
            max=float(HISTOGRAM_EXPONENTS[nonzero[-1]]),
            num=total,
            sum=float(np.dot(counts, centres)),
            sum_squares=float(np.dot(counts, centres**2)),
            bucket_limits=HISTOGRAM_EXPONENTS[nonzero[0] : nonzero[-1] + 1].astype(float).tolist(),
            bucket_counts=counts[nonzero[0] : nonzero[-1] + 1].tolist(),
            global_step=step,
        )
    for layer, norms in layers.items():
        norm = _host_combine(norms)
        writer.add_scalar(f"{prefix}/{layer}/grad_norm", norm, step)


def _host_combine(norms: list[float]) -> float:
    scale = max(norms, default=0.0)
    if not math.isfinite(scale) or scale == 0:
        return scale
    return scale * math.sqrt(sum((n / scale) ** 2 for n in norms))
