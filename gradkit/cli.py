"""The ``gradkit`` command.

``gradkit demo`` runs the runnable examples (one per problem gradkit exists to solve) and prints
each one's verdict; it exits non-zero if any verdict is wrong.

Every example script follows one protocol, so the demo and the tests can run it the same way:
it accepts ``--out DIR`` (where it may write plots and logs), prints lines that start with
``Verdict:`` summarising its answer, and exits with status 0 only when that answer is the right
one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import gradkit
from gradkit import _check_command

VERDICT_PREFIX = "Verdict:"


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One runnable example of the demo.

    Attributes:
      name: short identifier used by ``gradkit demo --only``.
      script: file name inside the examples folder.
      question: the question the example answers, printed as its heading.
    """

    name: str
    script: str
    question: str


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "xor",
        "sigmoid_family_xor.py",
        "seed 000: why does hard_sigmoid train XOR to nowhere, and why has ultra_fast_sigmoid "
        "no gradient?",
    ),
    Scenario(
        "derivatives",
        "derivatives_tour.py",
        "seed 003: grad, jacobian, hessian, Rop, Lop, Hessian-vector products, and the "
        "derivative as a formula",
    ),
    Scenario(
        "truncation",
        "recurrent_truncation.py",
        "seed 002: why does a recurrent net with recurrent weights 0 get 1e-4 of the "
        "finite-difference gradient with gradient_steps=1?",
    ),
    Scenario(
        "checker",
        "gradient_checker.py",
        "seed 002, as a CI check: the feed-forward net's gradient passes, and a broken "
        "custom_vjp is located to its line",
    ),
    Scenario(
        "theano",
        "theano_tutorial.py",
        "seed 001: the Theano tutorial in pure JAX, and its momentum MLP on two Gaussian clusters",
    ),
    Scenario(
        "vanishing",
        "vanishing_gradients.py",
        "seed 004: why does one more hidden layer with N(0, 1e-3) init stop a ReLU net "
        "from learning?",
    ),
)


def examples_dir() -> Path:
    """Returns the folder holding the example scripts.

    A wheel install ships them inside the package (``gradkit/_examples``); a source checkout or an
    editable install finds them next to the package, in ``examples/``.
    """
    package_dir = Path(gradkit.__file__).resolve().parent
    for candidate in (package_dir / "_examples", package_dir.parent / "examples"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no examples folder found next to {package_dir}; reinstall gradkit from its repository"
    )


@dataclasses.dataclass
class ScenarioResult:
    """What running one scenario produced."""

    scenario: Scenario
    returncode: int
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def verdicts(self) -> list[str]:
        return [
            line.strip()[len(VERDICT_PREFIX) :].strip()
            for line in self.output.splitlines()
            if line.strip().startswith(VERDICT_PREFIX)
        ]


def run_example(
    script: str, out_dir: str | Path, *, timeout: float = 900.0
) -> subprocess.CompletedProcess:
    """Runs one example script of :func:`examples_dir` in a fresh Python process.

    The script gets ``--out out_dir`` and a headless matplotlib backend; its output is captured.
    A script still running after ``timeout`` seconds is stopped and reported with return code
    124 and a line saying so.
    """
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(examples_dir() / script), "--out", str(out_dir)]
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as error:
        stdout = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout or ""
        message = f"{script} did not finish within {timeout:.0f} s"
        return subprocess.CompletedProcess(command, 124, stdout, message)


def run_scenario(scenario: Scenario, out_dir: Path, *, timeout: float = 900.0) -> ScenarioResult:
    """Runs one scenario's example, writing its files to ``out_dir/<script name>``."""
    target = out_dir / Path(scenario.script).stem
    target.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    completed = run_example(scenario.script, target, timeout=timeout)
    output = completed.stdout + completed.stderr
    return ScenarioResult(scenario, completed.returncode, time.perf_counter() - start, output)


def _demo(args: argparse.Namespace) -> int:
    scenarios = SCENARIOS
    if args.only:
        known = {s.name for s in SCENARIOS}
        unknown = sorted(set(args.only) - known)
        if unknown:
            print(
                f"gradkit demo: unknown scenario(s) {unknown}; choose from {sorted(known)}",
                file=sys.stderr,
            )
            return 2
        scenarios = tuple(s for s in SCENARIOS if s.name in args.only)
    out_dir = Path(args.out).resolve()
    blocked = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        print(
            f"gradkit demo: --out {args.out} cannot be a folder: {blocked} is a file",
            file=sys.stderr,
        )
        return 2
    print(f"gradkit {gradkit.__version__} demo: {len(scenarios)} scenario(s), files in {out_dir}")
    failures = 0
    for scenario in scenarios:
        print(f"\n== {scenario.name}: {scenario.question}")
        result = run_scenario(scenario, out_dir)
        if args.verbose or not result.ok:
            print(result.output.rstrip())
        else:
            for verdict in result.verdicts or ["(the example printed no verdict)"]:
                print(f"   {verdict}")
        status = "ok" if result.ok else f"WRONG (exit status {result.returncode})"
        print(f"   -> {status} in {result.seconds:.1f} s")
        failures += not result.ok
    print(f"\n{len(scenarios) - failures} of {len(scenarios)} scenario(s) gave the right answer.")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradkit",
        description=(
            "gradkit: differentiate JAX programs and trust the result. "
            "Run `gradkit demo` to see the problems gradkit answers."
        ),
    )
    parser.add_argument("--version", action="version", version=f"gradkit {gradkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the examples and print each one's verdict",
        description=(
            "Runs each example script in its own process, prints its verdict lines, and exits "
            "non-zero if any example reports a wrong answer. Scenarios: "
            + ", ".join(s.name for s in SCENARIOS)
            + "."
        ),
    )
    demo.add_argument(
        "--out",
        default="gradkit_demo_output",
        help="folder for the plots and logs the examples write (default: %(default)s)",
    )
    demo.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these scenarios",
    )
    demo.add_argument(
        "-v", "--verbose", action="store_true", help="print each example's whole output"
    )
    demo.set_defaults(handler=_demo)
    check = commands.add_parser(
        "check",
        help="check the derivatives of @gradcheck_target functions against finite differences",
        description=(
            "Checks autodiff against finite differences for each target and prints the reports; "
            "exit status 0 only if every check passes (1 if one fails, 2 for a bad target)."
        ),
    )
    _check_command.add_arguments(check)
    check.set_defaults(handler=_check_command.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradkit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
