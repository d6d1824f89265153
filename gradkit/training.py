"""Jitted training loops on optax: train state, train step, fit, checkpoints, logging hooks."""
