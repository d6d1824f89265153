"""In-jit gradient statistics, the optax health monitor, and TensorBoard health logging.

:func:`gradient_stats` turns a gradient pytree into a small pytree of per-leaf statistics that is
cheap to compute inside a jitted step; :func:`health_monitor` is an optax transformation that keeps
the latest statistics in its state every ``k`` steps; :func:`log_health` writes them to TensorBoard
on the host; :func:`diagnose` runs one forward/backward pass with every layer boundary observed and
turns the statistics into per-layer verdicts with tested fixes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import html
import math
import os
import re
import weakref
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike

from gradkit import _platform, _probe
from gradkit import activations as _activations

try:  # public since JAX 0.4.36; Flax uses it the same way, to tell trace levels apart
    from jax.extend.core import get_opaque_trace_state as _get_trace_state
except ImportError:  # pragma: no cover - depends on the JAX version
    _get_trace_state = None

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
      zero_fraction: the fraction of entries (of all entries) that are exactly zero, either sign
        (subnormals are not zeros, although CPUs compare them equal to 0).
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
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{argument}{jax.tree_util.keystr(path)} has dtype {dtype}; gradient statistics "
                "are defined for real leaves: pass the real and imaginary parts (or the modulus) "
                "as separate leaves"
            )
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


def _power_of_two_scale(max_abs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(scale, inverse)``: the power of two ``2**e`` with ``max_abs < 2**e`` (1 for 0),
    ``e`` kept within ``±(maxexp - 2)`` of the dtype so that both are finite normal numbers.

    Dividing by a power of two is exact and is a multiplication, so scaling entries by it before
    squaring avoids underflow and overflow without rounding error or a division per entry. The
    clamp matters at the ends of the range: for ``max_abs >= 2**127`` in float32 ``2**e`` would
    be ``inf`` and its inverse a subnormal (flushed to 0 on CPUs), making the norm ``inf * 0``;
    clamped, the scaled entries are below 4 and their squares cannot overflow.
    """
    dtype = jnp.dtype(max_abs.dtype)
    _, exponent = jnp.frexp(jnp.where(max_abs > 0, max_abs, 1))
    limit = jnp.finfo(dtype).maxexp - 2
    exponent = jnp.clip(exponent, -limit, limit)
    one = jnp.ones((), dtype)
    return jnp.ldexp(one, exponent), jnp.ldexp(one, -exponent)


def safe_norm(x: jax.Array) -> jax.Array:
    r"""The Euclidean norm of the finite entries of ``x`` without underflow or overflow.

    .. math::
        \lVert x \rVert_2 = s \sqrt{\textstyle\sum_i (x_i / s)^2}, \qquad
        s = 2^{\lceil \log_2 \max_i |x_i| \rceil},

    and 0 when every entry is 0. In float32 a plain ``sqrt(sum(x**2))`` of entries near 1e-20 is
    exactly 0 because the squares underflow; this one is not.
    """
    x = jnp.asarray(x)
    x = x.astype(_compute_dtype(x.dtype))
    magnitude = jnp.where(jnp.isfinite(x), jnp.abs(x), 0)
    scale, inverse = _power_of_two_scale(jnp.max(magnitude, initial=0))
    return scale * jnp.sqrt(jnp.sum(jnp.square(magnitude * inverse)))


def combine_norms(norms: jax.Array) -> jax.Array:
    """The norm of a concatenation, from the norms of its parts, without underflow."""
    return safe_norm(jnp.asarray(norms))


def _zeros(x: jax.Array) -> jax.Array:
    """1 where an entry is exactly zero (either sign), else 0, as int32.

    Read from the bits for float32: CPUs compare with denormals treated as zero, so ``x == 0``
    there also holds for subnormals, which the histogram counts in their own bins. Bitwise, the
    zeros and the histogram add up to the finite entries on every backend. Not a comparison
    of the bits with 0 either: LLVM turns that back into ``x == 0``.
    """
    if x.dtype == jnp.float32:
        magnitude = lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
        return 1 - jnp.minimum(magnitude, 1)
    return (x == 0).astype(jnp.int32)


