"""gradkit: differentiate JAX programs and trust the result.

The public modules are :mod:`gradkit.activations`, :mod:`gradkit.derivatives`,
:mod:`gradkit.layers`, :mod:`gradkit.recurrent`, :mod:`gradkit.diagnostics` and
:mod:`gradkit.training`; the most used names are re-exported here.
"""

__version__ = "0.1.0"

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
