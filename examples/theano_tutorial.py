"""Seed 001: the Theano tutorial (Colin Raffel's), toured in pure JAX with gradkit.

Each section of the tutorial has its JAX counterpart here: symbolic variables and compiled
functions become plain Python functions and ``jax.jit``; shared variables with ``updates``
become state passed through a pure function; ``T.grad`` and ``theano.gradient.jacobian`` become
``jax.grad`` and ``jax.jacobian``; test values become shape errors raised while tracing that name
the layer and your line; ``DebugMode`` becomes ``jax_debug_nans`` (and gradkit.diagnostics'
``find_nan_origin``); ``floatX`` becomes JAX's float32 default and ``jax.enable_x64``.

Then the tutorial's example: an MLP with layer sizes [2, 4, 1], sigmoid activations and a squared
error cost, trained for 20 full-batch iterations with learning rate 0.01 and momentum 0.9 on two
Gaussian clusters (N = 1000), written with ``gradkit.layers.MLP``, ``gradkit.training.fit`` and
``gradkit.training.tutorial_momentum``. The data and initial weights come from NumPy's legacy
``RandomState(0)`` exactly as the tutorial draws them. The script checks that cost and accuracy
after every iteration match a plain-NumPy implementation of the same update rule (float64,
backpropagation written out by hand) on the same data.

Run:  python examples/theano_tutorial.py --out DIR
Writes DIR/decision_surface.png, DIR/cost_curve.png, DIR/output_per_iteration.png,
DIR/history.png; prints ``Verdict:`` lines; exits 0 only if every check passes.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gradkit import diagnostics
from gradkit.layers import MLP, Dense
from gradkit.training import fit, tutorial_momentum

N = 1000
LAYER_SIZES = [2, 4, 1]
LEARNING_RATE = 0.01
MOMENTUM = 0.9
ITERATIONS = 20

CHECKS: list[tuple[str, bool]] = []


def check(description: str, ok: bool) -> bool:
    """Records one check of the tour; the exit status is 0 only if all of them pass."""
    CHECKS.append((description, bool(ok)))
    print(f"  [{'ok' if ok else 'WRONG'}] {description}")
    return bool(ok)


def heading(title: str) -> None:
    print(f"\n== {title}")


# ---------------------------------------------------------------------------------------------
# The tour
# ---------------------------------------------------------------------------------------------


def basics() -> None:
    heading("Symbolic variables and functions -> Python functions, compiled by jax.jit")

    def square(foo):
        return foo**2

    f = jax.jit(square)  # theano.function([foo], bar)
    print("jaxpr of foo**2 (the analogue of theano.pp):", jax.make_jaxpr(square)(3.0))
    print("f(3) =", float(f(3.0)))
    check("f(3) = 9", float(f(3.0)) == 9.0)

    heading("Several outputs and a default argument (theano.Param(b, default=...))")

    b_default = jnp.zeros(2)

    @jax.jit
    def linear_mix(A, x, b=b_default):
        return A @ x + b, jnp.sum(A**2)

    A = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x = jnp.array([1.0, 2.0, 3.0])
    y, z = linear_mix(A, x, jnp.array([4.0, 5.0]))
    y0, z0 = linear_mix(A, x)
    print("linear_mix(A, x, b) =", y.tolist(), float(z), "  with the default b:", y0.tolist())
    check("A x + b = [18, 37], sum(A**2) = 91", y.tolist() == [18.0, 37.0] and float(z) == 91.0)
    check("with the default b = 0: [14, 32]", y0.tolist() == [14.0, 32.0] and float(z0) == 91.0)


def shared_state() -> None:
    heading("Shared variables and updates -> state passed to and returned by pure functions")
    shared_var = jnp.array([[3.0, 4.0], [2.0, 1.0]])  # shared_var.set_value(...)

    def function_1(state):  # theano.function([], shared_var**2)
        return state**2

    @jax.jit
    def function_2(state, subtract):  # updates={shared_var: shared_var - subtract}
        new_state = state - subtract
        return state, new_state  # (the output, the updated state)

    print("shared_var before:", shared_var.tolist())
    _, shared_var = function_2(shared_var, jnp.ones((2, 2)))
    print("after function_2:", shared_var.tolist(), " function_1():", function_1(shared_var))
    check("state update [[2, 3], [1, 0]]", shared_var.tolist() == [[2.0, 3.0], [1.0, 0.0]])
    check("function_1 sees the new state", function_1(shared_var).tolist() == [[4, 9], [1, 0]])


def gradients() -> None:
    heading("Gradients: T.grad -> jax.grad, theano.gradient.jacobian -> jax.jacobian")
    bar_grad = jax.grad(lambda foo: foo**2)(10.0)
    print("d(foo**2)/dfoo at 10 =", float(bar_grad))
    check("grad of foo**2 at 10 is 20", float(bar_grad) == 20.0)
    A = jnp.array([[9.0, 8.0, 7.0], [4.0, 5.0, 6.0]])
    jacobian = jax.jacobian(lambda x: A @ x + jnp.array([4.0, 5.0]))(jnp.array([1.0, 2.0, 3.0]))
    print("jacobian of A x + b with respect to x:\n", np.asarray(jacobian))
    check("the jacobian of the linear mix is A", bool(jnp.array_equal(jacobian, A)))


def shape_errors() -> None:
    heading("Test values -> shape errors raised while tracing, naming the line")
    this_file = Path(__file__).name
    A, B = jnp.zeros((3, 4)), jnp.zeros((5, 6))
    try:
        jax.jit(lambda A, B: jnp.dot(A, B))(A, B)  # the faulty line
    except TypeError as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == __file__]
        print("jnp.dot of (3, 4) and (5, 6):", str(error).splitlines()[0])
        print(f"  raised while tracing, at {this_file}:{frames[-1].lineno}: {frames[-1].line}")
        check("jnp.dot shape mismatch is caught at trace time", "jnp.dot(A, B)" in frames[-1].line)
    else:
        check("jnp.dot shape mismatch is caught at trace time", False)

    # The tutorial keeps examples as columns, X of shape (2, N); gradkit's layers take the
    # features on the last axis. Passing the Theano layout is caught before anything runs:
    mlp = MLP(LAYER_SIZES, "sigmoid", final_activation="sigmoid")
    params = mlp.init(jax.random.key(0))
    X_theano_layout = jnp.zeros((2, N))
    try:
        jax.jit(mlp.apply)(params, X_theano_layout)  # the faulty line
    except ValueError as error:
        print("MLP on the (2, N) Theano layout:", error)
        message = str(error)
        check(
            "the layer error names the layer, both shapes and this line",
            "'dense_0'" in message
            and "(..., 2)" in message
            and f"(2, {N})" in message
            and f"{this_file}:" in message
            and "jax.jit(mlp.apply)(params, X_theano_layout)" in message,
        )
    else:
        check("the layer error names the layer, both shapes and this line", False)
    try:
        Dense(3, name="hidden").apply(Dense(3).init(jax.random.key(0), 4), jnp.ones(5))
    except ValueError as error:
        print("Dense:", error)


def nan_debugging() -> None:
    heading("DebugMode for NaN -> jax_debug_nans, and find_nan_origin")

    def divide(num, den):
        return num / den

    compiled = jax.jit(divide)
    zero = jnp.float32(0.0)
    print("divide(10, 2) =", float(compiled(10.0, 2.0)), "  divide(0, 0) =", compiled(zero, zero))
    check("without checks, 0/0 is a silent nan", bool(jnp.isnan(compiled(zero, zero))))
    try:
        with jax.debug_nans(True):
            jax.jit(divide)(zero, zero)
    except FloatingPointError as error:
        print("with jax.debug_nans(True):", str(error).splitlines()[0])
        check("jax_debug_nans turns the nan into an error", True)
    else:
        check("jax_debug_nans turns the nan into an error", False)
    report = diagnostics.find_nan_origin(divide, zero, zero)
    print(report)
    check("find_nan_origin names the division", report.found and "div" in str(report.first))


def float_x() -> None:
    heading("floatX -> float32 by default, float64 under jax.enable_x64")
    var = jnp.asarray(np.array([1.3, 2.4]))  # NumPy's float64, converted by JAX
    params = MLP(LAYER_SIZES, "sigmoid").init(jax.random.key(0))
    print(
        "np.array([1.3, 2.4]) in JAX:",
        var.dtype,
        "  MLP params:",
        params["dense_0"]["kernel"].dtype,
    )
    with jax.enable_x64(True):
        var64 = jnp.asarray(np.array([1.3, 2.4]))
        params64 = MLP(LAYER_SIZES, "sigmoid").init(jax.random.key(0))
        print("under jax.enable_x64(True):", var64.dtype, params64["dense_0"]["kernel"].dtype)
    half = Dense(4, param_dtype=jnp.float16).init(jax.random.key(0), 2)["kernel"].dtype
    print("Dense(4, param_dtype=float16) params:", half)
    check(
        "float32 by default, float64 under x64, param_dtype overrides",
        var.dtype == jnp.float32
        and params["dense_0"]["kernel"].dtype == jnp.float32
        and var64.dtype == jnp.float64
        and params64["dense_0"]["kernel"].dtype == jnp.float64
        and half == jnp.float16,
    )


# ---------------------------------------------------------------------------------------------
# The MLP example
# ---------------------------------------------------------------------------------------------


def tutorial_data() -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The tutorial's clusters and initial weights, drawn as it draws them (RandomState(0)).

    The tutorial's ``np.random.random_integers(0, 1, N)`` is gone from NumPy; it was implemented
    as ``randint(0, 1 + 1, N)``, so ``randint(0, 2, N)`` draws exactly the same labels.

    Returns:
      ``X`` (2, N) float64 (examples as columns, as in the tutorial), ``y`` (N,), and the
      weights ``W`` (out, in) and biases ``b`` (out,) of each layer.
    """
    rng = np.random.RandomState(0)
    y = rng.randint(0, 2, N)
    means = np.array([[-1, 1], [-1, 1]])
    covariances = rng.random_sample((2, 2)) + 1
    X = np.vstack(
        [
            rng.randn(N) * covariances[0, y] + means[0, y],
            rng.randn(N) * covariances[1, y] + means[1, y],
        ]
    )
    W_init, b_init = [], []
    for n_input, n_output in itertools.pairwise(LAYER_SIZES):
        W_init.append(rng.randn(n_output, n_input))
        b_init.append(np.ones(n_output))
    return X, y.astype(np.float64), W_init, b_init


