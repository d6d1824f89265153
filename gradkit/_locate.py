r"""Find the one equation whose derivative rule is wrong.

The implementation behind :func:`gradkit.diagnostics.locate_gradient_error`. ``f`` is traced to a
jaxpr and evaluated equation by equation, recording every intermediate value. Each equation with
floating-point inputs and outputs is then checked on its own, at its recorded inputs:

* its JVP rule against a Richardson-extrapolated central difference of that equation alone
  (random tangents scaled to each input), and
* its transpose (VJP) against its JVP by the dot-product test
  :math:`\langle \bar y, J t\rangle = \langle J^\top \bar y, t\rangle`, which is exact up to
  rounding.

``custom_vjp`` functions have no JVP; their VJP is compared with the finite difference of the
projected output instead. A failing equation that holds a sub-program (``jit``, ``custom_jvp``,
``custom_vjp``, ``scan``, ``cond``, ``checkpoint``) is descended into, so the report names the
innermost wrong equation; when the inner program is fine, the custom rule itself is wrong and the
line inside the rule that computes the wrong tangent or cotangent is found by tracing the rule.

Equations that change gradients on purpose are listed as expected deviations and never blamed:
``stop_gradient``, the truncated scans of :mod:`gradkit.recurrent` (their equations carry
``gradkit_truncation[...]`` in their name stack), custom rules whose function name starts with
``gradkit_``, and primitives whose derivative is zero almost everywhere (``round``, ``floor``,
``ceil``, ``sign``, comparisons, casts to integers).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util

from gradkit import _finite_differences as fd

PyTree = Any

#: primitives whose derivative is zero almost everywhere (or undefined): FD and AD may disagree
#: across their jumps, which is expected.
NON_DIFFERENTIABLE = frozenset(
    {
        "round",
        "floor",
        "ceil",
        "sign",
        "stop_gradient",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "argmax",
        "argmin",
        "is_finite",
        "nextafter",
        "random_bits",
        "rng_bit_generator",
    }
)
TRUNCATION_SCOPE = "gradkit_truncation["
GRADKIT_RULE_PREFIX = "gradkit_"
#: at most this many iterations of a failing scan are examined one by one.
MAX_SCAN_ITERATIONS = 256

_CHECKER_FILES = {
    os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    for name in ("_locate.py", "_gradcheck.py", "_finite_differences.py")
}


@dataclasses.dataclass(frozen=True)
class SourceLocation:
    """A place in the user's source: file, line and enclosing function."""

    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


@dataclasses.dataclass(frozen=True)
class EquationFinding:
    """The equation whose derivative rule is wrong.

    Attributes:
      primitive: the primitive's name (``custom_jvp_call``, ``sin``, ``scan``, ...).
      problem: what is wrong, in words (which rule, what it disagrees with).
      inputs: input types, e.g. ``("f32[3,4]", "f32[4]")``.
      outputs: output types.
      source: where the equation is applied in the user's code.
      rule_source: inside a custom rule, the line that computes the wrong tangent/cotangent.
      rule_name: the name of the custom function, if any.
      context: the enclosing calls, outermost first, e.g. ``("scan iteration 2", "custom_vjp
        `my_op`")``.
      autodiff: the autodiff value of the worst comparison.
      finite_difference: the finite-difference (or, for a transpose, the JVP) value.
      abs_error: the gap.
      error_bar: the error bar of the finite difference.
    """

    primitive: str
    problem: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: SourceLocation | None
    rule_source: SourceLocation | None
    rule_name: str | None
    context: tuple[str, ...]
    autodiff: float
    finite_difference: float
    abs_error: float
    error_bar: float

    @property
    def line(self) -> int | None:
        """The most specific line: inside the rule if known, else the equation's."""
        if self.rule_source is not None:
            return self.rule_source.line
        return None if self.source is None else self.source.line

    @property
    def file(self) -> str | None:
        """The file of :attr:`line`."""
        where = self.rule_source or self.source
        return None if where is None else where.file

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["line"] = self.line
        data["file"] = self.file
        return data

    def __str__(self) -> str:
        what = self.primitive + (f" `{self.rule_name}`" if self.rule_name else "")
        chain = (
            "inside " + " inside ".join(reversed(self.context)) if self.context else "at top level"
        )
        lines = [
            f"wrong derivative rule: {what} {chain}",
            f"  {self.problem}",
            f"  inputs {', '.join(self.inputs)} -> outputs {', '.join(self.outputs)}",
        ]
        if self.source is not None:
            lines.append(f"  applied at {self.source}")
        if self.rule_source is not None:
            owner = f" of `{self.rule_name}`" if self.rule_name else ""
            lines.append(f"  the rule{owner} computes the wrong value at {self.rule_source}")
        lines.append(
            f"  autodiff {self.autodiff:.6g} vs reference {self.finite_difference:.6g} "
            f"(abs error {self.abs_error:.3g}, error bar {self.error_bar:.2g})"
        )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ExpectedDeviation:
    """An equation that changes gradients on purpose.

    Attributes:
      primitive: the primitive's name.
      reason: why its derivative differs from finite differences.
      source: where it is applied.
      context: the enclosing calls.
      mismatch: whether its derivative disagreed with finite differences at the recorded inputs
        (None if it was not evaluated).
    """

    primitive: str
    reason: str
    source: SourceLocation | None
    context: tuple[str, ...]
    mismatch: bool | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        effect = {True: " [changes the gradient here]", False: "", None: ""}[self.mismatch]
        return f"`{self.primitive}`{where}: {self.reason}{effect}"


