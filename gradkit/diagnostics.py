"""Gradient checks that say where, gradient-flow health, and where a NaN came from.

Finite differences are compared with autodiff by :func:`check_grads` (and computed element by
element, with error bars, by :func:`finite_difference_grad`); a wrong rule is traced to
one equation and source line by :func:`locate_gradient_error`; gradient flow is summarised by
:func:`gradient_stats` and :func:`diagnose`, and drawn by ``HealthReport.plot`` and
:func:`plot_norm_history`; :func:`find_nan_origin` names the first equation that produced a NaN
or an Inf.
"""

from gradkit._check_command import gradcheck_target as gradcheck_target
from gradkit._finite_differences import finite_difference_grad as finite_difference_grad
from gradkit._gradcheck import GradCheckCost as GradCheckCost
from gradkit._gradcheck import GradCheckReport as GradCheckReport
from gradkit._gradcheck import GradCheckRow as GradCheckRow
from gradkit._gradcheck import GradientCheckError as GradientCheckError
from gradkit._gradcheck import WorstElement as WorstElement
from gradkit._gradcheck import assert_grads_correct as assert_grads_correct
from gradkit._gradcheck import check_grads as check_grads
from gradkit._health import HISTOGRAM_EXPONENTS as HISTOGRAM_EXPONENTS
from gradkit._health import HealthMonitorState as HealthMonitorState
from gradkit._health import HealthReport as HealthReport
from gradkit._health import LayerHealth as LayerHealth
from gradkit._health import LeafStats as LeafStats
from gradkit._health import diagnose as diagnose
from gradkit._health import gradient_stats as gradient_stats
from gradkit._health import health_monitor as health_monitor
from gradkit._health import latest_health as latest_health
from gradkit._health import layer_boundary as layer_boundary
from gradkit._health import log_health as log_health
from gradkit._health_plot import plot_norm_history as plot_norm_history
from gradkit._locate import EquationFinding as EquationFinding
from gradkit._locate import ExpectedDeviation as ExpectedDeviation
from gradkit._locate import GradientLocation as GradientLocation
from gradkit._locate import locate_gradient_error as locate_gradient_error
from gradkit._nan_origin import NanEvent as NanEvent
from gradkit._nan_origin import NanOriginReport as NanOriginReport
from gradkit._nan_origin import find_nan_origin as find_nan_origin
