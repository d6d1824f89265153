r"""Finite differences against autodiff, with a verdict that says where and how sure it is.

The implementation behind :func:`gradkit.diagnostics.check_grads`. The function is flattened to
``leaves -> one output vector``; autodiff runs in the dtype of the inputs and the finite
differences run in float64 (see :mod:`gradkit._finite_differences`). Each comparison gets a
verdict:

* ``pass``: :math:`|a - d| \le 3 e + \mathrm{rtol}\, s + \mathrm{atol}`, where :math:`a` is the
  autodiff value, :math:`d` the extrapolated finite difference, :math:`e` its error bar and
  :math:`s` the scale of the quantity (so rounding in long sums is not mistaken for a bug);
* ``fail``: the gap is beyond that bound;
* ``inconclusive``: the finite difference is too noisy to decide (its error bar is not small
  against the derivatives of ``f``), produced NaN/Inf (that element only), or the point is a kink
  (left and right slopes differ) and the autodiff value is not between them. An autodiff value
  between the two one-sided slopes at a kink is a subgradient, which passes. A comparison that
  fails is looked at again with a 1024 times smaller step: if that agrees with autodiff (or finds
  the kink), a kink lies inside the default step and the verdict is ``inconclusive``.

In forward mode the scale :math:`s` is taken per output leaf, so a large output cannot hide a
wrong rule in a small one. Reverse mode projects all outputs onto one random cotangent, so there a
large output can still dominate; the forward-mode rows (checked by default) catch such a rule.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from gradkit import _finite_differences as fd

PyTree = Any

VERDICTS = ("pass", "fail", "inconclusive")
METHODS = ("directional", "full")
MODES = ("forward", "reverse")
#: largest Jacobian (outputs x inputs) the full method builds.
MAX_FULL_JACOBIAN = 2**26

_TRACE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def default_rtol(dtype) -> float:
    r"""Relative tolerance for autodiff computed in ``dtype``: :math:`4\sqrt{\epsilon}`.

    That is about ``1.4e-3`` for float32, ``6e-8`` for float64, ``0.13`` for float16: half the
    digits of the dtype, which leaves room for rounding in long reductions but not for a wrong
    rule (those are off by O(1) in the affected entries).
    """
    return 4.0 * math.sqrt(fd.machine_epsilon(dtype))


# --------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass(frozen=True)
class GradCheckRow:
    """One comparison of the report: one derivative order, one mode, one input leaf.

    Attributes:
      order: 1 for first derivatives, 2 for second derivatives.
      mode: ``"forward"`` (JVP) or ``"reverse"`` (VJP); at order 2, e.g.
        ``"forward over reverse"``.
      leaf: pytree path of the input leaf, e.g. ``params['dense_1']['kernel']``.
      verdict: ``"pass"``, ``"fail"``, ``"inconclusive"`` or ``"skipped"``.
      autodiff: the autodiff value of the worst comparison.
      finite_difference: the finite-difference value of the worst comparison.
      abs_error: ``|autodiff - finite_difference|``.
      rel_error: ``abs_error / max(|finite_difference|, scale)``.
      error_bar: the error bar of the finite difference.
      tolerance: the largest gap that passes.
      note: why the verdict is what it is, in words.
    """

    order: int
    mode: str
    leaf: str
    verdict: str
    autodiff: float = float("nan")
    finite_difference: float = float("nan")
    abs_error: float = float("nan")
    rel_error: float = float("nan")
    error_bar: float = float("nan")
    tolerance: float = float("nan")
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class WorstElement:
    """The worst comparison of a check, named down to the element where it was narrowed.

    Attributes:
      path: the input, e.g. ``params['dense_1']['kernel'][3, 7]``; for a directional check that
        was not narrowed, the leaf and the probe, e.g. ``params['w'] (random direction 0)``.
      output: the output element, for forward-mode comparisons of a vector output.
      order: derivative order.
      mode: ``"forward"`` or ``"reverse"`` (or an order-2 combination).
      autodiff: value from autodiff.
      finite_difference: value from finite differences.
      abs_error: absolute gap.
      rel_error: relative gap.
      error_bar: error bar of the finite difference.
      left_slope: backward one-sided slope (meaningful at kinks).
      right_slope: forward one-sided slope.
    """

    path: str
    output: str | None
    order: int
    mode: str
    autodiff: float
    finite_difference: float
    abs_error: float
    rel_error: float
    error_bar: float
    left_slope: float = float("nan")
    right_slope: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class GradCheckCost:
    """What a check cost.

    Attributes:
      function_evaluations: evaluations of ``f`` made by the finite differences.
      jvps: Jacobian-vector products (forward mode) evaluated.
      vjps: vector-Jacobian products (reverse mode) evaluated.
      compilations: number of XLA compilations.
      compile_seconds: wall time spent tracing and compiling.
      run_seconds: wall time spent running compiled code.
    """

    function_evaluations: int = 0
    jvps: int = 0
    vjps: int = 0
    compilations: int = 0
    compile_seconds: float = 0.0
    run_seconds: float = 0.0

    def add(self, other: GradCheckCost) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.function_evaluations} function evaluations, {self.jvps} JVPs, "
            f"{self.vjps} VJPs, {self.compilations} compilations "
            f"({self.compile_seconds:.2f} s compiling, {self.run_seconds:.2f} s running)"
        )


class GradientCheckError(AssertionError):
    """A gradient check failed; ``.report`` holds the :class:`GradCheckReport`.

    Subclasses ``AssertionError`` so test runners show it as a failed assertion.
    """

    def __init__(self, report: GradCheckReport):
        self.report = report
        super().__init__("gradient check " + report.verdict.upper() + "\n" + str(report))


@dataclasses.dataclass
class GradCheckReport:
    """The result of :func:`check_grads`.

    Attributes:
      verdict: ``"pass"``, ``"fail"`` or ``"inconclusive"``.
      rows: one :class:`GradCheckRow` per (order, mode, input leaf).
      worst: the worst comparison (:class:`WorstElement`), named down to the element when the
        check failed.
      cost: a :class:`GradCheckCost`.
      function: the name of the checked function.
      method: ``"directional"`` or ``"full"``.
      dtype: the dtype autodiff ran in.
      reference_dtype: the dtype the finite differences ran in.
      skipped: inputs left alone (integer and boolean leaves, arguments outside ``argnums``)
        and modes that could not run, with the reason.
      location: the :class:`~gradkit._locate.GradientLocation` found by ``locate=True``.
      matmul_precision: the default precision of float32 matrix products and convolutions
        during the check (``"highest"`` unless ``check_grads`` was told otherwise; ``None``:
        the platform's own default).
      reduced_matmuls: whether float32 matrix products may have run at reduced precision
        (``matmul_precision`` left to the default of a GPU or TPU, which is TF32 or bfloat16).
    """

    verdict: str
    rows: list[GradCheckRow]
    worst: WorstElement | None
    cost: GradCheckCost
    function: str
    method: str
    dtype: str
    reference_dtype: str
    skipped: list[str] = dataclasses.field(default_factory=list)
    location: Any = None
    matmul_precision: str | None = "highest"
    reduced_matmuls: bool = False

    @property
    def ok(self) -> bool:
        """Whether the verdict is ``"pass"``."""
        return self.verdict == "pass"

    def raise_if_failed(self, *, allow_inconclusive: bool = False) -> GradCheckReport:
        """Raises :class:`GradientCheckError` unless the check passed.

        Args:
          allow_inconclusive: also accept an ``"inconclusive"`` verdict.

        Returns:
          The report itself, so calls can be chained.

        Raises:
          GradientCheckError: the verdict is ``"fail"`` (or ``"inconclusive"`` and that is not
            allowed); the error carries the report and prints it.
        """
        if self.verdict == "pass" or (allow_inconclusive and self.verdict == "inconclusive"):
            return self
        raise GradientCheckError(self)

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as JSON-serialisable data."""
        return {
            "function": self.function,
            "verdict": self.verdict,
            "ok": self.ok,
            "method": self.method,
            "dtype": self.dtype,
            "reference_dtype": self.reference_dtype,
            "worst": None if self.worst is None else self.worst.to_dict(),
            "rows": [row.to_dict() for row in self.rows],
            "cost": self.cost.to_dict(),
            "skipped": list(self.skipped),
            "location": None if self.location is None else self.location.to_dict(),
            "matmul_precision": self.matmul_precision,
            "reduced_matmuls": self.reduced_matmuls,
        }

    def __str__(self) -> str:
        lines = [
            f"check_grads({self.function}): {self.verdict.upper()}  "
            f"[{self.method}, autodiff in {self.dtype}, finite differences in "
            f"{self.reference_dtype}]",
            "  AD = autodiff (jax.jvp/jax.vjp); FD = finite differences (Richardson-extrapolated"
            " central differences, error bar = FD uncertainty)",
        ]
        header = (
            f"  {'order':<5} {'mode':<22} {'input':<34} {'verdict':<12} {'AD':>11} {'FD':>11} "
            f"{'|AD-FD|':>9} {'FD error':>9} {'allowed':>9}"
        )
        lines.append(header)
        for row in self.rows:
            lines.append(
                f"  {row.order:<5} {row.mode:<22} {_clip(row.leaf, 34):<34} {row.verdict:<12} "
                f"{_num(row.autodiff):>11} {_num(row.finite_difference):>11} "
                f"{_num(row.abs_error, 2):>9} {_num(row.error_bar, 2):>9} "
                f"{_num(row.tolerance, 2):>9}"
            )
            if row.note:
                lines.append(f"        {row.note}")
        if self.worst is not None and self.verdict != "pass":
            w = self.worst
            where = w.path + (f" -> {w.output}" if w.output else "")
            lines.append(
                f"  worst: {where} ({w.mode}, order {w.order}): autodiff {w.autodiff:.6g}, "
                f"finite differences {w.finite_difference:.6g} ± {w.error_bar:.2g} "
                f"(abs error {w.abs_error:.3g}, rel error {w.rel_error:.3g})"
            )
            if np.isfinite(w.left_slope) and np.isfinite(w.right_slope):
                lines.append(
                    f"         one-sided slopes: left {w.left_slope:.6g}, right {w.right_slope:.6g}"
                )
        for item in self.skipped:
            lines.append(f"  not checked: {item}")
        if self.reduced_matmuls:
            lines.append(f"  note: {REDUCED_MATMUL_NOTE}")
        if self.location is not None:
            lines.append("  " + str(self.location).replace("\n", "\n  "))
        lines.append(f"  cost: {self.cost}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colour = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700"}
        cells = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    row.order,
                    row.mode,
                    row.leaf,
                    row.verdict,
                    _num(row.autodiff),
                    _num(row.finite_difference),
                    _num(row.abs_error, 2),
                    _num(row.error_bar, 2),
                    row.note,
                )
            )
            + "</tr>"
            for row in self.rows
        )
        heading = (
            f"<b>check_grads({html.escape(self.function)})</b>: "
            f"<span style='color:{colour.get(self.verdict, 'black')}'>"
            f"<b>{self.verdict.upper()}</b></span>"
        )
        worst = ""
        if self.worst is not None and self.verdict != "pass":
            worst = f"<p>worst: {html.escape(self.worst.path)}</p>"
        location = ""
        if self.location is not None:
            location = f"<pre>{html.escape(str(self.location))}</pre>"
        return (
            f"<div>{heading}<table><tr><th>order</th><th>mode</th><th>input</th>"
            "<th>verdict</th><th>autodiff</th><th>finite differences</th><th>|AD-FD|</th>"
            f"<th>FD error bar</th><th>note</th></tr>{cells}</table>{worst}{location}"
            f"<p>cost: {html.escape(str(self.cost))}</p></div>"
        )


