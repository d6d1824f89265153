r"""Derivative helpers over pytrees: jacobian, hessian, hvp, jvp (Rop), vjp (Lop).

Also :func:`expression`, which turns a traced function or its derivative into a readable formula.

Every helper differentiates pure functions of pytrees (arrays, tuples, lists, dicts, registered
dataclasses), works inside ``jax.jit``, ``jax.vmap`` and ``jax.grad``, and checks its inputs when
it is traced: a leaf that is not floating point raises ``TypeError`` naming its path, a tangent or
cotangent that does not match raises ``ValueError`` showing both structures.

The names follow Theano for its users:

- ``jacobian(f)(x)``: :math:`J_{ij} = \partial f_i / \partial x_j` (``theano.gradient.jacobian``);
- ``hessian(f)(x)``: :math:`\nabla^2 f` (``theano.gradient.hessian``);
- ``jvp(f, x, v)``, alias ``Rop``: :math:`J(x)\,v` (``T.Rop``);
- ``vjp(f, x, u)``, alias ``Lop``: :math:`u^\top J(x)` (``T.Lop``);
- ``hvp(f, x, v)``: :math:`\nabla^2 f(x)\,v` (``T.Rop(T.grad(cost, x), x, v)``);
- ``expression(f, x)``: the formula, e.g. ``4*x**3 + 3*x**2 + 2*x`` (``theano.pp``).

**Functions of several arguments.** ``jacobian`` and ``hessian`` take ``argnums`` like
``jax.jacfwd``: an int or a tuple of ints naming the positional arguments to differentiate.
``jvp``, ``vjp`` and ``hvp`` take the point ``x`` at which to differentiate. By default ``f`` is
called as ``f(x)`` and ``x`` may be any pytree. With ``argnums=i`` (or a tuple), ``x`` is the tuple
of *all* of ``f``'s positional arguments, ``f`` is called as ``f(*x)``, and only the selected
arguments are differentiated: the tangent ``v`` (or the result of ``vjp``) then has the structure
of ``x[i]`` (or of ``tuple(x[i] for i in argnums)``). Seed 003's ``T.Rop(T.dot(x, W), W, V)``
is ``Rop(lambda x, W: x @ W, (x, W), V, argnums=1)``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from gradkit._symbolic import Expression

__all__ = [
    "Expression",
    "Lop",
    "Rop",
    "expression",
    "hessian",
    "hvp",
    "jacobian",
    "jvp",
    "vjp",
]

PyTree = Any

#: Accepted values of ``jacobian``'s ``mode``.
JACOBIAN_MODES = ("auto", "forward", "reverse")


# --------------------------------------------------------------------------------------------
# Input checks


class _Spec:
    """A leaf shown as ``float32[2, 3]`` inside a printed pytree structure."""

    def __init__(self, dtype: Any, shape: Sequence[int]) -> None:
        self.text = f"{np.dtype(dtype).name}[{', '.join(map(str, shape))}]"

    def __repr__(self) -> str:
        return self.text


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, canonical dtype, and whether the leaf is a weakly typed Python scalar."""
    if isinstance(leaf, (bool, np.bool_)):
        return (), np.dtype(np.bool_), False
    if isinstance(leaf, (int, float, complex)):
        return (), np.dtype(jnp.result_type(leaf)), True
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(leaf.shape), np.dtype(jnp.result_type(leaf.dtype)), False
    array = jnp.asarray(leaf)
    return tuple(array.shape), np.dtype(array.dtype), False


def _structure(tree: PyTree) -> str:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    specs = []
    for leaf in leaves:
        shape, dtype, _ = _shape_dtype(leaf)
        specs.append(_Spec(dtype, shape))
    return repr(jax.tree_util.tree_unflatten(treedef, specs))


def _parameter_names(f: Callable) -> list[str]:
    try:
        parameters = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):
        return []
    names = []
    for parameter in parameters:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return names


def _argument_label(f: Callable, position: int) -> tuple[str, str]:
    """How messages name ``f``'s positional argument: its parameter name and a note."""
    names = _parameter_names(f)
    if position < len(names):
        return names[position], f" (argument {position} of f)"
    return f"argument {position} of f", ""