@dataclasses.dataclass
class GradientLocation:
    """The result of :func:`locate_gradient_error`.

    Attributes:
      culprit: the first equation whose rule is wrong, or None.
      expected_deviations: equations that change gradients on purpose.
      custom_rules: the custom_jvp/custom_vjp functions met on the way (all checked).
      kinks: equations evaluated at a non-differentiable point (not blamed).
      equations_checked: how many equations were checked numerically.
      function: the name of the examined function.
    """

    culprit: EquationFinding | None
    expected_deviations: list[ExpectedDeviation]
    custom_rules: list[str]
    kinks: list[str]
    equations_checked: int
    function: str

    @property
    def explanation(self) -> str:
        """One sentence: what explains a mismatch between autodiff and finite differences."""
        if self.culprit is not None:
            where = self.culprit.rule_source or self.culprit.source
            return f"the derivative rule of `{self.culprit.primitive}` at {where} is wrong"
        active = [d for d in self.expected_deviations if d.mismatch]
        if active:
            groups: dict[str, list[ExpectedDeviation]] = {}
            for d in active:
                groups.setdefault(d.reason, []).append(d)
            parts = []
            for reason, members in groups.items():
                where = f", first at {members[0].source}" if members[0].source else ""
                count = (
                    f"{len(members)} `{members[0].primitive}` equations"
                    if len(members) > 1
                    else f"`{members[0].primitive}`"
                )
                parts.append(f"{reason} ({count}{where})")
            return "expected: the gradient is changed on purpose: " + "; ".join(parts)
        if self.kinks:
            return "no wrong rule; non-differentiable point(s): " + "; ".join(self.kinks)
        return "every equation's derivative rule agrees with finite differences"

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "culprit": None if self.culprit is None else self.culprit.to_dict(),
            "expected_deviations": [d.to_dict() for d in self.expected_deviations],
            "custom_rules": list(self.custom_rules),
            "kinks": list(self.kinks),
            "equations_checked": self.equations_checked,
            "explanation": self.explanation,
        }

    def __str__(self) -> str:
        lines = [
            f"locate_gradient_error({self.function}): {self.equations_checked} equations checked"
        ]
        if self.culprit is not None:
            lines.append(str(self.culprit))
        else:
            lines.append("no equation with a wrong derivative rule")
        if self.expected_deviations:
            lines.append("expected deviations (gradient changed on purpose):")
            counts: dict[str, int] = {}
            for d in self.expected_deviations:
                if d.mismatch:
                    counts[str(d)] = counts.get(str(d), 0) + 1
            lines += [f"  {text}" + (f" (x{n})" if n > 1 else "") for text, n in counts.items()]
            quiet = [d for d in self.expected_deviations if not d.mismatch]
            if quiet:
                kinds = sorted({d.primitive for d in quiet})
                lines.append(
                    f"  + {len(quiet)} more that do not change the gradient here: "
                    + ", ".join(f"`{k}`" for k in kinds)
                )
        if self.kinks:
            lines.append("non-differentiable points (not blamed):")
            lines += [f"  {k}" for k in self.kinks]
        lines.append(f"explanation: {self.explanation}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# helpers on equations


def _user_frame(source_info) -> SourceLocation | None:
    traceback = getattr(source_info, "traceback", None)
    for frame in source_info_util.user_frames(traceback):
        if os.path.abspath(frame.file_name) in _CHECKER_FILES:
            continue
        return SourceLocation(frame.file_name, frame.start_line, frame.function_name)
    return None


def _type_text(x) -> str:
    aval = getattr(x, "aval", x)
    dtype = np.dtype(aval.dtype)
    short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}.get(
        dtype.name, dtype.name
    )
    return f"{short}[{','.join(str(d) for d in aval.shape)}]"


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _rule_name(eqn) -> str | None:
    jaxpr = eqn.params.get("call_jaxpr")
    info = getattr(getattr(jaxpr, "jaxpr", jaxpr), "debug_info", None)
    return getattr(info, "func_name", None)