def numpy_reference(X, y, W_init, b_init):
    """The tutorial's training in float64 NumPy with hand-written backpropagation."""

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    Ws = [W.copy() for W in W_init]
    bs = [b.reshape(-1, 1).copy() for b in b_init]
    velocities = [np.zeros_like(p) for p in Ws + bs]
    costs, accuracies = [], []
    for _ in range(ITERATIONS):
        activations = [X]
        for W, b in zip(Ws, bs, strict=True):
            activations.append(sigmoid(W @ activations[-1] + b))
        output = activations[-1]
        costs.append(np.sum((output - y) ** 2))
        delta = 2.0 * (output - y) * output * (1.0 - output)
        grads_W, grads_b = [None] * len(Ws), [None] * len(Ws)
        for layer in reversed(range(len(Ws))):
            grads_W[layer] = delta @ activations[layer].T
            grads_b[layer] = delta.sum(axis=1, keepdims=True)
            if layer:
                a = activations[layer]
                delta = (Ws[layer].T @ delta) * a * (1.0 - a)
        params, grads = Ws + bs, grads_W + grads_b
        for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
            param -= LEARNING_RATE * velocities[i]  # param - learning_rate * param_update
            velocities[i] = MOMENTUM * velocities[i] + (1.0 - MOMENTUM) * grad
        output = X
        for W, b in zip(Ws, bs, strict=True):
            output = sigmoid(W @ output + b)
        accuracies.append(np.mean((output > 0.5) == y))
    return np.array(costs), np.array(accuracies)


