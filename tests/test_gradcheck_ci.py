"""Tests for the CI side of the checker: gradcheck_target, `gradkit check` and the pytest plugin."""

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from gradkit import _check_command, cli
from gradkit.diagnostics import gradcheck_target

pytest_plugins = ["pytester"]

TARGETS = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp

    import gradkit.diagnostics as gd


    @gd.gradcheck_target(lambda: ({"w": jnp.linspace(-1.0, 1.0, 4)}, jnp.ones(4)))
    def good(params, x):
        return jnp.sum(jnp.tanh(params["w"] * x) ** 2)


    @jax.custom_jvp
    def bad_sin(x):
        return jnp.sin(x)


    @bad_sin.defjvp
    def _bad_sin_jvp(primals, tangents):
        return jnp.sin(primals[0]), 2.0 * jnp.cos(primals[0]) * tangents[0]  # the wrong line


    @gd.gradcheck_target(lambda: jnp.linspace(0.1, 1.0, 3))
    def bad(x):
        return jnp.sum(bad_sin(x))


    @jax.custom_jvp
    def steep_relu(x):
        return jnp.maximum(x, 0.0)


    steep_relu.defjvp(lambda p, t: (steep_relu(p[0]), jnp.where(p[0] > 0, 1.0, 3.0) * t[0]))


    @gd.gradcheck_target(lambda: (jnp.zeros(1),), modes="forward")
    def kink(x):
        # At the kink the slope 3 is outside [0, 1]: inconclusive, not a failure.
        return steep_relu(x)


    def undecorated(x):
        return x
    """
)


@pytest.fixture
def targets_file(tmp_path):
    path = tmp_path / "gradient_targets.py"
    path.write_text(TARGETS)
    return path


def _wrong_line(path):
    return 1 + next(i for i, l in enumerate(path.read_text().splitlines()) if "the wrong line" in l)


def test_gradcheck_target_attaches_arguments_and_validates_options():
    @gradcheck_target(lambda: jnp.ones(2), order=2)
    def f(x):
        return jnp.sum(x**3)

    spec = f.__gradcheck__
    assert spec.options == {"order": 2}
    (x,) = spec.example_args()
    assert x.shape == (2,)
    with pytest.raises(TypeError, match="unknown check_grads option"):
        gradcheck_target(lambda: 1.0, tolerance=3)
    with pytest.raises(TypeError, match="example_args_factory must be a function"):
        gradcheck_target(jnp.ones(2))


def test_gradcheck_target_without_its_factory_is_refused_at_decoration():
    # @gradcheck_target with no parentheses passed the function as the factory, and the name
    # was bound to the inner decorator: calling energy(x) returned x.
    with pytest.raises(TypeError, match=r"'energy' takes arguments .*without its factory"):

        @gradcheck_target
        def energy(x):
            return jnp.sum(jnp.tanh(x) ** 2)

    # Factories with defaulted parameters only are fine.
    @gradcheck_target(lambda n=3: (jnp.ones(n),))
    def f(x):
        return jnp.sum(x**2)

    assert f(jnp.ones(2)) == 2.0


def test_a_json_report_in_a_missing_folder_is_a_usage_error_before_any_check(
    targets_file, capsys, tmp_path
):
    status = cli.main(["check", f"{targets_file}::good", "--json", str(tmp_path / "no" / "r.json")])
    assert status == 2
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "== " not in captured.out


def test_check_command_passing_target_exits_0(targets_file, capsys):
    assert cli.main(["check", f"{targets_file}::good"]) == 0
    out = capsys.readouterr().out
    assert "check_grads(good): PASS" in out and "1 of 1 gradient check(s) passed" in out


def test_check_command_failing_target_exits_1_and_names_the_line(targets_file, capsys, tmp_path):
    report_path = tmp_path / "reports.json"
    status = cli.main(["check", f"{targets_file}::bad", "--json", str(report_path)])
    assert status == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and f"{targets_file}:{_wrong_line(targets_file)}" in out
    (result,) = json.loads(report_path.read_text())
    assert result["ok"] is False and result["report"]["verdict"] == "fail"
    culprit = result["report"]["location"]["culprit"]
    assert (
        culprit["line"] == _wrong_line(targets_file) and culprit["primitive"] == "custom_jvp_call"
    )


def test_check_command_runs_every_target_of_a_file_or_module(targets_file, capsys, monkeypatch):
    assert cli.main(["check", str(targets_file), "--no-locate"]) == 1
    out = capsys.readouterr().out
    assert out.count("== ") == 3 and "1 of 3 gradient check(s) passed" in out
    monkeypatch.syspath_prepend(str(targets_file.parent))
    assert cli.main(["check", "gradient_targets:good"]) == 0
    assert cli.main(["check", "gradient_targets", "--no-locate"]) == 1


def test_inconclusive_is_configurable(targets_file, capsys):
    assert cli.main(["check", f"{targets_file}::kink"]) == 1
    assert "INCONCLUSIVE" in capsys.readouterr().out
    assert cli.main(["check", f"{targets_file}::kink", "--allow-inconclusive"]) == 0


def test_bad_targets_exit_2_with_a_message(targets_file, capsys):
    assert cli.main(["check", f"{targets_file}::undecorated"]) == 2
    assert "not decorated with @gradkit.gradcheck_target" in capsys.readouterr().err
    assert cli.main(["check", f"{targets_file}::missing"]) == 2
    err = capsys.readouterr().err
    # The file's path, not the internal module name it is imported under.
    assert f"{targets_file} has no attribute 'missing'" in err and "_gradkit_check_" not in err
    assert cli.main(["check", f"{targets_file}::goood"]) == 2
    assert "did you mean 'good'?" in capsys.readouterr().err
    assert cli.main(["check", "no_such_module_xyz:f"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert cli.main(["check", "no/such/file.py"]) == 2
    with pytest.raises(_check_command.TargetError, match="defines no function decorated"):
        _check_command.resolve("json")


@pytest.mark.parametrize("kind", ["file", "module"])
def test_a_target_that_raises_on_import_exits_2_naming_the_error_and_line(
    tmp_path, capsys, monkeypatch, kind
):
    path = tmp_path / "broken_targets.py"
    path.write_text("import jax\n\nraise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    target = str(path) if kind == "file" else "broken_targets"
    assert cli.main(["check", target]) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: boom at import" in err and f"{path}:3" in err
    assert "Traceback" not in err


def test_a_file_target_checks_only_the_functions_it_defines(targets_file, capsys, monkeypatch):
    importer = targets_file.parent / "importing_targets.py"
    importer.write_text(
        textwrap.dedent(
            """
            import jax.numpy as jnp

            import gradkit.diagnostics as gd
            from gradient_targets import good


            @gd.gradcheck_target(lambda: jnp.ones(3))
            def own(x):
                return jnp.sum(x**2)
            """
        )
    )
    names = [name for name, _ in _check_command.resolve(str(importer))]
    assert names == [f"{importer}::own"]
    # Both files on one command line: the imported `good` is checked once, from its own file.
    assert cli.main(["check", str(targets_file), str(importer), "--no-locate"]) == 1
    out = capsys.readouterr().out
    assert out.count("::good\n") == 1 and "2 of 4 gradient check(s) passed" in out
    only_imports = targets_file.parent / "only_imports.py"
    only_imports.write_text("from gradient_targets import good\n")
    with pytest.raises(_check_command.TargetError, match=r"it imports gradient_targets\.good"):
        _check_command.resolve(str(only_imports))
    # A package's own modules count as its own: re-exports from them are checked.
    package = targets_file.parent / "targets_package"
    package.mkdir()
    (package / "__init__.py").write_text("from targets_package.inner import good\n")
    (package / "inner.py").write_text(targets_file.read_text())
    monkeypatch.syspath_prepend(str(targets_file.parent))
    assert [name for name, _ in _check_command.resolve("targets_package")] == [
        "targets_package:good"
    ]


def test_check_command_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "check" in capsys.readouterr().out


def test_console_script_runs_check(targets_file):
    completed = subprocess.run(
        [sys.executable, "-m", "gradkit.cli", "check", f"{targets_file}::good"],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "PASS" in completed.stdout


PLUGIN_TESTS = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp


    def test_good(gradcheck):
        report = gradcheck(lambda x: jnp.sum(jnp.sin(x) ** 2), jnp.linspace(-1.0, 1.0, 3))
        assert report.ok
        assert report.dtype == ("float64" if X64 else "float32")


    @jax.custom_jvp
    def bad_sin(x):
        return jnp.sin(x)


    bad_sin.defjvp(lambda p, t: (jnp.sin(p[0]), -jnp.cos(p[0]) * t[0]))


    def test_bad(gradcheck):
        gradcheck(lambda x: jnp.sum(bad_sin(x)), jnp.linspace(0.1, 1.0, 3))
    """
)


