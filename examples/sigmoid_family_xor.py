"""Seed 000: Theano's hard_sigmoid "trains XOR to nowhere" and ultra_fast_sigmoid has no gradient.

The network of the post: 2 inputs + bias -> 3 hidden units + bias -> 1 output, weights theta1
(3, 3) and theta2 (4, 1) (``params["hidden"]``, ``params["output"]``) drawn like
``np.random.rand`` (uniform on [0, 1)), the same activation in both layers, binary
cross-entropy, plain per-sample gradient descent with learning rate 0.1, 4000 epochs over the four
XOR patterns, float64 as in the post (``T.dvector``).

It is trained from many random initialisations at once (``vmap`` over inits, ``lax.scan`` over
epochs) with:

- sigmoid;
- ultra_fast_sigmoid, which gradkit gives a derivative (Theano raised ``MethodNotDefined``);
- hard_sigmoid with Theano's constants (slope 0.2), the one that did not converge;
- hard_sigmoid forward with surrogate gradients (sigmoid's derivative, and a scaled one);
- a control: hard_sigmoid whose flat parts are given a gradient, keeping the true slope inside.

and it reports, per variant, how many inits learn XOR, the cost trajectory of a representative
init, its final predictions, and where the pre-activations sat relative to the activation's
zero-gradient region (``gradkit.activations.get(name).zero_grad_mask``). The representative
trained network (and, for hard_sigmoid, the first dead one) then goes through
``gradkit.diagnostics.diagnose`` on the four patterns: the network marks its layer boundaries
with ``layer_boundary``, and diagnose's per-layer zero-gradient and saturation numbers are
printed next to the example's own counts, which they must equal.

Run: ``python examples/sigmoid_family_xor.py --out DIR`` (writes ``DIR/xor_cost.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from gradkit import activations
from gradkit.diagnostics import diagnose, layer_boundary

jax.config.update("jax_enable_x64", True)  # the post trains in float64

PATTERNS = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
TARGETS = np.array([1.0, 1.0, 0.0, 0.0])
LEARNING_RATE = 0.1
EPOCHS = 4000
PRINT_EVERY = 500
# Keras clips probabilities the same way before the cross-entropy: a hard sigmoid can output
# exactly 0 or 1, where log() would give an infinite cost and NaN gradients.
PROBABILITY_EPSILON = 1e-7
THEANO_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of training the network.

    Attributes:
      label: what the output calls it.
      activation: the activation used in both layers (its derivative is what training uses).
      forward: the activation whose *values* the network computes; its zero-gradient region is
        where the true derivative would vanish.
    """

    label: str
    activation: activations.Activation
    forward: activations.Activation


def _flat_tail_surrogate(x):
    """Theano hard_sigmoid's slope 0.2 inside [-2.5, 2.5], plus gradient in the flat parts.

    Its derivative is 0.2 on (-2.5, 2.5) and 0.2 exp(-(|x| - 2.5)) outside: the true derivative,
    except that saturated units still get a (decaying) gradient.
    """
    inside = THEANO_SLOPE * activations.hard_tanh(x / 2.5) * 2.5
    outside = activations.relu(jnp.abs(x) - 2.5)
    return inside + jnp.sign(x) * THEANO_SLOPE * -jnp.expm1(-outside)


def _scaled_sigmoid(x):
    """1.5 sigmoid(x): derivative 1.5 sigma'(x), peak 0.375 like ultra_fast_sigmoid's."""
    return 1.5 * activations.sigmoid(x)


