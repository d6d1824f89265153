"""``gradkit check``: gradient checks in CI, and the ``@gradcheck_target`` decorator they run.

A function opts in with :func:`gradcheck_target`, giving a factory of example arguments::

    @gradkit.gradcheck_target(lambda: (init_params(), batch()))
    def loss(params, batch): ...

``gradkit check TARGET`` then imports the target, builds the arguments, runs
:func:`gradkit.diagnostics.check_grads` (with ``locate=True``), prints each report and exits with
status 0 only if every check passes. ``TARGET`` is ``package.module:function``,
``path/to/file.py::function``, or a module or file, in which case every decorated function it
defines is checked (one it imports from another module is that module's to check; a package
counts its own modules' functions as its own). A target that cannot be imported, raises while it
is imported, or holds no decorated function exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

TARGET_ATTRIBUTE = "__gradcheck__"


@dataclasses.dataclass(frozen=True)
class GradcheckTarget:
    """What :func:`gradcheck_target` attaches to a function.

    Attributes:
      example_args_factory: returns the positional arguments (a tuple, or one non-tuple value).
      options: keyword arguments for :func:`gradkit.diagnostics.check_grads`.
      module: the name of the module in which the decorator was applied (where a
        ``functools.partial`` or other callable object was made a target), or None.
    """

    example_args_factory: Callable[[], Any]
    options: dict[str, Any]
    module: str | None = None

    def example_args(self) -> tuple:
        args = self.example_args_factory()
        return args if isinstance(args, tuple) else (args,)


def gradcheck_target(example_args_factory: Callable[[], Any], **options: Any) -> Callable:
    """Marks a function for ``gradkit check`` (and the ``gradcheck`` pytest fixture).

    The function is returned unchanged, with the factory attached as ``__gradcheck__``.

    Args:
      example_args_factory: a function of no arguments returning the point at which to check:
        a tuple of positional arguments, or a single argument.
      **options: keyword arguments passed on to :func:`gradkit.diagnostics.check_grads`
        (``argnums``, ``order``, ``method``, ``modes``, ``rtol`` ...).

    Returns:
      A decorator.

    Raises:
      TypeError: the factory is not callable, or an option is not a ``check_grads`` keyword.

    Example:
      >>> import jax.numpy as jnp
      >>> @gradcheck_target(lambda: (jnp.linspace(-1.0, 1.0, 4),))
      ... def energy(x):
      ...     return jnp.sum(x**4)
      >>> energy.__gradcheck__.example_args()[0].shape
      (4,)
    """
    if not callable(example_args_factory):
        raise TypeError(
            "gradcheck_target: example_args_factory must be a function returning the example "
            f"arguments, got {type(example_args_factory).__name__}; write "
            "@gradcheck_target(lambda: (x,))"
        )
    if _takes_arguments(example_args_factory):
        # @gradcheck_target without parentheses passes the function itself as the factory.
        raise TypeError(
            "gradcheck_target: example_args_factory must be a function of no arguments "
            "returning the example arguments, but "
            f"{getattr(example_args_factory, '__name__', example_args_factory)!r} takes "
            "arguments (is @gradcheck_target used without its factory?); write "
            "@gradcheck_target(lambda: (x,))"
        )
    from gradkit._gradcheck import check_grads

    known = set(inspect.signature(check_grads).parameters) - {"f", "args"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"gradcheck_target: unknown check_grads option(s) {unknown}; known: {sorted(known)}"
        )

    def decorate(function: Callable) -> Callable:
        caller = sys._getframe(1).f_globals.get("__name__")
        target = GradcheckTarget(example_args_factory, dict(options), caller)
        try:
            setattr(function, TARGET_ATTRIBUTE, target)
        except (AttributeError, TypeError, dataclasses.FrozenInstanceError) as error:
            raise TypeError(
                f"gradcheck_target: cannot mark {function!r}: it takes no attributes ({error}); "
                "wrap it in a function: gradcheck_target(...)(lambda x: f(x))"
            ) from None
        return function

    return decorate


def _takes_arguments(function: Callable) -> bool:
    """Whether ``function`` has a parameter without a default (False if it cannot be told)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in parameters
    )