def _apply(eqn, inputs: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*inputs, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _deviation_reason(eqn) -> str | None:
    name = eqn.primitive.name
    if TRUNCATION_SCOPE in str(eqn.source_info.name_stack):
        scope = str(eqn.source_info.name_stack)
        start = scope.index(TRUNCATION_SCOPE) + len("gradkit_truncation")
        mode = scope[start : scope.index("]", start) + 1]
        return f"truncated backpropagation through time {mode} drops this cotangent on purpose"
    if name in ("custom_jvp_call", "custom_vjp_call"):
        rule = _rule_name(eqn) or ""
        if rule.startswith(GRADKIT_RULE_PREFIX):
            return f"gradkit custom rule `{rule}` replaces the derivative on purpose"
        return None
    if name == "stop_gradient":
        return "stop_gradient: derivative set to zero on purpose"
    if name in NON_DIFFERENTIABLE:
        return f"{name}: derivative is zero almost everywhere (jumps are not differentiable)"
    if name == "convert_element_type":
        new = eqn.params.get("new_dtype")
        if new is not None and not jnp.issubdtype(new, jnp.inexact):
            return f"cast to {np.dtype(new).name}: the gradient stops here"
    return None


# --------------------------------------------------------------------------------------------
# checking one equation


@dataclasses.dataclass
class _Check:
    ok: bool
    kink: bool
    kind: str  # "jvp" | "transpose" | "vjp"
    autodiff: float = float("nan")
    reference: float = float("nan")
    gap: float = 0.0
    error_bar: float = 0.0
    wrong_output: int | None = None
    wrong_input: int | None = None


class _EquationChecker:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def tangent_for(self, x) -> np.ndarray:
        x64 = np.asarray(x, np.float64)
        rms = float(np.sqrt(np.mean(x64**2))) if x64.size else 0.0
        scale = rms if rms > 0 else 1.0
        return (self.rng.standard_normal(x64.shape) * scale).astype(np.dtype(x.dtype))

    def check(self, eqn, inputs, outputs) -> _Check | None:
        float_in = [
            i
            for i, (v, x) in enumerate(zip(eqn.invars, inputs, strict=True))
            if not isinstance(v, jcore.Literal) and _is_float(x) and np.size(x) > 0
        ]
        float_out = [k for k, o in enumerate(outputs) if _is_float(o) and np.size(o) > 0]
        if not float_in or not float_out:
            return None
        g = self._restricted(eqn, inputs, float_in, float_out)
        xs = [inputs[i] for i in float_in]
        ts = [self.tangent_for(x) for x in xs]
        cts = [self.tangent_for(jnp.ones_like(outputs[k])) for k in float_out]
        dtype = np.dtype(jnp.result_type(*[outputs[k] for k in float_out]))
        rtol = 4.0 * np.sqrt(fd.machine_epsilon(dtype))
        try:
            _, ad = jax.jvp(g, xs, ts)
            has_jvp = True
        except TypeError as error:
            if "forward-mode" not in str(error) and "jvp" not in str(error):
                raise
            has_jvp = False
        if has_jvp:
            der = self.finite_difference(g, xs, ts)
            worst = None
            for k, (a, d) in enumerate(zip(ad, der, strict=True)):
                a = np.asarray(a, np.float64)
                value = np.asarray(d.value)
                scale = np.abs(value) + np.sqrt(np.mean(value**2))
                result = _compare(a, d, scale, rtol)
                if result is not None and (worst is None or result.gap > worst.gap):
                    worst = dataclasses.replace(result, wrong_output=k)
            if worst is not None:
                return worst
            # Transpose: <ct, J t> = <J^T ct, t>.
            _, pullback = jax.vjp(g, *xs)
            bars = pullback(cts)
            lhs_terms = [
                np.sum(np.asarray(c, np.float64) * np.asarray(a, np.float64))
                for c, a in zip(cts, ad, strict=True)
            ]
            rhs_terms = [
                np.asarray(b, np.float64) * np.asarray(t, np.float64)
                for b, t in zip(bars, ts, strict=True)
            ]
            lhs, rhs = float(np.sum(lhs_terms)), float(sum(np.sum(r) for r in rhs_terms))
            magnitude = float(np.sqrt(sum(np.sum(r**2) for r in rhs_terms)))
            magnitude = max(magnitude, abs(lhs))
            if abs(lhs - rhs) > rtol * magnitude + 1e-300:
                wrong_input = self._wrong_input_by_transpose(g, xs, ts, cts, ad, bars)
                return _Check(
                    False,
                    False,
                    "transpose",
                    rhs,
                    lhs,
                    abs(lhs - rhs),
                    0.0,
                    wrong_input=wrong_input,
                )
            return _Check(True, False, "jvp")
        # No forward mode (custom_vjp): compare the VJP with FD of the projected output.
        _, pullback = jax.vjp(g, *xs)
        bars = pullback(cts)
        worst = None
        for i in range(len(xs)):
            only = [t if j == i else np.zeros_like(t) for j, t in enumerate(ts)]
            der_i = self.finite_difference(g, xs, only)
            projected = _project_derivative(der_i, cts)
            a = float(np.sum(np.asarray(bars[i], np.float64) * np.asarray(ts[i], np.float64)))
            scale = abs(float(projected.value)) + float(
                np.sqrt(np.sum((np.asarray(bars[i], np.float64) * ts[i]) ** 2))
            )
            result = _compare(np.asarray(a), projected, scale, rtol)
            if result is not None and (worst is None or result.gap > worst.gap):
                worst = dataclasses.replace(result, kind="vjp", wrong_input=i)
        return worst or _Check(True, False, "vjp")

    def _wrong_input_by_transpose(self, g, xs, ts, cts, ad, bars) -> int | None:
        worst, index = -1.0, None
        for i in range(len(xs)):
            only = [t if j == i else np.zeros_like(t) for j, t in enumerate(ts)]
            _, ad_i = jax.jvp(g, xs, only)
            lhs = sum(
                float(np.sum(np.asarray(c, np.float64) * np.asarray(a, np.float64)))
                for c, a in zip(cts, ad_i, strict=True)
            )
            rhs = float(np.sum(np.asarray(bars[i], np.float64) * np.asarray(ts[i], np.float64)))
            if abs(lhs - rhs) > worst:
                worst, index = abs(lhs - rhs), i
        return index

    @staticmethod
    def _restricted(eqn, inputs, float_in, float_out):
        def g(*xs):
            full = list(inputs)
            for i, x in zip(float_in, xs, strict=True):
                full[i] = x
            outs = _apply(eqn, full)
            return [outs[k] for k in float_out]

        return g

    @staticmethod
    def finite_difference(g, xs, ts) -> list[fd.Derivative]:
        # The least precise input or output sets the step and the rounding floor: perturbing a
        # float32 input rounds the step to float32 even when the equation computes in float64.
        center_out = g(*xs)
        dtype = max(
            (np.dtype(a.dtype) for a in (*xs, *center_out)), key=lambda d: fd.machine_epsilon(d)
        )
        hs = fd.steps(fd.base_step(dtype))
        center = [np.asarray(o, np.float64) for o in center_out]
        # Host arithmetic (NumPy) around the equation: in JAX every operation would compile
        # once per shape, and each equation brings new shapes.
        host = [np.asarray(x) for x in xs]
        plus, minus = [], []
        for h in hs:
            plus.append(g(*[x + (h * t).astype(x.dtype) for x, t in zip(host, ts, strict=True)]))
            minus.append(g(*[x - (h * t).astype(x.dtype) for x, t in zip(host, ts, strict=True)]))
        eps = fd.machine_epsilon(dtype)
        out = []
        for k, c in enumerate(center):
            p = np.stack([np.asarray(e[k], np.float64) for e in plus])
            m = np.stack([np.asarray(e[k], np.float64) for e in minus])
            der = fd.derivative_from_evaluations(c, p, m, hs, eps)
            out.append(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), der))
        return out


