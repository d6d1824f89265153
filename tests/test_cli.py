"""Tests for the ``gradkit`` command and for the two set-up commands of the README."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradkit
from gradkit import cli

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradkit {gradkit.__version__}"


def test_help_lists_the_demo_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "gradkit demo" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: gradkit" in capsys.readouterr().out


def test_demo_rejects_unknown_scenario(capsys, tmp_path):
    assert cli.main(["demo", "--only", "nonexistent", "--out", str(tmp_path)]) == 2
    assert "unknown scenario" in capsys.readouterr().err


@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_demo_refuses_an_out_folder_that_is_or_lies_under_a_file(capsys, tmp_path, below):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    out = a_file / below if below else a_file
    assert cli.main(["demo", "--only", "derivatives", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot be a folder" in err and str(a_file) in err
    assert a_file.read_text() == "not a folder"


def test_every_scenario_script_exists():
    for scenario in cli.SCENARIOS:
        assert (cli.examples_dir() / scenario.script).is_file(), scenario.script


def test_console_script_is_installed():
    completed = subprocess.run(
        [sys.executable, "-m", "gradkit.cli", "--version"], capture_output=True, text=True
    )
    assert completed.returncode == 0
    assert gradkit.__version__ in completed.stdout


def _readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    return [line for block in blocks[:2] for line in block.strip().splitlines()]


def test_readme_has_the_two_setup_commands_first():
    install_demo, install_test = _readme_commands()[:2]
    assert install_demo.startswith("pip install") and install_demo.endswith("gradkit demo")
    assert "[test]" in install_test and "pytest" in install_test


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _readme_commands()[1] in ci_lines
