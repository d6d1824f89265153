"""gradkit: differentiate JAX programs and trust the result.

The public modules are :mod:`gradkit.activations`, :mod:`gradkit.derivatives`,
:mod:`gradkit.layers`, :mod:`gradkit.recurrent`, :mod:`gradkit.diagnostics` and
:mod:`gradkit.training`; the most used names are re-exported here.

Modules load on first use: ``import gradkit.recurrent`` loads the recurrent module and JAX,
not optax, flax or sympy, and ``gradkit.fit`` loads :mod:`gradkit.training` the first time it
is read. ``from gradkit import *`` and ``dir(gradkit)`` see every public name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = (
    "activations",
    "derivatives",
    "diagnostics",
    "layers",
    "recurrent",
    "training",
)
# Re-exported name -> the public module that defines it.
_EXPORTS = {
    "with_surrogate_grad": "activations",
    "Lop": "derivatives",
    "Rop": "derivatives",
    "expression": "derivatives",
    "hessian": "derivatives",
    "hvp": "derivatives",
    "jacobian": "derivatives",
    "jvp": "derivatives",
    "vjp": "derivatives",
    "GradCheckReport": "diagnostics",
    "GradientCheckError": "diagnostics",
    "HealthReport": "diagnostics",
    "assert_grads_correct": "diagnostics",
    "check_grads": "diagnostics",
    "diagnose": "diagnostics",
    "find_nan_origin": "diagnostics",
    "gradcheck_target": "diagnostics",
    "gradient_stats": "diagnostics",
    "health_monitor": "diagnostics",
    "layer_boundary": "diagnostics",
    "locate_gradient_error": "diagnostics",
    "MLP": "layers",
    "Dense": "layers",
    "RNN": "recurrent",
    "Chunked": "recurrent",
    "Full": "recurrent",
    "TheanoTail": "recurrent",
    "Window": "recurrent",
    "scan": "recurrent",
    "tbptt_value_and_grad": "recurrent",
    "TrainState": "training",
    "fit": "training",
    "make_train_step": "training",
    "tutorial_momentum": "training",
}
__all__ = ["__version__", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"gradkit.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gradkit.{module}"), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static analysis and IDEs read
    from gradkit import activations as activations
    from gradkit import derivatives as derivatives
    from gradkit import diagnostics as diagnostics
    from gradkit import layers as layers
    from gradkit import recurrent as recurrent
    from gradkit import training as training
    from gradkit.activations import with_surrogate_grad as with_surrogate_grad
    from gradkit.derivatives import Lop as Lop
    from gradkit.derivatives import Rop as Rop
    from gradkit.derivatives import expression as expression
    from gradkit.derivatives import hessian as hessian
    from gradkit.derivatives import hvp as hvp
    from gradkit.derivatives import jacobian as jacobian
    from gradkit.derivatives import jvp as jvp
    from gradkit.derivatives import vjp as vjp
    from gradkit.diagnostics import GradCheckReport as GradCheckReport
    from gradkit.diagnostics import GradientCheckError as GradientCheckError
    from gradkit.diagnostics import HealthReport as HealthReport
    from gradkit.diagnostics import assert_grads_correct as assert_grads_correct
    from gradkit.diagnostics import check_grads as check_grads
    from gradkit.diagnostics import diagnose as diagnose
    from gradkit.diagnostics import find_nan_origin as find_nan_origin
    from gradkit.diagnostics import gradcheck_target as gradcheck_target
    from gradkit.diagnostics import gradient_stats as gradient_stats
    from gradkit.diagnostics import health_monitor as health_monitor
    from gradkit.diagnostics import layer_boundary as layer_boundary
    from gradkit.diagnostics import locate_gradient_error as locate_gradient_error
    from gradkit.layers import MLP as MLP
    from gradkit.layers import Dense as Dense
    from gradkit.recurrent import RNN as RNN
    from gradkit.recurrent import Chunked as Chunked
    from gradkit.recurrent import Full as Full
    from gradkit.recurrent import TheanoTail as TheanoTail
    from gradkit.recurrent import Window as Window
    from gradkit.recurrent import scan as scan
    from gradkit.recurrent import tbptt_value_and_grad as tbptt_value_and_grad
    from gradkit.training import TrainState as TrainState
    from gradkit.training import fit as fit
    from gradkit.training import make_train_step as make_train_step
    from gradkit.training import tutorial_momentum as tutorial_momentum