def _project_derivative(ders: list[fd.Derivative], cts) -> fd.Derivative:
    def dot(field):
        return np.asarray(
            sum(
                np.sum(np.asarray(c, np.float64) * getattr(d, field))
                for c, d in zip(cts, ders, strict=True)
            )
        )

    def abs_dot(field):
        return np.asarray(
            sum(
                np.sum(np.abs(np.asarray(c, np.float64)) * getattr(d, field))
                for c, d in zip(cts, ders, strict=True)
            )
        )

    finite = np.asarray(all(bool(np.all(d.finite)) for d in ders))
    return fd.Derivative(
        value=dot("value"),
        error=abs_dot("error"),
        left=dot("left"),
        right=dot("right"),
        side_error=abs_dot("side_error"),
        finite=finite,
        magnitude=abs_dot("magnitude"),
    )


def _compare(a: np.ndarray, d: fd.Derivative, scale, rtol: float) -> _Check | None:
    """Returns a failing :class:`_Check` for the worst element, or None if all agree."""
    value = np.asarray(d.value)
    gap = np.abs(a - value)
    allowed = 3 * np.asarray(d.error) + rtol * scale + 1e-300
    finite = np.asarray(d.finite, bool) & np.isfinite(a)
    kink = (
        np.abs(np.asarray(d.right) - np.asarray(d.left))
        > 3 * (np.asarray(d.side_error) + np.asarray(d.error)) + rtol * scale
    )
    bad = finite & ~kink & (gap > allowed)
    if not bad.any():
        if (finite & kink & (gap > allowed)).any():
            return _Check(False, True, "jvp")
        return None
    ratio = np.where(bad, gap / allowed, -np.inf)
    k = np.unravel_index(int(np.argmax(ratio)), np.shape(ratio))
    return _Check(
        False,
        False,
        "jvp",
        float(np.asarray(a)[k]),
        float(value[k]),
        float(gap[k]),
        float(np.asarray(d.error)[k]),
    )


