"""Interpret a traced jaxpr into sympy: the engine behind :func:`gradkit.derivatives.expression`.

Every jaxpr variable becomes a NumPy ``object`` array of sympy expressions (shape ``()`` for
scalars), so broadcasting, reshapes and transposes are NumPy's and only the arithmetic is
sympy's. Only the equations an output depends on are interpreted, so the forward values that a
gradient's jaxpr computes and then drops never need a rule.

sympy is the ``symbolic`` extra; importing this module without it raises an ``ImportError`` that
says how to install it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import Literal

try:
    import sympy
except ImportError as error:  # pragma: no cover - exercised by a test that hides sympy
    raise ImportError(
        "gradkit.derivatives.expression needs sympy; install it with: "
        'pip install "gradkit[symbolic]"'
    ) from error

try:  # Readable "file:line (function)" of an equation; private, so optional.
    from jax._src.source_info_util import summarize as _summarize_source
except ImportError:  # pragma: no cover - depends on the jax version
    _summarize_source = None

#: Largest number of elements an input or intermediate array may have.
MAX_ELEMENTS = 1024

#: Largest denominator for which a constant such as 0.5 or 1/3 is shown as a fraction.
_MAX_DENOMINATOR = 100

#: Largest numerator of such a fraction.
_MAX_NUMERATOR = 1000

#: Largest formula (``sympy.count_ops`` over all outputs) that ``simplify=True`` hands to
#: ``sympy.simplify``; larger ones are only expanded or given their sigmoid form.
SIMPLIFY_MAX_OPS = 200

#: Longest ``scan`` that is unrolled into a formula.
_MAX_SCAN_LENGTH = 64


class sigmoid(sympy.Function):
    r"""The logistic function as a sympy function, printed ``sigmoid(x)``.

    .. math:: \operatorname{sigmoid}(x) = \frac{1}{1 + e^{-x}}, \qquad
       \operatorname{sigmoid}'(x) = \operatorname{sigmoid}(x)\,(1 - \operatorname{sigmoid}(x)).

    ``expr.rewrite(sympy.exp)`` turns it into exponentials; ``evalf`` evaluates it.
    """

    @classmethod
    def eval(cls, arg):
        if arg.is_zero:
            return sympy.Rational(1, 2)
        if arg is sympy.oo:
            return sympy.Integer(1)
        if arg is sympy.S.NegativeInfinity:
            return sympy.Integer(0)
        if arg.is_Number:
            return 1 / (1 + sympy.exp(-arg))
        return None

    def fdiff(self, argindex=1):
        if argindex != 1:
            raise sympy.ArgumentIndexError(self, argindex)
        value = sigmoid(self.args[0])
        return value * (1 - value)

    def _eval_rewrite_as_exp(self, arg, **kwargs):
        return 1 / (1 + sympy.exp(-arg))

    def _eval_evalf(self, prec):
        return (1 / (1 + sympy.exp(-self.args[0])))._eval_evalf(prec)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_real

    def _latex(self, printer):
        return r"\sigma\left(" + printer._print(self.args[0]) + r"\right)"


class rint(sympy.Function):
    r"""Rounding to the nearest integer, halves to the even one (``jnp.round``, NumPy's
    ``rint``), as a sympy function printed ``rint(x)``. Its derivative is 0, as in JAX."""

    @classmethod
    def eval(cls, arg):
        if arg.is_integer:
            return arg
        if arg.is_Rational or arg.is_Float:
            value = sympy.Rational(arg)
            below = sympy.floor(value)
            rest = value - below
            if rest == sympy.Rational(1, 2):
                return below if below % 2 == 0 else below + 1
            return below if rest < sympy.Rational(1, 2) else below + 1
        return None

    def fdiff(self, argindex=1):
        if argindex != 1:
            raise sympy.ArgumentIndexError(self, argindex)
        return sympy.Integer(0)

    def _eval_is_integer(self):
        return True if self.args[0].is_finite and self.args[0].is_real else None

    def _eval_is_real(self):
        return self.args[0].is_real

    def _latex(self, printer):
        return r"\operatorname{rint}\left(" + printer._print(self.args[0]) + r"\right)"


#: Functions that are finite wherever their arguments are, also in floating point (so not
#: ``exp``: ``jnp.where(jnp.isfinite(jnp.exp(x)), jnp.exp(x), 0)`` guards against its overflow).
_FINITE_FUNCTIONS = (
    sympy.Max,
    sympy.Min,
    sympy.Abs,
    sympy.sign,
    sympy.floor,
    sympy.ceiling,
    sympy.sin,
    sympy.cos,
    sympy.tanh,
    sympy.atan,
    sympy.atan2,
    sympy.erf,
    sympy.erfc,
    sigmoid,
)


def _finite_number(value: sympy.Basic) -> bool:
    """Whether a number (``2``, ``pi``, ``log(0)`` = zoo, ``sqrt(-1)``) is a finite real."""
    value = value.evalf()
    return value.is_extended_real is True and value.is_finite is True


def _surely_finite(value: sympy.Basic) -> bool:
    """Whether ``value`` is finite for every finite real value of its symbols (False: unknown).

    sympy's own ``is_finite`` is not enough: it calls ``log(x)`` finite for a real ``x``. Sums
    and products of finite terms count as finite (their floating-point overflow is not
    modelled); ``exp`` and powers of unknown sign do not.
    """
    if isinstance(value, sympy.Symbol):
        return True
    if value.is_number:
        return _finite_number(value)
    if isinstance(value, sympy.Pow):
        return bool(value.exp.is_Integer and value.exp >= 0 and _surely_finite(value.base))
    if isinstance(value, sympy.Piecewise):
        return all(_surely_finite(piece) for piece, _ in value.args)
    if isinstance(value, (sympy.Add, sympy.Mul, *_FINITE_FUNCTIONS)):
        return all(_surely_finite(arg) for arg in value.args)
    return False


class isfinite(sympy.logic.boolalg.Boolean, sympy.core.function.Application):
    """``jnp.isfinite`` of a formula, printed ``isfinite(u)``.

    True where the formula is finite for every finite real input (``isfinite(x**2 + 1)``), and
    kept otherwise (``isfinite(log(x))``, which is False at ``x = 0``), so that
    ``jnp.where(jnp.isfinite(u), u, 0)`` keeps both of its cases. An opaque predicate, not a
    ``BooleanFunction``: sympy's logic simplification would read its argument as a truth-table
    variable and drop it.
    """

    nargs = 1

    @classmethod
    def eval(cls, arg):
        if arg.is_number:
            return sympy.true if _finite_number(arg) else sympy.false
        if _surely_finite(arg):
            return sympy.true
        return None

    def _numpycode(self, printer):
        return f"isfinite({printer._print(self.args[0])})"


#: NumPy versions of gradkit's sympy functions, for :meth:`Expression.evaluate`'s float64 path.
_NUMPY_FUNCTIONS = {
    "sigmoid": lambda u: 1 / (1 + np.exp(-u)),
    "isfinite": np.isfinite,
    "rint": np.rint,
}


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive of the traced program has no symbolic rule."""


