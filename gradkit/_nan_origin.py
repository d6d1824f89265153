"""Where did the NaN come from: evaluate a program equation by equation and name the culprit.

:func:`find_nan_origin` traces ``f`` to a jaxpr and evaluates it one primitive at a time on the
given arguments, descending into ``jit``, custom-derivative, ``remat``, ``cond``, ``scan`` and
``while`` bodies. When ``f`` is a gradient function (``jax.grad(loss)``) its jaxpr holds the
forward and the backward pass, so both are inspected. The first equation whose output holds a NaN
or an Inf that none of its inputs held is reported with its primitive, a summary of its inputs,
the user's source line and call chain, and, for the cases users hit most, the reason in words.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from gradkit._health import non_finite_leaves
from gradkit._locate import SourceLocation

try:  # user_frames is not re-exported by jax.extend; fall back to no call chain without it.
    from jax._src.source_info_util import user_frames as _user_frames
except ImportError:  # pragma: no cover - depends on the JAX version
    _user_frames = None

_MAX_EVENTS = 8
# Primitives that only move or reshape values: looked through when asking "what produced this?".
_TRANSPARENT = {
    "broadcast_in_dim",
    "reshape",
    "squeeze",
    "expand_dims",
    "convert_element_type",
    "copy",
    "copy_p",
    "transpose",
    "slice",
    "dynamic_slice",
    "gather",
    "reduce_precision",
    "jit",
    "pjit",
}


@dataclasses.dataclass(frozen=True)
class ValueSummary:
    """Shape, dtype and the range/special-value counts of one array."""

    shape: tuple[int, ...]
    dtype: str
    min: float | None
    max: float | None
    nan_count: int
    posinf_count: int
    neginf_count: int
    zero_count: int

    @classmethod
    def of(cls, value: Any) -> ValueSummary:
        dtype = getattr(value, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            # PRNG keys (and other extended dtypes): no numbers to summarise, none NaN.
            return cls(tuple(np.shape(value)), str(dtype), None, None, 0, 0, 0, 0)
        array = np.asarray(value)
        dtype = array.dtype
        if jax.numpy.issubdtype(dtype, jax.numpy.floating) and dtype.kind != "f":
            # bfloat16 and the float8 types are not NumPy floating types: count in float32.
            array = array.astype(np.float32)
        if not np.issubdtype(array.dtype, np.number) or array.size == 0:
            return cls(array.shape, str(dtype), None, None, 0, 0, 0, 0)
        if np.issubdtype(array.dtype, np.complexfloating):
            array = np.abs(array)
        finite = array[np.isfinite(array)]
        return cls(
            shape=tuple(array.shape),
            dtype=str(dtype),
            min=float(finite.min()) if finite.size else None,
            max=float(finite.max()) if finite.size else None,
            nan_count=int(np.isnan(array).sum()) if array.dtype.kind == "f" else 0,
            posinf_count=int((array == np.inf).sum()) if array.dtype.kind == "f" else 0,
            neginf_count=int((array == -np.inf).sum()) if array.dtype.kind == "f" else 0,
            zero_count=int((array == 0).sum()),
        )

    @property
    def has_nan(self) -> bool:
        return self.nan_count > 0

    @property
    def has_inf(self) -> bool:
        return self.posinf_count + self.neginf_count > 0

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        parts = [f"{self.dtype}[{shape}]"]
        if self.min is not None:
            parts.append(
                f"= {self.min:.4g}"
                if self.min == self.max
                else f"in [{self.min:.4g}, {self.max:.4g}]"
            )
        specials = [
            f"{count} {label}"
            for count, label in (
                (self.nan_count, "NaN"),
                (self.posinf_count, "+Inf"),
                (self.neginf_count, "-Inf"),
                (self.zero_count, "exact zeros"),
            )
            if count
        ]
        if specials:
            parts.append("(" + ", ".join(specials) + ")")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class NanEvent:
    """One equation whose output holds a NaN or Inf that none of its inputs held.

    Attributes:
      primitive: the JAX primitive, e.g. ``"log"``.
      phase: ``"forward"`` or ``"backward"`` (an equation of the transposed, i.e. backward, pass
        of a gradient function).
      produced: what appeared: ``"NaN"``, ``"+Inf"``, ``"-Inf"`` or a combination.
      equation: the equation as JAX prints it.
      inputs: summaries of the input values.
      outputs: summaries of the output values.
      location: the user's source line, or ``None`` if JAX recorded none.
      call_chain: the enclosing user frames, outermost first.
      scopes: the enclosing named calls (``jit`` names, custom-derivative functions, loops).
    """

    primitive: str
    phase: str
    produced: str
    equation: str
    inputs: tuple[ValueSummary, ...]
    outputs: tuple[ValueSummary, ...]
    location: SourceLocation | None
    call_chain: tuple[SourceLocation, ...]
    scopes: tuple[str, ...]

    def __str__(self) -> str:
        where = str(self.location) if self.location else "(no source line recorded)"
        lines = [
            f"{self.primitive} in the {self.phase} pass produced {self.produced} at {where}",
            f"  equation: {self.equation}",
        ]
        for i, summary in enumerate(self.inputs):
            lines.append(f"  input {i}: {summary}")
        if self.scopes:
            lines.append(f"  inside: {' > '.join(self.scopes)}")
        if len(self.call_chain) > 1:
            lines.append("  call chain: " + " -> ".join(str(f) for f in self.call_chain))
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class NanOriginReport:
    """What :func:`find_nan_origin` found.

    Attributes:
      found: whether any equation produced a NaN or Inf.
      first: the first such equation in evaluation order (``None`` if none).
      events: the first few such equations, in evaluation order.
      cause: a short name for a recognised pattern (``"log_of_softmax"``, ``"log_of_sigmoid"``,
        ``"sqrt_at_zero"``, ``"unprotected_where"``, ``"log_of_zero"``, ``"division_by_zero"``,
        ``"pole_at_zero"``, ``"overflow"``, ``"invalid_operation"``, ``"non_finite_input"``) or
        ``None``.
      explanation: the cause and the fix in words.
      outputs: summaries of ``f``'s outputs.
      non_finite_inputs: the arguments already holding NaN or Inf, each as ``"args[i]...:
        n NaN, first at index (...)"`` (``args[0]`` is ``f``'s first argument). No equation
        of ``f`` produced those: find where the data or parameters came from. When no
        equation produced any either, :attr:`cause` is ``"non_finite_input"``.
    """

    found: bool
    first: NanEvent | None
    events: tuple[NanEvent, ...]
    cause: str | None
    explanation: str
    outputs: tuple[ValueSummary, ...]
    non_finite_inputs: tuple[str, ...] = ()

    def __str__(self) -> str:
        inputs = [f"  {entry}" for entry in self.non_finite_inputs]
        if not self.found:
            if inputs:
                return "\n".join([f"find_nan_origin: {self.explanation}", *inputs])
            return "find_nan_origin: no equation produced a NaN or an Inf."
        lines = [f"find_nan_origin: {self.explanation}", "", "first: " + str(self.first)]
        for event in self.events[1:]:
            lines.append("then: " + str(event))
        if inputs:
            lines += ["", "the arguments also held NaN or Inf already:", *inputs]
        return "\n".join(lines)


def _non_finite_inputs(args: tuple[Any, ...]) -> tuple[str, ...]:
    """``"args[i]...: counts, first at index"`` for each argument leaf holding NaN or Inf."""
    found = []
    for path, array in non_finite_leaves(args):
        counts = []
        nan = int(np.isnan(array).sum())
        posinf, neginf = int((array == np.inf).sum()), int((array == -np.inf).sum())
        for count, what in ((nan, "NaN"), (posinf, "+Inf"), (neginf, "-Inf")):
            if count:
                counts.append(f"{count} {what}")
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0]) if array.ndim else ()
        at = f", first at index {where}" if array.ndim else ""
        found.append(
            f"args{path} ({array.dtype.name}{list(array.shape)}): "
            f"{', '.join(counts)} of {array.size}{at}"
        )
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Provenance: every value the interpreter computes gets a node recording how it was made.


class _Node:
    __slots__ = ("consumers", "event", "inputs", "primitive", "summary")

    def __init__(self, primitive: str, inputs: Sequence[_Node], summary: ValueSummary | None):
        self.primitive = primitive
        self.inputs = list(inputs)
        self.summary = summary
        self.consumers: list[tuple[_Node, str]] = []
        self.event: NanEvent | None = None
        for node in self.inputs:
            node.consumers.append((self, primitive))


def _source(node: _Node) -> _Node:
    """Looks through reshapes, broadcasts and call boundaries to the node that computed a value."""
    seen = 0
    while node.primitive in _TRANSPARENT and len(node.inputs) >= 1 and seen < 64:
        node = node.inputs[0]
        seen += 1
    return node


def _excluded_file(path: str) -> bool:
    if path.endswith(os.path.join("gradkit", "_nan_origin.py")):
        return True
    prefixes = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.startswith(prefix) for prefix in prefixes if prefix)


def _locations(eqn: Any) -> tuple[SourceLocation | None, tuple[SourceLocation, ...]]:
    traceback = eqn.source_info.traceback
    if _user_frames is None or traceback is None:
        return None, ()
    frames = [
        SourceLocation(frame.file_name, frame.start_line, frame.function_name)
        for frame in _user_frames(traceback)
        if not _excluded_file(frame.file_name)
    ]
    if not frames:
        return None, ()
    return frames[0], tuple(reversed(frames))


def _is_backward(eqn: Any) -> bool:
    return "transpose" in str(eqn.source_info.name_stack)


@dataclasses.dataclass(frozen=True)
class _Context:
    """Where the interpreter is: enclosing calls, backward pass or not, the caller's line."""

    scopes: tuple[str, ...] = ()
    backward: bool = False
    location: SourceLocation | None = None
    chain: tuple[SourceLocation, ...] = ()

    def enter(self, label: str, eqn: Any) -> _Context:
        location, chain = _locations(eqn)
        return _Context(
            scopes=(*self.scopes, label),
            backward=self.backward or _is_backward(eqn),
            location=location or self.location,
            chain=chain or self.chain,
        )