# --------------------------------------------------------------------------------------------
# walking the program


class _Walker:
    def __init__(self, seed: int):
        self.checker = _EquationChecker(seed)
        self.culprit: EquationFinding | None = None
        self.deviations: list[ExpectedDeviation] = []
        self.custom_rules: list[str] = []
        self.kinks: list[str] = []
        self.checked = 0
        self._seen_deviations: set = set()

    def walk(self, jaxpr, consts, inputs, context: tuple[str, ...], check: bool = True):
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, inputs, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = _apply(eqn, ins)
            self._visit(eqn, ins, outs, context, check and self.culprit is None)
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def _visit(self, eqn, ins, outs, context, check: bool):
        name = eqn.primitive.name
        reason = _deviation_reason(eqn)
        if reason is not None:
            result = self.checker.check(eqn, ins, outs) if check else None
            self._record_deviation(eqn, reason, context, None if result is None else not result.ok)
            return
        if name in ("custom_jvp_call", "custom_vjp_call"):
            label = f"{name.split('_call')[0]} `{_rule_name(eqn)}`"
            if label not in self.custom_rules:
                self.custom_rules.append(label)
        try:
            if not check:
                return
            self._check_and_blame(eqn, ins, outs, context)
        finally:
            self._list_nested_deviations(eqn, context)

    def _check_and_blame(self, eqn, ins, outs, context):
        name = eqn.primitive.name
        result = self.checker.check(eqn, ins, outs)
        if result is None:
            return
        self.checked += 1
        if result.ok:
            return
        if result.kink:
            where = _user_frame(eqn.source_info)
            self.kinks.append(f"`{name}` at {where}: left and right slopes differ")
            return
        # Descend into a sub-program; if the inner program is fine, the rule itself is wrong.
        self._descend(eqn, ins, context)
        if self.culprit is None:
            self.culprit = self._finding(eqn, ins, outs, context, result)

    def _list_nested_deviations(self, eqn, context, source=None):
        """Lists deviations inside sub-programs that were not descended into (not evaluated)."""
        if eqn.primitive.name in ("custom_jvp_call", "custom_vjp_call"):
            return  # the primal body of a custom rule is not what gets differentiated
        source = source or _user_frame(eqn.source_info)
        for sub in jcore.jaxprs_in_params(eqn.params):
            inner = (*context, eqn.primitive.name)
            for nested in sub.eqns:
                reason = _deviation_reason(nested)
                if reason is not None:
                    self._record_deviation(nested, reason, inner, None, source)
                else:
                    self._list_nested_deviations(nested, inner, source)

    def _record_deviation(self, eqn, reason, context, mismatch, fallback_source=None):
        if id(eqn) in self._seen_deviations:
            return
        self._seen_deviations.add(id(eqn))
        source = _user_frame(eqn.source_info) or fallback_source
        self.deviations.append(
            ExpectedDeviation(eqn.primitive.name, reason, source, context, mismatch)
        )

    def _descend(self, eqn, ins, context):
        name = eqn.primitive.name
        params = eqn.params
        if name in (
            "jit",
            "pjit",
            "closed_call",
            "core_call",
            "custom_jvp_call",
            "custom_vjp_call",
            "checkpoint",
            "remat",
        ):
            sub = params.get("jaxpr", params.get("call_jaxpr"))
            if sub is None:
                return
            label = {
                "custom_jvp_call": f"custom_jvp `{_rule_name(eqn)}`",
                "custom_vjp_call": f"custom_vjp `{_rule_name(eqn)}`",
                "jit": f"jit `{params.get('name')}`",
                "pjit": f"jit `{params.get('name')}`",
            }.get(name, name)
            if name in ("custom_jvp_call", "custom_vjp_call"):
                # The primal body of a custom function is not what is differentiated, but a wrong
                # rule nested inside it (e.g. a helper used by the rule) still shows here.
                pass
            closed = hasattr(sub, "consts")
            self.walk(
                sub.jaxpr if closed else sub, sub.consts if closed else [], ins, (*context, label)
            )
        elif name == "scan":
            self._descend_scan(eqn, ins, context)
        elif name == "cond":
            branches = params["branches"]
            index = int(np.clip(int(np.asarray(ins[0])), 0, len(branches) - 1))
            branch = branches[index]
            self.walk(branch.jaxpr, branch.consts, ins[1:], (*context, f"cond branch {index}"))

    def _descend_scan(self, eqn, ins, context):
        params = eqn.params
        body = params["jaxpr"]
        num_consts, num_carry, length = params["num_consts"], params["num_carry"], params["length"]
        consts, carry, xs = (
            ins[:num_consts],
            ins[num_consts : num_consts + num_carry],
            ins[num_consts + num_carry :],
        )
        order = range(length - 1, -1, -1) if params["reverse"] else range(length)
        for count, t in enumerate(order):
            if count >= MAX_SCAN_ITERATIONS:
                break
            step_in = [*consts, *carry, *[x[t] for x in xs]]
            outs = self.walk(body.jaxpr, body.consts, step_in, (*context, f"scan iteration {t}"))
            carry = outs[:num_carry]
            if self.culprit is not None:
                return

    def _finding(self, eqn, ins, outs, context, result: _Check) -> EquationFinding:
        name = eqn.primitive.name
        rule_name = _rule_name(eqn) if name.startswith("custom_") else None
        problems = {
            "jvp": "its JVP (forward-mode rule) disagrees with finite differences of the equation",
            "transpose": "its transpose (reverse-mode rule) disagrees with its own JVP "
            "(dot-product test)",
            "vjp": "its VJP (reverse-mode rule) disagrees with finite differences of the equation",
        }
        problem = problems[result.kind]
        if name == "custom_jvp_call":
            problem = f"the custom_jvp rule of `{rule_name}`: " + problem
        elif name == "custom_vjp_call":
            problem = f"the custom_vjp backward rule of `{rule_name}`: " + problem
        definition = _rule_definition(eqn)
        if definition:
            problem += f" (rule `{definition}`)"
        elif name in ("scan", "cond", "jit", "pjit", "while"):
            problem += " (no single inner equation is wrong on its own)"
        if result.wrong_output is not None and len(outs) > 1:
            problem += f"; output {result.wrong_output} is wrong"
        if result.wrong_input is not None and len(ins) > 1:
            problem += f"; the cotangent of input {result.wrong_input} is wrong"
        return EquationFinding(
            primitive=name,
            problem=problem,
            inputs=tuple(_type_text(x) for x in ins),
            outputs=tuple(_type_text(o) for o in outs),
            source=_user_frame(eqn.source_info),
            rule_source=self._rule_source(eqn, ins, outs, result),
            rule_name=rule_name,
            context=context,
            autodiff=result.autodiff,
            finite_difference=result.reference,
            abs_error=result.gap,
            error_bar=result.error_bar,
        )

    def _rule_source(self, eqn, ins, outs, result: _Check) -> SourceLocation | None:
        """Traces the failing rule and returns the user line that produces the wrong value."""
        float_in = [
            i
            for i, (v, x) in enumerate(zip(eqn.invars, ins, strict=True))
            if not isinstance(v, jcore.Literal) and _is_float(x) and np.size(x) > 0
        ]
        float_out = [k for k, o in enumerate(outs) if _is_float(o) and np.size(o) > 0]
        g = _EquationChecker._restricted(eqn, ins, float_in, float_out)
        xs = [ins[i] for i in float_in]
        wanted = _rule_function_name(eqn)
        direct = _trace_rule_directly(eqn, xs, result)
        if direct is not None:
            return direct
        found = None
        for dtype in _alternate_dtypes(xs):
            try:
                cast_xs = [jnp.asarray(x, dtype) for x in xs]
                if result.kind == "jvp":
                    traced = jax.make_jaxpr(lambda a, b: jax.jvp(g, a, b)[1])(cast_xs, cast_xs)
                    index = result.wrong_output or 0
                else:
                    cts = [jnp.zeros(outs[k].shape, dtype) for k in float_out]
                    traced = jax.make_jaxpr(lambda a, c: jax.vjp(g, *a)[1](c))(cast_xs, cts)
                    index = result.wrong_input or 0
            except Exception:
                continue
            where = _producer_location(traced.jaxpr, traced.jaxpr.outvars[index])
            if where is not None and (wanted is None or _same_function(where.function, wanted)):
                return where
            found = found or where
        return found


