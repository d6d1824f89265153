"""Activation functions with deliberately chosen, documented derivatives.

Every activation here states its formula and its derivative convention at each kink or boundary,
implements that convention with ``jax.custom_jvp`` where plain autodiff would surprise, and is
registered with metadata (formula, output range, zero-gradient region) that
:mod:`gradkit.diagnostics` reads to count saturated and dead units.
"""
