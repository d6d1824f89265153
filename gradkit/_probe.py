"""Layer-boundary taps: named identities that diagnostics can observe without rewriting a model.

A model (gradkit's own layers, or a user's plain function) calls :func:`tap` on the values worth
observing, for example each layer's pre-activation, and may then ask :func:`activation` which
activation function to apply to it. Outside a :func:`collecting` block ``tap`` is the identity and
``activation`` returns the function it was given: neither adds an equation to the traced program.
Inside one, the active collector decides: gradkit.diagnostics records pre-activations and, by
adding a zero perturbation it differentiates against, the cotangent that flows back through each
tapped value; and to measure what a surrogate gradient would change, it substitutes a layer's
activation with one that has the same values and a different derivative.

Collectors are per thread and nest; only the innermost one sees a tap.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax

_state = threading.local()


class Collector(Protocol):
    """What :func:`collecting` accepts: an object that sees every tapped value.

    A collector may also define ``activation(name, function) -> function``; :func:`activation`
    calls it (when it exists) right after the layer's :func:`tap`, so it can be paired with the
    most recent tap of ``name``.
    """

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


def activation(
    name: str, function: Callable[[jax.Array], jax.Array]
) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function layer ``name`` should apply to its tapped pre-activation.

    A layer calls it right after :func:`tap`-ing its pre-activation, with the activation it would
    apply: ``z = tap(name, z, ...); y = activation(name, fn)(z)``.

    Args:
      name: the layer's name, as given to :func:`tap`.
      function: the layer's own activation, ``(..., features) -> (..., features)``.

    Returns:
      ``function`` itself outside a :func:`collecting` block, or when the innermost collector has
      no ``activation`` method; otherwise what that method returns (gradkit.diagnostics returns
      ``function`` unless it is measuring a surrogate gradient for this layer).
    """
    collectors = _collectors()
    if not collectors:
        return function
    substitute = getattr(collectors[-1], "activation", None)
    if substitute is None:
        return function
    return substitute(name, function)


@contextlib.contextmanager
def collecting(collector: Collector) -> Iterator[Collector]:
    """Routes every :func:`tap` made inside the block (on this thread) to ``collector``."""
    collectors = _collectors()
    collectors.append(collector)
    try:
        yield collector
    finally:
        collectors.pop()
