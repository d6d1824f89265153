"""Tests for the ``gradkit`` package namespace: its re-exports and what importing it loads."""

import importlib
import json
import subprocess
import sys

import pytest

import gradkit

HEAVY = ("optax", "flax", "sympy", "chex", "matplotlib", "tensorboardX")


def _loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def test_every_reexported_name_is_the_defining_modules_object():
    assert set(gradkit.__all__) >= {"__version__", *gradkit._SUBMODULES, *gradkit._EXPORTS}
    for name, module in gradkit._EXPORTS.items():
        defining = importlib.import_module(f"gradkit.{module}")
        assert getattr(gradkit, name) is getattr(defining, name), name
    for name in gradkit._SUBMODULES:
        assert getattr(gradkit, name) is importlib.import_module(f"gradkit.{name}")


def test_star_import_and_dir_see_every_public_name():
    namespace: dict = {}
    exec("from gradkit import *", namespace)
    assert namespace["fit"] is gradkit.training.fit
    assert namespace["scan"] is gradkit.recurrent.scan
    assert set(gradkit.__all__) <= set(namespace)
    assert set(gradkit.__all__) <= set(dir(gradkit))


def test_an_unknown_name_raises_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'check_gradz'"):
        gradkit.check_gradz  # noqa: B018
    assert not hasattr(gradkit, "_not_a_name")


def test_importing_the_recurrent_module_leaves_training_and_its_dependencies_unloaded():
    # A recurrent model pays for JAX, not for optax, flax, sympy or plotting (each megabytes of
    # resident memory and a fraction of a second of start-up).
    loaded = _loaded_after("import gradkit.recurrent")
    assert "gradkit.recurrent" in loaded and "jax" in loaded
    assert not loaded & {*HEAVY, "gradkit.training", "gradkit.diagnostics"}


def test_the_package_alone_loads_no_submodule_until_a_name_is_read():
    assert not {m for m in _loaded_after("import gradkit") if m.startswith(("gradkit.", "jax"))}
    loaded = _loaded_after("import gradkit\ngradkit.fit")
    assert {"gradkit.training", "optax"} <= loaded