def _rule_function_name(eqn) -> str | None:
    """The name of the user's rule function (custom_jvp rule or custom_vjp bwd), if known."""
    for key in ("jvp_jaxpr_fun", "bwd"):
        info = getattr(eqn.params.get(key), "debug_info", None)
        text = getattr(info, "func_src_info", None)
        if text:
            return text.split(" at ")[0]
    return None


def _rule_definition(eqn) -> str | None:
    for key in ("jvp_jaxpr_fun", "bwd"):
        info = getattr(eqn.params.get(key), "debug_info", None)
        text = getattr(info, "func_src_info", None)
        if text:
            return text
    return None


def _parse_definition(text: str | None) -> tuple[str, str, int] | None:
    """``'name at file:line'`` -> ``(name, file, line)``."""
    if not text or " at " not in text:
        return None
    name, _, where = text.partition(" at ")
    file, _, line = where.rpartition(":")
    return (name, file, int(line)) if line.isdigit() else None


def _find_function(root, name: str, line: int, depth: int = 0, seen=None):
    """Finds the user's function ``name`` defined at ``line`` among closures and wrappers."""
    seen = set() if seen is None else seen
    if depth > 10 or id(root) in seen:
        return None
    seen.add(id(root))
    if inspect.isfunction(root):
        code = root.__code__
        if root.__name__ == name and code.co_firstlineno == line:
            return root
        children = [c.cell_contents for c in (root.__closure__ or ()) if _has_contents(c)]
        children += [getattr(root, "__wrapped__", None)]
    elif isinstance(root, functools.partial):
        children = [root.func, *root.args]
    elif isinstance(root, (tuple, list)):
        children = list(root)
    elif hasattr(root, "f") and hasattr(root, "transforms"):  # a linear_util.WrappedFun
        children = [root.f, *root.transforms]
    else:
        return None
    for child in children:
        if child is not None:
            found = _find_function(child, name, line, depth + 1, seen)
            if found is not None:
                return found
    return None


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - empty cells raise
        return True
    except ValueError:
        return False


