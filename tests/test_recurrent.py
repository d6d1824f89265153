"""Tests of gradkit.recurrent.scan: truncation modes, remat, masks, reverse, vmap, markers, errors.

Every truncated gradient is compared with two definitions written independently of the library:
the explicit sum over (s, t) pairs of d l_s / d theta_t (obtained by giving every step its own copy
of the parameters and keeping the pairs a mode allows), and an unrolled Python loop with
``stop_gradient`` placed by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gradkit import recurrent
from gradkit.recurrent import Chunked, Full, TheanoTail, Window, scan

T, I, H = 7, 2, 3


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    theta = (
        jnp.asarray(rng.normal(size=(I, H))),
        jnp.asarray(rng.normal(size=(H, H)) * 0.8),
        jnp.asarray(rng.normal(size=H)),
    )
    xs = jnp.asarray(rng.normal(size=(T, I)))
    weights = jnp.asarray(rng.normal(size=(T, H)))
    final_weights = jnp.asarray(rng.normal(size=H))
    h0 = jnp.asarray(rng.normal(size=H))
    return theta, h0, xs, weights, final_weights


def _cell(theta, h, x):
    w, u, b = theta
    return jnp.tanh(x @ w + h @ u + b)


def _scan_loss(theta, h0, xs, weights, final_weights, truncate, remat=None, reverse=False):
    """L = sum_s sum(sin(h_s) * c_s) + h_T . d, with the step closing over theta."""

    def step(h, x):
        h = _cell(theta, h, x)
        return h, h

    h_final, hs = scan(step, h0, xs, truncate=truncate, remat=remat, reverse=reverse)
    return jnp.sum(jnp.sin(hs) * weights) + h_final @ final_weights


# Pair rules: may the loss at step s reach the direct dependence of step t (t <= s)?
RULES = {
    Full(): lambda s, t: t <= s,
    Chunked(1): lambda s, t: t == s,
    Chunked(3): lambda s, t: t <= s and t // 3 == s // 3,
    Window(1): lambda s, t: t == s,
    Window(3): lambda s, t: s - 3 < t <= s,
    TheanoTail(1): lambda s, t: t <= s and t >= T - 1,
    TheanoTail(3): lambda s, t: t <= s and t >= T - 3,
}
TRUNCATED = [m for m in RULES if not isinstance(m, Full)]


def _per_step_losses(thetas, h0, xs, weights, final_weights, mask=None):
    """l_s for every s, where step t uses its own parameter copy thetas[.][t]."""
    h, losses = h0, []
    for t in range(T):
        new_h = _cell(tuple(a[t] for a in thetas), h, xs[t])
        if mask is not None:
            new_h = jnp.where(mask[t], new_h, h)
        h = new_h
        y = h if mask is None else jnp.where(mask[t], h, 0.0)
        loss = jnp.sum(jnp.sin(y) * weights[t])
        losses.append(loss + (h @ final_weights if t == T - 1 else 0.0))
    return jnp.stack(losses)


_per_step_jacobian = jax.jit(jax.jacobian(_per_step_losses, argnums=(0, 1, 2)))


def _pair_reference(rule, theta, h0, xs, weights, final_weights, mask=None):
    """Gradients (theta, h0, xs) from the explicit sum over allowed (s, t) pairs."""
    thetas = tuple(jnp.broadcast_to(a, (T, *a.shape)) for a in theta)
    jac_theta, jac_h0, jac_xs = _per_step_jacobian(thetas, h0, xs, weights, final_weights, mask)
    allowed = np.array([[rule(s, t) for t in range(T)] for s in range(T)], dtype=float)
    g_theta = tuple(jnp.einsum("st,st...->...", allowed, j) for j in jac_theta)
    g_xs = jnp.einsum("st,sti->ti", allowed, jac_xs)
    g_h0 = jnp.einsum("s,si->i", allowed[:, 0], jac_h0)  # init is reached iff step 0 is
    return g_theta, g_h0, g_xs


def _assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


_grad_all = jax.jit(jax.grad(_scan_loss, argnums=(0, 1, 2)), static_argnums=(5, 6, 7))


@pytest.mark.parametrize("mode", list(RULES), ids=repr)
def test_mode_matches_sum_over_allowed_pairs(mode):
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem()
        got = _grad_all(theta, h0, xs, weights, final_weights, mode, None, False)
        want = _pair_reference(RULES[mode], theta, h0, xs, weights, final_weights)
        _assert_trees_close(got, want)


def _hand_truncated_loss(mode, theta, h0, xs, weights, final_weights):
    """Unrolled loop with stop_gradient placed by hand (independent of the pair rules)."""
    sg = lax.stop_gradient
    if isinstance(mode, Chunked):
        h, total = h0, 0.0
        for t in range(T):
            if t > 0 and t % mode.k == 0:
                h = sg(h)
            h = _cell(theta, h, xs[t])
            total += jnp.sum(jnp.sin(h) * weights[t])
        return total + h @ final_weights
    if isinstance(mode, TheanoTail):
        frozen = jax.tree.map(sg, theta)
        h, total = sg(h0), 0.0
        for t in range(T):
            live = t >= T - mode.k
            h = _cell(theta if live else frozen, h if live else sg(h), xs[t] if live else sg(xs[t]))
            total += jnp.sum(jnp.sin(h) * weights[t])
        return total + h @ final_weights
    # Window: loss term s sees the graph cut where the carry enters step s - k + 1.
    total = 0.0
    for s in range(T):
        h = h0
        for t in range(s + 1):
            if t == s - mode.k + 1 and t > 0:
                h = sg(h)
            h = _cell(theta, h, xs[t])
        total += jnp.sum(jnp.sin(h) * weights[s]) + (h @ final_weights if s == T - 1 else 0.0)
    return total


@pytest.mark.parametrize("mode", [Chunked(2), Chunked(3), Window(2), TheanoTail(2)], ids=repr)
def test_mode_matches_hand_placed_stop_gradient(mode):
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(1)
        got = _grad_all(theta, h0, xs, weights, final_weights, mode, None, False)
        want = jax.grad(_hand_truncated_loss, argnums=(1, 2, 3))(
            mode, theta, h0, xs, weights, final_weights
        )
        _assert_trees_close(got, want)


@pytest.mark.parametrize("kind", [Chunked, Window, TheanoTail], ids=lambda c: c.__name__)
@pytest.mark.parametrize("k", [T, T + 5])
def test_k_at_least_length_equals_full(kind, k):
    with jax.enable_x64():
        problem = _problem(2)
        full = _grad_all(*problem, Full(), None, False)
        _assert_trees_close(_grad_all(*problem, kind(k), None, False), full)


def test_window_custom_vjp_with_k_at_least_length_equals_full():
    # scan() sends k >= T to the exact path; run the custom VJP itself to check it too.
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(3)

        def loss(theta, h0, xs, k):
            def step(h, x):
                h = _cell(theta, h, x)
                return h, h

            h_final, hs = recurrent._window_scan(step, h0, xs, Window(k), None, False, 1, T)
            return jnp.sum(jnp.sin(hs) * weights) + h_final @ final_weights

        full = _grad_all(theta, h0, xs, weights, final_weights, Full(), None, False)
        for k in (T, T + 2):
            _assert_trees_close(jax.grad(loss, argnums=(0, 1, 2))(theta, h0, xs, k), full)


@pytest.mark.parametrize(
    ("mode", "reverse"),
    [
        (Full(), False),
        (Chunked(3), True),
        (Window(2), False),
        (Window(3), True),
        (TheanoTail(3), True),
    ],
    ids=repr,
)
def test_remat_never_changes_values_or_gradients(mode, reverse):
    with jax.enable_x64():
        problem = _problem(4)
        value_and_grad = jax.jit(
            jax.value_and_grad(_scan_loss, argnums=(0, 1, 2)), static_argnums=(5, 6, 7)
        )
        reference = value_and_grad(*problem, mode, None, reverse)
        # T = 7: chunks of 2 and 3 leave a remainder; a chunk longer than T stores only init.
        for remat in ("step", 2, "sqrt", T + 2):
            _assert_trees_close(value_and_grad(*problem, mode, remat, reverse), reference)


@pytest.mark.parametrize("mode", [Full(), Window(3)], ids=repr)
def test_remat_chunk_bounds_what_the_backward_pass_stores(mode):
    # remat=c keeps T/c chunk-boundary carries plus c carries of one chunk: the residual
    # memory of the compiled gradient shrinks accordingly (Window's custom VJP included).
    n = 400
    xs = jnp.ones((n, 64))
    w = jnp.eye(64) * 0.5

    def loss(w, remat):
        _, hs = scan(
            lambda h, x: (jnp.tanh(h @ w + x),) * 2, jnp.zeros(64), xs, remat=remat, truncate=mode
        )
        return jnp.sum(hs)

    def temp_bytes(remat):
        compiled = jax.jit(jax.grad(loss), static_argnums=1).lower(w, remat).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    assert temp_bytes("sqrt") < temp_bytes(None) / 3


@pytest.mark.parametrize("mode", list(RULES), ids=repr)
def test_forward_values_do_not_depend_on_mode(mode):
    theta, h0, xs, _, _ = (jax.tree.map(lambda a: a.astype(jnp.float32), p) for p in _problem(5))

    def step(h, x):
        h = _cell(theta, h, x)
        return h, h

    want = lax.scan(step, h0, xs)
    got = jax.jit(lambda: scan(step, h0, xs, truncate=mode, remat=2))()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_full_gradient_equals_jax_grad_of_lax_scan():
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(6)

        def lax_loss(theta, h0, xs):
            def step(h, x):
                h = _cell(theta, h, x)
                return h, h

            h_final, hs = lax.scan(step, h0, xs)
            return jnp.sum(jnp.sin(hs) * weights) + h_final @ final_weights

        want = jax.grad(lax_loss, argnums=(0, 1, 2))(theta, h0, xs)
        for truncate in (None, Full()):
            _assert_trees_close(
                _grad_all(theta, h0, xs, weights, final_weights, truncate, None, False), want
            )


@pytest.mark.parametrize("mode", list(RULES), ids=repr)
def test_reverse_counts_steps_from_the_end(mode):
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(7)
        got = _grad_all(theta, h0, xs, weights, final_weights, mode, None, True)
        # Reversed processing of xs with weights == forward processing of the flipped arrays.
        want = _pair_reference(RULES[mode], theta, h0, xs[::-1], weights[::-1], final_weights)
        want = (want[0], want[1], want[2][::-1])
        _assert_trees_close(got, want)


def test_reverse_outputs_are_in_array_order_like_lax_scan():
    theta, h0, xs, _, _ = _problem(8)

    def step(h, x):
        h = _cell(theta, h, x)
        return h, h

    want = lax.scan(step, h0, xs, reverse=True)
    for mode in (Full(), Chunked(2), Window(2), TheanoTail(2)):
        got = scan(step, h0, xs, truncate=mode, reverse=True)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


MASK = np.array([True, True, False, True, False, False, True])


def test_mask_keeps_carry_and_zeroes_outputs():
    theta, h0, xs, _, _ = _problem(9)

    def step(h, x):
        h = _cell(theta, h, x)
        return h, h

    h_final, hs = scan(step, h0, xs, mask=MASK)
    h, expected = h0, []
    for t in range(T):
        if MASK[t]:
            h = _cell(theta, h, xs[t])
        expected.append(h if MASK[t] else jnp.zeros(H))
    np.testing.assert_allclose(hs, jnp.stack(expected), rtol=1e-6)
    np.testing.assert_allclose(h_final, h, rtol=1e-6)


@pytest.mark.parametrize("mode", [Full(), Chunked(2), Window(2), TheanoTail(3)], ids=repr)
def test_masked_steps_count_toward_k(mode):
    rules = {
        Chunked(2): lambda s, t: t <= s and t // 2 == s // 2,
        Window(2): lambda s, t: s - 2 < t <= s,
        TheanoTail(3): lambda s, t: t <= s and t >= T - 3,
        Full(): lambda s, t: t <= s,
    }
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(10)

        def loss(theta, h0, xs):
            def step(h, x):
                h = _cell(theta, h, x)
                return h, h

            h_final, hs = scan(step, h0, xs, truncate=mode, mask=MASK)
            return jnp.sum(jnp.sin(hs) * weights) + h_final @ final_weights

        got = jax.grad(loss, argnums=(0, 1, 2))(theta, h0, xs)
        want = _pair_reference(rules[mode], theta, h0, xs, weights, final_weights, MASK)
        _assert_trees_close(got, want)


def test_batched_mask_broadcasts_over_leading_axes():
    rng = np.random.default_rng(11)
    batch = 4
    theta, _, _, _, _ = _problem(11)
    xs = jnp.asarray(rng.normal(size=(T, batch, I)), jnp.float32)
    mask = rng.random((T, batch)) > 0.4
    h0 = jnp.zeros((batch, H))

    def step(h, x):
        h = _cell(theta, h, x)
        return h, (h, h.sum(-1))

    for mode in (Chunked(2), Window(3)):
        h_final, (hs, sums) = scan(step, h0, xs, mask=mask, truncate=mode)
        for b in range(batch):
            hb, sb = scan(lambda h, x: step(h, x), h0[b], xs[:, b], mask=mask[:, b])
            np.testing.assert_allclose(hs[:, b], sb[0], rtol=1e-6)
            np.testing.assert_allclose(sums[:, b], sb[1], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(h_final[b], hb, rtol=1e-6)
        assert np.all(np.asarray(sums)[~mask] == 0)


def _feed_forward_problem():
    theta, h0, xs, weights, _ = _problem(12)

    def step(h, x):  # ignores its carry
        h_new = jnp.tanh(x @ theta[0] + theta[2])
        return h_new, h_new

    return theta, h0, xs, weights, step


@pytest.mark.parametrize("mode", list(RULES), ids=repr)
def test_carry_ignoring_step_gives_feed_forward_gradient(mode):
    with jax.enable_x64():
        theta, h0, xs, weights, _ = _feed_forward_problem()

        def loss(w, b, truncate):
            def step(h, x):
                h_new = jnp.tanh(x @ w + b + 0.0 * h)
                return h_new, h_new

            _, hs = scan(step, h0, xs, truncate=truncate)
            return jnp.sum(jnp.sin(hs) * weights)

        def feed_forward(w, b, last=None):
            hs = jnp.tanh(xs @ w + b)
            terms = jnp.sin(hs) * weights
            return jnp.sum(terms if last is None else terms[-last:])

        got = jax.grad(loss, argnums=(0, 1))(theta[0], theta[2], mode)
        if isinstance(mode, TheanoTail):
            # The invariant fails by design: only the last k loss terms contribute.
            want = jax.grad(feed_forward, argnums=(0, 1))(theta[0], theta[2], mode.k)
            full = jax.grad(feed_forward, argnums=(0, 1))(theta[0], theta[2])
            assert not np.allclose(got[0], full[0])
        else:
            want = jax.grad(feed_forward, argnums=(0, 1))(theta[0], theta[2])
        _assert_trees_close(got, want)


def test_window_handles_pytrees_with_integer_leaves_and_closures():
    # Carry (h, counter:int), inputs (x, token:int) with a closed-over embedding table.
    with jax.enable_x64():
        rng = np.random.default_rng(13)
        table = jnp.asarray(rng.normal(size=(5, H)))
        u = jnp.asarray(rng.normal(size=(H, H)) * 0.7)
        tokens = jnp.asarray(rng.integers(0, 5, size=T))
        scale = jnp.asarray(rng.normal(size=(T,)))
        k = 2

        def make_step(table, u):
            def step(carry, x):
                h, count = carry
                s, token = x
                h = jnp.tanh(table[token] * s + h @ u)
                return (h, count + 1), {"h": h, "count": count}

            return step

        def loss(table, u, scale, mode):
            (h, count), out = scan(
                make_step(table, u), (jnp.zeros(H), 0), (scale, tokens), truncate=mode
            )
            return jnp.sum(out["h"] ** 2) + jnp.sum(h) + 0 * count

        def hand(table, u, scale):
            total = 0.0
            for s in range(T):
                h = jnp.zeros(H)
                for t in range(s + 1):
                    if t == s - k + 1 and t > 0:
                        h = lax.stop_gradient(h)
                    h = jnp.tanh(table[tokens[t]] * scale[t] + h @ u)
                total += jnp.sum(h**2) + (jnp.sum(h) if s == T - 1 else 0.0)
            return total

        got = jax.grad(loss, argnums=(0, 1, 2))(table, u, scale, Window(k))
        want = jax.grad(hand, argnums=(0, 1, 2))(table, u, scale)
        _assert_trees_close(got, want)
        (_, count), out = scan(
            make_step(table, u), (jnp.zeros(H), 0), (scale, tokens), truncate=Window(k)
        )
        assert int(count) == T
        np.testing.assert_array_equal(out["count"], np.arange(T))


@pytest.mark.parametrize("mode", [Chunked(3), Window(3), TheanoTail(3)], ids=repr)
def test_vmap_over_batch_gives_per_example_gradients(mode):
    with jax.enable_x64():
        theta, h0, _, weights, final_weights = _problem(14)
        rng = np.random.default_rng(14)
        batch_xs = jnp.asarray(rng.normal(size=(3, T, I)))
        per_example = jax.vmap(
            jax.grad(_scan_loss, argnums=(0, 2)), in_axes=(None, None, 0, None, None, None)
        )(theta, h0, batch_xs, weights, final_weights, mode)
        for b in range(3):
            want = _pair_reference(RULES[mode], theta, h0, batch_xs[b], weights, final_weights)
            _assert_trees_close(jax.tree.map(lambda a, b=b: a[b], per_example[0]), want[0])
            _assert_trees_close(per_example[1][b], want[2])


@pytest.mark.parametrize("mode", [Chunked(3), Window(3), TheanoTail(3)], ids=repr)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_of_vmap_with_per_example_values_in_the_closure(mode, jit):
    # The usual batch loss: vmap over examples, then grad. The step closes over a per-example
    # integer label (an embedding row) and a per-example float offset: batched tracers, the
    # label one that carries no tangent. The gradient is the sum of the examples' gradients,
    # each the pair rule's (the label's row moves the bias, so it is written into b).
    with jax.enable_x64():
        theta, h0, _, weights, final_weights = _problem(16)
        rng = np.random.default_rng(16)
        batch_xs = jnp.asarray(rng.normal(size=(3, T, I)))
        offsets = jnp.asarray(rng.normal(size=(3, H)))
        table = jnp.asarray(rng.normal(size=(4, H)))
        labels = jnp.asarray([2, 0, 3])

        def example_loss(theta, label, offset, xs):
            def step(h, x):  # reads the label and the offset inside the step
                w, u, b = theta
                h = _cell((w, u, b + table[label] + offset), h, x)
                return h, h

            h_final, hs = scan(step, h0, xs, truncate=mode)
            return jnp.sum(jnp.sin(hs) * weights) + h_final @ final_weights

        def batch_loss(theta):
            losses = jax.vmap(example_loss, in_axes=(None, 0, 0, 0))(
                theta, labels, offsets, batch_xs
            )
            return jnp.sum(losses)

        grad = jax.jit(jax.grad(batch_loss)) if jit else jax.grad(batch_loss)
        got = grad(theta)
        want = [
            _pair_reference(
                RULES[mode],
                (theta[0], theta[1], theta[2] + table[labels[e]] + offsets[e]),
                h0,
                batch_xs[e],
                weights,
                final_weights,
            )[0]
            for e in range(3)
        ]
        _assert_trees_close(got, jax.tree.map(lambda *g: sum(g), *want))


def test_window_under_forward_mode_raises_clear_error():
    theta, h0, xs, weights, final_weights = _problem(15)

    def f(scale):
        return _scan_loss(theta, h0, xs * scale, weights, final_weights, Window(2))

    with pytest.raises(TypeError, match=r"Window\(2\).*only a reverse-mode gradient"):
        jax.jvp(f, (1.0,), (1.0,))
    with pytest.raises(TypeError, match=r"Window\(2\).*only a reverse-mode gradient"):
        jax.jacfwd(f)(1.0)
    with pytest.raises(TypeError, match="forward-mode"):  # raised by jax, when applied
        jax.linearize(f, 1.0)[1](1.0)
    # Forward-over-reverse works (jvp of the plain-JAX backward pass) and gives the derivative
    # of the truncated gradient as a function: a float64 central difference of it agrees.
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(15)

        def windowed(scale):
            return _scan_loss(theta, h0, xs * scale, weights, final_weights, Window(2))

        gradient = jax.jit(jax.grad(windowed))
        step = 1e-5
        want = (gradient(1.3 + step) - gradient(1.3 - step)) / (2 * step)
        forward_over_reverse = jax.jit(jax.jacfwd(jax.grad(windowed)))(1.3)
        np.testing.assert_allclose(forward_over_reverse, want, rtol=1e-7)
        reverse_over_reverse = jax.jit(jax.jacrev(jax.grad(windowed)))(1.3)
        np.testing.assert_allclose(reverse_over_reverse, forward_over_reverse)


def test_second_derivative_of_stop_gradient_truncation_is_the_surrogates():
    # Chunked cuts with stop_gradient, which also holds the cut carries constant when the
    # gradient is differentiated again: the result is the hand-placed surrogate's, not the
    # central difference of the truncated gradient (the scan docstring says so).
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(15)

        def chunked(scale):
            return _scan_loss(theta, h0, xs * scale, weights, final_weights, Chunked(2))

        def hand(scale):
            return _hand_truncated_loss(Chunked(2), theta, h0, xs * scale, weights, final_weights)

        got = jax.jacfwd(jax.grad(chunked))(1.3)
        np.testing.assert_allclose(got, jax.jacfwd(jax.grad(hand))(1.3), rtol=1e-10)
        gradient = jax.jit(jax.grad(chunked))
        central = (gradient(1.3 + 1e-5) - gradient(1.3 - 1e-5)) / 2e-5
        assert abs(got - central) > 0.1 * abs(central)


def test_chunked_supports_forward_mode():
    with jax.enable_x64():
        theta, h0, xs, weights, final_weights = _problem(16)
        direction = jax.tree.map(jnp.ones_like, theta)

        def f(theta):
            return _scan_loss(theta, h0, xs, weights, final_weights, Chunked(3))

        _, tangent = jax.jvp(f, (theta,), (direction,))
        grad = jax.grad(f)(theta)
        want = sum(jnp.vdot(g, d) for g, d in zip(grad, direction, strict=True))
        np.testing.assert_allclose(tangent, want, rtol=1e-10)


def test_float32_stays_float32():
    theta, h0, xs, weights, final_weights = (
        jax.tree.map(lambda a: a.astype(jnp.float32), p) for p in _problem(17)
    )
    for mode in (Full(), Chunked(2), Window(2), TheanoTail(2)):
        grads = _grad_all(theta, h0, xs, weights, final_weights, mode, None, False)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


# -------------------------------------------------------------------------------------------
# Markers for the gradient checker
# -------------------------------------------------------------------------------------------


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def _marked(mode):
    theta, h0, xs, weights, final_weights = _problem(18)
    closed = jax.make_jaxpr(jax.grad(_scan_loss), static_argnums=(5,))(
        theta, h0, xs, weights, final_weights, mode
    )
    return [
        eqn
        for eqn in _equations(closed.jaxpr)
        if "gradkit_truncation[" in str(eqn.source_info.name_stack)
    ]


@pytest.mark.parametrize("mode", [Chunked(2), TheanoTail(1)], ids=repr)
def test_stop_gradient_truncation_carries_marker(mode):
    marked = _marked(mode)
    assert marked
    assert any(eqn.primitive.name == "stop_gradient" for eqn in marked)
    assert all(f"gradkit_truncation[{mode!r}]" in str(e.source_info.name_stack) for e in marked)


def test_window_custom_vjp_carries_marker_and_name():
    marked = _marked(Window(2))  # the reverse pass of the custom VJP, inlined by grad
    assert marked
    assert all("gradkit_truncation[Window(2)]" in str(e.source_info.name_stack) for e in marked)
    theta, h0, xs, weights, final_weights = _problem(18)
    forward = jax.make_jaxpr(_scan_loss, static_argnums=(5,))(
        theta, h0, xs, weights, final_weights, Window(2)
    )
    (call,) = [e for e in _equations(forward.jaxpr) if e.primitive.name == "custom_vjp_call"]
    assert str(call.source_info.name_stack) == "gradkit_truncation[Window(2)]"
    assert call.params["call_jaxpr"].jaxpr.debug_info.func_name == "gradkit_window_truncation"
    assert "gradkit_window_truncation_bwd" in str(call.params["bwd"])


def test_full_adds_no_marker():
    assert _marked(Full()) == []
    assert _marked(Chunked(T)) == []


# -------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------


def _tanh_step(h, x):
    h = jnp.tanh(h + x.sum())
    return h, h


def test_mismatched_time_lengths_name_the_leaves():
    xs = {"a": jnp.ones((5, 2)), "b": jnp.ones((4,))}
    with pytest.raises(ValueError, match=r"xs\['a'\] has 5.*xs\['b'\] has 4"):
        scan(lambda h, x: (h, h), 0.0, xs)


def test_scalar_xs_leaf_rejected():
    with pytest.raises(ValueError, match=r"leading time axis; xs\['a'\] is a scalar"):
        scan(lambda h, x: (h, h), 0.0, {"a": jnp.ones(())})


@pytest.mark.parametrize("kind", [Chunked, Window, TheanoTail], ids=lambda c: c.__name__)
@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_rejected(kind, k):
    with pytest.raises(ValueError, match=rf"{kind.__name__}\(k\) needs k >= 1.*got k={k}"):
        kind(k)


def test_int_truncate_means_chunked_and_rejects_zero():
    assert recurrent._as_truncation(4) == Chunked(4)
    with pytest.raises(ValueError, match=r"Chunked\(k\) needs k >= 1"):
        scan(_tanh_step, 0.0, jnp.ones(3), truncate=0)
    with pytest.raises(TypeError, match=r"Chunked\(k\) needs an integer.*2.5"):
        Chunked(2.5)
    with pytest.raises(TypeError, match="truncate must be None, an int k"):
        scan(_tanh_step, 0.0, jnp.ones(3), truncate="chunked")


def test_mask_with_wrong_time_axis_rejected():
    with pytest.raises(ValueError, match=r"mask must be time-major with 3 steps.*\(4,\)"):
        scan(_tanh_step, 0.0, jnp.ones(3), mask=jnp.ones(4, bool))


def test_mask_that_does_not_broadcast_against_carry_rejected():
    xs = jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5\).*carry of shape \(2,\)"):
        scan(lambda h, x: (h + x, h), jnp.zeros(2), xs, mask=jnp.ones((3, 5), bool))


def test_carry_structure_change_rejected():
    with pytest.raises(TypeError, match="same pytree structure as init"):
        scan(lambda h, x: ((h, h), h), 0.0, jnp.ones(3))


def test_carry_shape_and_dtype_change_named():
    init = {"h": jnp.zeros(2), "n": jnp.zeros((), jnp.int32)}

    def step(c, x):
        return {"h": jnp.zeros(3), "n": c["n"] + 0.5}, x

    with pytest.raises(
        TypeError,
        match=r"carry\['h'\] is float32\[2\] in init but float32\[3\].*carry\['n'\] is int32\[\]",
    ):
        scan(step, init, jnp.ones(3))


def test_step_must_return_a_pair():
    with pytest.raises(TypeError, match=r"must return a pair \(new_carry, y\); got tuple of len"):
        scan(lambda h, x: (h, h, h), 0.0, jnp.ones(3))


@pytest.mark.parametrize("remat", ["sometimes", 0, -2, 1.5])
def test_bad_remat_rejected(remat):
    with pytest.raises(ValueError, match=r'remat must be None, "step", "sqrt"|remat chunk'):
        scan(_tanh_step, 0.0, jnp.ones(3), remat=remat)


def test_bad_unroll_and_length_rejected():
    with pytest.raises(ValueError, match="unroll must be a bool or an int >= 1; got 0"):
        scan(_tanh_step, 0.0, jnp.ones(3), unroll=0)
    with pytest.raises(ValueError, match="length=4 but the leaves of xs have 3 steps"):
        scan(_tanh_step, 0.0, jnp.ones(3), length=4)
    with pytest.raises(ValueError, match="pass length="):
        scan(lambda h, x: (h, h), 0.0, None)


def test_reverse_takes_numpy_booleans_and_truncate_names_the_strings_rnn_takes():
    xs = jnp.arange(1.0, 4.0)
    _, ys = scan(lambda h, x: (h + x, h + x), 0.0, xs, reverse=np.bool_(True))
    np.testing.assert_array_equal(ys, [6.0, 5.0, 3.0])
    with pytest.raises(TypeError, match="reverse must be a bool; got 1"):
        scan(_tanh_step, 0.0, xs, reverse=1)
    with pytest.raises(TypeError, match="got 'window' \\(RNN's truncate_mode takes the strings"):
        scan(_tanh_step, 0.0, xs, truncate="window")


def test_xs_none_with_length_runs():
    h, ys = scan(lambda h, _: (h + 1.0, h), 0.0, None, length=4, truncate=Window(2))
    assert float(h) == 4.0
    np.testing.assert_array_equal(ys, [0.0, 1.0, 2.0, 3.0])


def test_python_scalar_init_takes_the_step_dtype_like_lax_scan():
    # Under x64 a Python 0.0 is a weak float64; a float32 step returns float32 carries.
    xs = jnp.linspace(-1.0, 1.0, T, dtype=jnp.float32)
    with jax.enable_x64():
        w = jnp.float32(0.7)

        def step(h, x):
            h = jnp.tanh(w * h + x)
            return h, h

        want = lax.scan(step, 0.0, xs)
        for mode in (Full(), Chunked(2), Window(2), TheanoTail(2)):
            got = scan(step, 0.0, xs, truncate=mode, mask=np.ones(T, bool), remat=2)
            assert got[0].dtype == got[1].dtype == jnp.float32
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    # An integer Python scalar becomes the float carry the step returns, as in lax.scan.
    got = scan(lambda h, x: (h + x, h), 0, xs)
    want = lax.scan(lambda h, x: (h + x, h), 0, xs)
    assert got[0].dtype == want[0].dtype == jnp.float32
    np.testing.assert_array_equal(got[1], want[1])


def test_tbptt_errors_name_tbptt_and_its_own_arguments():
    def loss_step(p, h, x):
        return jnp.tanh(p * h + x), h**2

    with pytest.raises(ValueError, match=r"^tbptt_value_and_grad: xs has no leaves: it needs"):
        recurrent.tbptt_value_and_grad(loss_step, 0.5, 0.0, None, k1=2)
    with pytest.raises(ValueError, match=r"^tbptt_value_and_grad: unroll must be"):
        recurrent.tbptt_value_and_grad(loss_step, 0.5, 0.0, jnp.ones(4), k1=2, unroll=0)
    with pytest.raises(ValueError, match=r"^scan: xs has no leaves, so pass length="):
        scan(lambda h, x: (h, h), 0.0, None)
