"""Seed 002: "autodiff and finite differences disagree -- what is going on?"

The author of seed 002 compared Theano's gradients with a hand-written forward difference
(float32, eps = 1e-3) for two networks that compute the same loss: a softmax regression, and the
same layer made recurrent with zero recurrent weights and Lasagne's ``gradient_steps=1``. The
feed-forward gradients roughly agreed; the recurrent ones were 1e-4 of the finite differences, and
nothing said why.

This example runs gradkit's checker on the same three situations:

1. the feed-forward network (W (2, 2), b (2,), mean categorical cross-entropy on random data):
   the check passes in float32, because the finite differences run in float64 with an error bar;
2. the recurrent network with ``gradient_steps=1`` (``gradkit.recurrent.TheanoTail(1)``): the
   check fails, and the localiser explains the mismatch as deliberate truncation, not a bug;
   exact BPTT (``Full()``) gives exactly the feed-forward gradient, as the author expected;
3. a softmax cross-entropy with a deliberately broken ``custom_vjp``: the check fails and the
   localiser names the line of the backward rule that is wrong.

Run: ``python examples/gradient_checker.py --out DIR`` (writes ``DIR/reports.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gradkit import recurrent
from gradkit.diagnostics import check_grads

N_SEQ, N_STEPS, N_FEAT, N_CLASS = 10, 50, 2, 2


def make_data(seed: int = 0):
    """Random sequences and per-step labels, as in the question (fewer steps)."""
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((N_SEQ, N_STEPS, N_FEAT)), jnp.float32)
    ys = jnp.asarray(rng.integers(N_CLASS, size=(N_SEQ, N_STEPS)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((N_FEAT, N_CLASS)), jnp.float32)
    return {"W": w, "b": jnp.zeros(N_CLASS, jnp.float32)}, xs, ys


def cross_entropy(probabilities, labels):
    """Mean categorical cross-entropy, as ``lasagne.objectives.categorical_crossentropy``."""
    picked = jnp.take_along_axis(probabilities, labels[..., None], axis=-1)[..., 0]
    return -jnp.mean(jnp.log(picked))


def feedforward_loss(params, xs, ys):
    """Softmax regression on the n_seq * n_steps feature vectors treated independently."""
    flat = xs.reshape(-1, N_FEAT)
    return cross_entropy(jax.nn.softmax(flat @ params["W"] + params["b"]), ys.reshape(-1))


def recurrent_loss(params, xs, ys, truncate):
    """The same layer made recurrent, with W_rec = 0, over each sequence."""
    w_rec = jnp.zeros((N_CLASS, N_CLASS), xs.dtype)

    def step(h, x):
        h = jax.nn.softmax(x @ params["W"] + h @ w_rec + params["b"])
        return h, h

    def one_sequence(x):
        _, hs = recurrent.scan(step, jnp.zeros(N_CLASS, xs.dtype), x, truncate=truncate)
        return hs

    probabilities = jax.vmap(one_sequence)(xs)
    return cross_entropy(probabilities, ys)


# A softmax cross-entropy with a hand-written backward rule that forgets to average over the
# batch: the kind of bug a custom rule hides from everything except a gradient check.
@jax.custom_vjp
def softmax_cross_entropy(logits, onehot):
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))


def _softmax_cross_entropy_fwd(logits, onehot):
    return softmax_cross_entropy(logits, onehot), (jax.nn.softmax(logits), onehot)


def _softmax_cross_entropy_bwd(residuals, ct):
    probabilities, onehot = residuals
    grad_logits = ct * (probabilities - onehot)  # BROKEN: missing / batch size
    return grad_logits, jnp.zeros_like(onehot)


softmax_cross_entropy.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)


def broken_loss(params, xs, ys):
    flat = xs.reshape(-1, N_FEAT)
    onehot = jax.nn.one_hot(ys.reshape(-1), N_CLASS, dtype=flat.dtype)
    return softmax_cross_entropy(flat @ params["W"] + params["b"], onehot)


def question_forward_difference(loss, params, *args, eps: float = 1e-3) -> dict:
    """The question's check: a float32 forward difference with eps = 1e-3, element by element."""
    base = loss(params, *args)
    out = {}
    for name, value in params.items():
        flat = np.asarray(value).ravel()
        diffs = []
        for i in range(flat.size):
            bumped = flat.copy()
            bumped[i] += np.float32(eps)
            moved = dict(params, **{name: jnp.asarray(bumped.reshape(value.shape))})
            diffs.append((loss(moved, *args) - base) / np.float32(eps))
        out[name] = np.asarray(diffs, np.float32).reshape(value.shape)
    return out