def _user_function(eqn, key: str):
    info = getattr(eqn.params.get(key), "debug_info", None)
    parsed = _parse_definition(getattr(info, "func_src_info", None))
    if parsed is None:
        return None
    name, _, line = parsed
    return _find_function(eqn.params.get(key), name, line)


def _trace_rule_directly(eqn, xs, result) -> SourceLocation | None:
    """Calls the user's custom rule directly under tracing and finds the wrong line.

    JAX traces custom rules once (memoised) and often under the call site's source context, so
    the traced program of the derivative may not carry the rule's own lines; calling the rule
    function itself does.
    """
    name = eqn.primitive.name
    if eqn.params.get("num_consts", 0) or len(xs) != len(eqn.invars):
        return None
    try:
        if name == "custom_jvp_call" and result.kind in ("jvp", "transpose"):
            rule = _user_function(eqn, "jvp_jaxpr_fun")
            if rule is None:
                return None
            traced = jax.make_jaxpr(lambda p, t: rule(tuple(p), tuple(t))[1])(xs, xs)
            index = result.wrong_output or 0
        elif name == "custom_vjp_call":
            fwd, bwd = _user_function(eqn, "fwd_jaxpr_thunk"), _user_function(eqn, "bwd")
            if fwd is None or bwd is None:
                return None

            def pullback(a):
                out, residuals = fwd(*a)
                cotangent = jax.tree_util.tree_map(jnp.ones_like, out)
                return bwd(residuals, cotangent)

            traced = jax.make_jaxpr(pullback)(xs)
            index = result.wrong_input or 0
        else:
            return None
    except Exception:
        return None
    outvars = traced.jaxpr.outvars
    return _producer_location(traced.jaxpr, outvars[min(index, len(outvars) - 1)])


def _same_function(qualified: str, name: str) -> bool:
    return qualified.split(".")[-1] == name.split(".")[-1]


def _alternate_dtypes(xs) -> list:
    dtype = np.dtype(jnp.result_type(*xs))
    others = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(jnp.bfloat16)]
    if not fd.float64_available() or not jax.config.jax_enable_x64:
        others.remove(np.dtype(np.float64))
    return [*[d for d in others if d != dtype][:1], dtype]