def train_with_gradkit(X, y, W_init, b_init):
    mlp = MLP(LAYER_SIZES, "sigmoid", final_activation="sigmoid")
    # gradkit's kernels are (in, out) and act on rows: the tutorial's W transposed.
    params = {
        layer.name: {"kernel": jnp.asarray(W.T), "bias": jnp.asarray(b)}
        for layer, W, b in zip(mlp.layers, W_init, b_init, strict=True)
    }
    structure = jax.tree_util.tree_structure(mlp.init(jax.random.key(0)))
    assert jax.tree_util.tree_structure(params) == structure
    inputs, targets = jnp.asarray(X.T), jnp.asarray(y)  # float32: gradkit's default

    def squared_error(params, batch):
        x, target = batch
        return jnp.sum((mlp.apply(params, x)[:, 0] - target) ** 2)

    output = jax.jit(lambda params: mlp.apply(params, inputs)[:, 0])
    snapshots = []  # the network output after each iteration, as the tutorial plots it

    def accuracy(params):
        current_output = output(params)
        snapshots.append(np.asarray(current_output))
        return jnp.mean((current_output > 0.5) == (targets > 0.5))

    state, history = fit(
        squared_error,
        params,
        (inputs, targets),
        tutorial_momentum(LEARNING_RATE, MOMENTUM),
        steps=ITERATIONS,
        shuffle=False,  # full batch, in order, as the tutorial trains
        eval_fn=lambda p: {"accuracy": accuracy(p)},
        eval_every=1,
        progress=False,
    )
    return mlp, state, history, snapshots