def test_plugin_is_registered_as_a_pytest11_entry_point():
    points = importlib.metadata.entry_points(group="pytest11")
    assert any(p.value == "gradkit._pytest_plugin" for p in points)


@pytest.mark.parametrize("x64", [False, True])
def test_pytest_plugin_fixture_passes_and_fails_with_the_report(pytester, x64):
    pytester.makepyfile(test_plugin_use=f"X64 = {x64}\n" + PLUGIN_TESTS)
    # The plugin is loaded through its pytest11 entry point, as in any project that installs
    # gradkit.
    result = pytester.runpytest(*(["--gradcheck-x64"] * x64))
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*gradient check FAIL*",
            "*AD = autodiff*FD = finite differences*",
            "*wrong derivative rule: custom_jvp_call*",
        ]
    )


def test_a_file_checks_callable_objects_made_targets_in_it(tmp_path, capsys):
    # A functools.partial's __module__ is 'functools': the file's own target was taken for an
    # import and skipped ("defines no function decorated ...").
    path = tmp_path / "partial_targets.py"
    path.write_text(
        textwrap.dedent(
            """
            import functools
            import jax.numpy as jnp
            import gradkit.diagnostics as gd

            def loss(x, scale):
                return jnp.sum(jnp.tanh(scale * x) ** 2)

            scaled = gd.gradcheck_target(lambda: jnp.linspace(-1.0, 1.0, 4))(
                functools.partial(loss, scale=2.0)
            )
            """
        )
    )
    assert cli.main(["check", str(path)]) == 0
    assert "1 of 1 gradient check(s) passed" in capsys.readouterr().out


def test_an_object_that_takes_no_attributes_is_refused_with_a_wrapper_hint():
    from gradkit.activations import get

    with pytest.raises(TypeError, match=r"cannot mark .* wrap it in a function"):
        gradcheck_target(lambda: jnp.ones(3))(get("tanh"))


def test_a_bad_target_does_not_hide_the_others(targets_file, capsys, tmp_path):
    report_path = tmp_path / "r.json"
    status = cli.main(
        ["check", f"{targets_file}::good", "no_such_module_xyz:f", "--json", str(report_path)]
    )
    assert status == 2  # a usage error still decides the status
    out = capsys.readouterr()
    assert "cannot import module 'no_such_module_xyz'" in out.err
    assert "check_grads(good): PASS" in out.out
    results = json.loads(report_path.read_text())
    assert [r["ok"] for r in results] == [False, True]
    assert "no_such_module_xyz" in results[0]["error"]