class _Interpreter:
    def __init__(self) -> None:
        self.events: list[NanEvent] = []
        self.event_nodes: list[_Node] = []

    # The evaluation itself.

    def run(self, closed: Any, args: Sequence[Any]) -> list[tuple[Any, _Node]]:
        consts = [(c, _Node("constant", [], None)) for c in closed.consts]
        inputs = [
            (jax.numpy.asarray(a, dtype=var.aval.dtype), _Node("argument", [], None))
            for a, var in zip(args, closed.jaxpr.invars, strict=True)
        ]
        return self.eval_jaxpr(closed.jaxpr, consts, inputs, _Context())

    def eval_jaxpr(
        self,
        jaxpr: Any,
        consts: Sequence[tuple[Any, _Node]],
        args: Sequence[tuple[Any, _Node]],
        ctx: _Context,
    ) -> list[tuple[Any, _Node]]:
        env: dict[Any, tuple[Any, _Node]] = {}

        def read(atom: Any) -> tuple[Any, _Node]:
            if isinstance(atom, jex_core.Literal):
                return atom.val, _Node("literal", [], None)
            return env[atom]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            inputs = [read(v) for v in eqn.invars]
            outputs = self.eval_eqn(eqn, inputs, ctx)
            for var, value in zip(eqn.outvars, outputs, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def eval_eqn(
        self, eqn: Any, inputs: list[tuple[Any, _Node]], ctx: _Context
    ) -> list[tuple[Any, _Node]]:
        name = eqn.primitive.name
        params = eqn.params
        if name == "cond":
            index = int(np.asarray(inputs[0][0]))
            branch = params["branches"][index]
            return self._call(branch, inputs[1:], ctx.enter(f"cond branch {index}", eqn))
        if name == "scan":
            return self._scan(eqn, inputs, ctx)
        if name == "while":
            return self._while(eqn, inputs, ctx)
        inner = self._inner_jaxpr(eqn)
        if inner is not None:
            label = params.get("name", name)
            label = getattr(label, "__name__", label)
            return self._call(inner, inputs, ctx.enter(f"{name} {label}", eqn))
        return self._bind(eqn, inputs, ctx)

    @staticmethod
    def _inner_jaxpr(eqn: Any) -> Any:
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            inner = eqn.params.get(key)
            if inner is None:
                continue
            jaxpr = getattr(inner, "jaxpr", inner)
            if isinstance(jaxpr, jex_core.Jaxpr) and len(jaxpr.invars) == len(eqn.invars):
                if len(jaxpr.outvars) == len(eqn.outvars):
                    return inner
        return None

    def _call(self, inner, inputs, ctx):
        if isinstance(inner, jex_core.ClosedJaxpr):
            consts = [(c, _Node("constant", [], None)) for c in inner.consts]
            outputs = self.eval_jaxpr(inner.jaxpr, consts, inputs, ctx)
        else:
            outputs = self.eval_jaxpr(inner, [], inputs, ctx)
        # A call boundary: values pass through unchanged, under a transparent node.
        return [(value, _Node("jit", [node], node.summary)) for value, node in outputs]

    def _bind(self, eqn, inputs, ctx):
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        values = [value for value, _ in inputs]
        with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
            result = eqn.primitive.bind(*values, **bind_params)
        results = list(result) if eqn.primitive.multiple_results else [result]
        nodes = self._record(eqn, inputs, results, ctx)
        return list(zip(results, nodes, strict=True))

    def _record(self, eqn, inputs, results, ctx):
        input_summaries = []
        for value, node in inputs:
            if node.summary is None:
                node.summary = ValueSummary.of(value)
            input_summaries.append(node.summary)
        output_summaries = [ValueSummary.of(value) for value in results]
        nodes = [
            _Node(eqn.primitive.name, [node for _, node in inputs], summary)
            for summary in output_summaries
        ]
        in_nan = any(s.has_nan for s in input_summaries)
        in_inf = any(s.has_inf for s in input_summaries)
        out_nan = any(s.has_nan for s in output_summaries)
        out_inf = any(s.has_inf for s in output_summaries)
        new_nan = out_nan and not in_nan
        new_inf = out_inf and not (in_nan or in_inf)
        if (new_nan or new_inf) and len(self.events) < _MAX_EVENTS:
            produced = []
            if new_nan:
                produced.append("NaN")
            if new_inf:
                if any(s.posinf_count for s in output_summaries):
                    produced.append("+Inf")
                if any(s.neginf_count for s in output_summaries):
                    produced.append("-Inf")
            location, chain = _locations(eqn)
            event = NanEvent(
                primitive=eqn.primitive.name,
                phase="backward" if ctx.backward or _is_backward(eqn) else "forward",
                produced=" and ".join(produced),
                equation=_equation_text(eqn),
                inputs=tuple(input_summaries),
                outputs=tuple(output_summaries),
                location=location or ctx.location,
                call_chain=chain or ctx.chain,
                scopes=ctx.scopes,
            )
            self.events.append(event)
            for node in nodes:
                node.event = event
            self.event_nodes.append(nodes[0])
        return nodes

    def _scan(self, eqn, inputs, ctx):
        params = eqn.params
        body = params["jaxpr"]
        num_consts, num_carry = params["num_consts"], params["num_carry"]
        length, reverse = params["length"], params["reverse"]
        consts = inputs[:num_consts]
        carry = inputs[num_consts : num_consts + num_carry]
        xs = inputs[num_consts + num_carry :]
        ys_per_step = []
        order = range(length - 1, -1, -1) if reverse else range(length)
        for step in order:
            # Each step's slice under a node of its own (transparent, like any slice): the
            # node of the whole sequence keeps the summary of the whole sequence.
            x_step = [(value[step], _Node("slice", [node], None)) for value, node in xs]
            outputs = self._call(
                body, [*consts, *carry, *x_step], ctx.enter(f"scan step {step}", eqn)
            )
            carry = outputs[:num_carry]
            ys_per_step.append(outputs[num_carry:])
        if reverse:
            ys_per_step.reverse()
        num_ys = len(eqn.outvars) - num_carry
        ys = []
        for i in range(num_ys):
            if ys_per_step:
                stacked = jax.numpy.stack([step_out[i][0] for step_out in ys_per_step])
                node = _Node("scan", [step_out[i][1] for step_out in ys_per_step], None)
            else:
                aval = eqn.outvars[num_carry + i].aval
                stacked = jax.numpy.zeros(aval.shape, aval.dtype)
                node = _Node("scan", [], None)
            ys.append((stacked, node))
        return [*carry, *ys]

    def _while(self, eqn, inputs, ctx):
        params = eqn.params
        cond_n, body_n = params["cond_nconsts"], params["body_nconsts"]
        cond_consts = inputs[:cond_n]
        body_consts = inputs[cond_n : cond_n + body_n]
        carry = inputs[cond_n + body_n :]
        iteration = 0
        while True:
            (keep_going, _), *_ = self._call(
                params["cond_jaxpr"], [*cond_consts, *carry], ctx.enter("while condition", eqn)
            )
            if not bool(np.asarray(keep_going)):
                return carry
            carry = self._call(
                params["body_jaxpr"],
                [*body_consts, *carry],
                ctx.enter(f"while iteration {iteration}", eqn),
            )
            iteration += 1


def _equation_text(eqn: Any) -> str:
    text = str(eqn).strip()
    first_line = text.splitlines()[0] if text else eqn.primitive.name
    return first_line if len(first_line) <= 160 else first_line[:157] + "..."


# ---------------------------------------------------------------------------------------------
# Recognising the common causes.


def _produced_by(node: _Node, primitive: str) -> bool:
    return _source(node).primitive == primitive


def _is_softmax(node: _Node) -> bool:
    source = _source(node)
    return (
        source.primitive == "div" and bool(source.inputs) and _produced_by(source.inputs[0], "exp")
    )


def _masked_by_where(node: _Node, depth: int = 0) -> bool:
    """Whether a value flows (through transparent ops) into a select whose output is finite."""
    if depth > 16:
        return False
    for consumer, primitive in node.consumers:
        if primitive == "select_n":
            summary = consumer.summary
            if summary is not None and not summary.has_nan and not summary.has_inf:
                return True
        elif primitive in _TRANSPARENT and _masked_by_where(consumer, depth + 1):
            return True
    return False


def _explain(events: list[NanEvent], nodes: list[_Node]) -> tuple[str | None, str]:
    first, node = events[0], nodes[0]
    where = f" at {first.location}" if first.location else ""
    later_nan = next((e for e in events[1:] if "NaN" in e.produced), None)
    inputs = node.inputs
    if first.primitive == "log" and inputs and first.inputs[0].zero_count:
        if _is_softmax(inputs[0]):
            return "log_of_softmax", (
                f"log(softmax(x)){where}: softmax underflowed to exactly 0 for logits far below "
                "the largest one, so log gave -inf (and its gradient 1/0 gives NaN). Use "
                "jax.nn.log_softmax(x) (or gradkit.activations.log_softmax), which computes "
                "x - logsumexp(x) without forming the probabilities."
            )
        if _produced_by(inputs[0], "logistic"):
            return "log_of_sigmoid", (
                f"log(sigmoid(x)){where}: sigmoid rounded to exactly 0, so log gave -inf. Use "
                "jax.nn.log_sigmoid(x) (gradkit.activations.log_sigmoid)."
            )
    if first.primitive in ("div", "rsqrt", "pow", "integer_pow") and any(
        _produced_by(n, "sqrt") and s.zero_count for n, s in zip(inputs, first.inputs, strict=False)
    ):
        then = (
            "the backward pass then multiplies it by 0, giving NaN"
            if later_nan is not None or "NaN" in first.produced
            else "the gradient is infinite there"
        )
        return "sqrt_at_zero", (
            f"the derivative of sqrt at 0{where}: d sqrt(u) = du / (2 sqrt(u)) is 1/0 = inf "
            "when u = 0 (for a norm ||x|| = sqrt(sum(x**2)), a zero vector), and "
            f"{then}. The forward value is fine; only the gradient is undefined. Give it a "
            "chosen value at 0, e.g. sqrt(where(u > 0, u, 1)) inside where(u > 0, ..., 0) (the "
            "double-where trick), or add a small epsilon under the square root."
        )
    if later_nan is not None and _masked_by_where(node):
        nan_where = f" at {later_nan.location}" if later_nan.location else ""
        return "unprotected_where", (
            f"jnp.where does not protect the backward pass: {first.primitive}{where} produced "
            f"{first.produced} for elements that where() then discarded, but the gradient of the "
            f"discarded branch is still computed and multiplied by 0, giving NaN in the "
            f"{later_nan.phase} pass ({later_nan.primitive}{nan_where}). Use the double-where "
            "trick: make the input safe before the op, e.g. "
            f"{_double_where_example(first.primitive)}."
        )
    if first.primitive == "log" and first.inputs and first.inputs[0].zero_count:
        return "log_of_zero", f"log of 0{where} gave -inf."
    if first.primitive in ("div", "rem") and any(s.zero_count for s in first.inputs[1:]):
        return "division_by_zero", f"division by 0{where} gave {first.produced}."
    if (
        first.primitive in ("pow", "integer_pow", "rsqrt")
        and first.inputs
        and first.inputs[0].zero_count
        and "NaN" not in first.produced
    ):
        return "pole_at_zero", (
            f"{first.primitive} of 0{where} gave {first.produced}: a negative power of 0 "
            "(1/0), not an overflow. In a backward pass this is typically the derivative of "
            "x**p with 0 < p < 1 (p * x**(p - 1)) at x = 0, e.g. abs(x)**0.5. Keep the input "
            "away from 0 (x + eps, or the double-where trick) or choose the gradient there."
        )
    if "NaN" not in first.produced:
        return "overflow", (
            f"{first.primitive}{where} overflowed to {first.produced} from finite inputs."
        )
    return "invalid_operation", (
        f"{first.primitive}{where} produced NaN from finite inputs (an invalid operation such "
        "as 0/0, inf - inf, 0 * inf or sqrt/log of a negative number)."
    )


def _double_where_example(primitive: str) -> str:
    """The double-where fix written for the operation that produced the NaN/Inf."""
    examples = {
        "div": "where(x != 0, 1.0 / where(x != 0, x, 1.0), 0.0)",
        "sqrt": "where(x > 0, sqrt(where(x > 0, x, 1.0)), 0.0)",
        "rsqrt": "where(x > 0, rsqrt(where(x > 0, x, 1.0)), 0.0)",
        "pow": "where(x > 0, where(x > 0, x, 1.0) ** p, 0.0)",
        "integer_pow": "where(x != 0, where(x != 0, x, 1.0) ** p, 0.0)",
        "exp": "where(x < 80, exp(where(x < 80, x, 0.0)), big)",
    }
    return examples.get(primitive, "where(x > 0, log(where(x > 0, x, 1.0)), 0.0)")


def find_nan_origin(f: Callable[..., Any], *args: Any, **kwargs: Any) -> NanOriginReport:
    r"""Finds the first equation of ``f`` that produced a NaN or an Inf on ``args``.

    ``f`` is traced with :func:`jax.make_jaxpr` and the jaxpr is evaluated one primitive at a
    time (descending into ``jit``, custom-derivative, ``remat``, ``cond``, ``scan`` and ``while``
    bodies; loops are unrolled, so keep them short). An equation is an *origin* when its output
    holds a NaN that none of its inputs held, or an Inf while its inputs held neither. For a
    gradient function such as ``jax.grad(loss)`` the jaxpr contains the forward and the backward
    pass; events of the backward pass are marked ``phase="backward"``.

    Recognised causes (:attr:`NanOriginReport.cause`): ``log(softmax(x))`` with large logits,
    ``log(sigmoid(x))``, the derivative of ``sqrt`` (or a norm) at 0, and ``jnp.where`` that
    masks a NaN/Inf in the forward pass but not in the backward pass.

    Args:
      f: the function to inspect, e.g. ``loss`` or ``jax.grad(loss)``.
      *args: its arguments (concrete arrays or pytrees of them).
      **kwargs: keyword arguments, passed to ``f`` as static values.

    Returns:
      A :class:`NanOriginReport`; ``str(report)`` explains it.

    Raises:
      TypeError: if ``f`` is not callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> report = find_nan_origin(jax.grad(jnp.linalg.norm), jnp.zeros(3))
      >>> report.cause
      'sqrt_at_zero'
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    closed = jax.make_jaxpr(lambda *a: f(*a, **kwargs))(*args)
    flat_args = jax.tree_util.tree_leaves(args)
    interpreter = _Interpreter()
    outputs = interpreter.run(closed, flat_args)
    summaries = tuple(ValueSummary.of(value) for value, _ in outputs)
    non_finite = _non_finite_inputs(args)
    if not interpreter.events:
        if non_finite:
            return NanOriginReport(
                False,
                None,
                (),
                "non_finite_input",
                "no equation produced a NaN or an Inf: the arguments already held them. "
                "Look for where they came from (the data loading or preprocessing for a "
                "batch, an earlier update for parameters):",
                summaries,
                non_finite,
            )
        return NanOriginReport(
            False, None, (), None, "no equation produced a NaN or an Inf", summaries
        )
    cause, explanation = _explain(interpreter.events, interpreter.event_nodes)
    return NanOriginReport(
        found=True,
        first=interpreter.events[0],
        events=tuple(interpreter.events),
        cause=cause,
        explanation=explanation,
        outputs=summaries,
        non_finite_inputs=non_finite,
    )
