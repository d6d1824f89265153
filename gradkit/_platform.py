"""Code chosen by the platform a program is compiled for.

A :func:`jax.lax.cond` is cheap on XLA:CPU, where the runtime reads the predicate in place. On
a GPU, XLA copies the predicate to the host to choose the branch, a round trip on every call
(an NVIDIA H200: a trivial jitted call took 38 us, 63 to 68 us with a cond inside), and the
branch cannot join the launches XLA batches around it. Code that runs once per training step
therefore keeps its conds for the CPU and, on other platforms, computes both sides and selects
(``health_monitor(every=100)`` on the H200: +65% per step against +82% with its cond).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from jax import lax

_T = TypeVar("_T")

#: Tests set this to run the accelerator code paths on a CPU (compared there with the CPU's).
FORCE_ACCELERATOR = False


def cpu_or_accelerator(cpu: Callable[..., _T], accelerator: Callable[..., _T], *args: Any) -> _T:
    """``cpu(*args)`` in a program compiled for a CPU, ``accelerator(*args)`` otherwise.

    Both are traced; the choice is made when the program is lowered
    (:func:`jax.lax.platform_dependent`), so the compiled program holds one of them and no
    conditional. Both must return the same structure of arrays.
    """
    if FORCE_ACCELERATOR:
        return accelerator(*args)
    return lax.platform_dependent(*args, cpu=cpu, default=accelerator)