def broken_line() -> int:
    lines = Path(__file__).read_text().splitlines()
    return 1 + next(
        i
        for i, line in enumerate(lines)
        if line.rstrip().endswith("# BROKEN: missing / batch size")
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gradient_checker_output", help="folder for reports.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params, xs, ys = make_data()
    ok = True

    print("1. Feed-forward softmax regression, float32, checked against float64 differences")
    ff = check_grads(feedforward_loss, params, xs, ys, argnums=0)
    print(ff)
    # The gradients compared with one another below multiply float32 matrices: at full float32
    # precision, not the TF32 that JAX uses by default on recent NVIDIA GPUs (1e-3 relative).
    with jax.default_matmul_precision("highest"):
        grads_ff = jax.grad(feedforward_loss)(params, xs, ys)
    print(f"   autodiff dL/db = {np.asarray(grads_ff['b'])}")
    question = question_forward_difference(feedforward_loss, params, xs, ys)
    largest = max(float(np.max(np.abs(grads_ff[k]))) for k in ("W", "b"))
    question_gap = max(float(np.max(np.abs(question[k] - grads_ff[k]))) for k in ("W", "b")) / max(
        largest, np.finfo(np.float32).tiny
    )
    print(f"   the question's float32 forward difference (eps=1e-3): dL/db = {question['b']}")
    ff_ok = ff.verdict == "pass"
    ok &= ff_ok
    worst = max(r.rel_error for r in ff.rows)
    # The question's difference is "too noisy" when its own error is far above the gap that
    # check_grads resolves: a gradient error in between is invisible to it.
    noisy = question_gap > 100 * worst
    if ff_ok:
        print(
            "Verdict: the feed-forward network's gradients are correct: check_grads PASS in "
            f"float32 (worst relative gap {worst:.1e}); the question's float32 forward "
            f"difference with eps=1e-3 is off by up to {question_gap:.1e} of the largest "
            "gradient (float32 rounding divided by eps, plus the step's truncation error)"
            + (
                f", {question_gap / worst:.0f} times that: too noisy to tell a small gradient "
                "error from none"
                if noisy
                else ""
            )
        )
    else:
        print(
            f"Verdict: check_grads FAILED on the feed-forward network (worst relative gap "
            f"{worst:.1e}), which this example expects to pass"
        )

    print("\n2. The recurrent layer with gradient_steps=1 (TheanoTail(1)) and with exact BPTT")
    theano = check_grads(
        lambda p, x, y: recurrent_loss(p, x, y, recurrent.TheanoTail(1)),
        params,
        xs,
        ys,
        argnums=0,
        locate=True,
    )
    print(theano)
    with jax.default_matmul_precision("highest"):
        full_grads = jax.grad(recurrent_loss)(params, xs, ys, recurrent.Full())
        tail_grads = jax.grad(recurrent_loss)(params, xs, ys, recurrent.TheanoTail(1))
    same_as_ff = all(
        np.allclose(full_grads[k], grads_ff[k], rtol=1e-5, atol=1e-7) for k in ("W", "b")
    )
    ratio = float(jnp.linalg.norm(tail_grads["W"]) / jnp.linalg.norm(grads_ff["W"]))
    print(
        f"   |grad W| with TheanoTail(1) / feed-forward = {ratio:.2e}; Full() equals the "
        f"feed-forward gradient: {same_as_ff}"
    )
    location = theano.location
    explained = (
        theano.verdict == "fail"
        and location is not None
        and location.culprit is None
        and "truncated backpropagation through time" in location.explanation
    )
    ok &= explained and same_as_ff
    if explained:
        print(
            "Verdict: with gradient_steps=1 autodiff disagrees with finite differences by "
            "design: explained as truncated BPTT (TheanoTail(1)), not a bug; only the last "
            f"step's loss term survives ({ratio:.1e} of the feed-forward gradient here, of the "
            f"order of 1/n_steps = {1 / N_STEPS:.1e}; about 1e-4 with the question's 10^4 "
            f"steps), while exact BPTT gives the feed-forward gradient: {same_as_ff}"
        )
    else:
        print(
            "Verdict: the TheanoTail(1) mismatch was NOT explained as truncated BPTT "
            f"(check_grads verdict {theano.verdict}); exact BPTT gives the feed-forward "
            f"gradient: {same_as_ff}"
        )

    print("\n3. A softmax cross-entropy whose custom_vjp backward rule is broken")
    broken = check_grads(broken_loss, params, xs, ys, argnums=0, locate=True)
    print(broken)
    culprit = broken.location.culprit if broken.location else None
    located = (
        broken.verdict == "fail"
        and culprit is not None
        and culprit.primitive == "custom_vjp_call"
        and culprit.file == str(Path(__file__).resolve())
        and culprit.line == broken_line()
    )
    ok &= located
    where = f"{Path(culprit.file).name}:{culprit.line}" if culprit else "nowhere"
    print(
        f"Verdict: the broken custom_vjp is {'located' if located else 'NOT located'} to "
        f"{where} (`{culprit.rule_name if culprit else '?'}`, expected line {broken_line()})"
    )

    reports = {
        "feedforward": ff.to_dict(),
        "theano_tail": theano.to_dict(),
        "broken": broken.to_dict(),
    }
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    print(f"\nreports written to {out / 'reports.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