def _producer_location(jaxpr, var) -> SourceLocation | None:
    """The user source line of the equation producing ``var`` (or of its nearest ancestor)."""
    producers = {}
    for eqn in jaxpr.eqns:
        for out in eqn.outvars:
            producers[out] = eqn
    frontier, seen = [var], set()
    while frontier:
        current = frontier.pop(0)
        if isinstance(current, jcore.Literal) or current in seen:
            continue
        seen.add(current)
        eqn = producers.get(current)
        if eqn is None:
            continue
        where = _user_frame(eqn.source_info)
        if where is not None:
            return where
        frontier.extend(eqn.invars)
    return None


# --------------------------------------------------------------------------------------------
# entry point


def locate_gradient_error(
    f: Callable,
    *args: Any,
    argnums: int | Sequence[int] | None = None,
    seed: int = 0,
    float64: bool = True,
) -> GradientLocation:
    r"""Finds the first equation of ``f`` whose derivative rule is wrong, and its source line.

    ``f`` is traced to a jaxpr at ``args`` (in float64 when the platform has it, so finite
    differences are accurate), every intermediate value is recorded, and each equation is checked
    on its own: its JVP against a central finite difference of that equation alone, and its
    transpose against its JVP by the dot-product test
    :math:`\langle \bar y, J t\rangle = \langle J^\top \bar y, t\rangle`. Failing ``jit``,
    ``custom_jvp``, ``custom_vjp``, ``scan`` and ``cond`` equations are descended into. The first
    wrong equation in program order is reported with its primitive, input and output types, the
    user's file and line, the chain of enclosing calls and, for custom rules, the line inside the
    rule that computes the wrong value. Equations that change gradients on purpose
    (``stop_gradient``, truncated scans, ``round``/``sign``/comparisons, ``gradkit_`` rules) are
    listed as expected deviations and never blamed.

    Args:
      f: a pure JAX function of pytrees.
      *args: the point at which to check.
      argnums: the arguments whose float leaves are inputs of the traced program (default: all).
        Other arguments are closed over as constants.
      seed: seed of the random tangents.
      float64: trace and evaluate in float64 when the platform supports it.

    Returns:
      A :class:`GradientLocation`; ``.culprit`` is None when every rule is right.

    Raises:
      TypeError: ``f`` is not callable or cannot be traced.
      ValueError: ``argnums`` does not match the arguments.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> location = locate_gradient_error(lambda x: jnp.sin(x) * 2, jnp.ones(3))
      >>> location.culprit is None
      True
    """
    from gradkit._gradcheck import _TRACE_ERRORS, _as_array, _is_static, _normalise_argnums

    if not callable(f):
        raise TypeError(f"locate_gradient_error: f must be callable, got {type(f).__name__}")
    if not args:
        raise ValueError("locate_gradient_error: no arguments given")
    selected = _normalise_argnums(argnums, len(args))
    name = getattr(f, "__name__", None) or type(f).__name__
    use64 = float64 and fd.float64_available()
    context = jax.enable_x64(True) if use64 else _Null()
    with context:

        def convert(x):
            # Python ints, bools and other non-arrays stay static, as they do for jax.grad.
            x = _as_array(x)
            if _is_static(x):
                return x
            return jnp.asarray(x, jnp.float64) if use64 and _is_float(x) else jnp.asarray(x)

        cast = [jax.tree_util.tree_map(convert, a) for a in args]
        flat = [jax.tree_util.tree_flatten(cast[i]) for i in selected]
        inputs = [(k, j) for k, (ls, _) in enumerate(flat) for j, x in enumerate(ls)]
        inputs = [(k, j) for k, j in inputs if not _is_static(flat[k][0][j])]

        def program(*values):
            leaves = [list(ls) for ls, _ in flat]
            for (k, j), value in zip(inputs, values, strict=True):
                leaves[k][j] = value
            full = list(cast)
            for i, ls, (_, treedef) in zip(selected, leaves, flat, strict=True):
                full[i] = jax.tree_util.tree_unflatten(treedef, ls)
            return f(*full)

        flat_inputs = [flat[k][0][j] for k, j in inputs]
        try:
            closed = jax.make_jaxpr(program)(*flat_inputs)
        except _TRACE_ERRORS as error:
            raise TypeError(
                f"locate_gradient_error: {name} cannot be traced by JAX: "
                f"{type(error).__name__}: {str(error).splitlines()[0]}"
            ) from error
        walker = _Walker(seed)
        walker.walk(closed.jaxpr, closed.consts, flat_inputs, ())
    return GradientLocation(
        culprit=walker.culprit,
        expected_deviations=walker.deviations,
        custom_rules=walker.custom_rules,
        kinks=walker.kinks,
        equations_checked=walker.checked,
        function=name,
    )


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
