"""Gradient checks that say where, gradient-flow health, and where a NaN came from.

Finite differences are compared with autodiff by :func:`check_grads`; a wrong rule is traced to
one equation and source line by :func:`locate_gradient_error`; gradient flow is summarised by
:func:`gradient_stats` and :func:`diagnose`; :func:`find_nan_origin` names the first equation
that produced a NaN or an Inf.
"""
