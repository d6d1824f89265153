"""Gradient checks (finite differences vs autodiff) that say where, gradient-flow health, NaN origin."""