def _histogram_bins(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each entry's bin of :data:`HISTOGRAM_EXPONENTS`, and 1 where it counts (finite, nonzero),
    else 0 (int32; for float32 arithmetic on the bits, see :func:`_zeros`)."""
    if x.dtype == jnp.float32:
        # The binary exponent straight from the bits (cheaper than frexp, and exact for
        # subnormals, which XLA:CPU's frexp flushes): a normal number with biased exponent
        # E in 1..254 has frexp exponent E - 126; a subnormal m * 2**-149 has 32 - clz(m) - 149.
        bits = lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
        biased = bits >> 23
        mantissa = bits & 0x7FFFFF
        exponent = jnp.where(biased == 0, 32 - lax.clz(mantissa) - 149, biased - 126)
        counted = jnp.minimum(bits, 1) * (biased != 255).astype(jnp.int32)
    else:
        magnitude = jnp.abs(x)
        _, exponent = jnp.frexp(magnitude)
        counted = ((magnitude > 0) & (magnitude < jnp.inf)).astype(jnp.int32)
    return jnp.clip(exponent - HISTOGRAM_MIN_EXPONENT, 0, len(HISTOGRAM_EXPONENTS) - 1), counted


#: From this many entries on, a CPU histogram adds up entries two at a time (see
#: :func:`_histogram`); below, zeroing and summing its table costs more than the halved scatter.
PAIRED_HISTOGRAM_MIN_SIZE = 2**16


def _histogram(x: jax.Array) -> jax.Array:
    """The counts of :func:`_histogram_bins`: a scatter-add on a CPU; on other platforms a
    comparison of every entry with every bin, summed (a scatter-add there is an atomic add per
    entry, most of them into the same few bins).

    XLA:CPU's scatter costs about a nanosecond per update whatever the bins, so large leaves
    scatter pairs: entries ``2i`` and ``2i + 1`` add one to cell ``(b[2i], b[2i + 1])`` of a
    ``(bins + 1)**2`` table (the extra bin takes the entries that do not count), whose row and
    column sums are the histogram. Half the updates; the 300 KiB table stays in cache (a 784x512
    leaf: 370 us to 232 us on a 2-core x86 CPU).
    """
    index, counted = _histogram_bins(x)
    index, counted = index.ravel(), counted.ravel()
    bins = len(HISTOGRAM_EXPONENTS)

    def scatter(index, counted):
        if index.size < PAIRED_HISTOGRAM_MIN_SIZE:
            return jnp.zeros(bins, jnp.int32).at[index].add(counted)
        index = index + (bins - index) * (1 - counted)  # the uncounted to the extra bin
        if index.size % 2:
            index = jnp.concatenate([index, jnp.full((1,), bins, index.dtype)])
        pairs = index.reshape(-1, 2)
        cell = pairs[:, 0] * (bins + 1) + pairs[:, 1]
        # An update XLA cannot see is constant: a broadcast one is materialised on its own.
        ones = (cell >= 0).astype(jnp.int32)
        table = jnp.zeros((bins + 1) ** 2, jnp.int32)
        table = table.at[cell].add(ones, mode="promise_in_bounds").reshape(bins + 1, bins + 1)
        return (jnp.sum(table, axis=0) + jnp.sum(table, axis=1))[:bins]

    def compare(index, counted):
        hits = (index[:, None] == jnp.arange(bins, dtype=index.dtype)) * counted[:, None]
        return jnp.sum(hits, axis=0, dtype=jnp.int32)

    return _platform.cpu_or_accelerator(scatter, compare, index, counted)


#: Inside a rarely taken branch, the statistics of about this many gradient entries at a time
#: (see :func:`_packed_stats`): their temporaries, 8 to 11 bytes per entry with the updates,
#: are what the branch adds to the step's temporary memory.
SEQUENCE_ELEMENTS = 2**19

#: At most this many such runs: each is a cond, compiled as a program of its own, so compile
#: time grows with their number.
MAX_SEQUENCE_RUNS = 8


#: Leaves with at most this many entries always take the exact path of :func:`gradient_stats`
#: (its cost is negligible at that size); larger ones first try the one-pass sums.
FAST_PATH_MIN_SIZE = 4096


def _trustworthy_square_sum(square_sum: jax.Array) -> jax.Array:
    """Whether a plain float sum of squares is accurate to the dtype's rounding.

    It is when it is finite (no partial sum overflowed: every term is positive) and at least
    ``2**64`` times the smallest normal number: then the terms that decide it are normal numbers,
    and the terms that underflowed (each below the smallest normal) add up to less than
    ``2**-24`` of it for any leaf of fewer than ``2**40`` entries.
    """
    tiny = jnp.finfo(square_sum.dtype).tiny * 2.0**64
    return jnp.isfinite(square_sum) & (square_sum >= tiny)


def _fast_leaf_stats(
    x: jax.Array,
    param: jax.Array | None,
    update: jax.Array | None,
    nonzero: jax.Array | None = None,
) -> tuple[LeafStats, jax.Array | None, jax.Array | None]:
    r"""Statistics of a large leaf from plain sums when they are accurate, else the exact path.

    One pass over the gradient for :math:`\max|g|`, :math:`\sum g`, :math:`\sum g^2` and the
    number of zeros (a variadic reduction, row by row: :func:`_variadic_reduce`) and one reduction
    over each of the parameter and update leaves, instead of the exact path's scaled two-pass
    moments. (The parameter and update sums stay separate: folded into the gradient's pass, or
    into one pass of their own, they made the benchmark MLP's monitored step slower on
    XLA:CPU.) The sums are used only when they are provably accurate: every entry finite, the
    sums of squares neither overflowed nor underflowed (:func:`_trustworthy_square_sum`), and
    the variance :math:`\overline{g^2} - \bar g^2` at least half of :math:`\overline{g^2}` (so
    :math:`|\bar g| \le \sigma` and the subtraction loses at most one bit). Otherwise a
    :func:`jax.lax.cond` takes the exact path for this leaf.

    ``nonzero``, the sum of the leaf's histogram when it has one, gives the number of zeros
    without a pass of their own (on the fast path every entry is finite, so the histogram
    counts all but the zeros).
    """
    size = x.size
    counted = [x, jnp.square(x)]
    if nonzero is None:
        counted.append(_zeros(x).astype(x.dtype))
    maxima, sums = _variadic_reduce([jnp.abs(x)], counted)
    max_abs = maxima[0]
    total, square_sum = sums[0], sums[1]
    zeros = (size - nonzero).astype(x.dtype) if nonzero is not None else sums[2]
    mean = total / size
    mean_square = square_sum / size
    variance = mean_square - jnp.square(mean)
    ok = (
        jnp.isfinite(max_abs)
        & jnp.isfinite(total)
        & ((max_abs == 0) | (_trustworthy_square_sum(square_sum) & (variance >= 0.5 * mean_square)))
    )
    others = [leaf for leaf in (param, update) if leaf is not None]
    other_sums = [jnp.sum(jnp.square(leaf.astype(x.dtype))) for leaf in others]
    for other_sum in other_sums:
        ok = ok & ((other_sum == 0) | _trustworthy_square_sum(other_sum))

    def fast(x, others, other_sums):
        del x, others
        zero_int = jnp.zeros([], jnp.int32)
        stats = LeafStats(
            norm=jnp.sqrt(square_sum),
            max_abs=max_abs,
            mean=mean,
            std=jnp.sqrt(jnp.maximum(variance, 0)),
            zero_fraction=zeros / size,
            nan_count=zero_int,
            posinf_count=zero_int,
            neginf_count=zero_int,
            log2_histogram=None,
        )
        return stats, [jnp.sqrt(s) for s in other_sums]

    def exact(x, others, other_sums):
        del other_sums
        stats, *other_norms = _exact_leaf_stats(x, *others)
        return stats, other_norms

    stats, other_norms = lax.cond(ok, fast, exact, x, others, other_sums)
    other_norms = iter(other_norms)
    param_norm = next(other_norms) if param is not None else None
    update_norm = next(other_norms) if update is not None else None
    return stats, param_norm, update_norm


#: Longest row of the row-wise reductions of large leaves. XLA:CPU adds up a variadic
#: reduction's row sequentially (its tree-reduction rewrite skips variadic reductions), so the
#: row length bounds the rounding: in float32 a sequential sum of 2**25 ones is 2**24.
ROW_WIDTH = 1024


def _as_rows(x: jax.Array) -> jax.Array:
    """``x`` as ``(rows, width)`` rows of at most :data:`ROW_WIDTH` entries: its last axis when
    that is 64 to ``ROW_WIDTH`` long, else rows of ``ROW_WIDTH`` with the last one completed with
    zeros (the identity of the sums, and of the maxima of the non-negative values reduced
    here)."""
    if x.ndim >= 2 and 64 <= x.shape[-1] <= ROW_WIDTH:
        return x.reshape(-1, x.shape[-1])
    flat = x.ravel()
    width = max(min(flat.size, ROW_WIDTH), 1)
    missing = -flat.size % width
    if missing:
        flat = jnp.pad(flat, (0, missing))
    return flat.reshape(-1, width)


def _variadic_reduce(
    maxima: list[jax.Array], sums: list[jax.Array]
) -> tuple[jax.Array | None, jax.Array | None]:
    """The maxima of the non-negative arrays ``maxima`` and the sums of the arrays ``sums`` (all
    of one shape and dtype), all in one pass: a variadic reduction of their rows
    (:func:`_as_rows`), then one stacked reduction of the row results. Returns the maxima and
    the sums, each stacked in order (None for an empty list).

    XLA:CPU fuses the element-wise producers of a variadic reduction into its loop, where it
    hands single reductions to a vectorised library that takes its input materialised: a leaf-
    sized temporary per statistic, which inside a :func:`jax.lax.cond` branch enlarges the
    step's temporary memory on every call (past 32 MiB glibc maps it afresh each time, and the
    step page-faults it in), and outside one costs a pass over memory per statistic. Row by
    row, a sum's rounding grows with the row length, not with the leaf size.
    """
    operands = tuple(_as_rows(x) for x in (*maxima, *sums))
    zeros = tuple(jnp.zeros((), row.dtype) for row in operands)
    split = len(maxima)

    def reducer(a, b):
        return tuple(
            jnp.maximum(p, q) if i < split else p + q
            for i, (p, q) in enumerate(zip(a, b, strict=True))
        )

    # The row results are small: one stacked reduction of them needs fewer buffers than a
    # second variadic one (each operand of a variadic reducer is a buffer of its own).
    partial = lax.reduce(operands, zeros, reducer, (1,))
    top = jnp.max(jnp.stack(partial[:split]), axis=1) if split else None
    total = jnp.sum(jnp.stack(partial[split:]), axis=1) if len(partial) > split else None
    return top, total


def _exact_leaf_stats(x: jax.Array, *others: jax.Array) -> tuple[jax.Array | LeafStats, ...]:
    r"""Exact statistics of one leaf and the norms of its parameter and update leaves.

    ``x`` is in its compute dtype; ``others`` have its shape. Only finite entries count; they
    are scaled by a power of two near their maximum before squaring (exact, so entries near
    1e-20 keep a nonzero square in float32, and entries near 1e30 do not overflow), and the
    standard deviation is taken in a second pass around the mean,
    :math:`\sqrt{\overline{(x - \bar x)^2}}`, which does not cancel when
    :math:`|\bar x| \gg \sigma` the way :math:`\overline{x^2} - \bar x^2` does. No histogram.

    Four passes: the finite maxima of :math:`|g|`, :math:`|w|` and :math:`|\Delta w|`, the four
    counts, the scaled sums, then the deviations; for a small leaf each pass is one reduction of
    a stack, for a large one a variadic reduction (:func:`_variadic_reduce`). That keeps the
    operation count and the temporary memory low, which matters beyond the time the operations
    take: XLA's CPU runtime spends time on every operation of a :func:`jax.lax.cond` branch even
    on the steps that skip it, and this function runs inside such branches
    (:func:`_fast_leaf_stats`' fallback, :func:`health_monitor` with ``every > 1``). The norms
    of ``others`` are computed in the widest of the compute dtypes.

    Returns:
      ``(stats, *norms)``: a :class:`LeafStats` without histogram, then one norm (in the dtype
      of ``x``) per leaf of ``others``.
    """
    dtype = functools.reduce(
        jnp.promote_types, [_compute_dtype(jnp.asarray(leaf).dtype) for leaf in others], x.dtype
    )
    shape = x.shape  # large leaves are reduced in rows of it (see _as_rows)
    x = x.ravel()
    leaves = [x.astype(dtype), *(jnp.asarray(leaf).astype(dtype).ravel() for leaf in others)]
    # A small leaf's statistics cost little beyond the number of operations: stack the rows of
    # each pass and reduce them at once. A large one's cost its passes over memory and the
    # memory they hold: each pass is one variadic reduction (see _variadic_reduce).
    stacked = x.size <= FAST_PATH_MIN_SIZE

    def reduce_rows(reduce, rows, **options):
        if stacked:
            return reduce(jnp.stack(rows), axis=1, **options)
        if "dtype" in options:
            rows = [row.astype(options["dtype"]) for row in rows]
        rows = [row.reshape(shape) for row in rows]
        if reduce is jnp.max:
            return _variadic_reduce(rows, [])[0]
        return _variadic_reduce([], rows)[1]

    finite = [jnp.isfinite(leaf) for leaf in leaves]
    maxima = reduce_rows(
        jnp.max,
        [jnp.where(ok, jnp.abs(leaf), 0) for leaf, ok in zip(leaves, finite, strict=True)],
        initial=0,
    )
    # Counts summed in float32 are exact below 2**24 and take one vectorised reduction each
    # (XLA:CPU sums int32 in several stages).
    count_dtype = jnp.float32 if x.size < 2**24 else jnp.int32
    counts = reduce_rows(
        jnp.sum, [jnp.isnan(x), x == jnp.inf, x == -jnp.inf, _zeros(x)], dtype=count_dtype
    ).astype(jnp.int32)
    scales, inverses = _power_of_two_scale(maxima)
    scaled = [
        jnp.where(ok, leaf * inverse, 0)
        for leaf, ok, inverse in zip(leaves, finite, inverses, strict=True)
    ]
    sums = reduce_rows(jnp.sum, [scaled[0], *(jnp.square(v) for v in scaled)])
    size = x.size
    count = (size - counts[0] - counts[1] - counts[2]).astype(dtype)
    safe_count = jnp.maximum(count, 1)
    scaled_mean = sums[0] / safe_count
    deviation = jnp.where(finite[0], scaled[0] - scaled_mean, 0)
    if stacked:
        squared_deviation = jnp.sum(jnp.square(deviation))
    else:
        # A second output keeps this a variadic reduction (a single one would be handed to the
        # vectorised library, which takes its input materialised); it is not needed otherwise.
        rows = [jnp.square(deviation).reshape(shape), finite[0].astype(dtype).reshape(shape)]
        squared_deviation = _variadic_reduce([], rows)[1][0]
    norms = scales * jnp.sqrt(sums[1:])
    stats = LeafStats(
        norm=norms[0].astype(x.dtype),
        max_abs=maxima[0].astype(x.dtype),
        mean=(scales[0] * scaled_mean).astype(x.dtype),
        std=(scales[0] * jnp.sqrt(squared_deviation / safe_count)).astype(x.dtype),
        zero_fraction=(counts[3] / max(size, 1)).astype(x.dtype),
        nan_count=counts[0],
        posinf_count=counts[1],
        neginf_count=counts[2],
        log2_histogram=None,
    )
    return (stats, *(norm.astype(x.dtype) for norm in norms[1:]))


def _leaf_stats(
    g: jax.Array,
    param: jax.Array | None = None,
    update: jax.Array | None = None,
    *,
    branch: bool = True,
    nonzero: jax.Array | None = None,
) -> tuple[LeafStats, jax.Array | None, jax.Array | None]:
    """Statistics of one leaf, and its parameter and update norms (None where not given).

    With ``branch`` large leaves try the one-pass sums first (:func:`_fast_leaf_stats`, which
    takes ``nonzero``, the sum of the leaf's histogram, if there is one); without, the exact
    path and no cond (for code that is itself inside a rarely taken branch).
    """
    g = jnp.asarray(g)
    x = g.astype(_compute_dtype(g.dtype))

    def exact(x, param, update):
        stats, *norms = _exact_leaf_stats(
            x, *(leaf for leaf in (param, update) if leaf is not None)
        )
        norms = iter(norms)
        param_norm = next(norms) if param is not None else None
        update_norm = next(norms) if update is not None else None
        return stats, param_norm, update_norm

    if branch and x.size > FAST_PATH_MIN_SIZE:
        # The fast path's cond costs a GPU a round trip to the host (gradkit._platform);
        # there the exact path's extra passes are the cheaper choice.
        fast = functools.partial(_fast_leaf_stats, nonzero=nonzero)
        return _platform.cpu_or_accelerator(fast, exact, x, param, update)
    return exact(x, param, update)


_FLOAT_FIELDS = (
    "norm",
    "max_abs",
    "mean",
    "std",
    "zero_fraction",
    "param_norm",
    "update_norm",
    "update_ratio",
)
_COUNT_FIELDS = ("nan_count", "posinf_count", "neginf_count")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The static part of packed statistics: which pytree, which dtypes, which fields."""

    treedef: Any
    dtypes: tuple[np.dtype, ...]
    with_params: bool
    with_updates: bool
    histogram: bool


class _Packed(NamedTuple):
    """Statistics of all leaves in three arrays (few buffers: cheap to carry, copy and fetch).

    ``floats`` is ``(leaves, len(_FLOAT_FIELDS))`` in the widest compute dtype (absent fields
    are NaN), ``counts`` ``(leaves, 3)`` int32 and ``histograms`` ``(leaves, bins)`` int32 or
    ``None``.
    """

    floats: jax.Array
    counts: jax.Array
    histograms: jax.Array | None


def _packed_stats(
    grads: PyTree,
    params: PyTree | None = None,
    updates: PyTree | None = None,
    *,
    histogram: bool = True,
    branch: bool = True,
    updates_fn: Callable[[], PyTree] | None = None,
) -> tuple[_Layout, _Packed]:
    """:func:`gradient_stats` as a static layout and three arrays; validates its input.

    ``branch=True`` (what :func:`gradient_stats` and ``health_monitor(every=1)`` use): large
    leaves by one-pass sums unless a cond finds them inaccurate. ``branch=False`` is for code
    inside a rarely taken :func:`jax.lax.cond` branch (``health_monitor(every > 1)``,
    ``make_train_step(health_every=k)``): the exact path without per-leaf conds, since every
    operation in a branch costs time on the steps that skip it, and the leaves in runs of about
    :data:`SEQUENCE_ELEMENTS` entries, one run after another. ``updates_fn``, a function
    returning the updates, may then replace ``updates``: each run calls it for its own leaves.
    Otherwise XLA schedules every leaf's temporaries (histogram indices, scaled copies, the
    recomputed updates) at once: 8 to 11 bytes per parameter of the step's temporary buffer,
    which XLA:CPU allocates on every call, taken or not, and which past glibc's mmap threshold
    is page-faulted in afresh
    (+17.5% per step for ``health_monitor(every=100)`` on a 3.4M-parameter MLP, whose buffer
    the runs take from 49.9 to 22.1 MiB).
    """
    if updates_fn is not None:
        # Each run computes its own leaves' updates (XLA drops the rest), so that they are not
        # all alive at once.
        if updates is not None or branch:
            raise ValueError("updates_fn is for branch=False, in place of updates")
        updates = jax.eval_shape(updates_fn)
    leaves_with_path = _check_floating("grads", grads)
    grad_leaves = [jnp.asarray(leaf) for _, leaf in leaves_with_path]
    param_leaves = (
        None
        if params is None
        else _check_same_structure("grads", leaves_with_path, "params", params)
    )
    update_leaves = (
        None
        if updates is None
        else _check_same_structure("grads", leaves_with_path, "updates", updates)
    )
    dtypes = tuple(np.dtype(_compute_dtype(g.dtype)) for g in grad_leaves)
    wide = functools.reduce(jnp.promote_types, dtypes)
    n = len(grad_leaves)
    param_leaves = [None] * n if param_leaves is None else [jnp.asarray(p) for p in param_leaves]
    if update_leaves is None:
        update_leaves = [None] * n
    elif updates_fn is None:
        update_leaves = [jnp.asarray(u) for u in update_leaves]

    def one_leaf(g, param, update, dtype):
        """The packed row of float fields, the counts and the histogram of one leaf."""
        hist = _histogram(g.astype(dtype)) if histogram else None
        nonzero = None if hist is None else jnp.sum(hist)
        stats, param_norm, update_norm = _leaf_stats(
            g, param, update, branch=branch, nonzero=nonzero
        )
        ratio = None
        if param_norm is not None and update_norm is not None:
            ratio = jnp.where(
                param_norm > 0,
                update_norm / jnp.where(param_norm > 0, param_norm, 1),
                jnp.where(update_norm > 0, jnp.inf, 0.0),
            )
        stats = stats._replace(param_norm=param_norm, update_norm=update_norm, update_ratio=ratio)
        row = jnp.stack(
            [
                jnp.full((), jnp.nan, wide)
                if getattr(stats, field) is None
                else getattr(stats, field).astype(wide)
                for field in _FLOAT_FIELDS
            ]
        )
        count = jnp.stack([getattr(stats, field) for field in _COUNT_FIELDS])
        return row, count, hist

    # Small leaves of one shape and dtype (the biases and norm scales of identical blocks) are
    # stacked and computed by one vmapped program: the same statistics, with the operation
    # count, and so the compile time, of one leaf per group instead of one per leaf (96 such
    # leaves compiled in 10 s one by one). Large leaves stay separate: stacking them would copy
    # them on every monitored step.
    def group_key(i):
        g = grad_leaves[i]
        if not 0 < g.size <= FAST_PATH_MIN_SIZE:
            return None
        extra = [
            (leaf.shape, leaf.dtype)
            for leaf in (param_leaves[i], update_leaves[i])
            if leaf is not None
        ]
        return (g.shape, g.dtype, *extra)

    groups: dict[Any, list[int]] = {}
    for i in range(n):
        key = group_key(i)
        groups.setdefault(("single", i) if key is None else key, []).append(i)

    def group_stats(indices, g, p, u):
        if len(indices) == 1:
            out = one_leaf(g[0], p[0], u[0], dtypes[indices[0]])
            return jax.tree.map(lambda a: a[None], out)

        def stack(leaves):
            return None if leaves[0] is None else jnp.stack(leaves)

        return jax.vmap(functools.partial(one_leaf, dtype=dtypes[indices[0]]))(
            stack(g), stack(p), stack(u)
        )

    # Outside a branch every group is computed where it stands. Inside one (branch=False) the
    # groups go in runs of about SEQUENCE_ELEMENTS entries (at most MAX_SEQUENCE_RUNS runs),
    # run after run: each run in a cond of its own whose predicate reads the previous run's
    # counts (never negative, which XLA cannot know), so that only one run's temporaries are
    # live at a time. A cond per run rather than per leaf: each is compiled as a program of its
    # own, with its own copy of the updates' computation when they come as a function.
    # The runs are for XLA:CPU's temporary buffer; on other platforms a cond costs a round trip
    # to the host (gradkit._platform), so the branch is one run there.
    def split(in_runs):
        run_size = max(SEQUENCE_ELEMENTS, -(-sum(g.size for g in grad_leaves) // MAX_SEQUENCE_RUNS))
        runs: list[list[list[int]]] = [[]]
        size = 0
        for indices in groups.values():
            if runs[-1] and (branch or (in_runs and size >= run_size)):
                runs.append([])
                size = 0
            runs[-1].append(indices)
            size += sum(grad_leaves[i].size for i in indices)
        return runs

    def run_stats(run, inputs):
        if updates_fn is not None:
            fresh = jax.tree_util.tree_leaves(updates_fn())
            inputs = [
                (g, p, [fresh[i] for i in indices])
                for (g, p, _), indices in zip(inputs, run, strict=True)
            ]
        return [group_stats(indices, *args) for indices, args in zip(run, inputs, strict=True)]

    given_updates = [None] * n if updates_fn is not None else update_leaves

    def packed_arrays(in_runs):
        pieces, order = [], []  # per group: (rows, counts, histograms) with a leading leaf axis
        previous = None
        for run in split(in_runs):
            inputs = [
                tuple(
                    [leaves[i] for i in indices]
                    for leaves in (grad_leaves, param_leaves, given_updates)
                )
                for indices in run
            ]
            compute = functools.partial(run_stats, run)
            if previous is None:
                outs = compute(inputs)
            else:
                shapes = jax.eval_shape(compute, inputs)
                outs = lax.cond(
                    previous,
                    compute,
                    lambda _, shapes=shapes: jax.tree.map(
                        lambda s: jnp.zeros(s.shape, s.dtype), shapes
                    ),
                    inputs,
                )
            if not branch:
                previous = jnp.all(jnp.concatenate([out[1].ravel() for out in outs]) >= 0)
            for indices, out in zip(run, outs, strict=True):
                pieces.append(out)
                order.extend(indices)
        # Back to leaf order: one static gather per array, not a slice per leaf.
        in_order = order == sorted(order)
        position = np.argsort(order)

        def joined(k):
            parts = [piece[k] for piece in pieces]
            whole = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            return whole if in_order else whole[position]

        return _Packed(
            floats=joined(0), counts=joined(1), histograms=joined(2) if histogram else None
        )

    if branch or len(split(True)) == 1:
        packed = packed_arrays(True)
    else:
        packed = _platform.cpu_or_accelerator(
            lambda: packed_arrays(True), lambda: packed_arrays(False)
        )
    layout = _Layout(
        treedef=jax.tree_util.tree_structure(grads),
        dtypes=dtypes,
        with_params=params is not None,
        with_updates=updates is not None,
        histogram=histogram,
    )
    return layout, packed


def _unpack(layout: _Layout, packed: _Packed) -> PyTree:
    """The pytree of :class:`LeafStats` that :func:`_packed_stats` packed."""
    absent = set()
    if not layout.with_params:
        absent |= {"param_norm", "update_ratio"}
    if not layout.with_updates:
        absent |= {"update_norm", "update_ratio"}
    out = []
    for i, dtype in enumerate(layout.dtypes):
        values = {
            field: None if field in absent else packed.floats[i, j].astype(dtype)
            for j, field in enumerate(_FLOAT_FIELDS)
        }
        values.update({field: packed.counts[i, j] for j, field in enumerate(_COUNT_FIELDS)})
        hist = None if packed.histograms is None else packed.histograms[i]
        out.append(LeafStats(**values, log2_histogram=hist))
    return jax.tree_util.tree_unflatten(layout.treedef, out)


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
    :math:`\log_2 |g|` over fixed bins (:data:`HISTOGRAM_EXPONENTS`: the exponent of
    :func:`jax.numpy.frexp`, read from the bits for float32 so that subnormals land in their own
    bins, and the same bins at every step). With ``params`` and
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

    Returned from a jitted function, every statistic of every leaf is an output buffer of its
    own, and XLA compiles each (about 10 ms apiece on a CPU: 11 s for a model of 100 leaves).
    To carry statistics out of a training step, use :func:`health_monitor` (or ``fit(...,
    health_every=k)``), which keeps them packed in three arrays; its state's ``stats`` unpacks
    them where they are read (outside the step: on the host, at no compile cost).

    Raises:
      ValueError: if ``grads`` has no leaves, or ``params``/``updates`` differ from it in
        structure or shape (the message names the path).
      TypeError: if a leaf is not floating point (the message names the path).

    Example:
      >>> import jax.numpy as jnp
      >>> stats = gradient_stats({"w": jnp.full((4,), 1e-20)})
      >>> print(f'{float(stats["w"].norm):.3g}')  # a plain float32 norm would be 0.0
      2e-20
    """
    return _unpack(*_packed_stats(grads, params, updates, histogram=histogram))


# ---------------------------------------------------------------------------------------------
# The optax monitor.


@jax.tree_util.register_pytree_node_class
class HealthMonitorState:
    """State of :func:`health_monitor` (a pytree).

    The statistics are stored packed (a few arrays for all leaves, so carrying, copying and
    fetching them costs a few buffers, not a dozen per leaf); :attr:`stats` unpacks them.

    Attributes:
      count: the number of updates seen so far (int32).
      stats_step: the update index (0-based) at which ``stats`` were computed, -1 before the first.
      stats: the latest :func:`gradient_stats` pytree (zeros before the first update).
      inner_state: the state of the wrapped optimiser (``optax.EmptyState()`` without one).
    """

    def __init__(
        self,
        count: jax.Array,
        stats_step: jax.Array,
        packed: _Packed,
        inner_state: optax.OptState,
        layout: _Layout,
    ) -> None:
        self.count = count
        self.stats_step = stats_step
        self.packed = packed
        self.inner_state = inner_state
        self.layout = layout

    @property
    def stats(self) -> PyTree:
        return _unpack(self.layout, self.packed)

    def tree_flatten(self) -> tuple[tuple[Any, ...], _Layout]:
        return (self.count, self.stats_step, self.packed, self.inner_state), self.layout

    @classmethod
    def tree_unflatten(cls, layout: _Layout, children: tuple[Any, ...]) -> HealthMonitorState:
        return cls(*children, layout=layout)

    def __repr__(self) -> str:
        return (
            f"HealthMonitorState(count={self.count!r}, stats_step={self.stats_step!r}, "
            f"leaves={len(self.layout.dtypes)}, inner_state={self.inner_state!r})"
        )


def _check_monitored_structure(treedef: Any, grads: PyTree) -> None:
    """Raises unless ``grads`` has the pytree structure of the params the monitor was
    initialised with: the packed statistics are stored by leaf position, so another structure
    would file one leaf's statistics under another's name."""
    if jax.tree_util.tree_structure(grads) == treedef:
        return
    expected = [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(
            jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves)
        )[0]
    ]
    got = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    missing = [path for path in expected if path not in set(got)]
    extra = [path for path in got if path not in set(expected)]
    details = ([f"grads{extra[0]} is not among them"] if extra else []) + (
        [f"grads has no {missing[0]}"] if missing else []
    )
    detail = " and ".join(details) or "the leaves come in another order"
    raise ValueError(
        f"health_monitor: grads must have the pytree structure of the params the optimiser "
        f"state was initialised with ({len(expected)} leaves; got {len(got)}): {detail}. "
        "Re-initialise the state (tx.init(params)) after changing the model"
    )


def health_monitor(
    every: int = 1,
    inner: optax.GradientTransformation | None = None,
    *,
    histogram: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""An optax transformation that keeps gradient-health statistics in its state.

    Every ``every`` updates (the first one included) it computes :func:`gradient_stats` of the
    incoming gradients and stores them in :attr:`HealthMonitorState.stats`; in between it keeps
    the previous statistics. The choice is made inside the compiled step, so there is nothing to
    recompile: on a CPU with :func:`jax.lax.cond`, so the other steps skip the work; on a GPU or
    TPU, where a cond costs a round trip to the host, the statistics are computed every step
    and kept when due.

    Without ``inner`` the transformation passes the updates through unchanged (put it first in an
    ``optax.chain`` to see the raw gradients). With ``inner`` it wraps that optimiser: its output
    is the inner optimiser's, and the statistics also hold the update norms and the
    update/parameter ratios :math:`\lVert \Delta w \rVert/\lVert w \rVert`. Parameter norms are
    NaN for steps whose ``update`` call received no ``params``.

    On a CPU, mind the step's temporary memory when ``every > 1``: the cond keeps the
    gradients (4 bytes per parameter in float32) and one run of the branch's statistics (about
    2**19 entries at a time) in the temporary buffer XLA:CPU allocates on every call, and past
    glibc's mmap threshold (at most 32 MiB, about 8M parameters) every call page-faults it in
    afresh. TCMalloc preloaded, or ``MALLOC_MMAP_THRESHOLD_=268435456
    MALLOC_TRIM_THRESHOLD_=1073741824`` set before Python starts, avoid that (README,
    "Training loop and health monitoring"); so does ``gradkit.training.fit(...,
    health_every=k)``, which gates on the host.

    What it costs on a CPU: the README's benchmark MLP (784-512-512-10, batch 128, Adam) on 2
    cores took about +35% per step with ``every=1`` (+30% without histograms; merely reading the
    gradients, parameters and updates once per step cost +17 to +19% there) and 0 to 4% with
    ``every=100``. For statistics on every step of a small, fast model, gate on the host as
    below, or raise ``every``.

    On a GPU the statistics' kernels cost a small, fast step dearly: on an NVIDIA H200 the
    784-512-512-10 MLP's step, bound by the host's launches, took +69% with ``every=1`` and +65%
    with ``every=100`` (+82% with a cond). There, gate on the host: ``fit(...,
    health_every=k)``, or two compiled steps, one with the monitor (``every=1``) and one
    without, chosen by the loop.

    Args:
      every: compute the statistics on updates 0, k, 2k, ... (a positive int).
      inner: an optional optimiser to wrap.
      histogram: also keep the log2-magnitude histograms (see :func:`gradient_stats`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`HealthMonitorState`; find it in a chained state with :func:`latest_health`.
      Extra keyword arguments of ``update`` (``value``, ``grad``, ``value_fn``: what
      ``optax.lbfgs`` and ``optax.contrib.reduce_on_plateau`` need) go to ``inner``.

    Raises:
      ValueError: if ``every`` is not a positive integer; from ``update``, if the gradients'
        pytree structure is not that of the params ``init`` was given (naming the first leaf
        that differs).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = health_monitor(every=10, inner=optax.sgd(0.1))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
      >>> round(float(state.stats["w"].update_ratio), 6)
      0.2
    """
    if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    every = int(every)
    wrapped = None if inner is None else optax.with_extra_args_support(inner)

    def _stats(grads, params, updates, branch, updates_fn=None):
        return _packed_stats(
            grads,
            params,
            updates if inner is not None else None,
            histogram=histogram,
            branch=branch,
            updates_fn=updates_fn if inner is not None else None,
        )

    def init_fn(params):
        layout = []

        def packed_of(p):
            found, packed = _stats(p, p, p, True)
            layout.append(found)
            return packed

        shapes = jax.eval_shape(packed_of, params)
        layout = layout[0]
        packed = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        inner_state = inner.init(params) if inner is not None else optax.EmptyState()
        return HealthMonitorState(
            count=jnp.zeros([], jnp.int32),
            stats_step=jnp.full([], -1, jnp.int32),
            packed=packed,
            inner_state=inner_state,
            layout=layout,
        )

    def update_fn(updates, state, params=None, **extra_args):
        grads = updates
        _check_monitored_structure(state.layout.treedef, grads)

        def inner_update(grads, inner_state, params):
            if inner is None:
                return grads, inner_state
            # value, grad, value_fn (optax.lbfgs, reduce_on_plateau, ...) reach the inner
            # optimiser; one that takes no extra arguments ignores them, as in optax.chain.
            return wrapped.update(grads, inner_state, params, **extra_args)

        def compute(applied, branch, updates_fn=None):
            if params is not None:
                _, packed = _stats(grads, params, applied, branch, updates_fn)
            else:
                # No params this step: keep the state's layout, mark what is unknown as NaN.
                _, packed = _stats(grads, grads, applied, branch, updates_fn)
                unknown = np.isin(_FLOAT_FIELDS, ["param_norm", "update_ratio"])
                packed = packed._replace(floats=jnp.where(unknown, jnp.nan, packed.floats))
            # Gradients may arrive in another dtype than the params the state was built from.
            return jax.tree_util.tree_map(
                lambda new, old: new.astype(old.dtype), packed, state.packed
            )

        def compute_from_inputs():
            # The inner update is recomputed here rather than passed in: a cond operand would
            # have to be materialised, which keeps XLA from fusing the inner optimiser's
            # arithmetic into the parameter update on the steps that are not monitored. Inside
            # this rarely taken branch the statistics take their exact path without per-leaf
            # conds, in runs that each recompute their own leaves' updates.
            return compute(
                None,
                branch=False,
                updates_fn=lambda: inner_update(grads, state.inner_state, params)[0],
            )

        due = state.count % every == 0
        if every == 1:
            new_updates, inner_state = inner_update(grads, state.inner_state, params)
            packed = compute(new_updates, branch=True)
        else:

            def cpu_gate(grads, params, inner_state):
                packed = lax.cond(due, compute_from_inputs, lambda: state.packed)
                # The optimiser's update reads its inputs through this barrier, so it runs
                # after the cond: the cond then reads the gradients, parameters and optimiser
                # state while the update needs them anyway, instead of keeping them alive after
                # it (which cost the benchmark MLP's training step 1 to 3% on XLA:CPU).
                grads, params, inner_state, packed = lax.optimization_barrier(
                    (grads, params, inner_state, packed)
                )
                return packed, *inner_update(grads, inner_state, params)

            def accelerator_gate(grads, params, inner_state):
                # A cond costs a round trip to the host on every step (gradkit._platform):
                # compute the statistics every step and keep them when due (on an H200, +65%
                # per step for the benchmark MLP against +82% with the cond).
                new_updates, inner_state = inner_update(grads, inner_state, params)
                packed = jax.tree_util.tree_map(
                    lambda new, old: jnp.where(due, new, old),
                    compute(new_updates, branch=True),
                    state.packed,
                )
                return packed, new_updates, inner_state

            packed, new_updates, inner_state = _platform.cpu_or_accelerator(
                cpu_gate, accelerator_gate, grads, params, state.inner_state
            )
        stats_step = jnp.where(due, state.count, state.stats_step)
        new_state = HealthMonitorState(
            count=state.count + 1,
            stats_step=stats_step,
            packed=packed,
            inner_state=inner_state,
            layout=state.layout,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    for path, node in pairs:
        if not isinstance(node, LeafStats):
            raise TypeError(
                f"stats{jax.tree_util.keystr(path)} is {type(node).__name__}, not LeafStats; "
                "pass the output of gradient_stats or a HealthMonitorState"
            )
    nodes = [node for _, node in pairs]
    if any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(nodes)):
        nodes = jax.device_get(nodes)  # one transfer (and one call) for the whole tree
    result = {}
    for (path, _), node in zip(pairs, nodes, strict=True):
        result[path_name(path) or "value"] = LeafStats(
            *(None if field is None else np.asarray(field) for field in node)
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
    the norm of all its leaves together. ``update_ratio`` is left out for a leaf whose
    parameters are all 0 (a bias at initialisation), where it is undefined. Runs on the host;
    call it every few steps, not inside ``jit``.

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
    for path, leaf in by_path.items():
        for field in _SCALAR_FIELDS:
            value = getattr(leaf, field)
            if value is None:
                continue
            if field == "update_ratio" and float(leaf.param_norm) == 0:
                # Undefined for a leaf of zeros (a bias at initialisation): not written, where
                # inf would stretch the chart's axis (and make tensorboardX print a warning).
                continue
            writer.add_scalar(f"{prefix}/{path}/{field}", float(value), step)
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
    for layer, norm in layer_norms(by_path).items():
        writer.add_scalar(f"{prefix}/{layer}/grad_norm", norm, step)


def layer_norms(by_path: Mapping[str, LeafStats]) -> dict[str, float]:
    """Each layer's gradient norm (all its leaves together), from :func:`stats_by_path`."""
    layers: dict[str, list[float]] = {}
    for path, leaf in by_path.items():
        layers.setdefault(layer_of(path), []).append(float(leaf.norm))
    return {layer: _host_combine(norms) for layer, norms in layers.items()}


def _host_combine(norms: list[float]) -> float:
    scale = max(norms, default=0.0)
    if not math.isfinite(scale) or scale == 0:
        return scale
    return scale * math.sqrt(sum((n / scale) ** 2 for n in norms))


# ---------------------------------------------------------------------------------------------
# diagnose: one forward/backward pass with every layer boundary observed.

#: A layer's gradient is *vanishing* when its norm is below this absolute value **and** below
#: ``VANISHING_RATIO`` times the norm of the last layer's gradient. Both constants are
#: AUTOTRAINER's (``utils/monitor.py::gradient_issue``: beta_2 = 1e-4, beta_1 = 1e-3), applied
#: per layer instead of to the first layer only.
VANISHING_ABSOLUTE = 1e-4
#: See :data:`VANISHING_ABSOLUTE`.
VANISHING_RATIO = 1e-3
#: A layer's gradient is *exploding* when its norm exceeds this multiple of the last layer's
#: (AUTOTRAINER beta_3 = 70) and is not itself small (at least :data:`VANISHING_ABSOLUTE`:
#: 1e-6 is not exploding because the last layer's is 1e-15) ...
EXPLODING_RATIO = 70.0
#: ... or this absolute value (DLCheck/TFCheck: ||g|| > 1e6).
EXPLODING_ABSOLUTE = 1e6
#: A layer is flagged for *dead units* when at least this share of its units have an exactly
#: zero derivative for every example of the batch (for ReLU: never activate). 0.7 is the share
#: AUTOTRAINER (gamma) and DeepDiagnosis use for their dying-ReLU rules; here it is applied per
#: unit over the whole batch, the stricter keras-contrib DeadReluDetector criterion.
DEAD_UNIT_SHARE = 0.7
#: A bounded activation (sigmoid, tanh, hard_sigmoid, ...) is *saturated* when more than this
#: fraction of its pre-activations lie in its saturation region, read from
#: :meth:`gradkit.activations.Activation.saturation_mask` (DeepDiagnosis: > 50% of the layer).
SATURATED_FRACTION = 0.5
#: Bias used by the "small positive bias" counterfactual for ReLU-family layers (seed 004's
#: accepted answer uses 0.1 so that most ReLUs start active).
POSITIVE_BIAS = 0.1
#: Global-norm threshold of the gradient-clipping counterfactual.
CLIP_NORM = 1.0
#: Slope the surrogate-gradient counterfactual gives relu and relu6 where their derivative is 0:
#: the derivative of :math:`f(x) + a\,(x - f(x))`, i.e. leaky_relu's for relu. 0.01 is the
#: default negative slope of gradkit.activations.leaky_relu, ``jax.nn.leaky_relu`` and PyTorch's
#: ``LeakyReLU``.
SURROGATE_LEAK = 0.01

_SYMPTOM_ORDER = ("nan/inf", "no gradient", "vanishing", "exploding", "dead units", "saturated")


def layer_boundary(
    name: str, x: ArrayLike, activation: Any = None, *, apply: bool = False
) -> jax.Array:
    """Marks a layer boundary of a plain function so :func:`diagnose` can observe it.

    Call it on each layer's pre-activation (the input of its activation). Outside
    :func:`diagnose` it returns ``x`` (or ``activation(x)`` with ``apply=True``) and adds nothing
    to the traced program; inside, diagnose records ``x`` and the cotangent (the gradient of the
    loss with respect to ``x``) flowing back through it.

    With ``apply=True`` the boundary also applies the activation, which lets diagnose measure a
    surrogate gradient for this layer (the same values with a smooth derivative) when the layer
    is saturated or has dead units, as gradkit.layers' Dense does.

    Args:
      name: the layer's name; if the parameters hold a sub-dict with this key (for example
        ``params["dense_0"]``), its gradients are attributed to this layer.
      x: the pre-activation, ``(..., features)``.
      activation: the gradkit.activations name (or :class:`~gradkit.activations.Activation`) the
        layer applies next, so dead and saturated units can be counted; ``None`` if none. With
        ``apply=True``, any callable.
      apply: return ``activation(x)`` instead of ``x``.

    Returns:
      ``x``, or ``activation(x)`` with ``apply=True``.

    Raises:
      TypeError: if ``name`` is not a non-empty str, or ``apply=True`` and ``activation`` is
        neither a registered name nor a callable.
      ValueError: if ``activation`` is a str that names no registered activation.

    Example:
      >>> import jax.numpy as jnp
      >>> def net(params, x):
      ...     z = layer_boundary("dense_0", x @ params["dense_0"]["kernel"], "relu")
      ...     return jnp.maximum(z, 0)
      >>> def same_net(params, x):
      ...     return layer_boundary("dense_0", x @ params["dense_0"]["kernel"], "relu", apply=True)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"layer_boundary: name must be a non-empty str, got {name!r}")
    if isinstance(activation, str):
        _activations.get(activation)  # an unknown name raises, listing the close matches
    function = None
    if apply:
        function = _activations.get(activation) if isinstance(activation, str) else activation
        if not callable(function):
            raise TypeError(
                "layer_boundary: apply=True needs activation to be a gradkit.activations name or "
                f"a callable, got {activation!r}"
            )
    x = _probe.tap(name, jnp.asarray(x), kind="preactivation", activation=activation)
    if function is None:
        return x
    return _probe.activation(name, function)(x)


@dataclasses.dataclass
class LayerHealth:
    """What :func:`diagnose` measured for one layer.

    Attributes:
      name: the layer's name (tap name or parameter sub-tree).
      activation: the activation's name, if known.
      param_paths: the parameter leaves attributed to this layer.
      grad_norm: norm of the layer's parameter gradient (``None`` without parameters; NaN or
        Inf when the gradient holds a NaN or an Inf).
      grad_max_abs: max |gradient entry|.
      grad_zero_fraction: fraction of exactly-zero gradient entries.
      grad_histogram: log2-magnitude histogram of the gradient (:data:`HISTOGRAM_EXPONENTS`).
      cotangent_norm: norm of dL/d(pre-activation) (``None`` without a boundary mark; NaN or
        Inf like ``grad_norm``).
      preactivation_std: standard deviation of the pre-activations.
      zero_grad_fraction: fraction of pre-activations where the activation's derivative is 0.
      dead_fraction: share of units whose derivative is 0 for every example of the batch.
      saturated_fraction: fraction of pre-activations in the saturation region (bounded
        activations only).
      nonfinite: number of NaN/Inf entries in gradients, pre-activations and cotangents.
      symptoms: the verdicts, e.g. ``["vanishing"]``.
    """

    name: str
    activation: str | None = None
    param_paths: list[str] = dataclasses.field(default_factory=list)
    grad_norm: float | None = None
    grad_max_abs: float | None = None
    grad_zero_fraction: float | None = None
    grad_histogram: np.ndarray | None = None
    cotangent_norm: float | None = None
    preactivation_std: float | None = None
    zero_grad_fraction: float | None = None
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    nonfinite: int = 0
    symptoms: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["grad_histogram"] = (
            None if self.grad_histogram is None else np.asarray(self.grad_histogram).tolist()
        )
        return out


@dataclasses.dataclass
class Finding:
    """One symptom: which layers show it, where it starts, and what it means."""

    symptom: str
    layers: list[str]
    starts_at: str
    message: str


@dataclasses.dataclass
class Recommendation:
    """A candidate fix tried on the same batch, with the gradient norms it produced.

    Attributes:
      name: short name, e.g. ``"xavier + bias 0.1"``.
      description: what was changed.
      grad_norms: per-layer gradient norms with the fix.
      change: per flagged layer, new norm / old norm (layers whose old norm was exactly 0 are
        left out; see ``baseline_norms``).
      remaining: the symptoms left with the fix, as ``"symptom: layers"`` strings.
      resolved: the symptoms the fix cleared.
      baseline_norms: per flagged layer, the norm without the fix.
    """

    name: str
    description: str
    grad_norms: dict[str, float | None]
    change: dict[str, float]
    remaining: list[str]
    resolved: list[str]
    baseline_norms: dict[str, float | None] = dataclasses.field(default_factory=dict)

    def change_text(self) -> str:
        """The per-layer change as text: ``"dense_0 x12.3"``, or ``"dense_0 0 -> 4.1e-03"``."""
        parts = []
        for name in dict.fromkeys([*self.baseline_norms, *self.change]):
            after = self.grad_norms.get(name)
            if name in self.change:
                parts.append(f"{name} x{self.change[name]:.3g}")
            elif self.baseline_norms.get(name) == 0 and after is not None and after > 0:
                parts.append(f"{name} 0 -> {after:.2e}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"`` (JSON has no such numbers; ``json.dumps`` would write invalid JSON)."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(item) for item in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _fmt(value: float | None, spec: str = ".2e") -> str:
    if value is None:
        return "-"
    return format(value, spec)


@dataclasses.dataclass
class HealthReport:
    """Per-layer gradient-flow verdicts from :func:`diagnose`, with tested fixes.

    Attributes:
      loss: the loss on the batch.
      layers: one :class:`LayerHealth` per layer, in forward order.
      findings: one :class:`Finding` per symptom found.
      recommendations: candidate fixes, best first (fewest symptoms left, then largest gain).
      reference_layer: the layer whose gradient norm the ratio thresholds compare with.
      thresholds: the thresholds used.
      unobserved: layer boundaries marked inside a transformation that ``loss_fn`` applies
        itself (``jax.vmap``, ``lax.scan``, a nested ``jax.jit`` or ``jax.checkpoint``), whose
        values cannot be read from outside it; their layers are judged from their parameter
        gradients alone.
    """

    loss: float
    layers: list[LayerHealth]
    findings: list[Finding]
    recommendations: list[Recommendation]
    reference_layer: str | None
    thresholds: dict[str, float]
    unobserved: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no symptom was found."""
        return not self.findings

    def layer(self, name: str) -> LayerHealth:
        """The :class:`LayerHealth` named ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers are {[la.name for la in self.layers]}")

    def flagged(self, symptom: str) -> list[str]:
        """The layers showing ``symptom`` (e.g. ``"vanishing"``), in forward order."""
        return [layer.name for layer in self.layers if symptom in layer.symptoms]

    def _rows(self) -> list[list[str]]:
        rows = []
        for la in self.layers:
            rows.append(
                [
                    la.name,
                    la.activation or "-",
                    _fmt(la.grad_norm),
                    _fmt(la.cotangent_norm),
                    _fmt(la.zero_grad_fraction, ".0%"),
                    _fmt(la.dead_fraction, ".0%"),
                    _fmt(la.saturated_fraction, ".0%"),
                    ", ".join(la.symptoms) or "ok",
                ]
            )
        return rows

    _HEADER = (
        "layer",
        "activation",
        "grad norm",
        "dL/dz norm",
        "zero f'",
        "dead",
        "saturated",
        "verdict",
    )

    def __str__(self) -> str:
        rows = [list(self._HEADER), *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        lines = [f"Gradient-flow health (loss {self.loss:.6g})"]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        if not self.findings:
            lines.append("No problem found.")
        for finding in self.findings:
            lines.append(f"* {finding.message}")
        if self.unobserved:
            lines.append(
                f"(Boundaries {', '.join(self.unobserved)} are inside a vmap, scan, jit or "
                "checkpoint of loss_fn and were not observed; their layers are judged from "
                "parameter gradients only.)"
            )
        if self.recommendations:
            lines.append("")
            lines.append("Fixes tried on the same batch (best first):")
            for i, rec in enumerate(self.recommendations, 1):
                changes = rec.change_text()
                left = "; ".join(rec.remaining) if rec.remaining else "no symptom left"
                lines.append(f"  {i}. {rec.name}: {rec.description}")
                lines.append(f"     gradient norm change: {changes or '-'}; {left}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything in the report (strict JSON: a NaN or
        infinite number, such as the loss of a diverged model, is written as the string
        ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, which ``float()`` reads back)."""
        return _strict_json(
            {
                "loss": self.loss,
                "ok": self.ok,
                "reference_layer": self.reference_layer,
                "thresholds": dict(self.thresholds),
                "layers": [layer.to_dict() for layer in self.layers],
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "recommendations": [r.to_dict() for r in self.recommendations],
                "unobserved": list(self.unobserved),
            }
        )

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self._HEADER)
        body = []
        for la, row in zip(self.layers, self._rows(), strict=True):
            style = ' style="background:#fdd"' if la.symptoms else ""
            cells = "".join(f"<td>{html.escape(c)}</td>" for c in row)
            body.append(f"<tr{style}>{cells}</tr>")
        findings = "".join(f"<li>{html.escape(f.message)}</li>" for f in self.findings)
        recs = "".join(
            f"<li><b>{html.escape(r.name)}</b>: {html.escape(r.description)} &mdash; "
            f"{html.escape('; '.join(r.remaining) or 'no symptom left')}</li>"
            for r in self.recommendations
        )
        return (
            f"<div><b>Gradient-flow health</b> (loss {self.loss:.6g})"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<ul>{findings or '<li>No problem found.</li>'}</ul>"
            + (f"<b>Fixes tried on the same batch</b><ol>{recs}</ol>" if recs else "")
            + "</div>"
        )

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Draws per-layer gradient norms (log scale, problem layers marked) and histograms.

        Args:
          path: if given, the figure is also saved there (PNG, SVG, ... by extension).

        Returns:
          The matplotlib ``Figure`` (needs the ``plot`` extra).
        """
        from gradkit._health_plot import plot_report

        return plot_report(self, path)


def _trace_state() -> Any:
    """An opaque token for the JAX trace now active (``None`` if JAX cannot say)."""
    if _get_trace_state is None:  # pragma: no cover - depends on the JAX version
        return None
    return _get_trace_state(convention="gradkit")


class _Recorder:
    """Collector for the discovery trace: remembers names, kinds and activations in order.

    It also answers :func:`gradkit._probe.activation`: it notes which taps are followed by the
    layer's activation (only those can take a surrogate gradient) and returns the substitute
    activation for the taps in ``substitutes``.

    Only taps made at the trace level of ``loss_fn`` itself are observed. A tap inside a
    transformation that ``loss_fn`` applies (``jax.vmap`` over examples, ``lax.scan``, a nested
    ``jax.jit`` or ``jax.checkpoint``) sees values that cannot leave that transformation; it is
    left as the identity and its name is kept in ``hidden``, and that layer is judged from its
    parameter gradients alone.
    """

    def __init__(self, substitutes: Mapping[str, Any] | None = None) -> None:
        self.taps: list[tuple[str, str, Any]] = []
        self._counts: dict[str, int] = {}
        self._latest: dict[str, str] = {}
        self.hooked: set[str] = set()
        self.hidden: list[str] = []
        self.substitutes = dict(substitutes or {})
        self.trace_state: Any = None

    def key(self, name: str) -> str:
        count = self._counts.get(name, 0)
        self._counts[name] = count + 1
        key = name if count == 0 else f"{name}#{count}"
        self._latest[name] = key
        return key

    def observable(self, name: str) -> bool:
        """Whether a tap of ``name`` made now can be observed (see the class docstring)."""
        if self.trace_state is None or _trace_state() == self.trace_state:
            return True
        self._latest.pop(name, None)  # so activation() does not pair it with an earlier tap
        if name not in self.hidden:
            self.hidden.append(name)
        return False

    def tap(self, name: str, value: jax.Array, *, kind: str, activation: Any) -> jax.Array:
        if not self.observable(name):
            return value
        self.taps.append((self.key(name), kind, activation))
        return value

    def activation(self, name: str, function: Callable[[jax.Array], jax.Array]) -> Any:
        key = self._latest.get(name)
        if key is None:
            return function
        self.hooked.add(key)
        return self.substitutes.get(key, function)


class _Perturber(_Recorder):
    """Collector that records values and adds a zero perturbation we differentiate against."""

    def __init__(
        self, perturbations: dict[str, jax.Array], substitutes: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(substitutes)
        self.perturbations = perturbations
        self.values: dict[str, jax.Array] = {}

    def tap(self, name: str, value: jax.Array, *, kind: str, activation: Any) -> jax.Array:
        if not self.observable(name):
            return value
        key = self.key(name)
        self.taps.append((key, kind, activation))
        self.values[key] = value
        return value + self.perturbations[key].astype(value.dtype)


def _activation_entry(activation: Any) -> Any:
    if activation is None:
        return None
    try:
        return _activations.get(activation)
    except (TypeError, ValueError):
        return None


def _flax_interception(flax_modules: tuple[type, ...] | None) -> Any:
    """Taps the outputs of Flax linen layers (Dense, Conv, ...) when Flax is importable."""
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover - flax is a dependency
        return contextlib.nullcontext()
    types = flax_modules or (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Embed)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, types):
            return out
        if not isinstance(out, jax.Array) or not jnp.issubdtype(out.dtype, jnp.inexact):
            return out
        name = "/".join(str(p) for p in module.path) or str(module.name)
        return _probe.tap(name, out, kind="preactivation", activation=None)

    return nn.intercept_methods(interceptor)


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _param_name(path: tuple[Any, ...]) -> str:
    """A parameter leaf's path name; ``"params"`` when the parameters are a single array."""
    return path_name(path) or "params"


def _other_collection(params: PyTree, path: tuple[Any, ...]) -> bool:
    """Whether ``path`` lies in a Flax variable collection other than ``params``.

    Flax variables hold state that gradients do not train (``batch_stats``, caches) next to
    ``params``; its gradient is 0 by construction, so judging it would report "no gradient".
    """
    if not (isinstance(params, Mapping) and "params" in params and len(params) > 1 and path):
        return False
    return getattr(path[0], "key", None) != "params"


def _param_groups(params: PyTree) -> dict[str, list[str]]:
    """Groups parameter leaf paths by their parent path, in natural order (the leaves of Flax
    collections other than ``params`` are left out: they are not trained by gradients)."""
    groups: dict[str, list[str]] = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _other_collection(params, path):
            continue
        name = _param_name(path)
        groups.setdefault(layer_of(name), []).append(name)
    return dict(sorted(groups.items(), key=lambda item: _natural_key(item[0])))


def _match_group(tap_name: str, groups: Mapping[str, list[str]], used: set[str]) -> str | None:
    """The parameter group a tap's gradients belong to, or ``None``.

    The group whose path ends with the tap's name comes first (a Flax module path
    ``Block_1/Dense_0`` owns ``params/Block_1/Dense_0``, not ``params/Block_0/Dense_0``); failing
    that, one whose last part is the name's last part. Groups in ``used`` are taken already.
    """
    base = tap_name.split("#")[0]
    free = [group for group in groups if group not in used]
    for group in free:
        if group == base or group.endswith("/" + base):
            return group
    last = base.split("/")[-1]
    for group in free:
        if group.split("/")[-1] == last:
            return group
    return None


class _Analysis(NamedTuple):
    loss: float
    layers: list[LayerHealth]


def diagnose(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *batch: Any,
    activations: Mapping[str, Any] | None = None,
    has_aux: bool = False,
    key: jax.Array | None = None,
    try_fixes: bool = True,
    flax_modules: tuple[type, ...] | None = None,
    batches: Collection[Any] | None = None,
) -> HealthReport:
    r"""Runs one forward/backward pass and gives a per-layer verdict on the gradient flow.

    Layers are found without rewriting the model: gradkit.layers' Dense/MLP and plain functions
    that call :func:`layer_boundary` mark their pre-activations; Flax linen ``Dense``/``Conv``/...
    outputs are intercepted; without any mark, each parameter sub-tree is a layer. For each layer
    it measures the parameter-gradient norm (underflow-safe), the norm of the cotangent
    :math:`\partial L/\partial z` at the boundary, and, when the activation is known, the share
    of pre-activations where the activation's derivative is exactly zero, dead units and
    saturation (from :mod:`gradkit.activations`). Verdicts use the documented thresholds
    (:data:`VANISHING_ABSOLUTE`, :data:`VANISHING_RATIO`, :data:`EXPLODING_RATIO`,
    :data:`EXPLODING_ABSOLUTE`, :data:`DEAD_UNIT_SHARE`, :data:`SATURATED_FRACTION`).

    For the symptoms found it then *tries* candidate fixes on the same batch (He or Xavier
    re-initialisation of the flagged layers and of the layers the gradient flows back through,
    Xavier plus a small positive bias for ReLU layers, gradient clipping, and a surrogate
    gradient for saturated or dead layers whose activation is applied through the boundary:
    gradkit.layers' Dense, or ``layer_boundary(..., apply=True)``) and ranks them by the
    symptoms they leave and the change in gradient norms. The surrogate gradient keeps the
    layer's values and replaces its derivative: a leak of :data:`SURROGATE_LEAK` for relu and
    relu6, the matching logistic sigmoid's derivative for hard_sigmoid, hard_tanh and
    ultra_fast_sigmoid, a heavy-tailed "fast sigmoid" derivative for saturated sigmoid and tanh
    (details in ``_surrogate_for``); its zero-gradient and saturation counts are those of
    the surrogate derivative.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
        Pass the function itself, not a ``jax.jit`` of it: boundaries inside a ``jax.jit``,
        ``jax.vmap``, ``lax.scan`` or ``jax.checkpoint`` that ``loss_fn`` applies cannot be
        observed from outside (they are listed in :attr:`HealthReport.unobserved`, and their
        layers are judged from their parameter gradients alone).
      params: the parameter pytree (Flax variables as they are: of their collections only
        ``params`` is judged, since ``batch_stats`` and the like are not trained by gradients).
      *batch: the batch arguments of ``loss_fn``. Array leaves are traced, as in a jitted
        training step; any other leaf (a number, a string, a flag) is static. The traced and
        compiled analysis is kept for the next call with the same ``loss_fn``, static leaves
        and shapes, so diagnosing again (every few epochs, or a fixed model) is cheap. As with
        ``jax.jit``, that call does not run ``loss_fn``'s Python code again: after changing a
        global it reads, pass a new function.
      activations: optional ``{layer name: activation}`` for layers whose boundary does not say
        (Flax layers, parameter sub-trees).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      key: PRNG key for the re-initialisation candidates (default ``jax.random.key(0)``).
      try_fixes: set False to skip the counterfactual fixes.
      flax_modules: the Flax linen module types whose outputs are layer boundaries.
      batches: instead of ``*batch``, a few batches (a list of tuples of ``loss_fn``'s batch
        arguments, or a list of single batch arguments). They are joined along their first
        axis and analysed as one batch, so a unit is dead only if it is inactive on every
        example of every batch, and the gradients are those of the loss over all of them.

    Returns:
      A :class:`HealthReport`.

    Raises:
      ValueError: if ``params`` is empty, the loss is not a scalar, ``activations`` names an
        unknown activation or a layer the model does not have, or ``batches`` is empty, given
        together with ``*batch``, or holds batches that cannot be joined (another structure,
        other trailing shapes, or other non-array arguments).
      TypeError: if ``loss_fn`` is not callable, returns a tuple without ``has_aux`` (or not
        a pair with it), or a parameter leaf is not floating point.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradkit.layers import MLP, normal
      >>> mlp = MLP([4, 16, 16, 16, 1], "relu", w_init=normal(1e-3))
      >>> p = mlp.init(jax.random.key(0))
      >>> loss = lambda p, x: jnp.mean(mlp.apply(p, x) ** 2)
      >>> report = diagnose(loss, p, jnp.ones((8, 4)))
      >>> report.flagged("vanishing")
      ['dense_0', 'dense_1']
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_floating("params", params)
    overrides = dict(activations or {})
    for layer, activation in overrides.items():
        if isinstance(activation, str):
            try:
                _activations.get(activation)
            except ValueError as error:
                raise ValueError(f"activations[{layer!r}]: {error}") from None
    if batches is not None:
        if batch:
            raise ValueError("diagnose: pass either *batch or batches=[...], not both")
        batch = _join_batches(batches)
    params = jax.tree_util.tree_map(_strong_array, params)
    runner, arrays = _runner_for(loss_fn, params, batch, has_aux, flax_modules, overrides)
    base = runner.analyse(params, arrays)
    known = {layer.name.split("#")[0] for layer in base.layers}
    unknown = [layer for layer in overrides if layer not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"diagnose: activations names layer {unknown[0]!r}, which the model does not have"
            f"{hint}; its layers are {sorted(known)}"
        )
    reference = _reference_layer(base.layers)
    findings = _judge(base.layers, reference)
    recommendations = []
    if try_fixes and findings:
        key = jax.random.key(0) if key is None else key
        recommendations = _try_fixes(runner, arrays, params, base, findings, reference, key)
    return HealthReport(
        loss=base.loss,
        layers=base.layers,
        findings=findings,
        recommendations=recommendations,
        reference_layer=reference,
        thresholds={
            "VANISHING_ABSOLUTE": VANISHING_ABSOLUTE,
            "VANISHING_RATIO": VANISHING_RATIO,
            "EXPLODING_RATIO": EXPLODING_RATIO,
            "EXPLODING_ABSOLUTE": EXPLODING_ABSOLUTE,
            "DEAD_UNIT_SHARE": DEAD_UNIT_SHARE,
            "SATURATED_FRACTION": SATURATED_FRACTION,
        },
        unobserved=list(runner.hidden),
    )


def _join_batches(batches: Collection[Any]) -> tuple[Any, ...]:
    """One batch (a tuple of ``loss_fn``'s batch arguments) from several, joined on axis 0."""
    batches = [b if isinstance(b, tuple) else (b,) for b in batches]
    if not batches:
        raise ValueError("diagnose: batches is empty; pass at least one batch")
    structure = jax.tree_util.tree_structure(batches[0])
    leaves = []
    for i, b in enumerate(batches):
        if jax.tree_util.tree_structure(b) != structure:
            raise ValueError(
                f"diagnose: batches[{i}] has another structure than batches[0] "
                f"({jax.tree_util.tree_structure(b)} vs {structure})"
            )
        leaves.append(jax.tree_util.tree_leaves(b))
    joined = []
    for position, column in enumerate(zip(*leaves, strict=True)):
        if not _is_batch_array(column[0]):
            if any(_is_batch_array(v) or v != column[0] for v in column[1:]):
                raise ValueError(
                    f"diagnose: batch argument leaf {position} is not an array and differs "
                    f"between batches ({column[0]!r} vs the others); only arrays are joined"
                )
            joined.append(column[0])
            continue
        shapes = [np.shape(v) for v in column]
        if any(len(shape) == 0 or shape[1:] != shapes[0][1:] for shape in shapes):
            raise ValueError(
                f"diagnose: batch argument leaf {position} cannot be joined along its first "
                f"axis: shapes {shapes}"
            )
        joined.append(jnp.concatenate([jnp.asarray(v) for v in column]))
    return tuple(jax.tree_util.tree_unflatten(structure, joined))


def non_finite_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    """``(path, values)`` for each floating leaf of ``tree`` holding NaN or Inf, on the host.

    ``path`` is the leaf's ``jax.tree_util.keystr``; ``values`` the leaf as a NumPy array (in
    float32 for bfloat16 and the other ml_dtypes, which NumPy cannot test). Integer, boolean
    and PRNG-key leaves are skipped.
    """
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        array = np.asarray(jax.device_get(leaf))
        if array.dtype.kind not in "fc":
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            found.append((jax.tree_util.keystr(path), array))
    return found


def _strong_array(leaf: Any) -> jax.Array:
    """``leaf`` as a JAX array without a weak type, so ``jnp.full(n, 0.1)`` and a float32 array
    of the same shape share one compiled analysis."""
    leaf = jnp.asarray(leaf)
    return leaf.astype(leaf.dtype) if leaf.weak_type else leaf


def _is_batch_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


#: Runners (discovery trace and compiled analyses) kept per loss function, so that diagnosing
#: the same model again (every few epochs, or the fixed model after the broken one) does not
#: trace and compile it again. Keyed weakly: the cache never keeps a loss function alive.
_RUNNERS: weakref.WeakKeyDictionary[Any, dict[Any, _Runner]] = weakref.WeakKeyDictionary()
#: At most this many batch/parameter signatures are kept per loss function.
_RUNNERS_PER_FUNCTION = 8


def _runner_for(loss_fn, params, batch, has_aux, flax_modules, overrides):
    """The (possibly cached) runner for this call, and the batch's array leaves.

    Array leaves of the batch become arguments of the compiled analysis; every other leaf (a
    Python number, a string, a flag) is static, part of the cache key, as ``jax.jit`` would
    treat a static argument.
    """
    leaves, batch_def = jax.tree_util.tree_flatten(batch)
    is_array = tuple(_is_batch_array(leaf) for leaf in leaves)
    arrays = [jnp.asarray(leaf) for leaf, array in zip(leaves, is_array, strict=True) if array]
    static = tuple(leaf for leaf, array in zip(leaves, is_array, strict=True) if not array)
    param_leaves, param_def = jax.tree_util.tree_flatten(params)
    signature = (
        has_aux,
        flax_modules,
        tuple(sorted(overrides.items(), key=lambda item: str(item[0]))),
        param_def,
        tuple((leaf.shape, leaf.dtype) for leaf in param_leaves),
        batch_def,
        is_array,
        tuple((leaf.shape, leaf.dtype, leaf.weak_type) for leaf in arrays),
        tuple((type(leaf), leaf) for leaf in static),
    )
    try:
        hash(signature)
        cached = _RUNNERS.setdefault(loss_fn, {})
    except TypeError:  # an unhashable static leaf or override, or a loss that takes no weakref
        cached = None
    runner = cached.get(signature) if cached is not None else None
    if runner is None:
        runner = _Runner(loss_fn, batch_def, is_array, static, has_aux, flax_modules, overrides)
        runner.discover(params, arrays)
        if cached is not None:
            if len(cached) >= _RUNNERS_PER_FUNCTION:
                cached.pop(next(iter(cached)))
            cached[signature] = runner
    return runner, arrays


class _Runner:
    """Traces the loss once to find the boundaries, then evaluates any params of that shape.

    The compiled analyses take the parameters and the batch's array leaves as arguments, so one
    runner serves every call with the same loss function and shapes.
    """

    def __init__(self, loss_fn, batch_def, is_array, static, has_aux, flax_modules, overrides):
        try:
            reference = weakref.ref(loss_fn)
            self._loss_fn = lambda: reference()
        except TypeError:  # not weakly referable: the runner is not cached either
            self._loss_fn = lambda: loss_fn
        self.batch_def = batch_def
        self.is_array = is_array
        self.static = static
        self.has_aux = has_aux
        self.flax_modules = flax_modules
        self.overrides = overrides
        self.taps: list[tuple[str, str, Any]] = []
        self.hooked: set[str] = set()
        self.hidden: list[str] = []
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}
        self.groups: dict[str, list[str]] = {}
        self.blendable: dict[str, tuple[Any, Any, Any]] = {}
        self._compiled: Callable[..., Any] | None = None

    def _batch(self, arrays):
        arrays, static = iter(arrays), iter(self.static)
        leaves = [next(arrays) if array else next(static) for array in self.is_array]
        return jax.tree_util.tree_unflatten(self.batch_def, leaves)

    def _loss(self, params, arrays, collector):
        collector.trace_state = _trace_state()
        with _probe.collecting(collector), _flax_interception(self.flax_modules):
            out = self._loss_fn()(params, *self._batch(arrays))
        if isinstance(out, tuple) and not self.has_aux:
            raise TypeError(
                f"loss_fn returned a tuple of {len(out)}; return a scalar, or pass has_aux=True "
                "if it returns (loss, aux)"
            )
        if self.has_aux and not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"with has_aux=True, loss_fn must return (loss, aux), got {type(out).__name__}"
            )
        loss = out[0] if self.has_aux else out
        loss = jnp.asarray(loss)
        if loss.shape != ():
            raise ValueError(
                f"loss_fn must return a scalar loss{' (first of the pair)' if self.has_aux else ''}"
                f", got shape {loss.shape}"
            )
        return loss

    def discover(self, params, arrays):
        perturber = _Perturber(_ZeroDict())

        def traced(params, arrays):
            perturber.__init__(_ZeroDict())
            loss = self._loss(params, arrays, perturber)
            return loss, perturber.values

        closed, (_, self.shapes) = jax.make_jaxpr(traced, return_shape=True)(params, arrays)
        self.taps = list(perturber.taps)
        self.hooked = set(perturber.hooked)
        self.hidden = [name for name in perturber.hidden if name not in self.shapes]
        self.groups = _param_groups(params)
        self.first_use = _first_use(closed.jaxpr, params)
        # Layers whose activation is applied through the boundary and has a surrogate: the
        # entry, the surrogate, and the entry with the surrogate's derivative.
        self.blendable = {}
        for key, _, activation in self.taps:
            entry = self._activation_name(key, activation)[0] if key in self.hooked else None
            surrogate = _surrogate_for(entry) if entry is not None else None
            if surrogate is not None:
                wrapped = _activations.with_surrogate_grad(entry, surrogate)
                self.blendable[key] = (entry, surrogate, wrapped)

    def _activation_name(self, key: str, activation: Any) -> tuple[Any, str | None]:
        base = key.split("#")[0]
        if base in self.overrides:
            activation = self.overrides[base]
        entry = _activation_entry(activation)
        if entry is not None:
            return entry, entry.name
        if activation is None:
            return None, None
        return None, getattr(activation, "__name__", str(activation))

    def compiled(self):
        """The jitted analysis ``(params, batch arrays, switches) -> (loss, stats, measures)``.

        ``switches`` holds one boolean per tap of :attr:`blendable`: where it is on, that layer
        uses its surrogate gradient (``_surrogate_for``) instead of its own derivative, and its
        zero-gradient and saturation counts describe the surrogate derivative. Both derivatives
        are in the one program, selected exactly (``jnp.where``), so the surrogate
        counterfactual costs no second compilation.
        """
        if self._compiled is not None:
            return self._compiled
        entries = {key: self._activation_name(key, act)[0] for key, _, act in self.taps}
        blendable = self.blendable
        groups = self.groups

        def switched(entry, surrogate, on):
            def derivative_source(u, **params):
                return jnp.where(on, surrogate(u, **params), entry(u, **params))

            return _activations.with_surrogate_grad(entry, derivative_source)

        def run(params, arrays, switches):
            perturbations = {k: jnp.zeros(s.shape, s.dtype) for k, s in self.shapes.items()}
            substitutes = {
                k: switched(entry, surrogate, switches[k])
                for k, (entry, surrogate, _) in blendable.items()
            }

            def f(params, perturbations):
                perturber = _Perturber(perturbations, substitutes)
                loss = self._loss(params, arrays, perturber)
                return loss, perturber.values

            (loss, values), (grads, cotangents) = jax.value_and_grad(
                f, argnums=(0, 1), has_aux=True
            )(params, perturbations)
            # One statistics entry per layer (its leaves raveled together): the layer's norm,
            # zero share and histogram are what the report needs, at a fraction of the compile
            # time of one entry per leaf.
            by_name = {_param_name(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
            layer_grads = {
                group: jnp.concatenate([jnp.ravel(by_name[p]) for p in paths])
                for group, paths in groups.items()
            }
            measures = {}
            for k, z in values.items():
                m = {
                    "std": jnp.std(jnp.where(jnp.isfinite(z), z, 0)),
                    "nonfinite": jnp.sum(~jnp.isfinite(z)) + jnp.sum(~jnp.isfinite(cotangents[k])),
                    "cotangent_norm": safe_norm(cotangents[k]),
                    "cotangent_nan": jnp.any(jnp.isnan(cotangents[k])),
                    "cotangent_inf": jnp.any(jnp.isinf(cotangents[k])),
                }
                masks = _derivative_masks(entries.get(k), z)
                if k in blendable and masks:
                    on_masks = _derivative_masks(blendable[k][2], z)
                    masks = {
                        name: jnp.where(switches[k], on_masks.get(name, mask), mask)
                        for name, mask in masks.items()
                    }
                if "zero" in masks:
                    zero = masks["zero"]
                    units = zero.reshape(-1, zero.shape[-1]) if zero.ndim else zero.reshape(1, 1)
                    m["zero_grad_fraction"] = jnp.mean(zero)
                    m["dead_fraction"] = jnp.mean(jnp.all(units, axis=0))
                if "saturated" in masks:
                    m["saturated_fraction"] = jnp.mean(masks["saturated"])
                measures[k] = m
            return loss, gradient_stats(layer_grads), measures

        self._compiled = jax.jit(run)
        return self._compiled

    def analyse(self, params, arrays, surrogates: Collection[str] = ()) -> _Analysis:
        """Evaluates ``params``; the taps in ``surrogates`` use their surrogate gradient."""
        unknown = set(surrogates) - set(self.blendable)
        if unknown:
            raise ValueError(f"no surrogate gradient for the layers {sorted(unknown)}")
        switches = {key: np.bool_(key in surrogates) for key in self.blendable}
        loss, stats, measures = jax.device_get(self.compiled()(params, arrays, switches))
        groups = self.groups
        layers: list[LayerHealth] = []
        used_groups: set[str] = set()
        for key, _, activation in self.taps:
            _, act_name = self._activation_name(key, activation)
            layer = LayerHealth(name=key, activation=act_name)
            group = None if "#" in key else _match_group(key, groups, used_groups)
            if group is not None:
                used_groups.add(group)
                layer.param_paths = list(groups[group])
            m = measures[key]
            layer.cotangent_norm = _nonfinite_norm(
                float(m["cotangent_norm"]), bool(m["cotangent_nan"]), bool(m["cotangent_inf"])
            )
            layer.preactivation_std = float(m["std"])
            layer.nonfinite = int(m["nonfinite"])
            for field in ("zero_grad_fraction", "dead_fraction", "saturated_fraction"):
                if field in m:
                    setattr(layer, field, float(m[field]))
            layers.append(layer)
        for group, paths in groups.items():
            if group not in used_groups:
                base = group.split("/")[-1]
                _, act_name = self._activation_name(base, None)
                # Named like the boundaries (Flax module paths carry no "params/").
                name = group.removeprefix("params/") if "/" in group else group
                layer = LayerHealth(name=name, activation=act_name, param_paths=paths)
                self._insert_in_forward_order(layers, layer)
        for layer in layers:
            if not layer.param_paths:
                continue
            group_stats = stats[layer_of(layer.param_paths[0])]
            layer.grad_norm = _nonfinite_norm(
                float(group_stats.norm),
                int(group_stats.nan_count) > 0,
                int(group_stats.posinf_count) + int(group_stats.neginf_count) > 0,
            )
            layer.grad_max_abs = float(group_stats.max_abs)
            layer.grad_zero_fraction = float(group_stats.zero_fraction)
            layer.grad_histogram = np.asarray(group_stats.log2_histogram)
            layer.nonfinite += (
                int(group_stats.nan_count)
                + int(group_stats.posinf_count)
                + int(group_stats.neginf_count)
            )
        return _Analysis(float(loss), layers)

    def _insert_in_forward_order(self, layers: list[LayerHealth], layer: LayerHealth) -> None:
        """Inserts a layer without a boundary (a parameter group no tap matched, such as a
        Flax ``BatchNorm``) before the first layer whose parameters the forward pass uses later
        than it uses this one's; at the end when that order is unknown."""

        def first_use(candidate: LayerHealth) -> int | None:
            uses = [self.first_use[p] for p in candidate.param_paths if p in self.first_use]
            return min(uses) if uses else None

        own = first_use(layer)
        position = len(layers)
        if own is not None:
            for index, other in enumerate(layers):
                other_use = first_use(other)
                if other_use is not None and other_use > own:
                    position = index
                    break
        layers.insert(position, layer)


def _first_use(jaxpr: Any, params: PyTree) -> dict[str, int]:
    """For each parameter path, the index of the first top-level equation of the traced
    forward pass that reads it (the params are the jaxpr's first inputs, in tree order)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    position = {
        id(var): _param_name(path)
        for var, (path, _) in zip(jaxpr.invars[: len(leaves)], leaves, strict=True)
    }
    found: dict[str, int] = {}
    for index, equation in enumerate(jaxpr.eqns):
        for var in equation.invars:
            name = position.get(id(var))
            if name is not None and name not in found:
                found[name] = index
    return found


def _nonfinite_norm(finite_norm: float, has_nan: bool, has_inf: bool) -> float:
    """The norm of a vector, from the norm of its finite entries: NaN if any entry is NaN, Inf
    if any is infinite (a layer whose gradient is all NaN must not read as norm 0)."""
    return math.nan if has_nan else math.inf if has_inf else finite_norm


def _derivative_masks(entry: Any, z: jax.Array) -> dict[str, jax.Array]:
    """``{"zero": ..., "saturated": ...}`` masks of ``z`` for an elementwise registry entry.

    ``"saturated"`` only for bounded activations with a known peak derivative; nothing for an
    unknown or non-elementwise activation.
    """
    if entry is None or not entry.elementwise:
        return {}
    masks = {"zero": entry.zero_grad_mask(z)}
    low, high = entry.output_range
    if math.isfinite(low) and math.isfinite(high) and entry.peak_derivative:
        masks["saturated"] = entry.saturation_mask(z)
    return masks


class _ZeroDict(dict):
    """Zero perturbations for the discovery trace, created on first use."""

    def __missing__(self, key):
        return jnp.zeros([])


def _reference_layer(layers: list[LayerHealth]) -> str | None:
    """The last layer with a parameter gradient, in forward order.

    Marked layers come in the order the forward pass reached them; parameter groups without a
    mark are listed after them in name order, which says nothing about depth, so a marked layer
    is preferred (a layer-norm scale or a temperature must not become the yardstick).
    """
    with_grads = [la for la in layers if la.grad_norm is not None]
    marked = [la for la in with_grads if la.cotangent_norm is not None]
    return (marked or with_grads)[-1].name if with_grads else None


def _norm_of(layer: LayerHealth) -> float | None:
    return layer.grad_norm if layer.grad_norm is not None else layer.cotangent_norm


def _judge(layers: list[LayerHealth], reference: str | None) -> list[Finding]:
    ref_layer = next((la for la in layers if la.name == reference), None)
    ref_norm = ref_layer.grad_norm if ref_layer is not None else None
    if ref_norm is None and layers:
        ref_norm = _norm_of(layers[-1])
    for la in layers:
        la.symptoms = []
        norm = _norm_of(la)
        if la.nonfinite:
            la.symptoms.append("nan/inf")
            continue
        if norm is not None and norm == 0:
            la.symptoms.append("no gradient")
        elif norm is not None and ref_norm and math.isfinite(ref_norm) and ref_norm > 0:
            ratio = norm / ref_norm
            if norm < VANISHING_ABSOLUTE and ratio < VANISHING_RATIO:
                la.symptoms.append("vanishing")
            elif (ratio > EXPLODING_RATIO and norm >= VANISHING_ABSOLUTE) or (
                norm > EXPLODING_ABSOLUTE
            ):
                la.symptoms.append("exploding")
        elif norm is not None and norm > EXPLODING_ABSOLUTE:
            la.symptoms.append("exploding")
        if la.dead_fraction is not None and la.dead_fraction >= DEAD_UNIT_SHARE:
            la.symptoms.append("dead units")
        if la.saturated_fraction is not None and la.saturated_fraction > SATURATED_FRACTION:
            la.symptoms.append("saturated")
    findings = []
    for symptom in _SYMPTOM_ORDER:
        names = [la.name for la in layers if symptom in la.symptoms]
        if not names:
            continue
        findings.append(_finding(symptom, names, layers, reference, ref_norm))
    return findings


def _finding(symptom, names, layers, reference, ref_norm) -> Finding:
    by_name = {la.name: la for la in layers}
    first = names[0]
    if symptom in ("vanishing", "exploding"):
        # The gradient flows backward, so the problem starts at the flagged layer nearest the
        # loss; the first layer is where it is worst.
        starts = names[-1]
        worst = min(names, key=lambda n: _norm_of(by_name[n]) or 0.0)
        if symptom == "exploding":
            worst = max(names, key=lambda n: _norm_of(by_name[n]) or 0.0)
        norm = _norm_of(by_name[worst])
        message = (
            f"{symptom} gradients in {', '.join(names)} (first layer: {first}); it starts at "
            f"{starts}, going backward from the loss. {worst} has gradient norm {norm:.3g} vs "
            f"{ref_norm:.3g} at the last layer ({reference})"
        )
        if symptom == "vanishing":
            message += (
                f" - below {VANISHING_ABSOLUTE:g} and {VANISHING_RATIO:g}x the last layer. The "
                "norm is small but not zero: this is vanishing, not a dead network. Likely "
                "cause: weights too small for the depth (initialisation scale)."
            )
        else:
            message += (
                f" - above {EXPLODING_RATIO:g}x the last layer (and at least "
                f"{VANISHING_ABSOLUTE:g}) or above {EXPLODING_ABSOLUTE:g}. Likely "
                "cause: weights too large for the depth, or a too-large learning rate."
            )
        return Finding(symptom, names, starts, message)
    if symptom == "nan/inf":
        message = (
            f"NaN/Inf in the gradients or activations of {', '.join(names)} (first layer: "
            f"{first}); use gradkit.diagnostics.find_nan_origin(jax.grad(loss_fn), params, "
            "*batch) to name the equation and source line."
        )
        return Finding(symptom, names, first, message)
    if symptom == "no gradient":
        message = (
            f"no gradient at all (norm exactly 0) in {', '.join(names)}: every path to the loss "
            "passes through a zero derivative (dead units, a hard threshold, round/sign/argmax) "
            "or the parameters are unused."
        )
        return Finding(symptom, names, first, message)
    if symptom == "dead units":
        parts = [f"{n} {by_name[n].dead_fraction:.0%}" for n in names]
        message = (
            f"dead units (derivative 0 for every example of the batch) in {', '.join(parts)} - "
            f"at least {DEAD_UNIT_SHARE:.0%} of the layer. Likely cause: negative biases or a "
            "large step pushed the pre-activations into the activation's flat region."
        )
        return Finding(symptom, names, first, message)
    parts = [f"{n} {by_name[n].saturated_fraction:.0%}" for n in names]
    message = (
        f"saturated units in {', '.join(parts)} of pre-activations in the activation's flat "
        f"region (threshold {SATURATED_FRACTION:.0%}). Likely cause: a hard or bounded "
        "activation with pre-activations too large; try a smaller initialisation or a surrogate "
        "gradient (gradkit.activations.with_surrogate_grad)."
    )
    return Finding(symptom, names, first, message)


_RELU_FAMILY = {"relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "mish", "softplus"}


#: How far the sigmoid-family surrogates are scaled up so that their derivative is nowhere below
#: the activation's own (see ``_surrogate_for``): ``1 / (4 sigmoid'(2))``, the ratio of the
#: logistic's derivative at its centre to its derivative two rate-units away ...
_KINK_SCALE = 1.0 / (4.0 * (1.0 / (1.0 + math.exp(-2.0))) * (1.0 - 1.0 / (1.0 + math.exp(-2.0))))
#: ... and ``max_u 4 sigmoid'(u) (1 + |u|/2)**2``, the smallest factor by which the fast sigmoid's
#: derivative :math:`p / (1 + 2p|x|/w)^2` (same peak as the logistic) covers the logistic's.
_FAST_SIGMOID_COVER = 1.8348811006189707


def _surrogate_for(entry: Any) -> Any:
    r"""The surrogate whose derivative diagnose tries in place of ``entry``'s, or ``None``.

    The layer then computes ``with_surrogate_grad(entry, surrogate)``: ``entry``'s values, the
    surrogate's derivative. Every surrogate here has a derivative that is **nowhere below the
    activation's own** and nonzero where it is zero, so the counterfactual measures what
    unblocking the flat parts gives, not a loss of slope elsewhere. With :math:`w` the width of
    the output range, :math:`c` the centre and :math:`s` the slope there:

    - **relu, relu6** (dead units): :math:`f(x) + a\,(x - f(x))` with :math:`a` =
      :data:`SURROGATE_LEAK`: slope 1 on the linear piece, :math:`a` where the derivative is 0
      (for relu, leaky_relu's derivative).
    - **hard_sigmoid, hard_tanh** (flat parts): the logistic sigmoid they approximate, with the
      same centre and range, rate :math:`r = 4s/w` (the logistic whose slope at the centre is
      :math:`s`), scaled so its derivative equals :math:`s` at the kinks
      :math:`|x - c| = w / (2s)`:

      .. math:: f'_{\mathrm{sur}}(x) = s\,\sigma'\bigl(r (x - c)\bigr) / \sigma'(2),

      which is above :math:`s` on the linear piece (2.38 s at the centre) and decays like
      :math:`e^{-r|x - c|}` on the flat parts. For Theano's hard_sigmoid (slope 0.2) it is the
      derivative of :math:`2.38\,\sigma(0.8 x)`, which trains seed 000's XOR network from 59 of
      64 random inits where hard_sigmoid's own derivative trains none.
    - **ultra_fast_sigmoid**: its own derivative on :math:`|x| < 3.4`,
      :math:`0.375 / (1 + |x|/2)^2`, continued over the linear and flat pieces beyond.
    - **sigmoid, tanh** (saturated): the "fast sigmoid" derivative of SuperSpike (Zenke &
      Ganguli, 2018), with polynomial instead of exponential tails, scaled by 1.83 so it covers
      the activation's own: :math:`1.83\,s / (1 + 2s|x - c|/w)^2` (sigmoid at :math:`x = 10`:
      :math:`4.5 \times 10^{-5}` becomes :math:`1.3 \times 10^{-2}`).

    Other activations, and ones already wrapped by ``with_surrogate_grad``, get none.

    References:
      Zenke, F. and Ganguli, S. (2018). SuperSpike: supervised learning in multilayer spiking
      neural networks. Neural Computation 30(6).
    """
    name = getattr(entry, "name", None)
    if name in ("relu", "relu6"):
        leak = SURROGATE_LEAK

        def leaky(x):
            y = entry(x)
            return y + leak * (x - y)

        return _activations.Activation(
            name=f"{name} + {leak:g} (x - {name})",
            function=leaky,
            derivative=f"{name}'s, or {leak:g} where that is 0",
            peak_derivative=1.0,
        )
    if name not in ("hard_sigmoid", "hard_tanh", "ultra_fast_sigmoid", "sigmoid", "tanh"):
        return None
    try:
        low, high = entry.output_range
        width = float(high - low)
        slope, centre = entry.peak(), 0.0
        if name == "hard_sigmoid":
            params = dict(entry.params)
            slope = float(params.get("slope", 1.0 / 6.0))
            centre = (0.5 - float(params.get("shift", 0.5))) / slope
    except (TypeError, ValueError, ZeroDivisionError):  # array-valued slope or shift
        return None
    if name in ("hard_sigmoid", "hard_tanh"):
        rate, scale = 4.0 * slope / width, _KINK_SCALE * width

        def logistic(x):
            return scale * _activations.sigmoid(rate * (x - centre))

        return _activations.Activation(
            name="logistic",
            function=logistic,
            derivative=f"d/dx {scale:.3g} sigmoid({rate:.3g} (x - {centre:.3g}))",
            peak_derivative=abs(scale * rate / 4.0),
        )
    if name == "ultra_fast_sigmoid":  # Theano's rational piece 0.75 a / (1 + a), a = |x| / 2
        peak, rate = slope, 0.5
    else:
        peak, rate = _FAST_SIGMOID_COVER * slope, 2.0 * slope / width

    def fast_sigmoid(x):
        u = rate * (x - centre)
        return (peak / rate) * u / (1.0 + jnp.abs(u))

    return _activations.Activation(
        name="fast sigmoid",
        function=fast_sigmoid,
        derivative=f"{peak:.3g} / (1 + {rate:.3g} |x - {centre:.3g}|)**2",
        peak_derivative=abs(peak),
    )


def _reinit(params, paths: set[str], kind: str, key, bias: float | None = None, relu=()):
    """Re-initialises the kernels (leaves with ndim >= 2) on ``paths``; optionally sets biases.

    A kernel of shape ``(..., fan_out)`` gets normal entries with variance ``2 / fan_in`` (He)
    or ``2 / (fan_in + fan_out)`` (Xavier), ``fan_in`` the product of the leading axes. All
    kernels are cut from one float32 draw whose length is rounded up to a power of two, so every
    candidate and every call reuses a handful of compiled samplers.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    targets = [
        i
        for i, (path, leaf) in enumerate(leaves)
        if kind is not None and _param_name(path) in paths and jnp.ndim(leaf) >= 2
    ]
    total = sum(int(np.size(leaves[i][1])) for i in targets)
    draw = 1 << max(total - 1, 0).bit_length()
    noise = np.asarray(jax.random.normal(key, (draw,), jnp.float32)) if targets else None
    out, offset = [], 0
    for i, (path, leaf) in enumerate(leaves):
        name = _param_name(path)
        if i in targets:
            shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
            fan_in, fan_out = max(int(np.prod(shape[:-1])), 1), int(shape[-1])
            variance = 2.0 / fan_in if kind == "he" else 2.0 / (fan_in + fan_out)
            size = int(np.prod(shape))
            values = noise[offset : offset + size].reshape(shape) * np.float32(math.sqrt(variance))
            offset += size
            leaf = jnp.asarray(values.astype(dtype))
        elif name in paths and jnp.ndim(leaf) == 1 and bias is not None and layer_of(name) in relu:
            leaf = jnp.asarray(np.full(jnp.shape(leaf), bias, jnp.result_type(leaf)))
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _try_fixes(runner, arrays, params, base, findings, reference, key) -> list[Recommendation]:
    layers = base.layers
    symptoms = {f.symptom for f in findings}
    flagged = [la.name for la in layers if la.symptoms]
    order = [la.name for la in layers]
    with_params = [la for la in layers if la.param_paths]
    first_index = min(order.index(n) for n in flagged)
    downstream = [la for la in with_params if order.index(la.name) >= first_index]
    flagged_layers = [la for la in with_params if la.name in flagged]
    relu_groups = {
        layer_of(la.param_paths[0])
        for la in with_params
        if la.activation in _RELU_FAMILY and la.param_paths
    }

    def paths(selection):
        return {p for la in selection for p in la.param_paths}

    candidates: list[tuple[str, str, Callable[[], Any], list[str] | None]] = []
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if symptoms & {"vanishing", "exploding", "no gradient", "dead units"} and with_params:
        names_down = ", ".join(la.name for la in downstream)
        names_flag = ", ".join(la.name for la in flagged_layers)
        if flagged_layers and flagged_layers != downstream:
            candidates.append(
                (
                    "he init (flagged layers)",
                    f"He-normal re-initialisation of {names_flag} only",
                    lambda: _reinit(params, paths(flagged_layers), "he", k1),
                    None,
                )
            )
        candidates.append(
            (
                "he init",
                f"He-normal re-initialisation of {names_down} (the flagged layers and those the "
                "gradient flows back through)",
                lambda: _reinit(params, paths(downstream), "he", k2),
                None,
            )
        )
        candidates.append(
            (
                "xavier init",
                f"Xavier (Glorot) normal re-initialisation of {names_down}",
                lambda: _reinit(params, paths(downstream), "xavier", k3),
                None,
            )
        )
        if relu_groups:
            candidates.append(
                (
                    f"xavier init + bias {POSITIVE_BIAS:g}",
                    f"Xavier re-initialisation of {names_down} and bias {POSITIVE_BIAS:g} on the "
                    "ReLU-family layers",
                    lambda: _reinit(
                        params, paths(downstream), "xavier", k3, POSITIVE_BIAS, relu_groups
                    ),
                    None,
                )
            )
    if "dead units" in symptoms and relu_groups:
        candidates.append(
            (
                f"bias {POSITIVE_BIAS:g}",
                f"bias {POSITIVE_BIAS:g} on the ReLU-family layers, weights unchanged",
                lambda: _reinit(params, paths(with_params), None, k4, POSITIVE_BIAS, relu_groups),
                None,
            )
        )
    saturated = [la for la in with_params if "saturated" in la.symptoms]
    if saturated and not any(candidate[0] == "xavier init" for candidate in candidates):
        candidates.append(
            (
                "xavier init",
                "Xavier (Glorot) normal re-initialisation of the saturated "
                f"{', '.join(la.name for la in saturated)}",
                lambda: _reinit(params, paths(saturated), "xavier", k3),
                None,
            )
        )
    surrogates, changed = [], []
    for la in layers:
        if {"saturated", "dead units"} & set(la.symptoms) and la.name in runner.blendable:
            surrogate = runner.blendable[la.name][1]
            surrogates.append(la.name)
            changed.append(f"{la.name}: {la.activation} values, derivative {surrogate.derivative}")
    if surrogates:
        candidates.append(
            (
                "surrogate gradient",
                f"{'; '.join(changed)} (train with gradkit.activations.with_surrogate_grad)",
                lambda: params,
                surrogates,
            )
        )
    results = []
    for name, description, make, switched_on in candidates:
        analysis = runner.analyse(make(), arrays, switched_on or ())
        results.append(_evaluate(name, description, analysis, base, findings, reference))
    if "exploding" in symptoms:  # clipping a NaN or Inf gradient only spreads the NaN
        results.append(_clipped(base, findings, reference))
    results.sort(key=lambda r: (len(r[1].remaining), -r[0]))
    return [rec for _, rec in results]


def _evaluate(name, description, analysis, base, findings, reference):
    ref_name = _reference_layer(analysis.layers) or reference
    new_findings = _judge(analysis.layers, ref_name)
    return _recommendation(name, description, analysis.layers, base, findings, new_findings)


def _recommendation(name, description, new_layers, base, findings, new_findings):
    old = {la.name: la for la in base.layers}
    new = {la.name: la for la in new_layers}
    change = {}
    baseline = {}
    gains = []
    for la_name, la in old.items():
        if not la.symptoms:
            continue
        before, after = _norm_of(la), _norm_of(new[la_name]) if la_name in new else None
        baseline[la_name] = before
        if before is None or after is None or not math.isfinite(before) or not math.isfinite(after):
            continue
        if before > 0:
            change[la_name] = after / before
            if after > 0:
                # Orders of magnitude in the direction that helps: down for an exploding
                # layer, up for every other symptom (vanishing, dead, saturated units).
                direction = -1.0 if "exploding" in la.symptoms else 1.0
                gains.append(direction * math.log10(after / before))
        elif after > 0:
            gains.append(math.inf)  # a gradient where there was none at all
    remaining = [f"{f.symptom}: {', '.join(f.layers)}" for f in new_findings]
    left = {f.symptom for f in new_findings}
    resolved = [f.symptom for f in findings if f.symptom not in left]
    score = float(np.mean(gains)) if gains else 0.0
    grad_norms = {n: _norm_of(la) for n, la in new.items()}
    recommendation = Recommendation(
        name, description, grad_norms, change, remaining, resolved, baseline
    )
    return score, recommendation


def _clipped(base, findings, reference):
    norms = [la.grad_norm for la in base.layers if la.grad_norm is not None]
    finite = [n for n in norms if math.isfinite(n)]
    total = _host_combine(finite) if finite else 0.0
    factor = min(1.0, CLIP_NORM / total) if total > 0 else 1.0
    layers = []
    for la in base.layers:
        copy = dataclasses.replace(la, symptoms=[])
        if copy.grad_norm is not None and math.isfinite(copy.grad_norm):
            copy.grad_norm *= factor
        elif (
            copy.grad_norm is None
            and copy.cotangent_norm is not None
            and math.isfinite(copy.cotangent_norm)
        ):
            # A layer without parameters is judged by its cotangent: scaled alike, so that it
            # keeps its standing relative to the others (clipping moves every norm together).
            copy.cotangent_norm *= factor
        layers.append(copy)
    new_findings = _judge(layers, reference)
    return _recommendation(
        f"clip by global norm {CLIP_NORM:g}",
        f"optax.clip_by_global_norm({CLIP_NORM:g}) on the gradients (scales every layer by "
        f"{factor:.3g}; it bounds the step but does not change the gradient's direction)",
        layers,
        base,
        findings,
        new_findings,
    )