@dataclasses.dataclass(frozen=True)
class Expression:
    """A traced function written as a formula.

    ``str()`` is the formula (sympy's printing); a function with several outputs prints as the
    container of its outputs, e.g. ``(2*x, 2*y)``.

    Attributes:
      sympy: the formula: a sympy expression for a scalar output, a ``sympy.Array`` for an array
        output, or the function's output container holding those.
      variables: the input symbols, by name, in argument order.
    """

    sympy: Any
    variables: dict[str, sympy.Symbol]

    def __str__(self) -> str:
        return _format(self.sympy)

    def __repr__(self) -> str:
        return f"Expression({self})"

    def evaluate(self, *args: Any) -> Any:
        """Evaluates the formula at ``args`` (laid out like the example arguments), in float64.

        Useful to check a formula against the function it came from. Returns NumPy float64 arrays
        in the output structure. Boolean arguments are substituted as true and false. Where the
        formula has no finite real value (``log(0)``, ``1/0``, ``sqrt(-1)``) the result is what
        NumPy's float64 arithmetic gives there, ``-inf``, ``inf`` or ``nan``, as in JAX; a part
        that sympy already folded to complex infinity while tracing (``x/(x - x)``) has no sign
        left and gives ``nan``.
        """
        leaves = [np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(args)]
        values = [value for leaf in leaves for value in leaf]
        if len(values) != len(self.variables):
            raise ValueError(
                f"Expression.evaluate: the formula has {len(self.variables)} input element(s) "
                f"({', '.join(self.variables)}), got {len(values)}"
            )
        symbols = list(self.variables.values())
        point = {
            symbol: sympy.true
            if value is np.True_
            else sympy.false
            if value is np.False_
            else sympy.Float(float(value), 30)
            for symbol, value in zip(symbols, values, strict=True)
        }

        def number(element: sympy.Basic) -> float:
            try:
                value = sympy.sympify(element).subs(point)
                if isinstance(value, sympy.logic.boolalg.BooleanAtom):
                    return float(bool(value))
                value = sympy.N(value, 30)
                if value.is_extended_real:
                    return float(value)
            except TypeError:  # a comparison with an infinite value (zoo > 1) in a condition
                pass
            # No finite real value: sympy's zoo, nan or a complex number. Float64 arithmetic
            # tells -inf from inf and nan, as JAX does.
            # Complex infinity (folded while tracing) has no sign: nan, as the docstring says;
            # NumPy's printer cannot write it.
            element = sympy.sympify(element).xreplace({sympy.zoo: sympy.nan})
            numeric = sympy.lambdify(symbols, element, modules=[_NUMPY_FUNCTIONS, "numpy"])
            arguments = (v if isinstance(v, np.bool_) else np.float64(v) for v in values)
            with np.errstate(all="ignore"):
                return float(numeric(*arguments))

        def leaf(value: Any) -> np.ndarray:
            if isinstance(value, sympy.NDimArray):
                flat = [number(e) for e in sympy.flatten(value.tolist())]
                return np.asarray(flat, dtype=np.float64).reshape(value.shape)
            return np.asarray(number(value), dtype=np.float64)

        return jax.tree_util.tree_map(leaf, self.sympy, is_leaf=_is_formula)

    def latex(self) -> str:
        """Returns the formula as LaTeX (array elements ``x[0]`` become ``x_{0}``)."""
        names = {symbol: _latex_name(name) for name, symbol in self.variables.items()}
        return sympy.latex(self.sympy, symbol_names=names)

    def _repr_latex_(self) -> str:
        return f"$\\displaystyle {self.latex()}$"


def _is_formula(value: Any) -> bool:
    return isinstance(value, sympy.Basic | sympy.NDimArray)


def _format(value: Any) -> str:
    """``str()`` of a formula or of the output container holding formulas.

    Constants carry more digits than they show (so that ``evaluate`` is exact); sympy pads a
    constant printed on its own, or inside a Python container, with zeros up to those digits, so
    every formula is printed with padding stripped.
    """
    if _is_formula(value):
        return sympy.sstr(value, full_prec=False)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        pairs = zip(value._fields, value, strict=True)
        fields = ", ".join(f"{name}={_format(v)}" for name, v in pairs)
        return f"{type(value).__name__}({fields})"
    if isinstance(value, tuple):
        inner = ", ".join(_format(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_format(v)}" for k, v in value.items()) + "}"
    return str(value)


def _latex_name(name: str) -> str:
    match = re.fullmatch(r"(.*)\[([0-9, ]+)\]", name)
    if match is None:
        return sympy.latex(sympy.Symbol(name))
    base, index = match.groups()
    return f"{sympy.latex(sympy.Symbol(base))}_{{{index}}}"


# --------------------------------------------------------------------------------------------
# Constants and variables