def _check_floating(caller: str, label: str, tree: PyTree, note: str = "") -> None:
    """Raises TypeError naming every leaf of ``tree`` that is not floating point or complex."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        _, dtype, _ = _shape_dtype(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            bad.append(f"{label}{jax.tree_util.keystr(path)}{note} has dtype {dtype.name}")
    if bad:
        raise TypeError(
            f"{caller}: derivatives are taken with respect to floating-point inputs, but "
            + "; ".join(bad)
            + ". Convert it with jnp.asarray(..., dtype=jnp.float32), or leave it out of the "
            "differentiated arguments (argnums)."
        )


def _check_like(
    caller: str, name: str, reference: PyTree, other_name: str, other: PyTree
) -> PyTree:
    """Checks that ``other`` has the structure, shapes and dtypes of ``reference``.

    A Python scalar in ``other`` is accepted for a floating leaf of the same shape and cast to its
    dtype. Returns ``other`` with those casts applied.

    Raises:
      ValueError: showing both structures and every mismatching leaf.
    """
    reference_leaves, reference_def = jax.tree_util.tree_flatten_with_path(reference)
    other_leaves, other_def = jax.tree_util.tree_flatten(other)
    both = f"\n  {name}: {_structure(reference)}\n  {other_name}: {_structure(other)}"
    if reference_def != other_def:
        raise ValueError(
            f"{caller}: {other_name} must have the same pytree structure as {name}; they differ:"
            + both
        )
    mismatches = []
    cast = []
    for (path, ref_leaf), leaf in zip(reference_leaves, other_leaves, strict=True):
        ref_shape, ref_dtype, _ = _shape_dtype(ref_leaf)
        shape, dtype, weak = _shape_dtype(leaf)
        compatible_weak = (
            weak
            and jnp.issubdtype(ref_dtype, jnp.inexact)
            and (jnp.issubdtype(dtype, jnp.inexact) or jnp.issubdtype(dtype, jnp.integer))
            # a complex Python scalar does not fit a real leaf
            and (
                not jnp.issubdtype(dtype, jnp.complexfloating)
                or jnp.issubdtype(ref_dtype, jnp.complexfloating)
            )
        )
        if shape != ref_shape or (dtype != ref_dtype and not compatible_weak):
            where = jax.tree_util.keystr(path) or "(the root)"
            mismatches.append(
                f"at {where}: {name} has {_Spec(ref_dtype, ref_shape)!r}, "
                f"{other_name} has {_Spec(dtype, shape)!r}"
            )
        cast.append(jnp.asarray(leaf, dtype=ref_dtype) if compatible_weak else leaf)
    if mismatches:
        raise ValueError(
            f"{caller}: {other_name} must match {name} leaf by leaf in shape and dtype; "
            + "; ".join(mismatches)
            + both
        )
    return jax.tree_util.tree_unflatten(other_def, cast)


def _normalise_argnums(caller: str, argnums: Any) -> int | tuple[int, ...]:
    def is_int(a: Any) -> bool:
        return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))

    if not (is_int(argnums) or isinstance(argnums, (tuple, list))):
        raise TypeError(
            f"{caller}: argnums must be an int or a tuple of ints, got {argnums!r} "
            f"({type(argnums).__name__})"
        )
    if is_int(argnums):
        return int(argnums)
    argnums = tuple(argnums)
    if not argnums:
        raise ValueError(f"{caller}: argnums must name at least one argument, got ()")
    if not all(is_int(a) for a in argnums):
        raise TypeError(f"{caller}: argnums must be an int or a tuple of ints, got {argnums!r}")
    argnums = tuple(int(a) for a in argnums)
    if len(set(argnums)) != len(argnums):
        raise ValueError(f"{caller}: argnums must not repeat an argument, got {argnums!r}")
    return argnums


def _check_positions(caller: str, argnums: int | tuple[int, ...], count: int) -> None:
    positions = (argnums,) if isinstance(argnums, int) else argnums
    for position in positions:
        if not -count <= position < count:
            raise ValueError(
                f"{caller}: argnums={argnums!r} names argument {position}, but f was called "
                f"with {count} positional argument(s)"
            )
    # (1, -1) of two arguments names argument 1 twice: one of its tangents or cotangents
    # would be dropped.
    if len({position % count for position in positions}) != len(positions):
        raise ValueError(
            f"{caller}: argnums must not repeat an argument, got {argnums!r}, which names the "
            f"same argument twice for f called with {count} positional argument(s)"
        )


def _selected(args: Sequence[Any], argnums: int | tuple[int, ...]) -> Any:
    if isinstance(argnums, int):
        return args[argnums]
    return tuple(args[i] for i in argnums)


def _check_selected(caller: str, f: Callable, args: Sequence[Any], argnums) -> None:
    for position in (argnums,) if isinstance(argnums, int) else argnums:
        position %= len(args)
        name, note = _argument_label(f, position)
        _check_floating(caller, name, args[position], note)


def _at_point(
    caller: str, f: Callable, x: PyTree, argnums: Any
) -> tuple[Callable[[PyTree], Any], PyTree, str]:
    """``f`` as a function of the differentiated arguments only, the point, and its label."""
    if argnums is None:
        _check_floating(caller, "x", x)
        return f, x, "x"
    argnums = _normalise_argnums(caller, argnums)
    if not isinstance(x, (tuple, list)):
        raise TypeError(
            f"{caller}: with argnums={argnums!r}, x must be the tuple of all of f's positional "
            f"arguments, got {type(x).__name__}"
        )
    args = tuple(x)
    _check_positions(caller, argnums, len(args))
    _check_selected(caller, f, args, argnums)
    label = f"x[{argnums}]" if isinstance(argnums, int) else f"x[{list(argnums)}]"
    return _restricted(f, args, argnums), _selected(args, argnums), label


def _restricted(
    f: Callable, args: Sequence[Any], argnums: int | tuple[int, ...], kwargs: Any = None
) -> Callable[[PyTree], Any]:
    """``f`` as a function of the ``argnums`` arguments alone (shaped like :func:`_selected`'s
    result), the other positional and keyword arguments fixed at ``args`` and ``kwargs``."""
    positions = (argnums,) if isinstance(argnums, int) else argnums

    def restricted(point: PyTree) -> Any:
        full = list(args)
        values = (point,) if isinstance(argnums, int) else point
        for position, value in zip(positions, values, strict=True):
            full[position] = value
        return f(*full, **(kwargs or {}))

    return restricted


def _size(tree: PyTree) -> int:
    return sum(int(np.prod(_shape_dtype(leaf)[0])) for leaf in jax.tree_util.tree_leaves(tree))


def _choose_mode(inputs: int, outputs: int) -> str:
    """Forward mode when fewer inputs than outputs are differentiated, reverse otherwise."""
    return "forward" if inputs < outputs else "reverse"


# --------------------------------------------------------------------------------------------
# Jacobians and Hessians


def jacobian(
    f: Callable,
    argnums: int | Sequence[int] = 0,
    *,
    mode: str = "auto",
    has_aux: bool = False,
    holomorphic: bool = False,
) -> Callable:
    r"""Returns a function computing the Jacobian of ``f``, in forward or reverse mode.

    .. math:: J_{ij}(x) = \frac{\partial f_i}{\partial x_j}

    The result has, for every output leaf of shape ``out`` and differentiated input leaf of shape
    ``in``, an array of shape ``out + in``, nested as output structure outside, input structure
    inside (like ``jax.jacfwd`` and ``jax.jacrev``, which give identical results).

    Mode rule (``mode="auto"``): with :math:`n` the number of differentiated input elements and
    :math:`m` the number of output elements, use forward mode (``jax.jacfwd``, :math:`n` JVPs) when
    :math:`n < m`, reverse mode (``jax.jacrev``, :math:`m` VJPs) otherwise. The sizes are read
    from shapes at trace time (``f`` is traced once more with ``jax.eval_shape`` to find
    :math:`m`), so the choice costs nothing at run time and works under ``jax.jit``.

    Args:
      f: function of one or more positional arguments (pytrees) returning a pytree of arrays.
      argnums: the positional argument(s) to differentiate, an int or a tuple of ints.
      mode: ``"auto"`` (the rule above), ``"forward"`` or ``"reverse"``.
      has_aux: ``f`` returns ``(output, aux)``; the Jacobian function then returns
        ``(jacobian, aux)``.
      holomorphic: ``f`` is holomorphic in complex inputs (as for ``jax.jacfwd``): needed to
        differentiate complex arguments, whose Jacobian is then complex.

    Returns:
      A function with ``f``'s signature returning the Jacobian (a tuple over ``argnums`` when
      ``argnums`` is a tuple).

    Raises:
      ValueError: ``mode`` is not one of ``"auto"``, ``"forward"``, ``"reverse"``; ``argnums``
        names an argument that ``f`` was not given.
      TypeError: a differentiated argument has a leaf that is not floating point (raised when
        the returned function is called or traced).

    Example:
      Seed 003: the Jacobian of :math:`x^2` at :math:`[4, 4]`, and the Jacobian of the scalar
      :math:`\sum x^2 + y^2` with respect to both arguments (its gradient):

      >>> import jax.numpy as jnp
      >>> from gradkit.derivatives import jacobian
      >>> jacobian(lambda x: x**2)(jnp.array([4.0, 4.0])).tolist()
      [[8.0, 0.0], [0.0, 8.0]]
      >>> s = lambda x, y: jnp.sum(x**2 + y**2)
      >>> jx, jy = jacobian(s, argnums=(0, 1))(jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0]))
      >>> jx.tolist(), jy.tolist()
      ([2.0, 4.0], [2.0, 4.0])
    """
    if mode not in JACOBIAN_MODES:
        raise ValueError(
            f"jacobian: mode must be one of {', '.join(map(repr, JACOBIAN_MODES))}; got {mode!r}"
        )
    argnums = _normalise_argnums("jacobian", argnums)

    def jacobian_fn(*args: Any, **kwargs: Any) -> Any:
        if not _check_call("jacobian", f, args, argnums):
            return _without_inputs(f, args, kwargs, argnums, has_aux)
        chosen = mode
        if chosen == "auto":
            chosen = _choose_mode(
                _size(_selected(args, argnums)), _output_size(f, args, kwargs, argnums, has_aux)
            )
        transform = jax.jacfwd if chosen == "forward" else jax.jacrev
        return transform(f, argnums=argnums, has_aux=has_aux, holomorphic=holomorphic)(
            *args, **kwargs
        )

    return _named(jacobian_fn, f, "jacobian")


def hessian(f: Callable, argnums: int | Sequence[int] = 0, *, has_aux: bool = False) -> Callable:
    r"""Returns a function computing the Hessian of a scalar ``f``, forward-over-reverse.

    .. math:: H_{ij}(x) = \frac{\partial^2 f}{\partial x_i\,\partial x_j}

    Computed as ``jax.jacfwd(jax.jacrev(f))``: one reverse pass for the gradient, then :math:`n`
    forward passes through it, the cheapest way to build a dense Hessian. To multiply by a vector
    without building it, use :func:`hvp`.

    With a tuple ``argnums=(0, 1)`` the result is the nested block matrix
    ``((H_00, H_01), (H_10, H_11))``; Theano's ``hessian(cost, [x, y])`` returned only the
    diagonal blocks ``[H_00, H_11]``.

    Args:
      f: function of one or more positional arguments returning a scalar.
      argnums: the positional argument(s) to differentiate, an int or a tuple of ints.
      has_aux: ``f`` returns ``(value, aux)``; the Hessian function then returns
        ``(hessian, aux)``.

    Returns:
      A function with ``f``'s signature returning the Hessian: for one argument with leaves of
      shapes ``a, b, ...`` a nested pytree of arrays of shape ``a + b``.

    Raises:
      ValueError: ``argnums`` names an argument that ``f`` was not given.
      TypeError: a differentiated argument has a leaf that is not floating point.

    Example:
      Seed 003: the Hessian of :math:`\sum x^2` at :math:`[4, 4]`, and the diagonal blocks of the
      Hessian of :math:`\sum x^2 + y^2` with respect to :math:`x` and :math:`y`:

      >>> import jax.numpy as jnp
      >>> from gradkit.derivatives import hessian
      >>> hessian(lambda x: jnp.sum(x**2))(jnp.array([4.0, 4.0])).tolist()
      [[2.0, 0.0], [0.0, 2.0]]
      >>> s = lambda x, y: jnp.sum(x**2 + y**2)
      >>> h = hessian(s, argnums=(0, 1))(jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0]))
      >>> h[0][0].tolist(), h[1][1].tolist()
      ([[2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, 2.0]])
      >>> h[0][1].tolist()
      [[0.0, 0.0], [0.0, 0.0]]
    """
    argnums = _normalise_argnums("hessian", argnums)

    def hessian_fn(*args: Any, **kwargs: Any) -> Any:
        if not _check_call("hessian", f, args, argnums):
            return _without_inputs(f, args, kwargs, argnums, has_aux)
        inner = jax.jacrev(f, argnums=argnums, has_aux=has_aux)
        return jax.jacfwd(inner, argnums=argnums, has_aux=has_aux)(*args, **kwargs)

    return _named(hessian_fn, f, "hessian")


def _check_call(caller: str, f: Callable, args: Sequence[Any], argnums: Any) -> bool:
    """Checks a call of a Jacobian or Hessian function; False if the arguments hold no arrays."""
    _check_positions(caller, argnums, len(args))
    _check_selected(caller, f, args, argnums)
    return bool(jax.tree_util.tree_leaves(_selected(args, argnums)))


def _output_size(
    f: Callable, args: Sequence[Any], kwargs: dict[str, Any], argnums: Any, has_aux: bool
) -> int:
    """The number of elements of ``f``'s output (aux excluded), from shapes only.

    Only the differentiated arguments are abstracted, as ``jax.jacfwd``/``jax.jacrev`` do: the
    others, keyword arguments and aux may be anything (a string, a function).
    """
    restricted = _restricted(f, args, argnums, kwargs)

    def output(point: PyTree) -> Any:
        out = restricted(point)
        return out[0] if has_aux else out

    return _size(jax.eval_shape(output, _selected(args, argnums)))


def _without_inputs(
    f: Callable, args: Sequence[Any], kwargs: dict[str, Any], argnums: Any, has_aux: bool
) -> Any:
    """The Jacobian or Hessian when the differentiated arguments hold no arrays (e.g. ``{}``).

    ``jax.jacfwd``/``jax.jacrev`` fail there; the derivative is every output leaf replaced by the
    (leafless) differentiated arguments, as those transforms nest it.
    """
    selected = _selected(args, argnums)
    if has_aux:
        out, aux = f(*args, **kwargs)
        return jax.tree_util.tree_map(lambda _: selected, out), aux
    out = jax.eval_shape(f, *args, **kwargs)
    return jax.tree_util.tree_map(lambda _: selected, out)


def _named(wrapper: Callable, f: Callable, prefix: str) -> Callable:
    name = getattr(f, "__name__", "f")
    wrapper.__name__ = f"{prefix}_of_{name}"
    wrapper.__qualname__ = wrapper.__name__
    wrapper.__doc__ = f"The {prefix} of {name}."
    return wrapper


# --------------------------------------------------------------------------------------------
# Products with vectors


def jvp(f: Callable, x: PyTree, v: PyTree, *, argnums: int | Sequence[int] | None = None) -> Any:
    r"""Jacobian-vector product :math:`J(x)\,v` (Theano's ``Rop``), forward mode.

    .. math:: \mathrm{jvp}(f, x, v) = \frac{\partial f}{\partial x}(x)\, v
       = \lim_{\varepsilon \to 0} \frac{f(x + \varepsilon v) - f(x)}{\varepsilon}

    The result has the structure of ``f``'s output. Unlike ``jax.jvp``, only the product is
    returned (not ``f(x)``), as Theano's ``Rop`` did. ``Rop`` is the same function.

    Args:
      f: the function; called as ``f(x)``, or ``f(*x)`` when ``argnums`` is given.
      x: the point: ``f``'s argument (any pytree), or with ``argnums`` the tuple of all of ``f``'s
        positional arguments.
      v: the tangent, with the structure, shapes and dtypes of ``x`` (of ``x[argnums]`` with
        ``argnums``). Python scalars are accepted for floating leaves.
      argnums: ``None`` (differentiate ``f``'s single argument ``x``), or the positional
        argument(s) of ``f`` to differentiate.

    Returns:
      :math:`J(x)\,v`, with the structure of ``f(x)``.

    Raises:
      TypeError: a differentiated leaf of ``x`` is not floating point.
      ValueError: ``v`` does not match ``x`` (both structures are shown).

    Example:
      Seed 003: ``T.Rop(T.dot(x, W), W, V)`` with :math:`W` and :math:`V` all ones and twos:

      >>> import jax.numpy as jnp
      >>> from gradkit.derivatives import Rop
      >>> W, V = jnp.ones((2, 2)), jnp.full((2, 2), 2.0)
      >>> x = jnp.array([0.0, 1.0])
      >>> Rop(lambda x, W: x @ W, (x, W), V, argnums=1).tolist()
      [2.0, 2.0]
      >>> Rop(lambda W: x @ W, W, V).tolist()
      [2.0, 2.0]
    """
    g, point, label = _at_point("jvp", f, x, argnums)
    v = _check_like("jvp", label, point, "v", v)
    return jax.jvp(g, (point,), (v,))[1]


def vjp(f: Callable, x: PyTree, u: PyTree, *, argnums: int | Sequence[int] | None = None) -> Any:
    r"""Vector-Jacobian product :math:`u^\top J(x)` (Theano's ``Lop``), reverse mode.

    .. math:: \mathrm{vjp}(f, x, u)_j = \sum_i u_i \frac{\partial f_i}{\partial x_j}(x)

    The result has the structure of ``x`` (of ``x[argnums]``). Unlike ``jax.vjp``, which returns
    a pull-back function, this returns the product, as Theano's ``Lop`` did. ``Lop`` is the same
    function.

    Args:
      f: the function; called as ``f(x)``, or ``f(*x)`` when ``argnums`` is given.
      x: the point: ``f``'s argument (any pytree), or with ``argnums`` the tuple of all of ``f``'s
        positional arguments.
      u: the cotangent, with the structure, shapes and dtypes of ``f(x)``.
      argnums: ``None`` (differentiate ``f``'s single argument ``x``), or the positional
        argument(s) of ``f`` to differentiate.

    Returns:
      :math:`u^\top J(x)`, with the structure of ``x`` (of ``x[argnums]``).

    Raises:
      TypeError: a differentiated leaf of ``x`` is not floating point.
      ValueError: ``u`` does not match ``f(x)`` (both structures are shown).

    Example:
      Seed 003: ``T.Lop(T.dot(x, W), W, V)`` with :math:`x = [0, 1]`, :math:`V = [2, 2]`:

      >>> import jax.numpy as jnp
      >>> from gradkit.derivatives import Lop
      >>> x, W = jnp.array([0.0, 1.0]), jnp.ones((2, 2))
      >>> Lop(lambda x, W: x @ W, (x, W), jnp.array([2.0, 2.0]), argnums=1).tolist()
      [[0.0, 0.0], [2.0, 2.0]]
    """
    g, point, _ = _at_point("vjp", f, x, argnums)
    out, pullback = jax.vjp(g, point)
    u = _check_like("vjp", "f(x)", out, "u", u)
    return pullback(u)[0]


def hvp(f: Callable, x: PyTree, v: PyTree, *, argnums: int | Sequence[int] | None = None) -> Any:
    r"""Hessian-vector product :math:`\nabla^2 f(x)\,v`, forward-over-reverse.

    .. math:: \mathrm{hvp}(f, x, v) = \nabla^2 f(x)\, v
       = \frac{\partial}{\partial \varepsilon} \nabla f(x + \varepsilon v)\Big|_{\varepsilon=0}

    Computed as ``jax.jvp(jax.grad(f), (x,), (v,))``: one forward pass through the gradient, at a
    small constant multiple of the cost of the gradient. The Hessian is never built, so this works
    where the :math:`n \times n` Hessian would not fit in memory. It is Theano's
    ``T.Rop(T.grad(cost, x), x, v)``; its other recipe, ``T.grad(T.sum(T.grad(cost, x) * v), x)``
    (reverse-over-reverse), gives the same numbers.

    Args:
      f: scalar function; called as ``f(x)``, or ``f(*x)`` when ``argnums`` is given.
      x: the point: ``f``'s argument (any pytree), or with ``argnums`` the tuple of all of ``f``'s
        positional arguments.
      v: the vector, with the structure, shapes and dtypes of ``x`` (of ``x[argnums]``).
      argnums: ``None`` (differentiate ``f``'s single argument ``x``), or the positional
        argument(s) of ``f`` to differentiate.

    Returns:
      :math:`\nabla^2 f(x)\,v`, with the structure of ``x`` (of ``x[argnums]``).

    Raises:
      TypeError: a differentiated leaf of ``x`` is not floating point.
      ValueError: ``v`` does not match ``x`` (both structures are shown); ``f`` does not return
        a scalar.

    Example:
      Seed 003: :math:`f = \sum x^2` at :math:`x = [4, 4]`, :math:`v = [2, 2]`:

      >>> import jax.numpy as jnp
      >>> from gradkit.derivatives import hvp
      >>> f = lambda x: jnp.sum(x**2)
      >>> hvp(f, jnp.array([4.0, 4.0]), jnp.array([2.0, 2.0])).tolist()
      [4.0, 4.0]
    """
    g, point, label = _at_point("hvp", f, x, argnums)
    v = _check_like("hvp", label, point, "v", v)
    out = jax.eval_shape(g, point)
    if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
        raise ValueError(
            "hvp: f must return a real scalar (the Hessian is defined for scalar functions); "
            f"it returned {_structure(out)}"
        )
    return jax.jvp(jax.grad(g), (point,), (v,))[1]


#: Theano's name for :func:`jvp` (the R-operator: :math:`J v`).
Rop = jvp

#: Theano's name for :func:`vjp` (the L-operator: :math:`u^\top J`).
Lop = vjp


# --------------------------------------------------------------------------------------------
# Formulas


def expression(
    f: Callable,
    *example_args: Any,
    simplify: bool = True,
    names: Sequence[str] | None = None,
) -> Expression:
    r"""The function ``f`` (or a derivative of it) written as a readable formula.

    ``f`` is traced at ``example_args`` with ``jax.make_jaxpr`` and each equation of the traced
    program is interpreted into `sympy <https://www.sympy.org>`_. Pass a derivative to read the
    derivative: ``expression(jax.grad(f), 1.0)``, like Theano's ``pp(T.grad(y, x))``. The example
    arguments fix only shapes and dtypes; their values do not matter.

    Variables are named after ``f``'s positional parameters (``jax.grad``, ``jax.jit`` and
    ``functools.partial`` are seen through), or ``x0, x1, ...`` where there are none, or after
    ``names``. A scalar argument ``x`` is the symbol ``x``; an array argument becomes one symbol
    per element, ``x[0], x[1]`` (``W[0, 1]`` for a matrix); a pytree argument's leaves are named
    by their path, ``params['w']``. Symbols are real (integer for integer inputs).

    The logistic function is the sympy function ``sigmoid`` whose derivative is
    ``sigmoid(x)*(1 - sigmoid(x))``. With ``simplify=True`` polynomials are expanded
    (``4*x**3 + 3*x**2 + 2*x``); other formulas are written with the fewest operations among the
    traced form, the form with ``1/(1 + exp(-u))`` written ``sigmoid(u)``, and
    ``sympy.simplify``'s, the last only for formulas of at most 200 operations in all outputs
    together (``sympy.simplify`` takes about a second per element of a 2x2 tanh layer's
    gradient, several for a 3x3 one). Constants are shown as the fraction with the smallest
    denominator up to 100 that rounds to them (``x/2``, ``3*x/10``) when the constant's precision
    tells such fractions apart and the numerator is at most 1000, otherwise with their shortest
    decimal.

    Supported: arithmetic, powers, exp/log/log1p/expm1, trigonometric and hyperbolic functions,
    logistic, sqrt/rsqrt/cbrt, abs, sign, max/min, comparisons and ``where`` (as ``Piecewise``),
    type conversions, reductions, ``dot_general``, reshapes, slices, concatenation and
    ``stack``; gathers, scatters and dynamic slices (indexing with arrays, ``x.at[i].add``,
    ``take_along_axis``, ``x[i]``) at constant indices or at indices that are piecewise-linear
    in one integer input (offsets, negative indices, clamping), which give a ``Piecewise`` over
    ranges of its values, out-of-bounds ones as JAX's index mode treats them; rounding
    (``jnp.round`` is ``rint``, halves to even), remainders and floor division (``%``,
    ``fmod``, ``//``), and
    ``jit``/``custom_jvp``/``custom_vjp``/``cond`` (their bodies are read) and scans of at most
    64 steps (unrolled), ``jax.checkpoint``; ``stop_gradient`` is the identity and
    ``jax.debug.print`` is skipped. ``jnp.isfinite`` of a formula that is finite for all finite
    real inputs is true; otherwise it stays ``isfinite(u)`` (``log(x)`` is infinite at 0, and
    ``exp(x)`` overflows); an ``isnan``/``isinf`` test (``==``/``!=``) of a formula sympy cannot
    prove a finite real is refused (folding it would drop a NaN guard from the formula). Integer
    bitwise operations have no rule. Arrays may have at most 1024 elements.

    Args:
      f: the function to write out.
      *example_args: positional arguments to trace ``f`` with (any pytrees).
      simplify: tidy the formula as described above; ``False`` gives the traced form (and
        is the quick choice for large formulas).
      names: one variable name per example argument, instead of ``f``'s parameter names.

    Returns:
      An ``Expression``: ``str()`` is the formula; ``.sympy`` the sympy expression (a
      ``sympy.Array`` for array outputs, or ``f``'s output container of those); ``.variables``
      the symbols by name; ``.latex()`` and ``_repr_latex_`` render it in notebooks.

    Raises:
      ImportError: sympy is not installed (``pip install "gradkit[symbolic]"``).
      NotImplementedError: the traced program uses a primitive without a symbolic rule; the
        message names the primitive and the source line it came from.
      ValueError: an argument or intermediate array has more than 1024 elements, or ``names``
        does not give one distinct name per example argument.

    Example:
      Seed 003: the derivative of :math:`x^2 + x^3 + x^4` and of the logistic function.

      >>> import jax
      >>> from gradkit.derivatives import expression
      >>> def f(x):
      ...     return x**2 + x**3 + x**4
      >>> print(expression(jax.grad(f), 1.0))
      4*x**3 + 3*x**2 + 2*x
      >>> print(expression(jax.grad(jax.nn.sigmoid), 1.0))
      (1 - sigmoid(x))*sigmoid(x)
      >>> print(expression(lambda x, W: x @ W, jax.numpy.ones(2), jax.numpy.ones((2, 2))))
      [W[0, 0]*x[0] + W[1, 0]*x[1], W[0, 1]*x[0] + W[1, 1]*x[1]]
    """
    symbolic = importlib.import_module("gradkit._symbolic")
    return symbolic.trace_expression(f, example_args, simplify=simplify, names=names)


def __getattr__(name: str) -> Any:
    # ``Expression`` lives with the sympy interpreter, which is imported only when needed so that
    # gradkit works without the ``symbolic`` extra.
    if name == "Expression":
        return importlib.import_module("gradkit._symbolic").Expression
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
