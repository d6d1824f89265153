"""Layer-boundary taps: named identities that diagnostics can observe without rewriting a model.

A model (gradkit's own layers, or a user's plain function) calls :func:`tap` on the values worth
observing, for example each layer's pre-activation. Outside a :func:`collecting` block ``tap`` is
the identity and costs nothing: it adds no equation to the traced program. Inside one, the active
collector decides what to do with the value; gradkit.diagnostics uses this to record
pre-activations and, by adding a zero perturbation it differentiates against, the cotangent that
flows back through each tapped value.

Collectors are per thread and nest; only the innermost one sees a tap.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import jax

_state = threading.local()


class Collector(Protocol):
    """What :func:`collecting` accepts: an object that sees every tapped value."""

    def tap(self, name: str, value: jax.Array, *, kind: str, activation: Any) -> jax.Array:
        """Returns the value to use in place of ``value`` (normally ``value`` itself)."""
        ...


def _collectors() -> list[Collector]:
    if not hasattr(_state, "collectors"):
        _state.collectors = []
    return _state.collectors


def tap(
    name: str, value: jax.Array, *, kind: str = "preactivation", activation: Any = None
) -> jax.Array:
    """Marks ``value`` as an observable point of the model named ``name``.

    Args:
      name: the layer's name, e.g. ``"dense_1"``; it names the layer in diagnostic reports.
      value: the array to observe (any shape; the last axis is features).
      kind: what ``value`` is: ``"preactivation"`` (input of the layer's activation) or
        ``"output"``.
      activation: the activation the layer applies to ``value`` (a gradkit.activations name or a
        callable), so diagnostics can look up its zero-gradient region; ``None`` if unknown.

    Returns:
      ``value`` itself outside a :func:`collecting` block; inside, whatever the collector returns.
    """
    collectors = _collectors()
    if not collectors:
        return value
    return collectors[-1].tap(name, value, kind=kind, activation=activation)


@contextlib.contextmanager
def collecting(collector: Collector) -> Iterator[Collector]:
    """Routes every :func:`tap` made inside the block (on this thread) to ``collector``."""
    collectors = _collectors()
    collectors.append(collector)
    try:
        yield collector
    finally:
        collectors.pop()