def _number(value: Any, dtype: np.dtype) -> sympy.Basic:
    """A sympy number for one constant of a jaxpr, written the way a person would write it."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return sympy.true if bool(value) else sympy.false
    if np.issubdtype(dtype, np.integer):
        return sympy.Integer(int(value))
    if np.issubdtype(dtype, np.complexfloating):
        value = complex(value)
        return _number(value.real, np.float64) + sympy.I * _number(value.imag, np.float64)
    typed = dtype.type(value)
    as_float = float(typed)
    if math.isnan(as_float):
        return sympy.nan
    if math.isinf(as_float):
        return sympy.oo if as_float > 0 else -sympy.oo
    # The shortest decimal that rounds to the constant in its own dtype is what is shown; it is
    # stored with at least the digits the dtype needs to round-trip (float32: 8, float64: 17), so
    # that evaluating the formula reproduces the constant (a Float of 1 digit, 0.007, would hold
    # 0.00702).
    digits = _shortest_decimal(typed, dtype)
    stored = int(jax.numpy.finfo(dtype).precision) + 2
    if as_float.is_integer():
        # Whole numbers are integers when their shortest decimal is the exact value (3, 300000000);
        # 1e30 in float32 is 1000000015047466219876688855040 exactly, and is shown as 1.0e+30.
        if float(digits) == as_float and abs(as_float) < 2.0**63:
            return sympy.Integer(int(as_float))
        return sympy.Float(digits, stored)
    # A fraction with a small denominator that rounds to this constant in its own dtype
    # (0.5, 1/3, 0.1) is what the author wrote; anything else keeps its shortest decimal.
    # The smallest denominator wins: in a coarse dtype several fractions round to the constant
    # (bfloat16's 0.3 is also 28/93), and the author wrote the simplest. Fractions with
    # denominators up to d lie at least 1/d**2 apart, so only those with 1/d**2 above the
    # constant's spacing can be told apart by it (bfloat16's 1.23 is not 27/22); a numerator
    # over 1000 is a decimal that happens to be one (float32 12345.678 is not 382716/31).
    _, exponent = math.frexp(as_float)
    spacing = float(jax.numpy.finfo(dtype).eps) * 2.0 ** (exponent - 1)
    largest = min(_MAX_DENOMINATOR, int(1 / math.sqrt(spacing)))
    for denominator in range(2, largest + 1):
        numerator = round(as_float * denominator)
        if abs(numerator) <= _MAX_NUMERATOR and dtype.type(numerator / denominator) == typed:
            return sympy.Rational(numerator, denominator)
    significant = len(digits.lstrip("-").split("e")[0].replace(".", "").lstrip("0"))
    return sympy.Float(digits, max(significant, stored))


def _shortest_decimal(value: Any, dtype: np.dtype) -> str:
    """The shortest decimal that rounds to ``value`` in ``dtype`` (for every float dtype)."""
    for count in range(1, 18):
        text = f"{float(value):.{count}g}"
        with np.errstate(over="ignore"):  # 4e+38 overflows float32 on the way to 3.4028235e+38
            if dtype.type(float(text)) == value:
                return text
    return repr(float(value))


def _constant_array(value: Any) -> np.ndarray:
    array = np.asarray(value)
    out = np.empty(array.shape, dtype=object)
    for index in np.ndindex(array.shape):
        out[index] = _number(array[index], array.dtype)
    return out


def _symbol(name: str, dtype: np.dtype) -> sympy.Symbol:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return sympy.Symbol(name, integer=True)
    if np.issubdtype(dtype, np.floating):
        return sympy.Symbol(name, real=True)
    return sympy.Symbol(name)


def parameter_names(fun: Callable, count: int, names: Sequence[str] | None = None) -> list[str]:
    """Names for ``count`` positional arguments of ``fun``.

    ``names`` wins; otherwise the positional parameters of ``fun``'s signature (which sees through
    ``jax.grad``, ``jax.jit`` and ``functools.partial``); ``x0, x1, ...`` for the rest.
    """
    if names is not None:
        names = list(names)
        if len(names) != count or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"expression: names must be {count} non-empty strings, one per example argument; "
                f"got {names!r}"
            )
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                f"expression: names must differ (two arguments would be one symbol); "
                f"{', '.join(map(repr, repeated))} given twice in {names!r}"
            )
        return names
    found: list[str] = []
    try:
        signature = inspect.signature(fun)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        for parameter in signature.parameters.values():
            if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                break
            found.append(parameter.name)
    found = found[:count]
    taken = set(found)
    index = 0
    while len(found) < count:
        candidate = f"x{index}"
        index += 1
        if candidate not in taken:
            found.append(candidate)
    return found


def _input_arrays(
    names: Sequence[str], args: Sequence[Any], in_avals: Sequence[Any]
) -> tuple[list[np.ndarray], dict[str, sympy.Symbol]]:
    """Symbol arrays for the flattened inputs, named ``x``, ``x[0]``, ``params['w'][0, 1]``."""
    arrays: list[np.ndarray] = []
    variables: dict[str, sympy.Symbol] = {}
    avals = iter(in_avals)
    for name, arg in zip(names, args, strict=True):
        for path, _ in jax.tree_util.tree_flatten_with_path(arg)[0]:
            aval = next(avals)
            leaf_name = name + jax.tree_util.keystr(path)
            size = math.prod(aval.shape)
            if size > MAX_ELEMENTS:
                raise ValueError(
                    f"expression: argument {leaf_name} has shape {tuple(aval.shape)} "
                    f"({size} elements); formulas are written for small arrays of at most "
                    f"{MAX_ELEMENTS} elements"
                )
            out = np.empty(aval.shape, dtype=object)
            for index in np.ndindex(aval.shape):
                suffix = f"[{', '.join(map(str, index))}]" if index else ""
                symbol = _symbol(leaf_name + suffix, aval.dtype)
                variables[leaf_name + suffix] = symbol
                out[index] = symbol
            arrays.append(out)
    return arrays, variables


# --------------------------------------------------------------------------------------------
# Element-wise helpers


def _map(fun: Callable, *arrays: np.ndarray) -> np.ndarray:
    """Applies ``fun`` element by element, broadcasting like NumPy; returns an object array."""
    broadcast = np.broadcast_arrays(*arrays)
    shape = broadcast[0].shape
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(shape):
        out[index] = fun(*(a[index] for a in broadcast))
    return out


def _as_bool(value: sympy.Basic) -> sympy.Basic:
    if isinstance(value, sympy.logic.boolalg.Boolean):
        return value
    return sympy.Ne(value, 0)


def _as_number(value: sympy.Basic) -> sympy.Basic:
    if value is sympy.true:
        return sympy.Integer(1)
    if value is sympy.false:
        return sympy.Integer(0)
    if isinstance(value, sympy.logic.boolalg.Boolean):
        return sympy.Piecewise((1, value), (0, True))
    return value


def _truncate(value: sympy.Basic) -> sympy.Basic:
    return sympy.sign(value) * sympy.floor(sympy.Abs(value))


def _select(predicate: sympy.Basic, *cases: sympy.Basic) -> sympy.Basic:
    if len(cases) == 2 and (
        isinstance(predicate, sympy.logic.boolalg.Boolean) or predicate.is_Boolean
    ):
        return sympy.Piecewise((cases[1], predicate), (cases[0], True))
    pieces = [(case, sympy.Eq(predicate, i)) for i, case in enumerate(cases[:-1])]
    return sympy.Piecewise(*pieces, (cases[-1], True))


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.inexact)


_UNARY: dict[str, Callable[[sympy.Basic], sympy.Basic]] = {
    "neg": lambda a: -a,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "asin": sympy.asin,
    "acos": sympy.acos,
    "atan": sympy.atan,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "tanh": sympy.tanh,
    "asinh": sympy.asinh,
    "acosh": sympy.acosh,
    "atanh": sympy.atanh,
    "exp": sympy.exp,
    "exp2": lambda a: 2**a,
    "log": sympy.log,
    "log1p": lambda a: sympy.log(1 + a),
    "expm1": lambda a: sympy.exp(a) - 1,
    "logistic": sigmoid,
    "sqrt": sympy.sqrt,
    "rsqrt": lambda a: 1 / sympy.sqrt(a),
    "cbrt": lambda a: sympy.sign(a) * sympy.Abs(a) ** sympy.Rational(1, 3),
    "square": lambda a: a**2,
    "abs": sympy.Abs,
    "sign": sympy.sign,
    "floor": sympy.floor,
    "ceil": sympy.ceiling,
    "erf": sympy.erf,
    "erfc": sympy.erfc,
    "erf_inv": sympy.erfinv,
    "lgamma": sympy.loggamma,
    "digamma": sympy.digamma,
    "not": lambda a: sympy.Not(_as_bool(a)),
    # Variables are finite reals, so the checks jnp inserts (logsumexp's of its maximum) are
    # true; an intermediate value can still be infinite (log(0)).
    "is_finite": isfinite,
    "stop_gradient": lambda a: a,
    "copy": lambda a: a,
    "copy_p": lambda a: a,
    "reduce_precision": lambda a: a,
    "optimization_barrier": lambda a: a,
    "real": sympy.re,
    "imag": sympy.im,
    "conj": sympy.conjugate,
}

_BINARY: dict[str, Callable[[sympy.Basic, sympy.Basic], sympy.Basic]] = {
    "add": lambda a, b: a + b,
    "add_any": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    # C's fmod, as XLA's rem: the sign of the dividend (jnp.remainder and // add their own
    # corrections around it).
    "rem": lambda a, b: a - b * _truncate(a / b),
    "pow": lambda a, b: a**b,
    "max": sympy.Max,
    "min": sympy.Min,
    "atan2": sympy.atan2,
    "eq": sympy.Eq,
    "ne": sympy.Ne,
    "lt": sympy.Lt,
    "le": sympy.Le,
    "gt": sympy.Gt,
    "ge": sympy.Ge,
    "and": lambda a, b: sympy.And(_as_bool(a), _as_bool(b)),
    "or": lambda a, b: sympy.Or(_as_bool(a), _as_bool(b)),
    "xor": lambda a, b: sympy.Xor(_as_bool(a), _as_bool(b)),
}

#: Rules that read their operands as booleans: for integers these primitives are bitwise.
_LOGICAL = ("and", "or", "xor", "not", "reduce_and", "reduce_or")

_REDUCTIONS: dict[str, Callable[..., sympy.Basic]] = {
    "reduce_sum": sympy.Add,
    "reduce_prod": sympy.Mul,
    "reduce_max": sympy.Max,
    "reduce_min": sympy.Min,
    "reduce_and": lambda *a: sympy.And(*map(_as_bool, a)),
    "reduce_or": lambda *a: sympy.Or(*map(_as_bool, a)),
}

#: Primitives whose body is a jaxpr called once with the equation's inputs.
_CALLS = (
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
)


def _reduce(array: np.ndarray, axes: Sequence[int], combine: Callable) -> np.ndarray:
    axes = tuple(sorted(a % array.ndim for a in axes)) if array.ndim else ()
    kept = [d for d in range(array.ndim) if d not in axes]
    moved = np.transpose(array, kept + list(axes))
    kept_shape = moved.shape[: len(kept)]
    flat = moved.reshape((*kept_shape, -1))
    out = np.empty(kept_shape, dtype=object)
    for index in np.ndindex(kept_shape):
        out[index] = combine(*flat[index])
    return out


def _dot_general(lhs: np.ndarray, rhs: np.ndarray, dimension_numbers) -> np.ndarray:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_free = [d for d in range(lhs.ndim) if d not in (*lhs_contract, *lhs_batch)]
    rhs_free = [d for d in range(rhs.ndim) if d not in (*rhs_contract, *rhs_batch)]
    lhs_t = np.transpose(lhs, [*lhs_batch, *lhs_free, *lhs_contract])
    rhs_t = np.transpose(rhs, [*rhs_batch, *rhs_contract, *rhs_free])
    batch_shape = lhs_t.shape[: len(lhs_batch)]
    lhs_free_shape = tuple(lhs.shape[d] for d in lhs_free)
    rhs_free_shape = tuple(rhs.shape[d] for d in rhs_free)
    contract = math.prod(lhs.shape[d] for d in lhs_contract)
    batch = math.prod(batch_shape)
    left = lhs_t.reshape(batch, math.prod(lhs_free_shape), contract)
    right = rhs_t.reshape(batch, contract, math.prod(rhs_free_shape))
    out = np.empty((batch, left.shape[1], right.shape[2]), dtype=object)
    for b, i, j in np.ndindex(out.shape):
        out[b, i, j] = sympy.Add(*(left[b, i, k] * right[b, k, j] for k in range(contract)))
    return out.reshape(batch_shape + lhs_free_shape + rhs_free_shape)


def _broadcast_in_dim(operand: np.ndarray, shape, broadcast_dimensions) -> np.ndarray:
    expanded = [1] * len(shape)
    for operand_axis, out_axis in enumerate(broadcast_dimensions):
        expanded[out_axis] = operand.shape[operand_axis]
    return np.broadcast_to(operand.reshape(expanded), tuple(shape)).copy()


def _pad(operand: np.ndarray, padding_value: np.ndarray, padding_config) -> np.ndarray:
    out = operand
    for axis, (low, high, interior) in enumerate(padding_config):
        if interior:
            size = out.shape[axis]
            shape = list(out.shape)
            shape[axis] = size + (size - 1) * interior if size else 0
            spread = np.full(shape, padding_value[()], dtype=object)
            index = [slice(None)] * out.ndim
            index[axis] = slice(None, None, interior + 1)
            spread[tuple(index)] = out
            out = spread
        for amount, at_start in ((low, True), (high, False)):
            if amount > 0:
                shape = list(out.shape)
                shape[axis] = amount
                block = np.full(shape, padding_value[()], dtype=object)
                out = np.concatenate([block, out] if at_start else [out, block], axis=axis)
            elif amount < 0:
                index = [slice(None)] * out.ndim
                index[axis] = slice(-amount, None) if at_start else slice(None, amount)
                out = out[tuple(index)]
    return out


def _starts(starts: Sequence[np.ndarray]) -> np.ndarray:
    """The scalar start indices of a dynamic slice as one object array."""
    out = np.empty(len(starts), dtype=object)
    for axis, start in enumerate(starts):
        out[axis] = start[()] if isinstance(start, np.ndarray) else start
    return out


def _clamped_window(
    starts: np.ndarray, sizes: Sequence[int], shape: Sequence[int]
) -> tuple[slice, ...]:
    """The window of a dynamic slice: each start clamped so that the window fits, as in XLA."""
    return tuple(
        slice(first, first + size)
        for first, size in (
            (min(max(int(start), 0), dim - size), size)
            for start, size, dim in zip(starts, sizes, shape, strict=True)
        )
    )


#: Scatters and how each combines the operand's element with the updates that land on it
#: (``scatter`` keeps the last update, which is XLA's choice when indices repeat on a CPU).
_SCATTERS: dict[str, Callable[..., sympy.Basic]] = {
    "scatter": lambda old, *new: new[-1],
    "scatter-add": lambda old, *new: sympy.Add(old, *new),
    "scatter-sub": lambda old, *new: old - sympy.Add(*new),
    "scatter-mul": lambda old, *new: sympy.Mul(old, *new),
    "scatter-min": lambda old, *new: sympy.Min(old, *new),
    "scatter-max": lambda old, *new: sympy.Max(old, *new),
}


def _gather_fill(dtype: np.dtype, fill_value: Any) -> sympy.Basic:
    """What ``gather(mode="fill")`` gives for an index out of bounds (JAX's defaults)."""
    dtype = np.dtype(dtype)
    if fill_value is not None:
        return _number(np.asarray(fill_value, dtype)[()], dtype)
    if _is_float(dtype):
        return sympy.nan
    if dtype == np.bool_:
        return sympy.true
    if np.issubdtype(dtype, np.signedinteger):
        return sympy.Integer(int(np.iinfo(dtype).min))
    return sympy.Integer(int(np.iinfo(dtype).max))


def _gather(eqn, operand: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``gather`` at concrete ``indices``: the same gather of every operand element's position,
    run by JAX itself (so every dimension-number layout and index mode is JAX's), then those
    elements."""
    params = dict(eqn.params)
    mode = jax.lax.GatherScatterMode.from_any(params.get("mode"))
    fill = mode == jax.lax.GatherScatterMode.FILL_OR_DROP
    if fill:
        params["fill_value"] = -1
    positions = np.arange(operand.size, dtype=np.int32).reshape(operand.shape)
    taken = np.asarray(
        eqn.primitive.bind(
            jax.numpy.asarray(positions),
            jax.numpy.asarray(indices, eqn.invars[1].aval.dtype),
            **params,
        )
    )
    flat = operand.reshape(-1)
    missing = _gather_fill(eqn.invars[0].aval.dtype, eqn.params.get("fill_value")) if fill else None
    out = np.empty(taken.shape, dtype=object)
    for index in np.ndindex(taken.shape):
        position = int(taken[index])
        out[index] = missing if position < 0 else flat[position]
    return out


def _scatter(eqn, operand: np.ndarray, indices: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """A scatter at concrete ``indices``: where each update element lands, found by JAX's own
    scatter-add of one update element at a time (so layouts, modes and dropped out-of-bounds
    updates are JAX's), then the operand's elements combined with theirs."""
    params = eqn.params
    count = updates.size

    def landing(k):
        one = (jax.numpy.arange(count) == k).astype(jax.numpy.int32).reshape(updates.shape)
        return jax.lax.scatter_add(
            jax.numpy.zeros(operand.shape, jax.numpy.int32),
            jax.numpy.asarray(indices, eqn.invars[1].aval.dtype),
            one,
            params["dimension_numbers"],
            indices_are_sorted=params.get("indices_are_sorted", False),
            unique_indices=params.get("unique_indices", False),
            mode=params.get("mode"),
        ).reshape(-1)

    hits = np.asarray(jax.vmap(landing)(jax.numpy.arange(count))) if count else None
    flat_updates = updates.reshape(-1)
    arrivals: list[list[sympy.Basic]] = [[] for _ in range(operand.size)]
    for k in range(count):
        for position in np.flatnonzero(hits[k]):
            arrivals[position].extend([flat_updates[k]] * int(hits[k, position]))
    combine = _SCATTERS[eqn.primitive.name]
    flat = operand.reshape(-1)
    out = np.empty(operand.size, dtype=object)
    for position, new in enumerate(arrivals):
        out[position] = combine(flat[position], *new) if new else flat[position]
    return out.reshape(operand.shape)


#: Most values of an integer input at which indices that depend on it are written out.
_MAX_INDEX_VALUES = 4096


def _critical_points(indices: np.ndarray, symbol: sympy.Symbol, reach: int, what: str) -> list[int]:
    """The values of ``symbol`` at which piecewise-linear ``indices`` may take another element:
    where a linear piece lies within ``reach`` of 0 (rounded outwards, one more on each side),
    and where a condition switches (one on each side; abs, sign, min and max are read as
    Piecewise). Between and beyond these,
    every piece is more than ``reach`` from 0 on a fixed side and every condition is fixed."""
    points: set[int] = set()

    def root(linear: sympy.Basic) -> None:
        # Where linear (a*i + b) is 0: the points around it.
        a, b = _linear(linear, symbol, what)
        if a != 0:
            center = -b / a
            points.update(range(int(sympy.floor(center)) - 1, int(sympy.ceiling(center)) + 2))

    def piece(e: sympy.Basic) -> None:
        if not e.has(symbol):
            return
        # abs, sign, min and max as Piecewise, sums and products of Piecewise folded into one.
        e = sympy.piecewise_fold(e.rewrite(sympy.Piecewise))
        if isinstance(e, sympy.Piecewise):
            for value, cond in e.args:
                piece(value)
                for relation in cond.atoms(sympy.core.relational.Relational):
                    root(relation.lhs - relation.rhs)
            return
        a, b = _linear(e, symbol, what)
        if a != 0:
            low, high = sorted(((-reach - b) / a, (reach - b) / a))
            points.update(range(int(sympy.floor(low)) - 1, int(sympy.ceiling(high)) + 2))

    for element in indices.reshape(-1):
        piece(sympy.sympify(element))
    return sorted(points)


def _linear(e: sympy.Basic, symbol: sympy.Symbol, what: str) -> tuple[sympy.Basic, sympy.Basic]:
    """``(a, b)`` with ``e == a*symbol + b``; refuses anything else."""
    try:
        poly = sympy.Poly(e, symbol)
    except sympy.PolynomialError:
        poly = None
    if poly is None or poly.degree() > 1 or not all(c.is_Number for c in poly.all_coeffs()):
        raise UnsupportedPrimitiveError(
            f"expression: {what}: an index or a condition on it ({e}) is not piecewise-linear "
            f"in {symbol} (as i % n, i // n, i * i and mode='wrap' are not); only such indices "
            "(offsets, wrapping of negative indices, clamping) have a formula"
        )
    coefficients = poly.all_coeffs()
    a, b = coefficients if len(coefficients) == 2 else (0, coefficients[-1])
    return sympy.Rational(a), sympy.Rational(b)


def _round(method: Any) -> Callable[[sympy.Basic], sympy.Basic]:
    """``lax.round``: halves away from zero (its default), or to even (``jnp.round``)."""
    if int(method) == int(jax.lax.RoundingMethod.TO_NEAREST_EVEN):
        return rint
    return lambda a: sympy.sign(a) * sympy.floor(sympy.Abs(a) + sympy.Rational(1, 2))


# --------------------------------------------------------------------------------------------
# The interpreter


class _Interpreter:
    def __init__(self) -> None:
        self.context: list[str] = []

    def where(self, eqn) -> str:
        """`` (at file:line (function), inside jit 'relu' at file:line (g))`` for messages."""
        parts = []
        source = _source(eqn)
        if source:
            parts.append(f"at {source}")
        if self.context:
            parts.append("inside " + " > ".join(self.context))
        return (" (" + ", ".join(parts) + ")") if parts else ""

    def run(self, jaxpr, consts: Sequence[Any], args: Sequence[np.ndarray]) -> list[np.ndarray]:
        env: dict[Any, np.ndarray] = {}

        def read(atom) -> np.ndarray:
            if isinstance(atom, Literal):
                return _constant_array(np.asarray(atom.val, dtype=atom.aval.dtype))
            if atom in constants:  # converted when first used
                array = np.asarray(constants.pop(atom))
                if array.size > MAX_ELEMENTS:
                    inside = f" (inside {' > '.join(self.context)})" if self.context else ""
                    raise ValueError(
                        f"expression: the traced function uses a constant of shape {array.shape} "
                        f"({array.size} elements){inside}; formulas are written for small arrays "
                        f"of at most {MAX_ELEMENTS} elements"
                    )
                env[atom] = _constant_array(array)
            return env[atom]

        constants: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            if _is_object(value):
                env[var] = value
            else:
                constants[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for eqn in _live_equations(jaxpr):
            outputs = self.equation(eqn, [read(v) for v in eqn.invars])
            for var, value in zip(eqn.outvars, outputs, strict=True):
                size = value.size
                if size > MAX_ELEMENTS:
                    raise ValueError(
                        f"expression: {eqn.primitive.name} makes an array of shape {value.shape} "
                        f"({size} elements){self.where(eqn)}; formulas are written for small "
                        f"arrays of at most {MAX_ELEMENTS} elements"
                    )
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def call(self, eqn, label: str, closed, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        jaxpr, consts = _open(closed)
        source = _source(eqn)
        self.context.append(f"{label} at {source}" if source else label)
        try:
            return self.run(jaxpr, consts, args)
        finally:
            self.context.pop()

    def _guarded_comparison(self, name: str, fun: Callable, eqn: Any) -> Callable:
        """``fun`` (``Eq``/``Ne``), refusing a comparison that exact arithmetic decides although
        floats may not: ``u != u`` (``jnp.isnan``) or ``|u| == inf`` (``jnp.isinf``) of an ``u``
        that sympy cannot prove a finite real for real inputs (``sqrt``, ``log``, a division).
        Folding
        it would drop a NaN/Inf guard from the formula (``where(isnan(sqrt(x)), 0, sqrt(x))``
        would read ``sqrt(x)``)."""

        def always_finite(e: Any) -> bool:
            # Provably a finite real for every real input (a polynomial, exp, jax's own stable
            # log1p(exp(-|x|)) ...): a NaN/Inf test of it, such as jax's NaN passthroughs in
            # logaddexp, folds safely. Overflow (exp(x) for large x) is the float's, not the
            # formula's.
            e = sympy.sympify(e)
            if not e.free_symbols:  # a constant, infinity included, is what it is
                return True
            while isinstance(e, sympy.Abs):  # |log(x)| is real where log(x) is not
                e = e.args[0]
            return e.is_extended_real is True and e.is_finite is True

        def compare(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
            result = fun(a, b)
            decided = isinstance(result, sympy.logic.boolalg.BooleanAtom)
            if decided and not (always_finite(a) and always_finite(b)):
                raise UnsupportedPrimitiveError(
                    f"expression: {'==' if name == 'eq' else '!='} comparison of {a} with "
                    f"{b}{self.where(eqn)} is {bool(result)} in exact arithmetic but not for every "
                    "float (a NaN or infinity test such as jnp.isnan, jnp.isinf or "
                    "jnp.nan_to_num); a formula would drop it"
                )
            return result

        return compare

    def equation(self, eqn, inputs: list[np.ndarray]) -> list[np.ndarray]:
        name = eqn.primitive.name
        params = eqn.params
        out_avals = [v.aval for v in eqn.outvars]
        if name in _LOGICAL and out_avals[0].dtype != np.bool_:
            raise UnsupportedPrimitiveError(
                f"expression: bitwise {name!r} of {out_avals[0].dtype} integers{self.where(eqn)} "
                "has no symbolic rule (logical and/or/xor/not of booleans have)"
            )
        if name in _UNARY:
            return [_map(_UNARY[name], inputs[0])]
        if name in _BINARY:
            fun = _BINARY[name]
            if name == "div" and not _is_float(out_avals[0].dtype):
                return [_map(lambda a, b: _truncate(a / b), *inputs)]
            if name in ("add", "sub", "mul", "max", "min") and out_avals[0].dtype == np.bool_:
                fun = {"add": _BINARY["or"], "max": _BINARY["or"]}.get(name, _BINARY["and"])
                if name == "sub":
                    raise UnsupportedPrimitiveError(f"sub of booleans{self.where(eqn)}")
            if name in ("eq", "ne") and eqn.invars[0].aval.dtype == np.bool_:
                # Of booleans: equivalence and exclusive or (sympy's Eq/Ne take numbers).
                fun = {"eq": sympy.Equivalent, "ne": sympy.Xor}[name]
                return [_map(lambda a, b: fun(_as_bool(a), _as_bool(b)), *inputs)]
            if name in ("eq", "ne"):
                fun = self._guarded_comparison(name, fun, eqn)
            return [_map(fun, *inputs)]
        if name == "integer_pow":
            return [_map(lambda a: a ** params["y"], inputs[0])]
        if name == "select_n":
            return [_map(_select, *inputs)]
        if name == "clamp":
            return [_map(lambda lo, a, hi: sympy.Min(sympy.Max(a, lo), hi), *inputs)]
        if name == "convert_element_type":
            return [_map(_converter(params["new_dtype"], eqn.invars[0].aval.dtype), inputs[0])]
        if name in _REDUCTIONS:
            return [_reduce(inputs[0], params["axes"], _REDUCTIONS[name])]
        if name == "dot_general":
            return [_dot_general(inputs[0], inputs[1], params["dimension_numbers"])]
        if name == "broadcast_in_dim":
            return [_broadcast_in_dim(inputs[0], params["shape"], params["broadcast_dimensions"])]
        if name == "reshape":
            return [inputs[0].reshape(params["new_sizes"])]
        if name == "squeeze":
            return [np.squeeze(inputs[0], axis=tuple(params["dimensions"]))]
        if name == "expand_dims":
            return [np.expand_dims(inputs[0], tuple(params["dimensions"]))]
        if name == "transpose":
            return [np.transpose(inputs[0], params["permutation"])]
        if name == "rev":
            return [np.flip(inputs[0], axis=tuple(params["dimensions"]))]
        if name == "slice":
            strides = params["strides"] or (1,) * inputs[0].ndim
            index = tuple(
                slice(start, stop, step)
                for start, stop, step in zip(
                    params["start_indices"], params["limit_indices"], strides, strict=True
                )
            )
            return [inputs[0][index]]
        if name == "concatenate":
            return [np.concatenate(inputs, axis=params["dimension"])]
        if name == "stack":  # jnp.stack and jnp.array([...]) of arrays
            return [np.stack(inputs, axis=params["axis"])]
        if name == "split":
            bounds = np.cumsum(params["sizes"])[:-1]
            return list(np.split(inputs[0], bounds, axis=params["axis"]))
        if name == "pad":
            return [_pad(inputs[0], inputs[1], params["padding_config"])]
        if name == "iota":
            positions = np.indices(params["shape"])[params["dimension"]]
            return [_constant_array(positions.astype(params["dtype"]))]
        if name == "dynamic_slice":
            operand, *starts = inputs

            def sliced(at: np.ndarray) -> np.ndarray:
                return operand[_clamped_window(at, params["slice_sizes"], operand.shape)]

            return [self.indexed(eqn, _starts(starts), operand.shape, sliced)]
        if name == "dynamic_update_slice":
            operand, update, *starts = inputs

            def updated(at: np.ndarray) -> np.ndarray:
                out = operand.copy()
                out[_clamped_window(at, update.shape, operand.shape)] = update
                return out

            return [self.indexed(eqn, _starts(starts), operand.shape, updated)]
        if name == "gather":
            operand, indices = inputs
            return [self.indexed(eqn, indices, operand.shape, lambda at: _gather(eqn, operand, at))]
        if name in _SCATTERS:
            operand, indices, updates = inputs
            return [
                self.indexed(
                    eqn, indices, operand.shape, lambda at: _scatter(eqn, operand, at, updates)
                )
            ]
        if name == "round":
            return [_map(_round(params["rounding_method"]), inputs[0])]
        if name in ("cumsum", "cumprod", "cummax", "cummin"):
            return [_cumulative(inputs[0], name, params["axis"], params["reverse"])]
        if name in _CALLS:
            body = _body(params)
            if body is None:
                raise UnsupportedPrimitiveError(
                    f"primitive {name!r}{self.where(eqn)}: no body jaxpr found"
                )
            label = f"{name} {params['name']!r}" if "name" in params else name
            return self.call(eqn, label, body, inputs)
        if name == "cond":
            return self.cond(eqn, inputs)
        if name == "scan":
            return self.scan(eqn, inputs)
        raise UnsupportedPrimitiveError(
            f"expression: primitive {name!r}{self.where(eqn)} has no symbolic rule; "
            "gradkit writes formulas for element-wise arithmetic, elementary functions, "
            "comparisons and where/select, reductions, dot products, reshapes, slices and stacks, "
            "gathers and scatters, "
            "and calls (jit, custom_jvp, custom_vjp, cond, short scans)"
        )

    def indexed(
        self,
        eqn,
        indices: np.ndarray,
        operand_shape: tuple[int, ...],
        compute: Callable[[np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """``compute(indices)`` for a gather, scatter or dynamic slice at concrete indices.

        Indices may depend on one integer input ``i`` (``x[i]``, ``take_along_axis`` of a
        label) through piecewise-linear expressions (JAX's wrapping of negative indices,
        clamping, offsets). Each linear piece is within ``n + 2`` of the bounds (``n`` the
        operand's longest dimension) only for a finite run of ``i``, and the conditions switch at
        single points: ``compute`` runs at each ``i`` of those runs and points, and once for
        each stretch between them (and beyond them on either side), where every index stays
        out of bounds on one side, so that JAX's index mode (clamp, fill or drop) gives one
        result throughout. Each element is then a ``Piecewise`` over ranges of ``i``.
        """
        free = set()
        for element in indices.reshape(-1):
            free |= sympy.sympify(element).free_symbols
        name = eqn.primitive.name

        def integers(array: np.ndarray, where: str) -> np.ndarray:
            out = np.empty(array.shape, dtype=np.int64)
            for index in np.ndindex(array.shape):
                element = sympy.sympify(array[index])
                if not element.is_Integer:
                    raise UnsupportedPrimitiveError(
                        f"{name}{self.where(eqn)}: an index ({element}) is not an integer{where}"
                    )
                out[index] = int(element)
            return out

        if not free:
            return compute(integers(indices, ""))
        if len(free) > 1 or not next(iter(free)).is_integer:
            raise UnsupportedPrimitiveError(
                f"{name}{self.where(eqn)} at indices that depend on "
                f"{', '.join(sorted(map(str, free)))}: only indices that depend on a single "
                "integer input have a formula"
            )
        (symbol,) = free
        reach = max(operand_shape, default=1) + 2
        points = _critical_points(indices, symbol, reach, f"{name}{self.where(eqn)}")
        if len(points) > _MAX_INDEX_VALUES:
            raise UnsupportedPrimitiveError(
                f"{name}{self.where(eqn)}: its indices take {len(points)} values of {symbol} "
                f"within the bounds; at most {_MAX_INDEX_VALUES} are written out"
            )
        # Segments [first, last] covering all integers: each point, the stretches between
        # them, and beyond them on either side (None: unbounded).
        segments: list[tuple[int | None, int | None]] = [(None, points[0] - 1)]
        for point, following in zip(points, [*points[1:], None], strict=True):
            segments.append((point, point))
            if following is None:
                segments.append((point + 1, None))
            elif following > point + 1:
                segments.append((point + 1, following - 1))

        def at(value: int) -> np.ndarray:
            concrete = _map(lambda e: sympy.sympify(e).subs(symbol, value), indices)
            return compute(integers(concrete, f" at {symbol} = {value}"))

        results = [at(last if first is None else first) for first, last in segments]

        def condition(runs: list[tuple[int | None, int | None]]) -> sympy.Basic:
            parts = []
            for first, last in runs:
                bounds = [
                    *([] if first is None else [sympy.Ge(symbol, first)]),
                    *([] if last is None else [sympy.Le(symbol, last)]),
                ]
                if first is not None and first == last:
                    bounds = [sympy.Eq(symbol, first)]
                parts.append(sympy.And(*bounds))
            return sympy.Or(*parts)

        boolean = eqn.outvars[0].aval.dtype == np.bool_
        shape = results[0].shape
        out = np.empty(shape, dtype=object)
        for index in np.ndindex(shape):
            # Adjacent segments with one value merge into runs; the value with the most
            # segments is the Piecewise's last case.
            groups: dict[sympy.Basic, list[tuple[int | None, int | None]]] = {}
            previous = None
            for (first, last), result in zip(segments, results, strict=True):
                value = result[index]
                runs = groups.setdefault(value, [])
                if runs and previous == value:
                    runs[-1] = (runs[-1][0], last)
                else:
                    runs.append((first, last))
                previous = value
            ordered = sorted(groups.items(), key=lambda item: len(item[1]))
            *cases, (default, _) = ordered
            pieces = [(value, condition(runs)) for value, runs in cases]
            if not pieces:
                out[index] = default
            elif boolean:
                # A truth value, not a number holding True and False: the cases' conditions
                # exclude each other, so it is the case that holds, and its value.
                out[index] = sympy.Or(
                    *(sympy.And(cond, _as_bool(value)) for value, cond in pieces),
                    sympy.And(
                        sympy.Not(sympy.Or(*(cond for _, cond in pieces))), _as_bool(default)
                    ),
                )
            else:
                out[index] = sympy.Piecewise(*pieces, (default, True))
        return out

    def cond(self, eqn, inputs: list[np.ndarray]) -> list[np.ndarray]:
        index, *operands = inputs
        branches = eqn.params["branches"]
        if index.shape != ():
            raise UnsupportedPrimitiveError(f"cond with a batched predicate{self.where(eqn)}")
        selector = index[()]
        results = [
            self.call(eqn, f"cond branch {i}", branch, operands)
            for i, branch in enumerate(branches)
        ]
        if selector.is_Integer:
            chosen = min(max(int(selector), 0), len(branches) - 1)
            return results[chosen]
        conditions = _branch_conditions(selector, len(branches))
        outputs = []
        for position in range(len(results[0])):

            def pick(*values, _conditions=conditions):
                pieces = list(zip(values[:-1], _conditions, strict=True))
                return sympy.Piecewise(*pieces, (values[-1], True))

            outputs.append(_map(pick, *(r[position] for r in results)))
        return outputs

    def scan(self, eqn, inputs: list[np.ndarray]) -> list[np.ndarray]:
        params = eqn.params
        length = params["length"]
        if length > _MAX_SCAN_LENGTH:
            raise UnsupportedPrimitiveError(
                f"scan of length {length}{self.where(eqn)}: only scans of at most "
                f"{_MAX_SCAN_LENGTH} steps are unrolled into a formula"
            )
        num_consts, num_carry = params["num_consts"], params["num_carry"]
        consts = inputs[:num_consts]
        carry = inputs[num_consts : num_consts + num_carry]
        xs = inputs[num_consts + num_carry :]
        steps = range(length - 1, -1, -1) if params["reverse"] else range(length)
        ys_per_step: list[list[np.ndarray]] = []
        for t in steps:
            out = self.call(
                eqn, f"scan step {t}", params["jaxpr"], [*consts, *carry, *(x[t, ...] for x in xs)]
            )
            carry, ys = out[:num_carry], out[num_carry:]
            ys_per_step.append(ys)
        if params["reverse"]:
            ys_per_step.reverse()
        stacked = []
        for position, var in enumerate(eqn.outvars[num_carry:]):
            if ys_per_step:
                stacked.append(np.stack([ys[position] for ys in ys_per_step]))
            else:
                stacked.append(np.empty(var.aval.shape, dtype=object))
        return [*carry, *stacked]


def _source(eqn) -> str:
    """The user's ``file:line (function)`` that emitted ``eqn``, or "" when unknown."""
    if _summarize_source is None:
        return ""
    try:
        return _summarize_source(eqn.source_info) or ""
    except Exception:  # source info is a courtesy, never a reason to fail
        return ""


def _branch_conditions(selector: sympy.Basic, count: int) -> list[sympy.Basic]:
    # lax.cond turns its boolean predicate into 0/1: read the boolean back out.
    if (
        count == 2
        and isinstance(selector, sympy.Piecewise)
        and len(selector.args) == 2
        and selector.args[0].expr == 1
        and selector.args[1].expr == 0
    ):
        return [sympy.Not(selector.args[0].cond)]
    return [sympy.Eq(selector, i) for i in range(count - 1)]


def _cumulative(array: np.ndarray, name: str, axis: int, reverse: bool) -> np.ndarray:
    combine = {
        "cumsum": lambda a, b: a + b,
        "cumprod": lambda a, b: a * b,
        "cummax": sympy.Max,
        "cummin": sympy.Min,
    }[name]
    moved = np.moveaxis(array, axis, 0)
    if reverse:
        moved = moved[::-1]
    out = np.empty(moved.shape, dtype=object)
    running = None
    for t in range(moved.shape[0]):
        running = moved[t] if running is None else _map(combine, running, moved[t])
        out[t] = running
    if reverse:
        out = out[::-1]
    return np.moveaxis(out, 0, axis)


def _converter(new_dtype, old_dtype) -> Callable[[sympy.Basic], sympy.Basic]:
    new_dtype, old_dtype = np.dtype(new_dtype), np.dtype(old_dtype)
    if new_dtype == np.bool_:
        return _as_bool
    if old_dtype == np.bool_:
        return _as_number
    if np.issubdtype(new_dtype, np.integer) and _is_float(old_dtype):
        return _truncate
    return lambda a: a


def _body(params) -> Any:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params:
            return params[key]
    return None


def _open(closed) -> tuple[Any, list[Any]]:
    if hasattr(closed, "jaxpr") and hasattr(closed, "consts"):
        return closed.jaxpr, list(closed.consts)
    return closed, []


def _is_object(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == object


def _only_output(effects) -> bool:
    """Whether ``effects`` only print or call back to the host (``jax.debug.print``, also
    inside a ``jit`` or ``cond``): no part of the formula."""
    return all(type(effect).__name__ in ("DebugEffect", "OrderedDebugEffect") for effect in effects)


def _live_equations(jaxpr) -> list[Any]:
    """The equations the outputs depend on, in order (a gradient's jaxpr drops forward values)."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars) or not _only_output(eqn.effects):
            live.append(eqn)
            needed.update(v for v in eqn.invars if not isinstance(v, Literal))
    live.reverse()
    return live


# --------------------------------------------------------------------------------------------
# Tidying


def _tidy(
    value: sympy.Basic, symbols: Sequence[sympy.Symbol], thorough: bool = True
) -> sympy.Basic:
    """Writes a formula the way a person would.

    Polynomials are expanded into sympy's canonical sum of monomials (``4*x**3 + 3*x**2 + 2*x``,
    not a factored form). Anything else is written with the fewest operations among: the
    formula with every ``1/(1 + exp(-u))`` written ``sigmoid(u)`` (and ``exp(-u)`` next to it as
    ``(1 - sigmoid(u))/sigmoid(u)``), the formula as traced, and, when ``thorough``,
    ``sympy.simplify``'s result; on a tie the earlier one in that list wins.
    """
    if not isinstance(value, sympy.Expr):
        if isinstance(value, sympy.Basic) and thorough:
            return _simplified(value)
        return value
    if value.has(sympy.Piecewise):
        value = sympy.piecewise_fold(value)
    elif value.is_polynomial(*symbols):
        return sympy.expand(value)
    candidates = [value]
    recognised = _recognise_sigmoid(value)
    if recognised != value:
        candidates.insert(0, recognised)
    if thorough:
        candidates.append(_simplified(value))
    return min(candidates, key=sympy.count_ops)


def _simplified(value: sympy.Basic) -> sympy.Basic:
    """``sympy.simplify(value)``, or ``value`` where sympy fails on it (its piecewise
    simplification raises on some conditions, e.g. ``Ne(x < 0, False)`` from ``x % 2``)."""
    try:
        return sympy.simplify(value)
    except (TypeError, ValueError, NotImplementedError, RecursionError):
        return value


def _recognise_sigmoid(value: sympy.Expr) -> sympy.Expr:
    """Writes ``(1 + exp(-u))**-n`` as ``sigmoid(u)**n`` and ``exp(-u)`` next to it through it."""

    def is_logistic_power(term: sympy.Basic) -> bool:
        if not (term.is_Pow and term.exp.is_Integer and term.exp < 0 and term.base.is_Add):
            return False
        parts = term.base.args
        return (
            len(parts) == 2
            and sympy.S.One in parts
            and any(isinstance(p, sympy.exp) for p in parts)
        )

    def as_sigmoid(term: sympy.Pow) -> sympy.Expr:
        (exponential,) = [p for p in term.base.args if isinstance(p, sympy.exp)]
        return sigmoid(-exponential.args[0]) ** (-term.exp)

    value = value.replace(is_logistic_power, as_sigmoid)
    for function in value.atoms(sigmoid):
        u = function.args[0]
        value = value.xreplace(
            {sympy.exp(-u): (1 - function) / function, sympy.exp(u): function / (1 - function)}
        )
    return value


def _to_sympy(array: np.ndarray) -> sympy.Basic:
    if array.shape == ():
        return array[()]
    return sympy.Array(array.tolist(), array.shape)


def trace_expression(
    fun: Callable,
    args: Sequence[Any],
    *,
    simplify: bool = True,
    names: Sequence[str] | None = None,
) -> Expression:
    """Traces ``fun(*args)`` and writes its outputs as sympy formulas (see ``expression``)."""
    arg_names = parameter_names(fun, len(args), names)
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    inputs, variables = _input_arrays(arg_names, args, closed.in_avals)
    outputs = _Interpreter().run(closed.jaxpr, closed.consts, inputs)
    symbols = list(variables.values())
    if simplify:
        # sympy.simplify's time grows quickly with the formula: 1 s for each element of a 2x2
        # tanh layer's gradient, minutes for a 4x4 one. Above the budget it is skipped.
        size = sum(
            sympy.count_ops(e) for out in outputs for e in out.flat if isinstance(e, sympy.Basic)
        )
        thorough = size <= SIMPLIFY_MAX_OPS
        outputs = [_map(lambda e: _tidy(e, symbols, thorough), out) for out in outputs]
    leaves = [_to_sympy(out) for out in outputs]
    tree = jax.tree_util.tree_structure(out_shape)
    return Expression(jax.tree_util.tree_unflatten(tree, leaves), variables)