def make_variants() -> list[Variant]:
    sigmoid = activations.get("sigmoid")
    ultra_fast = activations.get("ultra_fast_sigmoid")
    hard = activations.get("hard_sigmoid", slope=THEANO_SLOPE)
    return [
        Variant("sigmoid", sigmoid, sigmoid),
        Variant("ultra_fast_sigmoid", ultra_fast, ultra_fast),
        Variant("hard_sigmoid (slope 0.2)", hard, hard),
        Variant(
            "hard_sigmoid, gradient of sigmoid",
            activations.with_surrogate_grad(hard, sigmoid),
            hard,
        ),
        Variant(
            "hard_sigmoid, gradient of 1.5*sigmoid",
            activations.with_surrogate_grad(hard, _scaled_sigmoid),
            hard,
        ),
        Variant(
            "control: hard_sigmoid + gradient on flat parts",
            activations.with_surrogate_grad(hard, _flat_tail_surrogate),
            hard,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# The network of the post


def _with_bias(x):
    return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


def forward(params, x, activation):
    """Returns the named pre-activations and the output probability for one pattern ``(2,)``
    or a batch ``(patterns, 2)``.

    The pre-activations are what a gradient-flow diagnosis looks at: ``"hidden"`` (..., 3) and
    ``"output"`` (..., 1). ``layer_boundary(..., apply=True)`` applies the activation and lets
    ``diagnose`` observe each layer (outside diagnose it adds nothing to the computation).
    """
    hidden_pre = _with_bias(x) @ params["hidden"]
    hidden = layer_boundary("hidden", hidden_pre, activation, apply=True)
    output_pre = _with_bias(hidden) @ params["output"]
    p = layer_boundary("output", output_pre, activation, apply=True)[..., 0]
    return {"hidden": hidden_pre, "output": output_pre}, p


def loss_fn(params, x, y, activation):
    """Binary cross-entropy, as Theano's ``binary_crossentropy`` (averaged over a batch)."""
    _, p = forward(params, x, activation)
    p = jnp.clip(p, PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
    return jnp.mean(-(y * jnp.log(p) + (1 - y) * jnp.log(1 - p)))


def train(params, variant: Variant):
    """Per-sample gradient descent for EPOCHS epochs.

    Returns the final parameters and, per epoch, the mean cost over the four patterns (each taken
    before its update, like the post's ``cost`` function) and the fraction of hidden and output
    pre-activations in the zero-gradient region of the derivative used for training and of the
    forward activation.
    """
    value_and_grad = jax.value_and_grad(loss_fn)
    patterns, targets = jnp.asarray(PATTERNS), jnp.asarray(TARGETS)

    def epoch(params, _):
        costs, zero, flat = [], [], []
        for k in range(len(PATTERNS)):
            pre, _ = forward(params, patterns[k], variant.activation)
            zero.append([jnp.mean(variant.activation.zero_grad_mask(pre[n])) for n in pre])
            flat.append([jnp.mean(variant.forward.zero_grad_mask(pre[n])) for n in pre])
            cost, grads = value_and_grad(params, patterns[k], targets[k], variant.activation)
            params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
            costs.append(cost)
        record = {
            "cost": jnp.mean(jnp.stack(costs)),
            "zero_grad": jnp.mean(jnp.asarray(zero), axis=0),  # (hidden, output)
            "flat": jnp.mean(jnp.asarray(flat), axis=0),
        }
        return params, record

    return jax.lax.scan(epoch, params, None, length=EPOCHS)


def initial_params(num_inits: int):
    """``{"hidden": theta1 (inits, 3, 3), "output": theta2 (inits, 4, 1)}``; init i uses
    ``np.random.RandomState(i).rand``."""
    theta1, theta2 = [], []
    for seed in range(num_inits):
        rng = np.random.RandomState(seed)
        theta1.append(rng.rand(3, 3))
        theta2.append(rng.rand(4, 1))
    return {"hidden": jnp.asarray(np.stack(theta1)), "output": jnp.asarray(np.stack(theta2))}


@dataclasses.dataclass
class Outcome:
    """What training one variant from every init produced (arrays over inits)."""

    variant: Variant
    params: dict  # the trained parameters, arrays with a leading inits axis
    cost: np.ndarray  # (inits, epochs)
    zero_grad: np.ndarray  # (inits, epochs, 2): hidden, output
    flat: np.ndarray  # (inits, epochs, 2)
    predictions: np.ndarray  # (inits, 4)
    final_zero_grad: np.ndarray  # (inits, 2)
    final_flat: np.ndarray  # (inits, 2)

    @property
    def learned(self) -> np.ndarray:
        return np.all((self.predictions > 0.5) == (TARGETS > 0.5), axis=1)

    @property
    def xor_contrast(self) -> np.ndarray:
        """p(0,1) + p(1,0) - p(1,1) - p(0,0): exactly 0 for any affine function of the inputs."""
        p = self.predictions
        return p[:, 0] + p[:, 1] - p[:, 2] - p[:, 3]

    def representative(self) -> int:
        """The first init whose outcome (learned or not) is the majority outcome."""
        majority = self.learned.mean() >= 0.5
        return int(np.flatnonzero(self.learned == majority)[0])


def run_variant(variant: Variant, params) -> Outcome:
    final, record = jax.jit(jax.vmap(lambda p: train(p, variant)))(params)

    def final_state(p):
        pre, prob = jax.vmap(lambda x: forward(p, x, variant.activation))(jnp.asarray(PATTERNS))
        zero = [jnp.mean(variant.activation.zero_grad_mask(pre[n])) for n in pre]
        flat = [jnp.mean(variant.forward.zero_grad_mask(pre[n])) for n in pre]
        return prob, jnp.asarray(zero), jnp.asarray(flat)

    predictions, final_zero, final_flat = jax.jit(jax.vmap(final_state))(final)
    return Outcome(
        variant,
        jax.device_get(final),
        np.asarray(record["cost"]),
        np.asarray(record["zero_grad"]),
        np.asarray(record["flat"]),
        np.asarray(predictions),
        np.asarray(final_zero),
        np.asarray(final_flat),
    )


# ---------------------------------------------------------------------------------------------
# Reporting


def print_outcome(outcome: Outcome) -> None:
    n = len(outcome.learned)
    k = outcome.representative()
    print(f"\n== {outcome.variant.label}: learns XOR from {outcome.learned.sum()} of {n} inits")
    status = "learned" if outcome.learned[k] else "did not learn"
    print(f"   init #{k} ({status}, like the majority): mean cost over the 4 patterns")
    for epoch in [*range(0, EPOCHS, PRINT_EVERY), EPOCHS - 1]:
        print(f"     epoch {epoch:4d}  cost {outcome.cost[k, epoch]:.6f}")
    for pattern, p in zip(PATTERNS, outcome.predictions[k], strict=True):
        print(f"     predict {pattern.astype(int).tolist()} -> {p:.6f}")
    zero = 100 * outcome.zero_grad
    print(
        "   pre-activations in the zero-gradient region of the derivative used for training "
        "(mean over inits; hidden / output):"
    )
    print(
        f"     at init {zero[:, 0, 0].mean():5.1f}% / {zero[:, 0, 1].mean():5.1f}%;"
        f" during training {zero[:, :, 0].mean():5.1f}% / {zero[:, :, 1].mean():5.1f}%;"
        f" at the end {100 * outcome.final_zero_grad[:, 0].mean():5.1f}% /"
        f" {100 * outcome.final_zero_grad[:, 1].mean():5.1f}%"
    )
    if outcome.variant.forward is not outcome.variant.activation:
        print(
            "     on hard_sigmoid's flat parts (where its true derivative is 0) at the end: "
            f"{_percent(outcome.final_flat.mean(axis=1), outcome.learned)}"
        )


LAYERS = ("hidden", "output")


def diagnose_trained(outcome: Outcome, init: int, try_fixes: bool):
    """gradkit.diagnostics.diagnose on the trained network of ``init``, over the four patterns."""
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf[init]), outcome.params)
    patterns, targets = jnp.asarray(PATTERNS), jnp.asarray(TARGETS)
    return diagnose(
        loss_fn, params, patterns, targets, outcome.variant.activation, try_fixes=try_fixes
    )


def print_diagnosis(outcome: Outcome, init: int, report, why: str) -> None:
    """Prints diagnose's per-layer numbers next to the example's own counts for ``init``."""
    print(f"   gradkit.diagnostics.diagnose on init #{init} ({why}), on the 4 patterns:")
    print("     layer   f' = 0: diagnose / this example  saturated  grad norm  verdict")
    for j, name in enumerate(LAYERS):
        layer = report.layer(name)
        saturated = layer.saturated_fraction
        saturated = "-" if saturated is None else f"{100 * saturated:.1f}%"
        print(
            f"     {name:6s}  {100 * layer.zero_grad_fraction:5.1f}% / "
            f"{100 * outcome.final_zero_grad[init, j]:5.1f}%{saturated:>21s}  "
            f"{layer.grad_norm:9.2e}  {', '.join(layer.symptoms) or 'ok'}"
        )
    clipped = bool(np.all(np.isin(outcome.predictions[init], (0.0, 1.0))))
    if clipped and report.flagged("no gradient"):
        print(
            "     (its outputs are exactly 0 or 1, where the loss's clip of p to "
            f"[{PROBABILITY_EPSILON:g}, 1 - {PROBABILITY_EPSILON:g}] has derivative 0 too: no "
            "derivative of the activation alone can give this network a gradient)"
        )
    if outcome.learned[init]:
        return
    for finding in report.findings:
        print(f"     * {finding.message}")
    for rank, rec in enumerate(report.recommendations, 1):
        left = "; ".join(rec.remaining) if rec.remaining else "no symptom left"
        change = rec.change_text() or "unchanged"
        print(f"     fix {rank}. {rec.name}: gradient norm {change}; {left}")


def diagnosis_agrees(outcome: Outcome, init: int, report, saturation_is_flat: bool) -> bool:
    """diagnose's zero-gradient fractions equal the example's own counts; with
    ``saturation_is_flat`` (hard_sigmoid, whose slope is 0.2 or 0) so do its saturated fractions
    and the counts on the flat parts."""
    for j, name in enumerate(LAYERS):
        layer = report.layer(name)
        if abs(layer.zero_grad_fraction - outcome.final_zero_grad[init, j]) > 1e-12:
            return False
        if saturation_is_flat and (
            layer.saturated_fraction is None
            or abs(layer.saturated_fraction - outcome.final_flat[init, j]) > 1e-12
        ):
            return False
    return True


def _percent(values: np.ndarray, learned: np.ndarray) -> str:
    parts = []
    for name, which in (("inits that learned", learned), ("inits that did not", ~learned)):
        if which.any():
            parts.append(f"{100 * values[which].mean():.0f}% for {name}")
    return ", ".join(parts)


def theano_answer_demo() -> tuple[np.ndarray, np.ndarray]:
    """The accepted answer's demo: y = hard_sigmoid(w * x) at w = 1, and dy/dw."""
    xs = jnp.asarray([-3.0, -1.0, 0.0, 1.0, 3.0, -2.5, 2.5])

    def y(w, x):
        return activations.hard_sigmoid(w * x, slope=THEANO_SLOPE)

    values = jax.vmap(lambda x: y(1.0, x))(xs)
    slopes = jax.vmap(jax.grad(y), in_axes=(None, 0))(1.0, xs)
    print("\nThe answer's demo, y = hard_sigmoid(w*x) with slope 0.2 at w = 1:")
    for x, v, d in zip(np.asarray(xs), np.asarray(values), np.asarray(slopes), strict=True):
        print(f"   x = {x:+.1f}:  y = {v:.1f}  dy/dw = {d:+.1f}")
    print(
        "   (gradkit's derivative at the boundaries x = +-2.5 is 0: the flat region is closed, "
        "as in jax.nn and PyTorch; Theano's clip passed the slope 0.2 there, dy/dw = +-0.5.)"
    )
    return np.asarray(values), np.asarray(slopes)


def plot(outcomes: list[Outcome], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    epochs = np.arange(EPOCHS)
    for outcome in outcomes:
        median = np.median(outcome.cost, axis=0)
        label = f"{outcome.variant.label} ({outcome.learned.sum()}/{len(outcome.learned)})"
        ax.plot(epochs, median, label=label)
    ax.axhline(math.log(2), color="gray", linestyle=":", label="ln 2 (all outputs 0.5)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("median cost over inits")
    ax.set_title("XOR, per-sample gradient descent (inits that learn XOR in brackets)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the plot")
    parser.add_argument("--inits", type=int, default=64, help="random initialisations")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    grad_at_zero = float(jax.grad(activations.ultra_fast_sigmoid)(0.0))
    print(f"ultra_fast_sigmoid now has a gradient: d/dx at x = 0 is {grad_at_zero} (sigmoid: 0.25)")
    demo_values, demo_slopes = theano_answer_demo()

    params = initial_params(args.inits)
    outcomes = [run_variant(variant, params) for variant in make_variants()]
    sigmoid, ultra_fast, hard, surrogate, scaled, control = outcomes
    n = args.inits

    # Why hard_sigmoid stalls, run by run: either the output unit starts saturated for all four
    # patterns (no gradient reaches any weight, nothing ever changes), or every pre-activation is
    # on the linear piece, where the network is an affine function of its inputs.
    failed = ~hard.learned
    dead = failed & (hard.final_zero_grad[:, 1] == 1.0) & (hard.cost[:, 0] == hard.cost[:, -1])
    affine = failed & (hard.final_zero_grad.max(axis=1) == 0.0)
    affine &= np.abs(hard.xor_contrast) < 1e-6

    diagnoses = []  # (outcome, init, report): each variant's representative, hard_sigmoid's dead
    for outcome in outcomes:
        print_outcome(outcome)
        k = outcome.representative()
        why = "learned" if outcome.learned[k] else "did not learn"
        if outcome is hard and affine[k]:
            why = f"stuck on the linear piece, like {affine.sum()} of the {failed.sum()} failures"
        report = diagnose_trained(outcome, k, try_fixes=not outcome.learned[k])
        print_diagnosis(outcome, k, report, why)
        diagnoses.append((outcome, k, report))
        if outcome is hard and dead.any():
            k_dead = int(np.flatnonzero(dead)[0])
            report = diagnose_trained(outcome, k_dead, try_fixes=True)
            print_diagnosis(outcome, k_dead, report, f"dead, like {dead.sum()} failure(s)")
            diagnoses.append((outcome, k_dead, report))
    plot(outcomes, out / "xor_cost.png")
    print(f"\nplot: {out / 'xor_cost.png'}")

    def rate(outcome: Outcome) -> float:
        return float(outcome.learned.mean())

    affine_zero = 100 * hard.zero_grad[affine].mean() if affine.any() else 0.0
    hard_reports = {k: report for outcome, k, report in diagnoses if outcome is hard}
    affine_reports = [r for k, r in hard_reports.items() if affine[k]]
    dead_reports = [r for k, r in hard_reports.items() if dead[k]]
    seen = []  # what diagnose said about the stalled hard_sigmoid networks, for the summary
    for k, r in hard_reports.items():
        saturated = " / ".join(f"{100 * la.saturated_fraction:.0f}%" for la in r.layers)
        verdict = "no symptom" if r.ok else ", ".join(f.symptom for f in r.findings)
        kind = "affine" if affine[k] else "dead" if dead[k] else "stalled"
        seen.append(f"{kind} run #{k}: hidden / output {saturated} saturated, {verdict}")
    affine_outputs = hard.predictions[affine]
    flat_used = 100 * scaled.final_flat.mean(axis=1)[scaled.learned].mean()

    checks = {
        "the answer's demo gives y = [0, .3, .5, .7, 1] and dy/dw = [0, -.2, 0, .2, 0]": bool(
            np.allclose(demo_values[:5], [0.0, 0.3, 0.5, 0.7, 1.0])
            and np.array_equal(demo_slopes, [0.0, -0.2, 0.0, 0.2, 0.0, 0.0, 0.0])
        ),
        "ultra_fast_sigmoid'(0) = 0.375": grad_at_zero == 0.375,
        "sigmoid learns from >= 75% of inits": rate(sigmoid) >= 0.75,
        "ultra_fast_sigmoid learns from >= 75% of inits": rate(ultra_fast) >= 0.75,
        "hard_sigmoid learns from <= 10% of inits": rate(hard) <= 0.10,
        ">= 90% of stalled hard_sigmoid runs are either dead (output 100% in the zero-gradient "
        "region, cost never changes) or affine (0% there, XOR contrast < 1e-6)": bool(
            (dead | affine).sum() >= 0.9 * failed.sum()
        ),
        "most stalled runs are affine, with < 1% of pre-activations in the zero-gradient region "
        "during training and outputs within 0.05 of 0.5": bool(
            affine.sum() >= 0.75 * failed.sum()
            and affine_zero < 1.0
            and np.all(np.abs(affine_outputs - 0.5) < 0.05)
        ),
        "diagnose's per-layer zero-gradient fractions equal this example's counts for every "
        "diagnosed network (for hard_sigmoid, its saturated fractions too)": all(
            diagnosis_agrees(outcome, k, report, outcome is hard)
            for outcome, k, report in diagnoses
        ),
        "diagnose finds a stalled affine hard_sigmoid network with 0% of its pre-activations "
        "saturated and no saturation verdict": bool(affine_reports)
        and all(
            all(la.saturated_fraction == 0.0 for la in r.layers) and not r.flagged("saturated")
            for r in affine_reports
        ),
        "diagnose finds a dead hard_sigmoid network's output 100% saturated, with no gradient "
        "(or there is no dead run)": not dead.any()
        or all(
            r.layer("output").saturated_fraction == 1.0
            and "no gradient" in r.layer("hidden").symptoms
            for r in dead_reports
        ),
        "the scaled surrogate learns from >= 75% of inits": rate(scaled) >= 0.75,
        "its solutions put >= 25% of pre-activations on the flat parts": flat_used >= 25.0,
        "the unscaled surrogate learns from fewer inits than the scaled one": (
            rate(surrogate) < rate(scaled)
        ),
        "the control (gradient on the flat parts, constant slope inside) learns <= 10%": (
            rate(control) <= 0.10
        ),
    }

    print(
        f"\nIn short: with the post's network, init and learning rate, sigmoid learns XOR from "
        f"{sigmoid.learned.sum()} of {n} random inits and ultra_fast_sigmoid, which gradkit gives "
        f"a derivative (0.375 at 0, 0 for |x| >= 6), from {ultra_fast.learned.sum()}. "
        f"hard_sigmoid with Theano's slope 0.2 learns from {hard.learned.sum()}. In {dead.sum()} "
        f"of its {failed.sum()} failures the output unit starts on a flat part for all four "
        f"patterns (100% of output pre-activations in the zero-gradient region), so no gradient "
        f"reaches any weight and nothing changes: the answer's explanation. The other "
        f"{affine.sum()} fail the opposite way: only {affine_zero:.2f}% of their pre-activations "
        f"are in the zero-gradient region |x| >= 2.5 during training. Every unit sits on the "
        f"linear piece, so the network is exactly an affine function of its inputs "
        f"(p01 + p10 - p11 - p00 = {np.abs(hard.xor_contrast[affine]).max(initial=0):.1e}), the "
        f"best affine fit to XOR outputs 0.5 everywhere (cost ln 2), and gradient descent goes "
        f"there and stays. gradkit.diagnostics.diagnose on the trained networks agrees "
        f"({'; '.join(seen)}): the affine runs are not saturated, their gradient is small "
        f"because the affine fit is at its optimum, not because it is blocked. Solutions need "
        f"the flat parts ({flat_used:.0f}% of the "
        f"pre-activations of the solutions found below lie there). A surrogate gradient whose "
        f"derivative varies inside the linear piece breaks the affine trap: sigmoid's derivative "
        f"learns from {surrogate.learned.sum()} of {n}, 1.5 x sigmoid's derivative (peak 0.375) "
        f"from {scaled.learned.sum()}. The control that only gives the flat parts a gradient "
        f"learns from {control.learned.sum()}."
    )
    unexplained = failed.sum() - (dead | affine).sum()
    if unexplained:
        print(f"({unexplained} stalled hard_sigmoid run(s) are neither dead nor affine.)")
    print()
    print(
        f"Verdict: sigmoid learns XOR from {sigmoid.learned.sum()}/{n} inits; ultra_fast_sigmoid "
        f"now has a gradient (0.375 at x = 0) and learns from {ultra_fast.learned.sum()}/{n}."
    )
    print(
        f"Verdict: hard_sigmoid (slope 0.2) learns from {hard.learned.sum()}/{n}: {dead.sum()} "
        f"run(s) dead (output 100% in the zero-gradient region), {affine.sum()} stuck on the "
        f"linear piece ({affine_zero:.2f}% in the zero-gradient region; the network is affine, "
        f"outputs 0.5); diagnose: {'; '.join(seen)}."
    )
    print(
        f"Verdict: a surrogate gradient fixes it: hard_sigmoid with 1.5 x sigmoid's derivative "
        f"learns from {scaled.learned.sum()}/{n} (sigmoid's own derivative: "
        f"{surrogate.learned.sum()}/{n}; gradient on the flat parts only: "
        f"{control.learned.sum()}/{n})."
    )
    wrong = [name for name, ok in checks.items() if not ok]
    for name, ok in checks.items():
        print(f"   [{'ok' if ok else 'WRONG'}] {name}")
    if wrong:
        print(f"Verdict: WRONG, {len(wrong)} check(s) failed: {'; '.join(wrong)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
