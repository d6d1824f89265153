"""The custom VJP behind ``gradkit.recurrent.scan(..., truncate=Window(k))``.

``Window(k)`` is TBPTT(1, k): the cotangent of every output crosses exactly ``k`` applications of
the step function (its own step included) and is dropped after that. Plain ``stop_gradient`` cannot
express this, because a single carry mixes cotangents that started at different steps. The reverse
pass below therefore keeps the carry-adjoint split by *age* (how many steps it has crossed so far):
a buffer of ``k + 1`` adjoints of the current carry. At each step, the adjoints of age ``0 .. k-1``
cross the step (``k`` carry-VJPs, batched with ``vmap``), become one step older, and the one that
reaches age ``k`` is dropped unless it has arrived at ``init``.

Only :mod:`gradkit.recurrent` imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


def _is_differentiable(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


@dataclasses.dataclass(frozen=True, eq=False)
class _Partition:
    """Splits the leaves of a pytree into inexact (differentiable) and other leaves."""

    treedef: Any
    differentiable: tuple[bool, ...]

    @classmethod
    def of(cls, tree: PyTree) -> _Partition:
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, tuple(_is_differentiable(leaf) for leaf in leaves))

    def split(self, tree: PyTree) -> tuple[list, list]:
        leaves = self.treedef.flatten_up_to(tree)
        diff = [leaf for leaf, d in zip(leaves, self.differentiable, strict=True) if d]
        other = [leaf for leaf, d in zip(leaves, self.differentiable, strict=True) if not d]
        return diff, other

    def merge(self, diff: list, other: list) -> PyTree:
        diff_iter, other_iter = iter(diff), iter(other)
        leaves = [next(diff_iter) if d else next(other_iter) for d in self.differentiable]
        return self.treedef.unflatten(leaves)

    def cotangent(self, diff_cotangents: list) -> PyTree:
        """The cotangent pytree: the given leaves where differentiable, ``None`` elsewhere."""
        return self.merge(
            diff_cotangents, [None] * (len(self.differentiable) - len(diff_cotangents))
        )


@dataclasses.dataclass(frozen=True, eq=False)
class WindowSpec:
    """Static description of one windowed scan (hashed by identity)."""

    step: Callable  # step(carry, x, *consts) -> (carry, y), closure-converted
    k: int
    chunk: int  # carries stored every `chunk` steps; 1 stores every carry
    unroll: int | bool
    length: int


def _forward(spec: WindowSpec, consts: list, init: PyTree, xs: PyTree):
    """Runs the scan; returns (final carry, ys, stored carries)."""

    def body(carry, x):
        new_carry, y = spec.step(carry, x, *consts)
        return new_carry, (y, carry)

    if spec.chunk == 1:
        final, (ys, carries) = lax.scan(body, init, xs, length=spec.length, unroll=spec.unroll)
        return final, ys, carries
    n, r = divmod(spec.length, spec.chunk)
    c = spec.chunk
    xs_main = jax.tree.map(lambda a: a[: n * c].reshape((n, c, *a.shape[1:])), xs)

    def chunk_body(carry, x_chunk):
        def inner(h, x):
            new_h, y = spec.step(h, x, *consts)
            return new_h, y

        new_carry, ys_chunk = lax.scan(inner, carry, x_chunk, length=c, unroll=spec.unroll)
        return new_carry, (ys_chunk, carry)

    carry, (ys_main, boundaries) = lax.scan(chunk_body, init, xs_main, length=n)
    ys_main = jax.tree.map(lambda a: a.reshape((n * c, *a.shape[2:])), ys_main)
    # `boundaries[j]` is the carry entering step j * c; the remainder starts from `carry`.
    boundaries = jax.tree.map(lambda b, h: jnp.concatenate([b, h[None]]), boundaries, carry)
    if r:
        xs_rest = jax.tree.map(lambda a: a[n * c :], xs)
        carry, ys_rest = lax.scan(
            lambda h, x: spec.step(h, x, *consts), carry, xs_rest, length=r, unroll=spec.unroll
        )
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys_main, ys_rest)
    else:
        ys = ys_main
    return carry, ys, boundaries


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gradkit_window_truncation(spec: WindowSpec, consts: list, init: PyTree, xs: PyTree):
    """Scan whose reverse pass lets every cotangent cross at most ``spec.k`` steps."""
    final, ys, _ = _forward(spec, consts, init, xs)
    return final, ys


def gradkit_window_truncation_fwd(spec: WindowSpec, consts: list, init: PyTree, xs: PyTree):
    final, ys, stored = _forward(spec, consts, init, xs)
    return (final, ys), (consts, init, xs, stored)


def gradkit_window_truncation_bwd(spec: WindowSpec, residuals, cotangents):
    consts, init, xs, stored = residuals
    final_ct, ys_ct = cotangents
    k = spec.k
    consts_part = _Partition.of(consts)
    carry_part = _Partition.of(init)
    xs_part = _Partition.of(xs)
    x0 = jax.tree.map(lambda a: a[0], xs)
    y_example = jax.eval_shape(lambda: spec.step(init, x0, *consts)[1])
    y_part = _Partition.of(y_example)
    consts_d, consts_n = consts_part.split(consts)
    ys_ct_d, _ = y_part.split(ys_ct)
    final_ct_d, _ = carry_part.split(final_ct)

    def step_vjp(h, x):
        """VJP of one step w.r.t. (differentiable consts, carry, x) at carry h and input x."""
        h_d, h_n = carry_part.split(h)
        x_d, x_n = xs_part.split(x)

        def f(c_d, hh_d, xx_d):
            new_h, y = spec.step(
                carry_part.merge(hh_d, h_n),
                xs_part.merge(xx_d, x_n),
                *consts_part.merge(c_d, consts_n),
            )
            return carry_part.split(new_h)[0], y_part.split(y)[0]

        _, f_vjp = jax.vjp(f, consts_d, h_d, x_d)
        return f_vjp

    def reverse_step(state, inputs):
        buffer, acc = state  # buffer: carry-adjoint leaves with a leading age axis of size k + 1
        h, x, y_ct = inputs
        f_vjp = step_vjp(h, x)
        crossing = [b[:k] for b in buffer]
        # Thread j has crossed j steps; the output cotangent starts its own thread at age 0.
        y_threads = [jnp.zeros((k, *c.shape), c.dtype).at[0].set(c) for c in y_ct]
        if k == 1:
            c_ct, h_ct, x_ct = f_vjp(([b[0] for b in crossing], y_ct))
            h_cts = [c[None] for c in h_ct]
        else:
            _, h_cts, _ = jax.vmap(f_vjp)((crossing, y_threads))
            summed = [b.sum(0) for b in crossing]
            c_ct, _, x_ct = f_vjp((summed, y_ct))
        new_buffer = [jnp.concatenate([jnp.zeros_like(c[:1]), c]) for c in h_cts]
        acc = [a + c for a, c in zip(acc, c_ct, strict=True)]
        return (new_buffer, acc), x_ct

    buffer0 = [jnp.zeros((k + 1, *c.shape), c.dtype).at[0].set(c) for c in final_ct_d]
    acc0 = [jnp.zeros_like(c) for c in consts_d]
    state = (buffer0, acc0)
    if spec.chunk == 1:
        state, xs_ct_d = lax.scan(
            reverse_step, state, (stored, xs, ys_ct_d), reverse=True, unroll=spec.unroll
        )
    else:
        c = spec.chunk
        n, r = divmod(spec.length, c)

        def recompute_and_reverse(state, start, x_seg, y_ct_seg, seg_len):
            def fwd(h, x):
                new_h, _ = spec.step(h, x, *consts)
                return new_h, h

            _, carries = lax.scan(fwd, start, x_seg, length=seg_len, unroll=spec.unroll)
            return lax.scan(
                reverse_step, state, (carries, x_seg, y_ct_seg), reverse=True, unroll=spec.unroll
            )

        xs_ct_rest = None
        if r:
            start = jax.tree.map(lambda b: b[n], stored)
            x_seg = jax.tree.map(lambda a: a[n * c :], xs)
            y_seg = [a[n * c :] for a in ys_ct_d]
            state, xs_ct_rest = recompute_and_reverse(state, start, x_seg, y_seg, r)
        x_main = jax.tree.map(lambda a: a[: n * c].reshape((n, c, *a.shape[1:])), xs)
        y_main = [a[: n * c].reshape((n, c, *a.shape[1:])) for a in ys_ct_d]
        starts = jax.tree.map(lambda b: b[:n], stored)

        def chunk_reverse(state, inputs):
            start, x_seg, y_seg = inputs
            return recompute_and_reverse(state, start, x_seg, y_seg, c)

        state, xs_ct_main = lax.scan(chunk_reverse, state, (starts, x_main, y_main), reverse=True)
        xs_ct_d = [a.reshape((n * c, *a.shape[2:])) for a in xs_ct_main]
        if xs_ct_rest is not None:
            xs_ct_d = [jnp.concatenate([a, b]) for a, b in zip(xs_ct_d, xs_ct_rest, strict=True)]
    buffer, acc = state
    init_ct = [b.sum(0) for b in buffer]
    return (
        consts_part.cotangent(acc),
        carry_part.cotangent(init_ct),
        xs_part.cotangent(xs_ct_d),
    )


gradkit_window_truncation.defvjp(gradkit_window_truncation_fwd, gradkit_window_truncation_bwd)