def plots(out: Path, mlp, params, X, y, costs, accuracies, reference, snapshots, history) -> None:
    grid = np.linspace(-6, 6, 241)
    xx, yy = np.meshgrid(grid, grid)
    surface = np.asarray(mlp.apply(params, jnp.asarray(np.c_[xx.ravel(), yy.ravel()])))
    figure, axis = plt.subplots(figsize=(6.5, 6))
    contour = axis.contourf(
        xx, yy, surface.reshape(xx.shape), levels=np.linspace(0, 1, 21), cmap="cool", alpha=0.6
    )
    axis.contour(xx, yy, surface.reshape(xx.shape), levels=[0.5], colors="k", linewidths=1.5)
    axis.scatter(X[0], X[1], c=y, cmap="cool", s=4, lw=0.3, edgecolors="k")
    axis.set(
        xlim=(-6, 6),
        ylim=(-6, 6),
        title=(
            f"Network output after {ITERATIONS} iterations "
            f"(cost {costs[-1]:.1f}, accuracy {accuracies[-1]:.3f})"
        ),
    )
    figure.colorbar(contour, ax=axis, label="MLP output (decision boundary at 0.5)")
    figure.tight_layout()
    figure.savefig(out / "decision_surface.png", dpi=90)
    plt.close(figure)

    iterations = np.arange(1, ITERATIONS + 1)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    top.plot(iterations, costs, "o-", label="gradkit (float32)")
    top.plot(iterations, reference[0], "x--", label="plain NumPy (float64)")
    top.set(ylabel="cost (sum of squared errors)", title="Seed 001: training with momentum")
    top.legend()
    bottom.plot(iterations, accuracies, "o-", label="gradkit (float32)")
    bottom.plot(iterations, reference[1], "x--", label="plain NumPy (float64)")
    bottom.set(xlabel="iteration", ylabel="accuracy")
    bottom.legend()
    figure.tight_layout()
    figure.savefig(out / "cost_curve.png", dpi=90)
    plt.close(figure)

    figure, axes = plt.subplots(4, 5, figsize=(12, 10), sharex=True, sharey=True)
    for index, (axis, output) in enumerate(zip(axes.ravel(), snapshots, strict=True)):
        axis.scatter(X[0], X[1], c=output, cmap="cool", s=2, lw=0, vmin=0, vmax=1)
        axis.set(xlim=(-6, 6), ylim=(-6, 6))
        axis.set_title(
            f"{index + 1}: cost {costs[index]:.0f}, acc {accuracies[index]:.3f}", fontsize=8
        )
    figure.tight_layout()
    figure.savefig(out / "output_per_iteration.png", dpi=70)
    plt.close(figure)
    history.plot(path=out / "history.png")
    plt.close("all")


