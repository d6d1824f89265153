"""pytest plugin: a ``gradcheck`` fixture whose failures print the gradient-check report.

Registered through the ``pytest11`` entry point, so it is active wherever gradkit is installed::

    def test_my_layer(gradcheck):
        gradcheck(my_layer, params, x)            # fails the test with the report
        report = gradcheck(my_loss, params, batch, order=2)
        gradcheck.target(my_decorated_function)   # uses its @gradcheck_target arguments

Command-line options (defaults for every ``gradcheck`` call of the run):

* ``--gradcheck-x64``: run the checks with float64 enabled and floating inputs cast to float64,
  for suites that must not depend on float32 rounding;
* ``--gradcheck-method {directional,full}``;
* ``--gradcheck-seed N``;
* ``--gradcheck-allow-inconclusive``: do not fail on inconclusive checks (kinks).

gradkit is imported only when the fixture is used, so the plugin costs nothing elsewhere. With
plugin autoloading turned off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``) enable it by its entry-point
name, ``pytest -p gradkit``; naming the module instead (``-p gradkit._pytest_plugin``, or
``pytest_plugins`` in a conftest) while autoloading is on registers it twice, which pytest refuses.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradkit", "gradient checks (gradkit)")
    group.addoption(
        "--gradcheck-x64",
        action="store_true",
        default=False,
        help="gradcheck fixture: enable float64 and cast floating inputs to float64",
    )
    group.addoption(
        "--gradcheck-method",
        choices=("directional", "full"),
        default=None,
        help="gradcheck fixture: default check method",
    )
    group.addoption(
        "--gradcheck-seed", type=int, default=None, help="gradcheck fixture: default seed"
    )
    group.addoption(
        "--gradcheck-allow-inconclusive",
        action="store_true",
        default=False,
        help="gradcheck fixture: accept inconclusive checks (e.g. at kinks)",
    )


class GradCheckFixture:
    """The object the ``gradcheck`` fixture returns; call it like ``check_grads``."""

    def __init__(self, config: pytest.Config):
        self.x64 = bool(config.getoption("--gradcheck-x64"))
        self.allow_inconclusive = bool(config.getoption("--gradcheck-allow-inconclusive"))
        self.defaults: dict[str, Any] = {"locate": True}
        if config.getoption("--gradcheck-method"):
            self.defaults["method"] = config.getoption("--gradcheck-method")
        if config.getoption("--gradcheck-seed") is not None:
            self.defaults["seed"] = config.getoption("--gradcheck-seed")
        self.reports: list = []

    def __call__(self, f, *args, allow_inconclusive: bool | None = None, **options):
        """Checks ``f`` at ``args``; fails the test with the report unless it passes.

        Args:
          f: the function to check.
          *args: the point at which to check.
          allow_inconclusive: accept an inconclusive verdict (default: the command-line option).
          **options: keyword arguments of :func:`gradkit.diagnostics.check_grads`.

        Returns:
          The :class:`~gradkit.diagnostics.GradCheckReport` of a passing check.
        """
        import jax

        from gradkit._gradcheck import check_grads

        allow = self.allow_inconclusive if allow_inconclusive is None else allow_inconclusive
        context = jax.enable_x64(True) if self.x64 else contextlib.nullcontext()
        with context:
            if self.x64:
                args = jax.tree_util.tree_map(_to_float64, args)
            report = check_grads(f, *args, **{**self.defaults, **options})
        self.reports.append(report)
        if not (report.ok or (allow and report.verdict == "inconclusive")):
            pytest.fail(f"gradient check {report.verdict.upper()}\n{report}", pytrace=False)
        return report

    def target(self, function, **options):
        """Checks a function decorated with ``@gradkit.gradcheck_target``."""
        from gradkit._check_command import TARGET_ATTRIBUTE

        spec = getattr(function, TARGET_ATTRIBUTE, None)
        if spec is None:
            raise TypeError(
                f"{getattr(function, '__name__', function)!r} is not decorated with "
                "@gradkit.gradcheck_target(example_args_factory)"
            )
        return self(function, *spec.example_args(), **{**spec.options, **options})


def _to_float64(x):
    import jax.numpy as jnp

    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.asarray(x, jnp.float64)
    return x


@pytest.fixture
def gradcheck(request: pytest.FixtureRequest) -> GradCheckFixture:
    """Checks derivatives against finite differences; failures print the full report."""
    return GradCheckFixture(request.config)
