"""Seed 003: Theano's derivative tutorial, number by number, in JAX with gradkit.derivatives.

The post computed, with Theano: the gradient of x² + x³ + x⁴ and of the logistic function and
read them as formulas from a compiled graph; Jacobians (by a scan over output rows and directly);
Hessians (the same two ways); the R- and L-operators (Jacobian times a vector and a vector times
a Jacobian); and Hessian-vector products two ways. This script does each with JAX and gradkit,
prints the value next to the one the post printed, and reads the derivatives as formulas with
``gradkit.derivatives.expression`` instead of decoding ``Elemwise{Composite{...}}``.

Run: ``python examples/derivatives_tour.py --out DIR``. It writes ``logistic_derivative.png``
(the logistic function, its derivative from ``jax.grad`` and from the printed formula) under DIR,
prints ``Verdict:`` lines, and exits 0 only if every value and formula matches the post.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

# The post used Theano's double-precision types (T.dscalar, T.dvector, T.dmatrix).
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import sympy  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradkit.derivatives import Lop, Rop, expression, hessian, hvp, jacobian  # noqa: E402

CHECKS: list[tuple[str, bool]] = []


def show(
    title: str, code: str, ours, theano, ok: bool | None = None, source: str = "Theano post"
) -> None:
    """Prints one result next to the post's (or another reference), and records the agreement."""
    if ok is None:
        ok = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(_as_list(ours), _as_list(theano), strict=True)
        )
    CHECKS.append((title, ok))
    print(f"\n{title}\n  {code}")
    print(f"  gradkit/JAX : {_format(ours)}")
    print(f"  {source:<11} : {_format(theano)}")
    print(f"  {'same' if ok else 'DIFFERENT'}")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _format(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    return np.array2string(array, separator=", ").replace("\n", "") if array.ndim else str(array)


def polynomial(x):
    return x**2 + x**3 + x**4


def logistic(x):
    return 1 / (1 + jnp.exp(-x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the plot")
    out_dir = Path(parser.parse_args(argv).out)
    out_dir.mkdir(parents=True, exist_ok=True)

    x_sym = sympy.Symbol("x", real=True)
    sigmoid_x = expression(jax.nn.sigmoid, 1.0).sympy  # gradkit's sympy sigmoid(x)

    print("== 1. Gradients, read as formulas (Theano: pp(f.maker.fgraph.outputs[0]))")
    grad_formula = expression(jax.grad(polynomial), 1.0)
    theano_poly = 2 * x_sym + 3 * x_sym**2 + 4 * (x_sym**2) * x_sym
    show(
        "d/dx (x**2 + x**3 + x**4)",
        "expression(jax.grad(polynomial), 1.0)",
        str(grad_formula),
        "2*x+3*x^2+4*(x^2)*x   (decoded by hand from Elemwise{Composite{...}})",
        ok=sympy.expand(grad_formula.sympy - theano_poly) == 0,
    )
    at = 2.0
    show(
        "its value at x = 2 (jax.grad vs the formula)",
        "jax.grad(polynomial)(2.0), grad_formula.evaluate(2.0)",
        float(jax.grad(polynomial)(at)),
        float(grad_formula.evaluate(at)),
        source="formula",
    )
    logistic_formula = expression(jax.grad(logistic), 1.0)
    theano_logistic = sigmoid_x.subs(x_sym, -x_sym) * sigmoid_x
    show(
        "d/dx 1/(1 + exp(-x))",
        "expression(jax.grad(logistic), 1.0)",
        str(logistic_formula),
        "sigmoid(-x)*sigmoid(x)   (the same function: sigmoid(-x) = 1 - sigmoid(x))",
        ok=sympy.simplify((logistic_formula.sympy - theano_logistic).rewrite(sympy.exp)) == 0,
    )
    show(
        "the logistic itself, as written by hand",
        "expression(logistic, 1.0)",
        str(expression(logistic, 1.0)),
        "sigmoid(x)",
        ok=str(expression(logistic, 1.0)) == "sigmoid(x)",
        source="expected",
    )

    print("\n== 2. Jacobians")
    x44 = jnp.array([4.0, 4.0])

    def square(x):
        return x**2

    def rows_by_scan(f, x):
        # Theano's indirect way: one gradient per output row, looped with scan.
        y_size = f(x).shape[0]
        return jax.lax.map(lambda i: jax.grad(lambda x: f(x)[i])(x), jnp.arange(y_size))

    expected = np.array([[8.0, 0.0], [0.0, 8.0]])
    show(
        "Jacobian of x**2 at [4, 4], scan over rows",
        "lax.map(grad(y[i]))",
        rows_by_scan(square, x44),
        expected,
    )
    show(
        "Jacobian of x**2 at [4, 4], direct", "jacobian(square)(x)", jacobian(square)(x44), expected
    )

    def s(x, y):
        return jnp.sum(x**2 + y**2)

    x12 = jnp.array([1.0, 2.0])
    show(
        "jacobian of sum(x**2 + y**2) wrt [x, y] at x = y = [1, 2]",
        "jacobian(s, argnums=(0, 1))(x, y)",
        list(jacobian(s, argnums=(0, 1))(x12, x12)),
        [np.array([2.0, 4.0]), np.array([2.0, 4.0])],
    )

    print("\n== 3. Hessians")

    def cost(x):
        return jnp.sum(x**2)

    two_eye = np.array([[2.0, 0.0], [0.0, 2.0]])
    show(
        "Hessian of sum(x**2) at [4, 4], scan over rows of the gradient",
        "lax.map(grad(grad(cost)(x)[i]))",
        rows_by_scan(jax.grad(cost), x44),
        two_eye,
    )
    show("Hessian of sum(x**2) at [4, 4], direct", "hessian(cost)(x)", hessian(cost)(x44), two_eye)
    blocks = hessian(s, argnums=(0, 1))(x12, x12)
    show(
        "hessian of sum(x**2 + y**2) wrt [x, y] (Theano returns the diagonal blocks)",
        "H = hessian(s, argnums=(0, 1))(x, y); [H[0][0], H[1][1]]",
        [blocks[0][0], blocks[1][1]],
        [two_eye, two_eye],
    )
    show(
        "  ... and the off-diagonal blocks Theano left out",
        "[H[0][1], H[1][0]]",
        [blocks[0][1], blocks[1][0]],
        [np.zeros((2, 2)), np.zeros((2, 2))],
        source="expected",
    )

    print("\n== 4. R-operator (J v) and L-operator (v J) of y = x . W with respect to W")
    W = jnp.array([[1.0, 1.0], [1.0, 1.0]])
    V = jnp.array([[2.0, 2.0], [2.0, 2.0]])
    x01 = jnp.array([0.0, 1.0])

    def x_dot_w(x, W):
        return x @ W

    show(
        "Rop(y, W, V) with W = ones, V = 2s, x = [0, 1]",
        "Rop(x_dot_w, (x, W), V, argnums=1)",
        Rop(x_dot_w, (x01, W), V, argnums=1),
        np.array([2.0, 2.0]),
    )
    show(
        "Lop(y, W, v) with v = [2, 2], x = [0, 1]",
        "Lop(x_dot_w, (x, W), v, argnums=1)",
        Lop(x_dot_w, (x01, W), jnp.array([2.0, 2.0]), argnums=1),
        np.array([[0.0, 0.0], [2.0, 2.0]]),
    )

    print("\n== 5. Hessian-vector products of sum(x**2) at x = [4, 4], v = [2, 2]")
    v22 = jnp.array([2.0, 2.0])
    method_one = jax.grad(lambda x: jnp.sum(jax.grad(cost)(x) * v22))(x44)
    method_two = Rop(jax.grad(cost), x44, v22)
    show(
        "method 1: grad of sum(grad * v)",
        "jax.grad(lambda x: jnp.sum(jax.grad(cost)(x) * v))(x)",
        method_one,
        np.array([4.0, 4.0]),
    )
    show(
        "method 2: Rop of the gradient",
        "Rop(jax.grad(cost), x, v)",
        method_two,
        np.array([4.0, 4.0]),
    )
    show(
        "gradkit.hvp (forward-over-reverse, no Hessian built)",
        "hvp(cost, x, v)",
        hvp(cost, x44, v22),
        np.array([4.0, 4.0]),
    )

    # The plot: the printed formula and jax.grad are the same curve.
    xs = np.linspace(-6.0, 6.0, 241)
    autodiff = np.asarray(jax.vmap(jax.grad(logistic))(jnp.asarray(xs)))
    from_formula = np.array([float(logistic_formula.evaluate(x)) for x in xs[::8]])
    formula_ok = np.allclose(from_formula, autodiff[::8], rtol=1e-12, atol=1e-15)
    CHECKS.append(("formula of the logistic's derivative evaluates to jax.grad", formula_ok))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(xs, np.asarray(logistic(jnp.asarray(xs))), label="logistic(x)")
    axis.plot(xs, autodiff, label="jax.grad(logistic)(x)")
    axis.plot(xs[::8], from_formula, "o", markersize=3, label=f"{logistic_formula}")
    axis.set_xlabel("x")
    axis.legend(fontsize=8)
    axis.set_title("The printed derivative formula is jax.grad's derivative")
    figure.tight_layout()
    plot_path = out_dir / "logistic_derivative.png"
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)
    print(f"\nplot: {plot_path}")

    failed = [title for title, ok in CHECKS if not ok]
    print()
    print(
        f"Verdict: {len(CHECKS) - len(failed)} of {len(CHECKS)} results match the Theano post "
        "or their reference (gradient formulas, Jacobians, Hessians, Rop, Lop, "
        "Hessian-vector products)" + (f"; DIFFERENT: {', '.join(failed)}" if failed else "")
    )
    print(
        f"Verdict: d/dx(x**2 + x**3 + x**4) reads {grad_formula}; d/dx logistic(x) reads "
        f"{logistic_formula}, which is Theano's sigmoid(-x)*sigmoid(x)"
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