def _num(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


# --------------------------------------------------------------------------------------------
# The problem: which leaves are differentiated, and f as a function of a flat list of them


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _is_complex(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.complexfloating)


class _Problem:
    """``f`` as a function of the list of its differentiated leaves, returning one vector."""

    def __init__(self, f: Callable, args: tuple, argnums: int | Sequence[int] | None):
        if not callable(f):
            raise TypeError(f"check_grads: f must be callable, got {type(f).__name__}")
        if not args:
            raise ValueError("check_grads: no arguments given; call check_grads(f, x, ...)")
        self.f = f
        self.name = getattr(f, "__name__", None) or type(f).__name__
        self.argnums = _normalise_argnums(argnums, len(args))
        names = _argument_names(f, len(args))
        self.skipped: list[str] = []
        self.args = tuple(jax.tree_util.tree_map(_as_array, a) for a in args)
        self.arg_treedefs, self.arg_leaves = [], []
        self.paths: list[str] = []
        self.positions: list[tuple[int, int]] = []
        for i, arg in enumerate(self.args):
            path_leaves, treedef = jax.tree_util.tree_flatten_with_path(arg)
            self.arg_treedefs.append(treedef)
            self.arg_leaves.append([leaf for _, leaf in path_leaves])
            for j, (path, leaf) in enumerate(path_leaves):
                name = names[i] + jax.tree_util.keystr(path)
                if _is_static(leaf):
                    # Like jax.grad, Python ints, bools, strings and other objects are passed
                    # to f as they are (f may use them in range(), shapes or branches).
                    if i in self.argnums:
                        self.skipped.append(
                            f"{name}: Python {type(leaf).__name__} {_clip(repr(leaf), 40)}, "
                            "passed to f unchanged as a static value"
                        )
                    continue
                if _is_complex(leaf):
                    raise TypeError(
                        f"check_grads: input {name} is complex ({leaf.dtype}); complex inputs are "
                        "not supported, pass the real and imaginary parts as separate real arrays"
                    )
                if i not in self.argnums:
                    continue
                if not _is_float(leaf):
                    self.skipped.append(f"{name}: {leaf.dtype} leaf, not differentiable")
                    continue
                bad = int(np.size(leaf) - np.isfinite(np.asarray(leaf)).sum())
                if bad:
                    raise ValueError(
                        f"check_grads: input {name} has {bad} NaN/Inf value(s) out of "
                        f"{np.size(leaf)}; derivatives are checked at a finite point, pass one"
                    )
                self.paths.append(name)
                self.positions.append((i, j))
        for i in range(len(args)):
            if i not in self.argnums:
                self.skipped.append(f"{names[i]}: not in argnums={list(self.argnums)}")
        if not self.paths:
            raise ValueError(
                f"check_grads: argnums={list(self.argnums)} selects no floating-point input of "
                f"{self.name}; the selected arguments hold only "
                + (", ".join(self.skipped) or "nothing")
            )
        self.leaves = [self.arg_leaves[i][j] for i, j in self.positions]
        self.dtypes = [np.dtype(leaf.dtype) for leaf in self.leaves]
        self.dtype = np.dtype(jnp.result_type(*self.dtypes))
        self._describe_outputs()

    # The output structure, and which of its leaves are differentiable.
    def _describe_outputs(self) -> None:
        dynamic = [
            (i, j)
            for i, leaves in enumerate(self.arg_leaves)
            for j, leaf in enumerate(leaves)
            if not _is_static(leaf)
        ]

        def traced(values):
            arg_leaves = [list(leaves) for leaves in self.arg_leaves]
            for (i, j), value in zip(dynamic, values, strict=True):
                arg_leaves[i][j] = value
            return self.f(*self._unflatten(arg_leaves))

        try:
            self.jaxpr, out = jax.make_jaxpr(traced, return_shape=True)(
                [self.arg_leaves[i][j] for i, j in dynamic]
            )
        except _TRACE_ERRORS as error:
            raise TypeError(
                f"check_grads: {self.name} cannot be traced by JAX, so it cannot be "
                f"differentiated: {type(error).__name__}: {str(error).splitlines()[0]} -- "
                "make f a pure jax.numpy function (no float(), numpy conversion or Python "
                "if on traced values)"
            ) from error
        path_leaves, self.out_treedef = jax.tree_util.tree_flatten_with_path(out)
        self.out_paths, self.out_float, self.out_shapes, self.out_sizes = [], [], [], []
        ignored = []
        for path, leaf in path_leaves:
            name = "output" + jax.tree_util.keystr(path)
            if _is_complex(leaf):
                raise TypeError(
                    f"check_grads: {name} of {self.name} is complex ({leaf.dtype}); return real "
                    "and imaginary parts as separate real outputs"
                )
            is_float = jnp.issubdtype(leaf.dtype, jnp.floating)
            self.out_float.append(is_float)
            if not is_float:
                ignored.append(f"{name} ({leaf.dtype})")
                continue
            self.out_paths.append(name)
            self.out_shapes.append(leaf.shape)
            self.out_sizes.append(int(np.prod(leaf.shape, dtype=np.int64)))
        if self.out_paths and sum(self.out_sizes) == 0:
            shapes = ", ".join(
                f"{p} {tuple(shape)}"
                for p, shape in zip(self.out_paths, self.out_shapes, strict=True)
            )
            raise ValueError(
                f"check_grads: {self.name} has no output entries to differentiate: its "
                f"floating-point outputs are empty ({shapes})"
            )
        if not self.out_paths:
            kinds = ", ".join(ignored) or "no outputs"
            raise TypeError(
                f"check_grads: {self.name} has no differentiable output: it returns {kinds}; "
                "derivatives need floating-point outputs (an integer or boolean result has "
                "zero or undefined derivatives)"
            )
        for item in ignored:
            self.skipped.append(f"{item}: integer/boolean output, not differentiable")
        self.out_dtype = np.dtype(
            jnp.result_type(
                *[
                    leaf.dtype
                    for (_, leaf), ok in zip(path_leaves, self.out_float, strict=True)
                    if ok
                ]
            )
        )
        self.num_outputs = int(sum(self.out_sizes))

    def rebuild(self, leaves: Sequence[jax.Array], *, cast=None) -> tuple:
        """The argument tuple with the differentiated leaves replaced (other floats cast)."""
        arg_leaves = [list(ls) for ls in self.arg_leaves]
        if cast is not None:
            arg_leaves = [
                [
                    leaf.astype(cast) if not _is_static(leaf) and _is_float(leaf) else leaf
                    for leaf in ls
                ]
                for ls in arg_leaves
            ]
        for (i, j), leaf in zip(self.positions, leaves, strict=True):
            arg_leaves[i][j] = leaf
        return self._unflatten(arg_leaves)

    def _unflatten(self, arg_leaves) -> tuple:
        return tuple(
            jax.tree_util.tree_unflatten(t, ls)
            for t, ls in zip(self.arg_treedefs, arg_leaves, strict=True)
        )

    def flat(self, *, cast=None) -> Callable[[list], jax.Array]:
        """``leaves -> concatenated float outputs`` (in ``cast`` if given)."""

        def flat_f(leaves):
            out = self.f(*self.rebuild(leaves, cast=cast))
            out_leaves = jax.tree_util.tree_leaves(out)
            parts = [jnp.ravel(o) for o, ok in zip(out_leaves, self.out_float, strict=True) if ok]
            common = cast or jnp.result_type(*parts)
            parts = [p.astype(common) for p in parts]
            return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

        return flat_f

    def output_scale(self, values: np.ndarray) -> np.ndarray:
        """The typical size of each output element's derivative, per output leaf.

        Args:
          values: ``(..., outputs)`` derivatives of the flat output (NaN/Inf allowed).

        Returns:
          ``(outputs,)``: for each element, the RMS of the finite, nonzero ``values`` of its
          output leaf, so a small-scale output is not judged against a large-scale one.
        """
        values = np.asarray(values, np.float64).reshape(-1, self.num_outputs)
        scale = np.zeros(self.num_outputs)
        offset = 0
        for size in self.out_sizes:
            block = values[:, offset : offset + size]
            moved = block[(block != 0) & np.isfinite(block)]
            scale[offset : offset + size] = np.sqrt(np.mean(moved**2)) if moved.size else 0.0
            offset += size
        return scale

    def output_name(self, flat_index: int) -> str:
        offset = 0
        for path, shape, size in zip(self.out_paths, self.out_shapes, self.out_sizes, strict=True):
            if flat_index < offset + size:
                return path + _index_text(flat_index - offset, shape)
            offset += size
        return f"output[{flat_index}]"


def _as_array(x):
    # Python floats are differentiable inputs; Python ints and bools stay static (see
    # _is_static), as they do for jax.grad.
    if isinstance(x, (jax.Array, np.ndarray, np.generic, float, complex)) and not isinstance(
        x, bool
    ):
        return jnp.asarray(x)
    return x


def _is_static(x) -> bool:
    """Whether an argument leaf is passed to f as it is, not traced: anything but an array."""
    return not isinstance(x, (jax.Array, np.ndarray, np.generic))


def _normalise_argnums(argnums, num_args: int) -> tuple[int, ...]:
    if argnums is None:
        return tuple(range(num_args))
    items = (argnums,) if isinstance(argnums, (int, np.integer)) else tuple(argnums)
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"check_grads: argnums must hold integers, got {argnums!r}")
    normalised = tuple(int(a) % num_args if -num_args <= a < num_args else a for a in items)
    out_of_range = [a for a in normalised if not 0 <= a < num_args]
    if out_of_range:
        raise ValueError(
            f"check_grads: argnums={argnums!r} refers to argument(s) {out_of_range}, but f was "
            f"given {num_args} positional argument(s) (valid: 0..{num_args - 1})"
        )
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"check_grads: argnums={argnums!r} repeats an argument")
    if not normalised:
        raise ValueError("check_grads: argnums is empty; select at least one argument")
    return normalised