class TargetError(ValueError):
    """A ``gradkit check`` target cannot be resolved."""


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise TargetError(f"no such file: {path}")
    name = "_gradkit_check_" + "_".join(path.resolve().with_suffix("").parts[-3:]).replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise TargetError(f"cannot import {path}: {_import_failure(error)}") from error
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def _import_failure(error: Exception) -> str:
    """The exception an import raised, and the line that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def _import_module(name: str) -> ModuleType:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except Exception as error:  # not found, or the module raised while it was imported
        raise TargetError(f"cannot import module {name!r}: {_import_failure(error)}") from error


def _attribute(module: ModuleType, dotted: str, target: str) -> Callable:
    obj: Any = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            # A file is imported under an internal module name: show its path instead.
            where = (
                module.__file__
                if module.__name__.startswith("_gradkit_check_") and module.__file__
                else module.__name__
            )
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("__")])
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TargetError(f"{target}: {where} has no attribute {dotted!r}{hint}")
        obj = getattr(obj, part)
    return obj


def resolve(target: str) -> list[tuple[str, Callable]]:
    """Returns the ``(name, function)`` pairs a target string names.

    Args:
      target: ``package.module:function``, ``path/to/file.py::function``, a module name or a
        ``.py`` file (the ``@gradcheck_target`` functions it defines).

    Returns:
      The functions to check, each with a display name.

    Raises:
      TargetError: the module, file or function does not exist or raises when imported, a
        named function is not decorated, or a module defines no decorated function.
    """
    if "::" in target:
        file, _, name = target.partition("::")
        functions = [(target, _attribute(_import_file(Path(file)), name, target))]
    elif target.endswith(".py"):
        module = _import_file(Path(target))
        functions = _decorated(module, target)
    elif ":" in target:
        module_name, _, name = target.partition(":")
        functions = [(target, _attribute(_import_module(module_name), name, target))]
    else:
        functions = _decorated(_import_module(target), target)
    for name, function in functions:
        if not hasattr(function, TARGET_ATTRIBUTE):
            raise TargetError(
                f"{name} is not decorated with @gradkit.gradcheck_target(example_args_factory), "
                "so gradkit check does not know where to evaluate it"
            )
    return functions


def _defined_in(obj: Any, module: ModuleType) -> bool:
    """Whether ``obj`` was made a target in ``module`` (or, for a package, in one of its
    modules): where the decorator ran, else where ``obj`` was defined."""
    home = getattr(getattr(obj, TARGET_ATTRIBUTE, None), "module", None) or getattr(
        obj, "__module__", None
    )
    if not isinstance(home, str):
        return True  # no record of where it comes from: take it
    package = hasattr(module, "__path__")
    return home == module.__name__ or (package and home.startswith(module.__name__ + "."))


def _decorated(module: ModuleType, target: str) -> list[tuple[str, Callable]]:
    """The decorated functions a module or file defines; those it imports from elsewhere are
    left to their own module (a package's own modules count as its own), so that checking
    several files does not check an imported function twice."""
    decorated = [
        (name, obj)
        for name, obj in vars(module).items()
        if callable(obj) and hasattr(obj, TARGET_ATTRIBUTE)
    ]
    separator = "::" if target.endswith(".py") else ":"
    found = [
        (f"{target}{separator}{name}", obj) for name, obj in decorated if _defined_in(obj, module)
    ]
    if not found:
        imported = sorted(
            {
                f"{getattr(obj, TARGET_ATTRIBUTE).module or obj.__module__}.{name}"
                for name, obj in decorated
            }
        )
        hint = (
            f" (it imports {', '.join(imported)}: name that module, or the function as "
            f"{target}{separator}NAME)"
            if imported
            else ""
        )
        raise TargetError(f"{target} defines no function decorated with @gradcheck_target{hint}")
    return found


def run_target(function: Callable, **overrides: Any):
    """Checks one decorated function; returns its :class:`GradCheckReport`."""
    from gradkit._gradcheck import check_grads

    spec: GradcheckTarget = getattr(function, TARGET_ATTRIBUTE)
    options = {"locate": True, **spec.options, **overrides}
    return check_grads(function, *spec.example_args(), **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``gradkit check`` arguments to ``parser``."""
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="package.module:function, path/to/file.py::function, or a module/file whose "
        "@gradcheck_target functions are all checked",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the reports as JSON to PATH")
    parser.add_argument(
        "--allow-inconclusive",
        action="store_true",
        help="exit 0 when checks are inconclusive (e.g. at a kink); by default only passes do",
    )
    parser.add_argument(
        "--method", choices=("directional", "full"), help="override the check method"
    )
    parser.add_argument("--order", type=int, choices=(1, 2), help="override the derivative order")
    parser.add_argument("--seed", type=int, help="override the seed of the random directions")
    parser.add_argument(
        "--no-locate", action="store_true", help="do not localise failures to an equation"
    )


def main(args: argparse.Namespace) -> int:
    """Runs ``gradkit check``; returns the exit status (0 all pass, 1 a check failed, 2 a target
    could not be resolved or another usage error; the resolvable targets are checked anyway)."""
    overrides: dict[str, Any] = {}
    for key in ("method", "order", "seed"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.no_locate:
        overrides["locate"] = False
    if args.json and not Path(args.json).resolve().parent.is_dir():
        # Checked before any check runs: a report that cannot be written is a usage error.
        print(
            f"gradkit check: --json {args.json}: folder {Path(args.json).resolve().parent} "
            "does not exist",
            file=sys.stderr,
        )
        return 2
    # Every target is resolved and every resolvable one checked, so that one bad target does
    # not hide the others' results; the bad ones still make the exit status 2.
    functions, results, unresolved = [], [], 0
    for target in args.targets:
        try:
            functions += resolve(target)
        except TargetError as error:
            print(f"gradkit check: {error}", file=sys.stderr)
            results.append({"target": target, "error": f"TargetError: {error}", "ok": False})
            unresolved += 1
    failures = 0
    for name, function in functions:
        print(f"== {name}")
        try:
            report = run_target(function, **overrides)
        except Exception as error:
            failures += 1
            message = f"{type(error).__name__}: {error}"
            print(f"ERROR {message}")
            traceback.print_exc(limit=3, file=sys.stderr)
            results.append({"target": name, "error": message, "ok": False})
            continue
        print(report)
        accepted = report.ok or (args.allow_inconclusive and report.verdict == "inconclusive")
        failures += not accepted
        results.append({"target": name, "ok": accepted, "report": report.to_dict()})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    passed = len(functions) - failures
    print(f"\n{passed} of {len(functions)} gradient check(s) passed.")
    if unresolved:
        print(f"{unresolved} target(s) could not be resolved (see above).")
        return 2
    return 0 if failures == 0 else 1
