"""Pictures of gradient-flow health (needs the ``plot`` extra: matplotlib).

:func:`plot_report` draws a :class:`~gradkit._health.HealthReport`: per-layer gradient norms on a
log scale with the problem layers marked, and the per-layer log2-magnitude histograms as a heat
map. :func:`plot_norm_history` draws per-layer gradient norms over training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradkit._health import HISTOGRAM_EXPONENTS, VANISHING_ABSOLUTE


def _pyplot() -> Any:
    # The backend is left alone: a notebook keeps its inline backend, and without a display
    # matplotlib already falls back to Agg.
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError('plotting needs matplotlib: pip install "gradkit[plot]"') from error
    return plt


def plot_report(report: Any, path: str | os.PathLike | None = None) -> Any:
    """Draws a health report; see :meth:`gradkit.diagnostics.HealthReport.plot`."""
    plt = _pyplot()
    layers = report.layers
    names = [layer.name for layer in layers]
    positions = np.arange(len(layers))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)

    def series(values):
        return np.array([np.nan if v is None or v <= 0 else v for v in values], dtype=float)

    grads = series([layer.grad_norm for layer in layers])
    cotangents = series([layer.cotangent_norm for layer in layers])
    left.semilogy(positions, grads, "o-", color="C0", label="parameter gradient norm")
    if np.isfinite(cotangents).any():
        left.semilogy(positions, cotangents, "s--", color="C2", alpha=0.7, label="dL/dz norm")
    left.axhline(VANISHING_ABSOLUTE, color="0.5", lw=0.8, ls=":", label="vanishing threshold")
    flagged = [i for i, layer in enumerate(layers) if layer.symptoms]
    for i in flagged:
        value = grads[i] if np.isfinite(grads[i]) else cotangents[i]
        if np.isfinite(value):
            left.semilogy([i], [value], "o", ms=14, mfc="none", mec="red", mew=2)
        left.annotate(
            ", ".join(layers[i].symptoms),
            (i, value if np.isfinite(value) else 1.0),
            textcoords="offset points",
            xytext=(0, 12),
            ha="center",
            color="red",
            fontsize=8,
        )
    left.set_xticks(positions, names, rotation=45, ha="right")
    left.set_ylabel("norm (log scale)")
    left.set_title("Gradient norm per layer (red: problem layers)")
    left.legend(fontsize=8, loc="best")

    histograms = [
        layer.grad_histogram
        if layer.grad_histogram is not None
        else np.zeros(len(HISTOGRAM_EXPONENTS))
        for layer in layers
    ]
    matrix = np.asarray(histograms, dtype=float)
    nonzero = np.flatnonzero(matrix.sum(axis=0))
    if nonzero.size:
        lo, hi = max(nonzero[0] - 2, 0), min(nonzero[-1] + 3, matrix.shape[1])
    else:
        lo, hi = 0, matrix.shape[1]
    shares = matrix[:, lo:hi] / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    exponents = HISTOGRAM_EXPONENTS[lo:hi]
    image = right.imshow(
        shares,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(exponents[0] - 1, exponents[-1], -0.5, len(layers) - 0.5),
    )
    right.set_yticks(positions, names)
    for i in flagged:
        right.get_yticklabels()[i].set_color("red")
    right.set_xlabel("log2 |gradient entry|")
    right.set_title("Gradient magnitude histogram per layer")
    fig.colorbar(image, ax=right, label="share of the layer's entries")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_norm_history(
    histories: Mapping[str, tuple[Sequence[int], Mapping[str, Sequence[float]]]],
    path: str | os.PathLike | None = None,
    *,
    flagged: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """Per-layer gradient norms over training, one panel per run.

    Args:
      histories: ``{run name: (steps, {layer: norms})}``.
      path: optional file to save the figure to.
      flagged: optional ``{run name: [layers]}`` drawn in red.

    Returns:
      The matplotlib ``Figure``.

    Example:
      Norms read from :func:`~gradkit.diagnostics.health_monitor`'s statistics every 100 steps:

      >>> from gradkit.diagnostics import plot_norm_history
      >>> figure = plot_norm_history(
      ...     {"3 layers": ([0, 100, 200], {"dense_0": [1e-9, 2e-9, 1e-9], "dense_1": [1e-3] * 3})},
      ...     flagged={"3 layers": ["dense_0"]},
      ... )
      >>> figure.axes[0].get_yscale()
      'log'
    """
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(histories), figsize=(5 * len(histories), 4), squeeze=False, sharey=True
    )
    for ax, (run, (steps, norms)) in zip(axes[0], histories.items(), strict=True):
        marked = set((flagged or {}).get(run, ()))
        for i, (layer, values) in enumerate(norms.items()):
            values = np.asarray(values, dtype=float)
            values = np.where(values > 0, values, np.nan)
            style = {"color": "red", "lw": 2.0} if layer in marked else {"color": f"C{i}"}
            ax.semilogy(
                steps, values, label=layer + (" (flagged)" if layer in marked else ""), **style
            )
        ax.axhline(VANISHING_ABSOLUTE, color="0.5", lw=0.8, ls=":")
        ax.set_title(run)
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("gradient norm per layer (log scale)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