def _argument_names(f: Callable, num_args: int) -> list[str]:
    names = [f"args[{i}]" for i in range(num_args)]
    try:
        parameters = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        return names
    for i, p in enumerate(parameters[:num_args]):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names[i] = p.name
        elif p.kind == p.VAR_POSITIONAL:
            names[i:] = [f"{p.name}[{k}]" for k in range(num_args - i)]
            break
    return names


def _index_text(flat: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return ""
    index = np.unravel_index(int(flat), shape)
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


# --------------------------------------------------------------------------------------------
# Comparison rules


@dataclasses.dataclass
class _Judged:
    status: np.ndarray  # 0 pass, 1 subgradient pass, 2 inconclusive, 3 fail
    ratio: np.ndarray  # gap / allowed, used to pick the worst
    gap: np.ndarray
    allowed: np.ndarray
    scale: np.ndarray
    reason: np.ndarray  # for inconclusive: 0 noisy, 1 kink, 2 non-finite, 3 kink inside the step


def _judge(autodiff, derivative: fd.Derivative, scale, rtol, atol, context=0.0) -> _Judged:
    """Judges autodiff against finite differences, elementwise.

    ``scale`` is the size the tolerance is relative to (per output leaf, so a large output does
    not hide a small one); ``context`` is the typical size of the derivatives of ``f`` along the
    same directions, which an error bar must be small against for a comparison to count.
    """
    a = np.asarray(autodiff, np.float64)
    d = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), derivative)
    finite = (
        np.asarray(d.finite, bool)
        & np.isfinite(a)
        & np.isfinite(d.value)
        & np.isfinite(d.error)
        & np.isfinite(scale)
    )
    gap = np.abs(a - d.value)
    tol_ad = rtol * scale + atol
    allowed = 3.0 * d.error + tol_ad
    kink = np.abs(d.right - d.left) > 3.0 * (d.side_error + d.error) + tol_ad
    lo, hi = np.minimum(d.left, d.right), np.maximum(d.left, d.right)
    inside = (a >= lo - allowed) & (a <= hi + allowed)
    # Too noisy: the error bar is a large fraction of the derivative. An error bar at the
    # resolution limit of finite differences (about sqrt(eps) |f|) is no excuse: if the
    # derivative is smaller than that, finite differences cannot tell a right rule from a wrong one.
    noisy = 3.0 * d.error > 0.1 * (np.abs(d.value) + scale + context) + atol
    status = np.where(
        ~finite,
        2,
        np.where(
            kink,
            np.where(inside, 1, 2),
            np.where(gap <= allowed, np.where(noisy, 2, 0), 3),
        ),
    )
    reason = np.where(~finite, 2, np.where(kink, 1, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(finite, gap / np.maximum(allowed, np.finfo(np.float64).tiny), np.inf)
    return _Judged(status, ratio, gap, allowed, np.broadcast_to(scale, gap.shape), reason)


_STATUS_VERDICT = {0: "pass", 1: "pass", 2: "inconclusive", 3: "fail"}


def _rms(values) -> float:
    """The RMS of the finite, nonzero entries of ``values`` (0 if there are none)."""
    values = np.asarray(values, np.float64)
    moved = values[(values != 0) & np.isfinite(values)]
    return float(np.sqrt(np.mean(moved**2))) if moved.size else 0.0


#: how much smaller the step of the second look at a failing comparison is.
SMALL_STEP_FACTOR = 2.0**-10
#: random splits of a direction (or cotangent) used to measure autodiff's rounding at a
#: failing second-derivative comparison.
ROUNDING_SPLITS = 3


def _recheck(judged: _Judged, small: _Judged) -> _Judged:
    """Second look at failing comparisons with a much smaller step: a kink inside the step.

    A kink (``relu`` of a value near 0) within the step makes finite differences wrong while
    their error bar stays small, since the error bar assumes ``f`` smooth across the step. If the
    smaller step agrees with autodiff, or finds the kink itself, the failure is a kink inside
    the default step and the comparison is inconclusive; a wrong rule disagrees at any step.
    """
    failed = judged.status == 3
    agrees = failed & (small.status <= 1)
    kink = failed & (small.status == 2) & (small.reason == 1)
    return dataclasses.replace(
        judged,
        status=np.where(agrees | kink, 2, judged.status),
        reason=np.where(agrees, 3, np.where(kink, 1, judged.reason)),
    )


def _roundoff_recheck(judged: _Judged, widened: _Judged) -> _Judged:
    """Second look at failing second-derivative comparisons, allowing for autodiff's own rounding.

    ``widened`` is the same comparison with ``3 r`` added to the tolerance, ``r`` the rounding
    error autodiff makes at this point, measured from its linearity: a derivative function is
    linear in its direction, ``J v = J v1 + J v2`` for ``v = v1 + v2``, so the two sides differ
    by rounding alone, wrong rule or not. A wrong rule still fails; a right one whose compiled
    evaluation cancels large terms (a second derivative of 0 next to a large first derivative)
    passes with a note.
    """
    explained = (judged.status == 3) & (widened.status == 0)
    return dataclasses.replace(
        judged,
        status=np.where(explained, 0, judged.status),
        reason=np.where(explained, 4, judged.reason),
    )


def _note(status: int, reason: int, left: float, right: float, autodiff: float) -> str:
    if status == 0 and reason == 4:
        return (
            "within autodiff's own rounding at this point: the gap is of the size by which "
            "autodiff's values along split directions fail to add up (terms cancelling in the "
            "compiled derivative)"
        )
    if status == 1:
        return (
            f"kink: one-sided slopes {left:.4g} (left) and {right:.4g} (right) differ; the "
            f"autodiff value {autodiff:.4g} lies between them, so it is a valid subgradient"
        )
    if status == 2 and reason == 1:
        return (
            f"kink: one-sided slopes {left:.4g} (left) and {right:.4g} (right) differ and the "
            f"autodiff value {autodiff:.4g} is not between them; f is not differentiable here, "
            "move the point off the kink to check the rule"
        )
    if status == 2 and reason == 3:
        return (
            "kink inside the finite-difference step: f is not smooth on the scale of the step "
            f"(a relu input near 0?); with a {1 / SMALL_STEP_FACTOR:.0f} times smaller step "
            "finite differences agree with autodiff; move the point away from the kink to check"
        )
    if status == 2 and reason == 2:
        return (
            "finite differences produced NaN/Inf: a step leaves the domain of f (or overflows), "
            "so this comparison cannot be made; check at a point farther from the boundary"
        )
    if status == 2:
        return "finite differences too noisy to decide: error bar above 10% of the value"
    if status == 3:
        return "autodiff and finite differences disagree beyond the error bar and tolerance"
    return ""


# --------------------------------------------------------------------------------------------
# Timing helpers


class _Timer:
    def __init__(self, cost: GradCheckCost):
        self.cost = cost

    def compile(self, fn, *args):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        self.cost.compile_seconds += time.perf_counter() - start
        self.cost.compilations += 1
        return compiled

    def run(self, compiled, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        self.cost.run_seconds += time.perf_counter() - start
        return jax.tree_util.tree_map(np.asarray, out)


def _reference_context(use_float64: bool):
    return jax.enable_x64(True) if use_float64 else _null_context()


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------
# The checker


@dataclasses.dataclass
class _Options:
    modes: tuple[str, ...]
    method: str
    probes: int
    seed: int
    rtol: float
    atol: float
    use_float64: bool
    reference_dtype: np.dtype
    num_steps: int


class _Checker:
    """Runs one order-1 check of a :class:`_Problem` and produces rows and a worst element."""

    def __init__(self, problem: _Problem, options: _Options, order: int, mode_prefix: str):
        self.p = problem
        self.o = options
        self.order = order
        self.prefix = mode_prefix
        self.cost = GradCheckCost()
        self.timer = _Timer(self.cost)
        self.rng = np.random.default_rng(options.seed)
        self.rows: list[GradCheckRow] = []
        self.candidates: list[tuple[float, int, WorstElement]] = []
        self.leaves64 = [np.asarray(leaf, np.float64) for leaf in problem.leaves]
        self.scales = [fd.input_scale(x) for x in self.leaves64]
        self.modes = self._available_modes()

    def mode_name(self, mode: str) -> str:
        return f"{mode} over {self.prefix}" if self.prefix else mode

    def _available_modes(self) -> tuple[str, ...]:
        modes = list(self.o.modes)
        blocking = _custom_vjp_names(self.p.jaxpr.jaxpr)
        if "forward" in modes and blocking:
            modes.remove("forward")
            self.p.skipped.append(
                f"{self.mode_name('forward')} mode at order {self.order}: not available, "
                f"{self.p.name} calls jax.custom_vjp function(s) {sorted(blocking)}, which JAX "
                "cannot differentiate in forward mode"
            )
        if not modes:
            raise TypeError(
                f"check_grads: modes={list(self.o.modes)} cannot differentiate {self.p.name}: "
                + self.p.skipped[-1]
            )
        return tuple(modes)

    # ---- finite differences of f along a batch of tangents, in the reference dtype
    def _fd_function(self):
        flat64 = self.p.flat(cast=self.o.reference_dtype)
        eps = self._reference_eps()

        def along(leaves, tangent, h):
            return flat64([x + h * t for x, t in zip(leaves, tangent, strict=True)])

        def run(leaves, tangents, hs, cotangents):
            center = flat64(leaves)
            each_h = jax.vmap(along, in_axes=(None, None, 0))
            plus = jax.vmap(each_h, in_axes=(None, 0, 0))(leaves, tangents, hs)
            minus = jax.vmap(each_h, in_axes=(None, 0, 0))(leaves, tangents, -hs)
            vector = jax.vmap(fd.derivative_from_evaluations, in_axes=(None, 0, 0, 0, None))(
                center, plus, minus, hs, eps
            )
            vector_rounding = jax.vmap(fd.rounding_error, in_axes=(None, 0, 0, 0, None))(
                center, plus, minus, hs, eps
            )
            # Project onto each batch element's output cotangent (the reverse-mode check).
            projected = jax.vmap(
                lambda p, m, h, c, r, g: fd.derivative_from_evaluations(
                    *_project(center, p, m, c),
                    h,
                    eps,
                    rounding=jnp.abs(c) @ r,
                    magnitude=jnp.abs(c) @ g,
                )
            )(plus, minus, hs, cotangents, vector_rounding, vector.magnitude)
            return vector, projected

        return run

    def _reference_eps(self) -> float:
        if getattr(self, "_eps", None) is not None:
            return self._eps
        with _reference_context(self.o.use_float64):
            leaves = [jnp.asarray(x, self.o.reference_dtype) for x in self.leaves64]
            reference = self.o.reference_dtype
            out = jax.eval_shape(lambda ls: self.p.f(*self.p.rebuild(ls, cast=reference)), leaves)
        dtypes = [o.dtype for o in jax.tree_util.tree_leaves(out) if _is_float(o)]
        # f may compute in a narrower dtype than its inputs (hard-coded float32 constants).
        self._eps = max(fd.machine_epsilon(d) for d in dtypes)
        return self._eps

    def _evaluate_fd(
        self,
        tangents64: list[np.ndarray],
        cotangents64: np.ndarray,
        leaf_ids,
        step_factor: float = 1.0,
    ):
        """FD along a batch of tangents: returns (vector Derivative, projected Derivative).

        ``step_factor`` scales the steps (the second look at a failing comparison).
        """
        hs = np.stack(
            [
                fd.steps(
                    fd.base_step(self.o.reference_dtype) * self.scales[i] * step_factor,
                    self.o.num_steps,
                )
                for i in leaf_ids
            ]
        )
        with _reference_context(self.o.use_float64):
            args = (self.leaves64, tangents64, hs, cotangents64)
            key = ("fd", tuple(t.shape for t in tangents64))
            compiled = self._cache.get(key)
            if compiled is None:
                compiled = self.timer.compile(self._fd_function(), *args)
                self._cache[key] = compiled
            out = self.timer.run(compiled, *args)
        batch = hs.shape[0]
        self.cost.function_evaluations += batch * 2 * self.o.num_steps + 1
        return out

    _cache: dict

    # ---- autodiff along the same tangents
    def _ad_function(self, want_forward: bool, want_reverse: bool):
        flat_f = self.p.flat()

        def run(leaves, tangents, cotangents):
            primal = flat_f(leaves)
            forward = reverse = None
            if want_forward:
                forward = jax.vmap(lambda t: jax.jvp(flat_f, (leaves,), (t,))[1])(tangents)
            if want_reverse:
                _, pullback = jax.vjp(flat_f, leaves)
                reverse = jax.vmap(lambda c: pullback(c)[0])(cotangents)
            return primal, forward, reverse

        return run

    def _evaluate_ad(self, tangents, cotangents, want_forward, want_reverse):
        args = (
            [jnp.asarray(x, d) for x, d in zip(self.leaves64, self.p.dtypes, strict=True)],
            [jnp.asarray(t, d) for t, d in zip(tangents, self.p.dtypes, strict=True)],
            jnp.asarray(cotangents, self.p.out_dtype),
        )
        key = ("ad", want_forward, want_reverse, tuple(t.shape for t in tangents), cotangents.shape)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self.timer.compile(self._ad_function(want_forward, want_reverse), *args)
            self._cache[key] = compiled
        primal, forward, reverse = self.timer.run(compiled, *args)
        _raise_if_not_finite(self.p, primal)
        if want_forward:
            self.cost.jvps += tangents[0].shape[0]
        if want_reverse:
            self.cost.vjps += cotangents.shape[0]
        return forward, reverse

    # ---- the directional method
    def run_directional(self) -> None:
        self._cache = {}
        self._split_grads = None
        num_leaves, num_probes = len(self.p.leaves), self.o.probes
        batch = num_leaves * num_probes
        leaf_ids = [i for i in range(num_leaves) for _ in range(num_probes)]
        # Directions are drawn in float64, rounded to the input dtype and used by both sides.
        tangents = [np.zeros((batch, *x.shape)) for x in self.leaves64]
        for b, i in enumerate(leaf_ids):
            draw = self.rng.standard_normal(self.leaves64[i].shape)
            tangents[i][b] = np.asarray(draw.astype(self.p.dtypes[i]), np.float64)
        cot_draw = self.rng.standard_normal((num_probes, self.p.num_outputs))
        cot_draw = np.asarray(cot_draw.astype(self.p.out_dtype), np.float64)
        cotangents = cot_draw[[b % num_probes for b in range(batch)]]
        want_fwd, want_rev = "forward" in self.modes, "reverse" in self.modes
        self._want = (want_fwd, want_rev)
        forward, reverse = self._evaluate_ad(tangents, cot_draw, want_fwd, want_rev)
        vector, projected = self._evaluate_fd(tangents, cotangents, leaf_ids)
        self.tangents, self.cotangents, self.reverse_grads = tangents, cot_draw, reverse
        # Finite differences with a much smaller step, computed only if a comparison fails.
        small_step = None

        def small_step_fd():
            nonlocal small_step
            if small_step is None:
                small_step = self._evaluate_fd(
                    tangents, cotangents, leaf_ids, step_factor=SMALL_STEP_FACTOR
                )
            return small_step

        rtol, atol = self.o.rtol, self.o.atol
        # Whether an error bar is small is judged against the derivatives of all of f.
        forward_context = _rms(vector.value)
        reverse_context = _rms(projected.value)
        self._context = (forward_context, reverse_context)
        for i, path in enumerate(self.p.paths):
            rows = [b for b in range(batch) if leaf_ids[b] == i]
            if want_fwd:
                fwd_ad = np.asarray(forward[rows], np.float64)
                der = jax.tree_util.tree_map(lambda x, rows=rows: x[rows], vector)
                value = np.asarray(der.value)
                scale = base_scale = np.abs(value) + self.p.output_scale(value)
                judged = _judge(fwd_ad, der, scale, rtol, atol, forward_context)
                if (judged.status == 3).any():
                    small_der = jax.tree_util.tree_map(
                        lambda x, rows=rows: x[rows], small_step_fd()[0]
                    )
                    small = np.asarray(small_der.value)
                    scale = np.abs(small) + self.p.output_scale(small)
                    judged = _recheck(
                        judged, _judge(fwd_ad, small_der, scale, rtol, atol, forward_context)
                    )
                if self.order == 2 and (judged.status == 3).any():
                    rounding = self._forward_rounding(i, rows, tangents, cot_draw, fwd_ad)
                    judged = _roundoff_recheck(
                        judged,
                        _judge(
                            fwd_ad, der, base_scale, rtol, atol + 3.0 * rounding, forward_context
                        ),
                    )
                self._add_row("forward", i, path, judged, fwd_ad, der, rows, vector_output=True)
            if want_rev:
                grads = [np.asarray(reverse[i][b % num_probes], np.float64) for b in rows]
                dirs = [tangents[i][b] for b in rows]
                rev_ad = np.array([np.sum(g * t) for g, t in zip(grads, dirs, strict=True)])
                scale = np.array(
                    [np.sqrt(np.sum((g * t) ** 2)) for g, t in zip(grads, dirs, strict=True)]
                )
                der = jax.tree_util.tree_map(lambda x, rows=rows: x[rows], projected)
                judged = _judge(
                    rev_ad, der, np.abs(np.asarray(der.value)) + scale, rtol, atol, reverse_context
                )
                if (judged.status == 3).any():
                    small = jax.tree_util.tree_map(lambda x, rows=rows: x[rows], small_step_fd()[1])
                    small_scale = np.abs(np.asarray(small.value)) + scale
                    judged = _recheck(
                        judged, _judge(rev_ad, small, small_scale, rtol, atol, reverse_context)
                    )
                if self.order == 2 and (judged.status == 3).any():
                    rounding = self._reverse_rounding(i, rows, tangents, cot_draw, rev_ad)
                    judged = _roundoff_recheck(
                        judged,
                        _judge(
                            rev_ad,
                            der,
                            np.abs(np.asarray(der.value)) + scale,
                            rtol,
                            atol + 3.0 * rounding,
                            reverse_context,
                        ),
                    )
                self._add_row("reverse", i, path, judged, rev_ad, der, rows, vector_output=False)

    # ---- autodiff's own rounding, measured from linearity (second derivatives only)
    def _splits(self, vector: np.ndarray, salt: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``ROUNDING_SPLITS`` random ways of writing ``vector`` as a sum of two vectors."""
        rng = np.random.default_rng([self.o.seed, 2, salt])
        size = float(np.sqrt(np.mean(vector**2))) or 1.0
        pairs = []
        for _ in range(ROUNDING_SPLITS):
            shift = rng.standard_normal(vector.shape) * size
            pairs.append((vector / 2 + shift, vector / 2 - shift))
        return pairs

    def _forward_rounding(self, leaf, rows, tangents, cotangents, fwd_ad) -> np.ndarray:
        """Per compared element, how far autodiff's JVPs along split directions fail to add up
        to its JVP along the whole direction."""
        count = len(rows) * ROUNDING_SPLITS * 2
        split = [np.zeros((count, *x.shape)) for x in self.leaves64]
        k = 0
        for b in rows:
            for first, second in self._splits(tangents[leaf][b], b):
                split[leaf][k], split[leaf][k + 1] = first, second
                k += 2
        forward, _ = self._evaluate_ad(split, cotangents, True, False)
        parts = np.asarray(forward, np.float64).reshape(len(rows), ROUNDING_SPLITS, 2, -1)
        whole = np.asarray(fwd_ad, np.float64).reshape(len(rows), 1, -1)
        residual = np.abs(whole - parts[:, :, 0] - parts[:, :, 1]).max(axis=1)
        return residual.reshape(np.shape(fwd_ad))

    def _reverse_rounding(self, leaf, rows, tangents, cotangents, rev_ad) -> np.ndarray:
        """Per compared value, how far autodiff's VJPs of split cotangents, projected on the
        direction, fail to add up to the VJP of the whole cotangent."""
        num_probes = cotangents.shape[0]
        if self._split_grads is None:
            split = [
                part
                for p in range(num_probes)
                for pair in self._splits(cotangents[p], 1_000_000 + p)
                for part in pair
            ]
            zero = [np.zeros((1, *x.shape)) for x in self.leaves64]
            _, reverse = self._evaluate_ad(zero, np.asarray(split), False, True)
            self._split_grads = [
                np.asarray(r, np.float64).reshape(num_probes, ROUNDING_SPLITS, 2, -1)
                for r in reverse
            ]
        grads = self._split_grads[leaf]
        residual = []
        for k, b in enumerate(rows):
            values = grads[b % num_probes] @ np.asarray(tangents[leaf][b], np.float64).ravel()
            residual.append(np.max(np.abs(rev_ad[k] - values[:, 0] - values[:, 1])))
        return np.asarray(residual)

    def _add_row(self, mode, leaf, path, judged: _Judged, ad, der, rows, *, vector_output):
        flat_worst = int(np.argmax(np.where(np.isnan(judged.ratio), np.inf, judged.ratio)))
        status_all = judged.status.ravel()
        code = int(status_all.max())
        # The row verdict: any fail -> fail; else any inconclusive -> inconclusive; else pass.
        verdict = _STATUS_VERDICT[code]
        idx = np.unravel_index(flat_worst, judged.ratio.shape)
        if code in (2, 3):
            # Report the worst element among those with the deciding status.
            masked = np.where(judged.status == code, judged.ratio, -np.inf)
            idx = np.unravel_index(int(np.argmax(masked)), judged.ratio.shape)
        elif (judged.status == 1).any():
            masked = np.where(judged.status == 1, 1.0, -np.inf)
            idx = np.unravel_index(int(np.argmax(masked)), judged.ratio.shape)
        a = float(np.asarray(ad)[idx])
        d = float(np.asarray(der.value)[idx])
        left, right = float(np.asarray(der.left)[idx]), float(np.asarray(der.right)[idx])
        err = float(np.asarray(der.error)[idx])
        status = int(judged.status[idx])
        note = _note(status, int(judged.reason[idx]), left, right, a)
        gap = float(judged.gap[idx])
        rel = gap / max(abs(d), float(judged.scale[idx]), np.finfo(np.float64).tiny)
        self.rows.append(
            GradCheckRow(
                order=self.order,
                mode=self.mode_name(mode),
                leaf=path,
                verdict=verdict,
                autodiff=a,
                finite_difference=d,
                abs_error=gap,
                rel_error=rel,
                error_bar=err,
                tolerance=float(judged.allowed[idx]),
                note=note,
            )
        )
        probe = idx[0]
        output = (
            self.p.output_name(int(idx[1])) if vector_output and self.p.num_outputs > 1 else None
        )
        worst = WorstElement(
            path=f"{path} (random direction {probe})",
            output=output,
            order=self.order,
            mode=self.mode_name(mode),
            autodiff=a,
            finite_difference=d,
            abs_error=gap,
            rel_error=rel,
            error_bar=err,
            left_slope=left if status in (1, 2) else float("nan"),
            right_slope=right if status in (1, 2) else float("nan"),
        )
        rank = {3: 3, 2: 2, 1: 1, 0: 0}[status]
        self.candidates.append((rank, float(judged.ratio[idx]), worst))
        if status == 3 and self.o.method == "directional":
            narrowed = self._narrow(mode, leaf, rows[probe])
            if narrowed is not None:
                self.candidates.append((4, float(judged.ratio[idx]), narrowed))

    # ---- narrowing a failing direction down to one element by bisection
    def _narrow(self, mode: str, leaf: int, batch_row: int) -> WorstElement | None:
        """Bisects the failing direction of one leaf down to its worst element.

        Each level compares autodiff and finite differences along the direction restricted to
        each half of the remaining elements and keeps the half with the larger disagreement:
        about ``log2(size)`` levels, each one call of the already compiled batch.
        """
        shape = self.leaves64[leaf].shape
        size = int(np.prod(shape, dtype=np.int64))
        direction = self.tangents[leaf][batch_row].ravel()
        probe = batch_row % self.o.probes
        candidates = np.arange(size)
        while candidates.size > 1:
            half = candidates.size // 2
            parts = [candidates[:half], candidates[half:]]
            directions = []
            for part in parts:
                masked = np.zeros(size)
                masked[part] = direction[part]
                directions.append(masked.reshape(shape))
            results = self._probe(mode, leaf, directions, probe)
            ratios = [float(np.max(judged.ratio)) for _, _, judged, _ in results]
            candidates = parts[int(np.argmax(ratios))]
        element = int(candidates[0])
        unit = np.zeros(size)
        unit[element] = 1.0
        a, der, judged, out_index = self._probe(mode, leaf, [unit.reshape(shape)], probe)[0]
        value, gap, error = float(der.value), float(judged.gap), float(der.error)
        weight = float(self.cotangents[probe][0])
        if mode == "reverse" and self.p.num_outputs == 1 and weight != 0:
            # Reverse mode compares <c, df/dx_k>; for a scalar output divide the random weight c
            # out, so the report shows the gradient entry itself.
            a, value, gap, error = (
                a / weight,
                value / weight,
                gap / abs(weight),
                error / abs(weight),
            )
        return WorstElement(
            path=self.p.paths[leaf] + _index_text(element, shape),
            output=None
            if out_index is None or self.p.num_outputs == 1
            else self.p.output_name(out_index),
            order=self.order,
            mode=self.mode_name(mode),
            autodiff=a,
            finite_difference=value,
            abs_error=gap,
            rel_error=gap / max(abs(value), 1e-300),
            error_bar=error,
        )

    def _probe(self, mode, leaf, directions, probe):
        """Compares AD and FD along directions of one leaf, reusing the compiled batch.

        Returns one ``(autodiff, derivative, judged, output index)`` per direction, for the
        worst output element in forward mode.
        """
        batch = self.tangents[0].shape[0]
        results = []
        for start in range(0, len(directions), batch):
            chunk = directions[start : start + batch]
            tangents = [np.zeros_like(t) for t in self.tangents]
            for row, direction in enumerate(chunk):
                tangents[leaf][row] = direction
            cotangents = np.repeat(self.cotangents[probe][None], batch, axis=0)
            vector, projected = self._evaluate_fd(tangents, cotangents, [leaf] * batch)
            forward = None
            if mode == "forward":
                forward, _ = self._evaluate_ad(tangents, self.cotangents, *self._want)
            for row, direction in enumerate(chunk):
                results.append(
                    self._judge_probe(mode, leaf, direction, probe, row, vector, projected, forward)
                )
        return results

    def _judge_probe(self, mode, leaf, direction, probe, row, vector, projected, forward):
        rtol, atol = self.o.rtol, self.o.atol
        if mode == "reverse":
            grad = np.asarray(self.reverse_grads[leaf][probe], np.float64)
            a = float(np.sum(grad * direction))
            der = jax.tree_util.tree_map(lambda x: np.asarray(x)[row], projected)
            scale = np.abs(der.value) + np.sqrt(np.sum((grad * direction) ** 2))
            judged = _judge(a, der, scale, rtol, atol, self._context[1])
            return a, der, judged, None
        ad = np.asarray(forward[row], np.float64)
        der = jax.tree_util.tree_map(lambda x: np.asarray(x)[row], vector)
        value = np.asarray(der.value)
        scale = np.abs(value) + self.p.output_scale(value)
        judged = _judge(ad, der, scale, rtol, atol, self._context[0])
        k = int(np.argmax(np.where(np.isfinite(judged.ratio), judged.ratio, np.inf)))
        pick = jax.tree_util.tree_map(lambda x: np.asarray(x)[k], der)
        single = _Judged(
            *(np.asarray(getattr(judged, f.name))[k] for f in dataclasses.fields(judged))
        )
        return float(ad[k]), pick, single, k

    # ---- the full method: every input element, one compiled call per leaf
    def run_full(self) -> None:
        self._cache = {}
        if self.p.num_outputs * sum(x.size for x in self.leaves64) > MAX_FULL_JACOBIAN:
            raise ValueError(
                f"check_grads(method='full'): the Jacobian of {self.p.name} has "
                f"{self.p.num_outputs} x {sum(x.size for x in self.leaves64)} entries, more than "
                f"{MAX_FULL_JACOBIAN}; use method='directional'"
            )
        want_fwd, want_rev = "forward" in self.modes, "reverse" in self.modes
        if not want_rev:
            leaves = [jnp.asarray(x, d) for x, d in zip(self.leaves64, self.p.dtypes, strict=True)]
            _raise_if_not_finite(self.p, jax.jit(self.p.flat())(leaves))
        # With float64 inputs autodiff and the reference share a dtype: one compiled call does both.
        combine = want_rev and self.o.use_float64 and all(d == np.float64 for d in self.p.dtypes)
        fd_columns, fd_errors, reverse_jac = self._full_difference_columns(with_reverse=combine)
        if want_rev and not combine:
            reverse_jac = self._full_reverse_jacobian()
        forward_columns = self._full_forward_columns() if want_fwd else None
        for i, path in enumerate(self.p.paths):
            if want_fwd:
                self._full_compare(
                    "forward", i, path, forward_columns[i], fd_columns[i], fd_errors[i]
                )
            if want_rev:
                self._full_compare("reverse", i, path, reverse_jac[i], fd_columns[i], fd_errors[i])

    def _full_reverse_jacobian(self):
        m = self.p.num_outputs
        eye = np.eye(m)
        _, reverse = self._evaluate_ad(
            [np.zeros((1, *x.shape)) for x in self.leaves64], eye, False, True
        )
        # reverse[i]: (outputs, *leaf shape) -> (outputs, leaf size)
        return [np.asarray(r, np.float64).reshape(m, -1) for r in reverse]

    def _chunk(self, size: int) -> int:
        # Each batched evaluation holds a copy of the perturbed leaf and the outputs.
        return max(1, min(size, 2**22 // max(1, self.p.num_outputs + size)))

    def _full_difference_columns(self, *, with_reverse: bool = False):
        """Central differences for every input element, in one compiled call.

        The inputs are concatenated into one vector and a compiled loop perturbs one element at a
        time in place, so each evaluation of ``f`` reads the same (cached) inputs instead of a
        fresh copy, and the program holds ``f`` once. The step actually taken,
        ``(x + h) - x``, is used, not the nominal ``h``.

        Args:
          with_reverse: also compute the reverse-mode Jacobian in the same call (when autodiff
            runs in the reference dtype).

        Returns:
          Per leaf, the columns ``(outputs, leaf size)``, their rounding error bars, and the
          reverse-mode Jacobian ``(outputs, leaf size)`` (or None).
        """
        flat64 = self.p.flat(cast=self.o.reference_dtype)
        eps = self._reference_eps()
        base = fd.base_step(self.o.reference_dtype, extrapolated=False)
        shapes = [x.shape for x in self.leaves64]
        sizes = [x.size for x in self.leaves64]
        offsets = np.cumsum([0, *sizes])
        steps = np.concatenate(
            [np.full(n, base * scale) for n, scale in zip(sizes, self.scales, strict=True)]
        )
        vector = np.concatenate([x.ravel() for x in self.leaves64])
        outputs = self.p.num_outputs

        def unflatten(v):
            return [v[offsets[i] : offsets[i + 1]].reshape(shape) for i, shape in enumerate(shapes)]

        def all_columns(v, steps):
            center = flat64(unflatten(v))

            def body(k, state):
                v, values, errors = state
                vk, h = v[k], steps[k]
                up, down = vk + h, vk - h
                v = v.at[k].set(up)
                plus = flat64(unflatten(v))
                v = v.at[k].set(down)
                minus = flat64(unflatten(v))
                v = v.at[k].set(vk)
                taken = up - down
                magnitude = jnp.maximum(jnp.abs(center), jnp.maximum(jnp.abs(plus), jnp.abs(minus)))
                changed = (plus != minus) | (plus != center)
                values = values.at[k].set((plus - minus) / taken)
                errors = errors.at[k].set(jnp.where(changed, 4 * eps * magnitude / taken, 0.0))
                return v, values, errors

            zeros = jnp.zeros((v.size, outputs), center.dtype)
            _, values, errors = jax.lax.fori_loop(0, v.size, body, (v, zeros, zeros))
            jacobian = None
            if with_reverse:
                primal, pullback = jax.vjp(self.p.flat(), unflatten(v))
                rows = jax.vmap(lambda c: pullback(c)[0])(jnp.eye(outputs, dtype=primal.dtype))
                jacobian = [r.reshape(outputs, -1) for r in rows]
            return center, values, errors, jacobian

        with _reference_context(self.o.use_float64):
            compiled = self.timer.compile(all_columns, vector, steps)
            center, values, errors, jacobian = self.timer.run(compiled, vector, steps)
        _raise_if_not_finite(self.p, center)
        self.cost.function_evaluations += 2 * int(vector.size) + 1
        if with_reverse:
            self.cost.vjps += outputs
        values, errors = np.asarray(values, np.float64).T, np.asarray(errors, np.float64).T
        columns = [values[:, offsets[i] : offsets[i + 1]] for i in range(len(shapes))]
        bars = [errors[:, offsets[i] : offsets[i + 1]] for i in range(len(shapes))]
        if jacobian is not None:
            jacobian = [np.asarray(j, np.float64) for j in jacobian]
        return columns, bars, jacobian

    def _full_forward_columns(self):
        """Forward-mode Jacobian columns ``(outputs, leaf size)`` of every leaf, compiled once."""
        flat_f = self.p.flat()
        leaves = [jnp.asarray(x, d) for x, d in zip(self.leaves64, self.p.dtypes, strict=True)]

        def all_columns(leaves):
            results = []
            for leaf, x in enumerate(leaves):

                def column(k, leaf=leaf, x=x):
                    tangent = [jnp.zeros_like(y) for y in leaves]
                    tangent[leaf] = jnp.zeros(x.size, x.dtype).at[k].set(1).reshape(x.shape)
                    return jax.jvp(flat_f, (leaves,), (tangent,))[1]

                results.append(
                    jax.lax.map(column, jnp.arange(x.size), batch_size=self._chunk(x.size))
                )
            return results

        compiled = self.timer.compile(all_columns, leaves)
        results = self.timer.run(compiled, leaves)
        self.cost.jvps += sum(x.size for x in self.leaves64)
        return [np.asarray(r, np.float64).T for r in results]

    def _full_compare(self, mode, leaf, path, ad_jac, fd_jac, fd_err):
        rtol, atol = self.o.rtol, self.o.atol
        finite = np.isfinite(fd_jac)
        counts = np.maximum(finite.sum(axis=1, keepdims=True), 1)
        rms = np.sqrt(np.sum(np.where(finite, fd_jac, 0.0) ** 2, axis=1, keepdims=True) / counts)
        scale = np.abs(fd_jac) + rms
        gap = np.abs(ad_jac - fd_jac)
        allowed = 3 * fd_err + rtol * scale + atol
        # Screening with one step; suspects are confirmed with the Richardson table below.
        suspects = np.argwhere(~(gap <= allowed))
        order = np.argsort(-(gap / np.maximum(allowed, 1e-300))[tuple(suspects.T)])
        suspects = suspects[order[:64]]
        shape = self.leaves64[leaf].shape
        if suspects.size == 0:
            k = np.unravel_index(int(np.argmax(gap / np.maximum(allowed, 1e-300))), gap.shape)
            self._full_row(
                mode,
                leaf,
                path,
                "pass",
                k,
                ad_jac[k],
                fd_jac[k],
                gap[k],
                fd_err[k],
                allowed[k],
                "",
                shape,
            )
            return
        statuses = []
        for out_index, element in suspects:
            unit = np.zeros(self.leaves64[leaf].size)
            unit[element] = 1.0
            tangents = [np.zeros((1, *x.shape)) for x in self.leaves64]
            tangents[leaf][0] = unit.reshape(shape)
            cot = np.zeros((1, self.p.num_outputs))
            cot[0, out_index] = 1.0
            _vector, projected = self._evaluate_fd(tangents, cot, [leaf])
            der = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], projected)
            a = float(ad_jac[out_index, element])
            judged = _judge(a, der, float(scale[out_index, element]), rtol, atol, _rms(fd_jac))
            if judged.status == 3:
                _, small = self._evaluate_fd(tangents, cot, [leaf], SMALL_STEP_FACTOR)
                small = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], small)
                small_scale = abs(float(small.value)) + float(rms[out_index, 0])
                small_judged = _judge(a, small, small_scale, rtol, atol, _rms(fd_jac))
                judged = _recheck(judged, small_judged)
            statuses.append(
                (int(judged.status), float(judged.ratio), out_index, element, a, der, judged)
            )
        statuses.sort(key=lambda s: (s[0], s[1]), reverse=True)
        status, _, out_index, element, a, der, judged = statuses[0]
        verdict = _STATUS_VERDICT[status]
        note = _note(status, int(judged.reason), float(der.left), float(der.right), a)
        if status == 3:
            bad = sum(1 for s in statuses if s[0] == 3)
            note = f"{bad} Jacobian entr{'y' if bad == 1 else 'ies'} wrong; " + note
        self._full_row(
            mode,
            leaf,
            path,
            verdict,
            (out_index, element),
            a,
            float(der.value),
            float(judged.gap),
            float(der.error),
            float(judged.allowed),
            note,
            shape,
            left=float(der.left),
            right=float(der.right),
            status=status,
        )

    def _full_row(
        self,
        mode,
        leaf,
        path,
        verdict,
        k,
        a,
        d,
        gap,
        err,
        allowed,
        note,
        shape,
        left=float("nan"),
        right=float("nan"),
        status=0,
    ):
        a, d, gap, err, allowed = (float(v) for v in (a, d, gap, err, allowed))
        rel = gap / max(abs(d), 1e-300)
        self.rows.append(
            GradCheckRow(
                self.order, self.mode_name(mode), path, verdict, a, d, gap, rel, err, allowed, note
            )
        )
        worst = WorstElement(
            path=path + _index_text(int(k[1]), shape),
            output=self.p.output_name(int(k[0])) if self.p.num_outputs > 1 else None,
            order=self.order,
            mode=self.mode_name(mode),
            autodiff=a,
            finite_difference=d,
            abs_error=gap,
            rel_error=rel,
            error_bar=err,
            left_slope=left if status in (1, 2) else float("nan"),
            right_slope=right if status in (1, 2) else float("nan"),
        )
        rank = {"fail": 4, "inconclusive": 2, "pass": 0}[verdict]
        self.candidates.append((rank, gap / max(allowed, 1e-300), worst))


def _project(center, plus, minus, weights):
    return center @ weights, plus @ weights, minus @ weights


# --------------------------------------------------------------------------------------------
# Second derivatives: check the derivative functions themselves


def _derived_problems(
    problem: _Problem, seed: int, modes: Sequence[str]
) -> list[tuple[str, _Problem]]:
    """The reverse (VJP) and forward (JVP) derivative functions of f, as new problems."""
    rng = np.random.default_rng(seed + 1)
    cot = rng.standard_normal(problem.num_outputs).astype(problem.out_dtype)
    tangent = [
        rng.standard_normal(x.shape).astype(d)
        for x, d in zip(problem.leaves, problem.dtypes, strict=True)
    ]

    def vjp_function(*leaves):
        flat_f = problem.flat()
        out, pullback = jax.vjp(flat_f, list(leaves))
        return pullback(jnp.asarray(cot).astype(out.dtype))[0]

    def jvp_function(*leaves):
        flat_f = problem.flat()
        return jax.jvp(
            flat_f,
            (list(leaves),),
            ([jnp.asarray(t).astype(x.dtype) for t, x in zip(tangent, leaves, strict=True)],),
        )[1]

    vjp_function.__name__ = f"vjp_of_{problem.name}"
    jvp_function.__name__ = f"jvp_of_{problem.name}"
    derived = []
    blocking = _custom_vjp_names(problem.jaxpr.jaxpr)
    for label, fn in (("reverse", vjp_function), ("forward", jvp_function)):
        if label == "forward" and blocking:
            # The JVP function of f cannot even be traced; its checks are skipped, as forward
            # mode is at order 1.
            problem.skipped += [
                f"{mode} over forward mode at order 2: not available, {problem.name} calls "
                f"jax.custom_vjp function(s) {sorted(blocking)}, which JAX cannot differentiate "
                "in forward mode"
                for mode in modes
            ]
            continue
        sub = _Problem(fn, tuple(problem.leaves), None)
        sub.paths = list(problem.paths)
        derived.append((label, sub))
    return derived


# --------------------------------------------------------------------------------------------
# Matmul precision

REDUCED_MATMUL_NOTE = (
    "float32 matrix products ran at this platform's default precision (TF32 on recent NVIDIA "
    "GPUs, bfloat16 passes on TPUs), which rounds their factors to 10 or 8 bits: errors of "
    "about 1e-3 relative can fail a correct gradient. The default matmul_precision='highest' "
    "checks the derivative rules alone"
)


def _matmul_context(matmul_precision: str | None):
    """``jax.default_matmul_precision(matmul_precision)``, or nothing for None; a value JAX
    does not know is a ValueError naming the argument."""
    if matmul_precision is None:
        return _null_context()
    try:
        context = jax.default_matmul_precision(matmul_precision)
        with context:  # JAX checks the value on entry
            pass
    except ValueError as error:
        raise ValueError(
            f"check_grads: unknown matmul_precision {matmul_precision!r}: {error}"
        ) from None
    return jax.default_matmul_precision(matmul_precision)


def _reduced_matmul_default(dtype: str) -> bool:
    """Whether float32-or-narrower matrix products run at reduced precision by default here:
    on a GPU or TPU with no global ``jax_default_matmul_precision`` set."""
    if dtype not in ("float32", "float16", "bfloat16"):
        return False
    setting = jax.config.jax_default_matmul_precision
    if setting is not None and str(setting) not in ("default", "high", "bfloat16", "tensorfloat32"):
        return False
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


# --------------------------------------------------------------------------------------------
# Entry point


def check_grads(
    f: Callable,
    *args: Any,
    argnums: int | Sequence[int] | None = None,
    modes: Sequence[str] = MODES,
    order: int = 1,
    method: str = "directional",
    probes: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    float64_reference: bool = True,
    locate: bool = False,
    matmul_precision: str | None = "highest",
) -> GradCheckReport:
    r"""Checks the derivatives of ``f`` at ``args`` against finite differences.

    Autodiff (``jax.jvp`` for forward mode, ``jax.vjp`` for reverse mode) runs in the dtype of the
    inputs; the finite differences run in float64 whenever the platform has it (also when ``f``
    runs in float32), with the step chosen from the dtype and the size of the input and Richardson
    extrapolation over three steps, which also gives each estimate an error bar. A comparison
    passes when

    .. math::

        |a - d| \le 3 e + \mathrm{rtol}\cdot s + \mathrm{atol}

    with :math:`a` the autodiff value, :math:`d` the finite difference, :math:`e` its error bar
    and :math:`s` the scale of the compared quantity. At a kink (``relu`` or ``abs`` at 0,
    ``max`` with ties) the left and right one-sided slopes differ: an autodiff value between them
    is a subgradient and passes; otherwise the verdict is ``"inconclusive"``, never ``"fail"``.

    ``method="directional"`` (default) draws ``probes`` Gaussian directions per input leaf
    (zero on the other leaves, so a failure names the leaf) and one output cotangent per probe:
    forward mode compares :math:`J v` with the finite difference of :math:`f` along :math:`v`;
    reverse mode compares :math:`\langle J^\top c, v\rangle` with the finite difference of
    :math:`\langle c, f\rangle`. The cost does not depend on the input size: one compiled call
    with ``6 * probes * leaves + 1`` function evaluations, ``probes * leaves`` JVPs and
    ``probes`` VJPs. When a direction fails, the failing leaf is bisected (about
    :math:`\log_2 N` more calls of the same compiled batch) down to the worst element, so the
    report names an index without building the Jacobian.
    ``method="full"`` compares every entry of the Jacobian: one central difference per input
    element (``2 N + 1`` evaluations in one compiled loop that perturbs one element at a time in
    place), against the reverse-mode Jacobian (``outputs`` VJPs) and the forward-mode one
    (``N`` JVPs); entries outside the tolerance are confirmed with the Richardson table before
    they count as failures.

    When the platform has no float64 (or ``float64_reference=False``), the finite differences run
    in the dtype of ``f`` with a larger step; the error bar then widens and more comparisons may
    come out ``"inconclusive"``, but the rules above stay the same.

    Float32 matrix products and convolutions run at full float32 precision during the check
    (``matmul_precision="highest"``). JAX's default on recent NVIDIA GPUs is TF32 (and bfloat16
    passes on TPUs), which rounds the factors to 10 (or 8) bits: gradients then differ from
    the exact ones by about 1e-3 relative, enough to fail a correct float32 MLP, so a check of
    derivative rules turns it off. A precision passed to an operation itself
    (``jnp.dot(..., precision=...)``) still wins. ``matmul_precision=None`` checks the program
    at the platform's default, as it runs in training; the report then carries a note where
    that default is reduced.

    Args:
      f: a pure JAX function of pytrees (dicts, tuples, registered dataclasses) returning a
        pytree; integer and boolean leaves of the inputs are left alone (the report lists them),
        integer and boolean outputs are ignored.
      *args: the point at which to check, positional arguments of ``f``.
      argnums: which positional arguments to differentiate (default: all).
      modes: any of ``"forward"`` (JVP) and ``"reverse"`` (VJP).
      order: 1, or 2 to also check second derivatives (the derivatives of the JVP and VJP
        functions of ``f``, in both modes).
      method: ``"directional"`` or ``"full"``.
      probes: random directions per input leaf (directional method).
      seed: seed of the random directions; the default makes every run identical.
      rtol: relative tolerance for autodiff; default :math:`4\sqrt{\epsilon}` of the input
        dtype (1.4e-3 for float32, 6e-8 for float64).
      atol: absolute tolerance; default ``10 * eps`` of the input dtype.
      float64_reference: compute the finite differences in float64 when possible.
      locate: on failure, run :func:`gradkit._locate.locate_gradient_error` and attach its
        result as ``report.location``.
      matmul_precision: the default precision of float32 matrix products and convolutions
        while ``f`` and its derivatives run (any value of :func:`jax.default_matmul_precision`,
        such as ``"highest"``, ``"tensorfloat32"``, ``"bfloat16"``), or ``None`` for the
        platform's default.

    Returns:
      A :class:`GradCheckReport`.

    Raises:
      TypeError: ``f`` is not callable, cannot be traced by JAX, has complex inputs/outputs, or
        has no floating-point output.
      ValueError: bad ``argnums``/``modes``/``method``/``order``/``probes``, a negative or
        non-finite ``rtol``/``atol``, an unknown ``matmul_precision``, an input with NaN/Inf,
        no floating-point input selected, ``f`` is NaN/Inf at ``args``, or its floating-point
        outputs are all empty.

    Example:
      >>> import jax.numpy as jnp
      >>> report = check_grads(lambda x: jnp.sum(jnp.sin(x) ** 2), jnp.arange(3.0))
      >>> report.verdict
      'pass'
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
        raise ValueError(f"check_grads: modes must be a subset of {MODES}, got {modes!r}")
    if method not in METHODS:
        raise ValueError(f"check_grads: method must be one of {METHODS}, got {method!r}")
    if order not in (1, 2):
        raise ValueError(f"check_grads: order must be 1 or 2, got {order!r}")
    if not isinstance(probes, (int, np.integer)) or probes < 1:
        raise ValueError(f"check_grads: probes must be a positive integer, got {probes!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (
            isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            raise ValueError(
                f"check_grads: {name} must be a non-negative finite number (or None for the "
                f"default), got {value!r}"
            )
    context = _matmul_context(matmul_precision)
    with context:
        problem = _Problem(f, args, argnums)
        use_float64 = float64_reference and fd.float64_available()
        reference_dtype = np.dtype(np.float64) if use_float64 else problem.dtype
        options = _Options(
            modes=modes,
            method=method,
            probes=int(probes),
            seed=int(seed),
            rtol=default_rtol(problem.dtype) if rtol is None else float(rtol),
            atol=10 * fd.machine_epsilon(problem.dtype) if atol is None else float(atol),
            use_float64=use_float64,
            reference_dtype=reference_dtype,
            num_steps=fd.DEFAULT_NUM_STEPS,
        )
        cost = GradCheckCost()
        rows: list[GradCheckRow] = []
        candidates = []
        checked = [(1, "", problem)]
        if order == 2:
            checked += [(2, label, sub) for label, sub in _derived_problems(problem, seed, modes)]
        failing_problem = None
        for check_order, prefix, prob in checked:
            checker = _Checker(prob, options, check_order, prefix)
            if method == "full":
                checker.run_full()
            else:
                checker.run_directional()
            rows += checker.rows
            candidates += checker.candidates
            cost.add(checker.cost)
            if failing_problem is None and any(r.verdict == "fail" for r in checker.rows):
                failing_problem = prob
            if prob is not problem:
                problem.skipped += [s for s in prob.skipped if "mode at order" in s]
        verdicts = {row.verdict for row in rows}
        verdict = "fail" if "fail" in verdicts else "pass"
        if verdict == "pass" and "inconclusive" in verdicts:
            verdict = "inconclusive"
        worst = max(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None
        report = GradCheckReport(
            verdict=verdict,
            rows=rows,
            worst=worst,
            cost=cost,
            function=problem.name,
            method=method,
            dtype=str(problem.dtype),
            reference_dtype=str(reference_dtype),
            skipped=list(dict.fromkeys(problem.skipped)),
            matmul_precision=matmul_precision,
            reduced_matmuls=matmul_precision is None
            and _reduced_matmul_default(str(problem.dtype)),
        )
        if locate and verdict == "fail" and failing_problem is not None:
            from gradkit._locate import locate_gradient_error

            if failing_problem is problem:
                report.location = locate_gradient_error(
                    problem.f, *problem.args, argnums=problem.argnums, seed=seed
                )
            else:
                report.location = locate_gradient_error(
                    failing_problem.f, *failing_problem.args, seed=seed
                )
    return report


def _custom_vjp_names(jaxpr) -> set[str]:
    """Names of the custom_vjp functions called anywhere in ``jaxpr`` (they have no JVP)."""
    names = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_vjp_call":
            sub = eqn.params.get("call_jaxpr")
            info = getattr(getattr(sub, "jaxpr", sub), "debug_info", None)
            names.add(getattr(info, "func_name", None) or "custom_vjp")
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _custom_vjp_names(sub)
    return names


def _raise_if_not_finite(problem: _Problem, out) -> None:
    bad = np.flatnonzero(~np.isfinite(np.asarray(out)))
    if bad.size:
        raise ValueError(
            f"check_grads: {problem.name} returns NaN/Inf at the given point "
            f"({bad.size} value(s), first at {problem.output_name(int(bad[0]))}); derivatives can "
            "only be checked where f is finite (gradkit.diagnostics.find_nan_origin names the "
            "operation that produced it)"
        )


def assert_grads_correct(f: Callable, *args: Any, allow_inconclusive: bool = False, **options):
    """Checks ``f`` with :func:`check_grads` and raises unless it passes.

    Args:
      f: the function to check.
      *args: the point at which to check.
      allow_inconclusive: also accept an ``"inconclusive"`` verdict.
      **options: keyword arguments of :func:`check_grads`; ``locate`` defaults to True here.

    Returns:
      The :class:`GradCheckReport`.

    Raises:
      GradientCheckError: the check failed; its message is the report.

    Example:
      >>> import jax.numpy as jnp
      >>> _ = assert_grads_correct(jnp.tanh, jnp.linspace(-1.0, 1.0, 5))
    """
    options.setdefault("locate", True)
    report = check_grads(f, *args, **options)
    return report.raise_if_failed(allow_inconclusive=allow_inconclusive)


def report_json(reports: Sequence[GradCheckReport]) -> str:
    """Serialises reports to JSON text."""
    return json.dumps([r.to_dict() for r in reports], indent=2)