def mlp_example(out: Path) -> None:
    heading(
        f"The tutorial's MLP: N = {N}, layer sizes {LAYER_SIZES}, sigmoid, squared error, "
        f"learning rate {LEARNING_RATE}, momentum {MOMENTUM}, {ITERATIONS} full-batch iterations"
    )
    X, y, W_init, b_init = tutorial_data()
    mlp, state, history, snapshots = train_with_gradkit(X, y, W_init, b_init)
    costs, accuracies = history["loss"], history.eval_metrics["accuracy"]
    reference_costs, reference_accuracies = numpy_reference(X, y, W_init, b_init)

    print(f"{'iteration':>9} {'cost':>10} {'accuracy':>9}   {'NumPy cost':>10} {'NumPy acc':>9}")
    for i in range(ITERATIONS):
        print(
            f"{i + 1:>9} {costs[i]:>10.3f} {accuracies[i]:>9.3f}   "
            f"{reference_costs[i]:>10.3f} {reference_accuracies[i]:>9.3f}"
        )
    cost_error = float(np.max(np.abs(costs - reference_costs) / reference_costs))
    accuracy_error = float(np.max(np.abs(accuracies - reference_accuracies)))
    print(
        f"max relative cost difference {cost_error:.2e}, max accuracy difference "
        f"{accuracy_error:.4f} (1/N = {1 / N})"
    )
    ok_costs = check("cost matches NumPy at every iteration (rtol 1e-4)", cost_error < 1e-4)
    ok_accuracy = check(
        "accuracy matches NumPy at every iteration (within 1/N)", accuracy_error <= 1.0 / N
    )
    check(
        "the first iteration does not move the parameters (the velocity starts at 0)",
        costs[1] == costs[0],
    )
    check(
        "training helps, though not monotonically (as the tutorial warns)",
        costs[-1] < costs[0] and accuracies[-1] > accuracies[0],
    )
    plots(
        out,
        mlp,
        state.params,
        X,
        y,
        costs,
        accuracies,
        (reference_costs, reference_accuracies),
        snapshots,
        history,
    )
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.png')))} to {out}")
    if ok_costs and ok_accuracy:
        print(
            f"Verdict: gradkit.fit with tutorial_momentum reproduces the tutorial's MLP training: "
            f"cost and accuracy match plain NumPy at all {ITERATIONS} iterations "
            f"(max relative cost difference {cost_error:.1e}, max accuracy difference "
            f"{accuracy_error:.3f}); final accuracy {accuracies[-1]:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="theano_tutorial_output", help="folder for the PNGs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    basics()
    shared_state()
    gradients()
    shape_errors()
    nan_debugging()
    float_x()
    tour_ok = all(ok for _, ok in CHECKS)
    if tour_ok:
        print(
            "\nVerdict: the Theano tour works in pure JAX with gradkit: compiled functions, "
            "state updated by pure functions, grad and jacobian, shape errors that name the "
            "layer and your line, NaNs caught, float32 by default and float64 under x64"
        )
    mlp_example(out)
    failed = [description for description, ok in CHECKS if not ok]
    if failed:
        print(f"Verdict: WRONG: {len(failed)} check(s) failed: {'; '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
