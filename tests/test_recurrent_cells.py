"""Tests of gradkit.recurrent cells (SimpleRNN, GRU, LSTM), the RNN layer and streaming TBPTT.

Cells are compared with their equations written out again here, gate by gate, in plain JAX;
tbptt_value_and_grad is compared with a brute-force TBPTT(k1, k2) built from Python loops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from gradkit.recurrent import (
    GRU,
    LSTM,
    RNN,
    Chunked,
    Full,
    SimpleRNN,
    TheanoTail,
    Window,
    scan,
    tbptt_value_and_grad,
)

T, I, H = 6, 3, 4


def _sigmoid(x):
    return 1 / (1 + jnp.exp(-x))


def _gru_reference(p, h, x):
    w, u, b, c = p["kernel"], p["recurrent_kernel"], p["bias"], p["recurrent_bias"]
    w_r, w_z, w_n = w[:, :H], w[:, H : 2 * H], w[:, 2 * H :]
    u_r, u_z, u_n = u[:, :H], u[:, H : 2 * H], u[:, 2 * H :]
    b_r, b_z, b_n = b[:H], b[H : 2 * H], b[2 * H :]
    c_r, c_z, c_n = c[:H], c[H : 2 * H], c[2 * H :]
    r = _sigmoid(x @ w_r + b_r + h @ u_r + c_r)
    z = _sigmoid(x @ w_z + b_z + h @ u_z + c_z)
    n = jnp.tanh(x @ w_n + b_n + r * (h @ u_n + c_n))
    return z * h + (1 - z) * n


def _lstm_reference(p, carry, x):
    h, c = carry
    w, u, b = p["kernel"], p["recurrent_kernel"], p["bias"]

    def gate(j):
        return (
            x @ w[:, j * H : (j + 1) * H] + h @ u[:, j * H : (j + 1) * H] + b[j * H : (j + 1) * H]
        )

    input_gate, forget_gate = _sigmoid(gate(0)), _sigmoid(gate(1))
    candidate, output_gate = jnp.tanh(gate(2)), _sigmoid(gate(3))
    c = forget_gate * c + input_gate * candidate
    return output_gate * jnp.tanh(c), c


def _run_reference(update, p, carry, xs):
    outputs = []
    for t in range(T):
        carry = update(p, carry, xs[t])
        outputs.append(carry[0] if isinstance(carry, tuple) else carry)
    return carry, jnp.stack(outputs)


@pytest.mark.parametrize(
    ("cell", "reference"),
    [(GRU(H), _gru_reference), (LSTM(H), _lstm_reference)],
    ids=["GRU", "LSTM"],
)
def test_gated_cells_match_plain_jax_equations(cell, reference):
    with jax.enable_x64():
        params = cell.init(jax.random.key(0), I, dtype=jnp.float64)
        xs = jax.random.normal(jax.random.key(1), (T, I), jnp.float64)
        weights = jax.random.normal(jax.random.key(2), (T, H), jnp.float64)
        init = cell.initial_carry(dtype=jnp.float64)

        def loss(params):
            _, ys = scan(lambda c, x: cell.apply(params, c, x), init, xs)
            return jnp.sum(jnp.sin(ys) * weights), ys

        def reference_loss(params):
            _, ys = _run_reference(reference, params, init, xs)
            return jnp.sum(jnp.sin(ys) * weights), ys

        (value, ys), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        (ref_value, ref_ys), ref_grads = jax.jit(jax.value_and_grad(reference_loss, has_aux=True))(
            params
        )
        np.testing.assert_allclose(ys, ref_ys, rtol=1e-12)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads, ref_grads)


def test_cell_parameter_shapes_and_initialisation():
    gru = GRU(H).init(jax.random.key(0), I)
    assert {k: v.shape for k, v in gru.items()} == {
        "kernel": (I, 3 * H),
        "recurrent_kernel": (H, 3 * H),
        "bias": (3 * H,),
        "recurrent_bias": (3 * H,),
    }
    lstm = LSTM(H, forget_bias=1.5).init(jax.random.key(0), I)
    np.testing.assert_array_equal(lstm["bias"][H : 2 * H], 1.5)
    simple = SimpleRNN(H).init(jax.random.key(0), I)
    bound = 1 / math.sqrt(H)
    lstm_other_biases = jnp.concatenate([lstm["bias"][:H], lstm["bias"][2 * H :]])
    leaves = [*jax.tree.leaves((gru, simple, lstm["kernel"])), lstm_other_biases]
    for leaf in leaves:
        assert leaf.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(leaf))) <= bound
        # Uniform on [-bound, bound]: both signs, spread over the interval, no repeats.
        assert float(jnp.max(leaf)) > 0.5 * bound and float(jnp.min(leaf)) < -0.5 * bound
        assert len(np.unique(np.asarray(leaf))) == leaf.size
    assert not np.allclose(simple["kernel"][:, :H], simple["recurrent_kernel"][:I])
    h, c = LSTM(H).initial_carry()
    assert h.shape == c.shape == (H,) and not jnp.any(h) and not jnp.any(c)


def test_simple_rnn_matches_elman_equation_and_accepts_activation_names():
    with jax.enable_x64():
        cell = SimpleRNN(H, activation=jax.nn.softmax)
        params = cell.init(jax.random.key(3), I, dtype=jnp.float64)
        h = jax.random.normal(jax.random.key(4), (H,), jnp.float64)
        x = jax.random.normal(jax.random.key(5), (I,), jnp.float64)
        new_h, y = cell.apply(params, h, x)
        a = np.asarray(x) @ params["kernel"] + np.asarray(h) @ params["recurrent_kernel"]
        a = a + params["bias"]
        want = np.exp(a) / np.exp(a).sum()
        np.testing.assert_allclose(new_h, want, rtol=1e-12)
        np.testing.assert_array_equal(new_h, y)
        by_name, _ = SimpleRNN(H, activation="softmax").apply(params, h, x)
        np.testing.assert_allclose(by_name, want, rtol=1e-12)
        tanh_h, _ = SimpleRNN(H).apply(params, h, x)
        np.testing.assert_allclose(tanh_h, np.tanh(a), rtol=1e-12)


def test_cell_errors_name_the_problem():
    with pytest.raises(ValueError, match="hidden_size must be a positive int; got 0"):
        GRU(0)
    with pytest.raises(TypeError, match="activation must be a name or a callable"):
        SimpleRNN(3, activation=3)
    with pytest.raises(ValueError, match="unknown activation 'tahn'"):
        SimpleRNN(3, activation="tahn")
    params = LSTM(H).init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=r"x must have shape \(3,\).*got \(2, 3\)"):
        LSTM(H).apply(params, LSTM(H).initial_carry(), jnp.ones((2, I)))


# -------------------------------------------------------------------------------------------
# RNN layer
# -------------------------------------------------------------------------------------------

B = 3


def _layer_data():
    xs = jax.random.normal(jax.random.key(6), (B, T, I))
    targets = jax.random.normal(jax.random.key(7), (B, T, H))
    return xs, targets


def test_rnn_layer_runs_the_cell_over_batch_major_input():
    xs, _ = _layer_data()
    cell = GRU(H)
    layer = RNN(cell)
    params = layer.init(jax.random.key(8), I)
    out = jax.jit(layer.apply)(params, xs)
    assert out.shape == (B, T, H)
    for b in range(B):
        _, want = lax.scan(lambda h, x: cell.apply(params, h, x), cell.initial_carry(), xs[b])
        np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-6)
    same = layer.init(jax.random.key(8), xs.shape)  # an input shape works like an int
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, same, params))
    with pytest.raises(ValueError, match="input_shape is empty"):
        layer.init(jax.random.key(8), ())
    final = RNN(cell, only_return_final=True).apply(params, xs)
    np.testing.assert_allclose(final, out[:, -1], rtol=1e-6)
    backwards = RNN(cell, backwards=True).apply(params, xs)
    _, want = lax.scan(
        lambda h, x: cell.apply(params, h, x), cell.initial_carry(), xs[0], reverse=True
    )
    np.testing.assert_allclose(backwards[0], want, rtol=1e-5, atol=1e-6)


def test_rnn_layer_default_carry_takes_the_cells_dtype():
    # float64 parameters with float32 input compute in float64; the zero carry follows.
    with jax.enable_x64():
        xs = jax.random.normal(jax.random.key(6), (B, T, I), jnp.float32)
        for cell in (GRU(H), LSTM(H)):
            layer = RNN(cell)
            params = layer.init(jax.random.key(8), I, dtype=jnp.float64)
            out = layer.apply(params, xs)
            assert out.dtype == jnp.float64
            np.testing.assert_array_equal(out, layer.apply(params, xs.astype(jnp.float64)))


@pytest.mark.parametrize(
    ("layer_kwargs", "truncate"),
    [
        ({}, Full()),
        ({"gradient_steps": 2}, Chunked(2)),
        ({"gradient_steps": 2, "truncate_mode": "window"}, Window(2)),
        ({"truncate": TheanoTail(2)}, TheanoTail(2)),
    ],
    ids=["default", "chunked", "window", "theano"],
)
def test_rnn_layer_gradient_steps_select_the_truncation(layer_kwargs, truncate):
    with jax.enable_x64():
        xs, targets = (a.astype(jnp.float64) for a in _layer_data())
        cell = SimpleRNN(H)
        layer = RNN(cell, **layer_kwargs)
        assert layer.truncation == truncate
        params = layer.init(jax.random.key(9), I, dtype=jnp.float64)

        def layer_loss(params):
            return jnp.sum((layer.apply(params, xs) - targets) ** 2)

        def scan_loss(params):
            total = 0.0
            for b in range(B):
                _, ys = scan(
                    lambda h, x: cell.apply(params, h, x),
                    cell.initial_carry(jnp.float64),
                    xs[b],
                    truncate=truncate,
                )
                total += jnp.sum((ys - targets[b]) ** 2)
            return total

        got, want = jax.jit(jax.grad(layer_loss))(params), jax.jit(jax.grad(scan_loss))(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), got, want)


def test_rnn_gradient_steps_one_is_feed_forward_not_lasagne():
    # Seed 002 in miniature: recurrent weights 0, softmax; gradkit's gradient_steps=1 keeps the
    # feed-forward gradient, Lasagne's (TheanoTail(1)) keeps only the last step's loss.
    with jax.enable_x64():
        xs, _ = _layer_data()
        xs = xs.astype(jnp.float64)
        labels = jax.random.randint(jax.random.key(10), (B, T), 0, H)
        cell = SimpleRNN(H, activation=jax.nn.softmax)
        params = cell.init(jax.random.key(11), I, dtype=jnp.float64)
        params["recurrent_kernel"] = jnp.zeros((H, H))
        params["bias"] = jnp.zeros(H)

        def cross_entropy(probs, labels):
            return -jnp.mean(jnp.log(jnp.take_along_axis(probs, labels[..., None], -1)))

        def loss(params, layer):
            return cross_entropy(layer.apply(params, xs), labels)

        def feed_forward(params):
            return cross_entropy(jax.nn.softmax(xs @ params["kernel"] + params["bias"]), labels)

        ff = jax.grad(feed_forward)(params)
        grad = jax.jit(jax.grad(loss), static_argnums=1)
        for layer in (RNN(cell, gradient_steps=1), RNN(cell, 1, truncate_mode="window")):
            got = grad(params, layer)
            np.testing.assert_allclose(got["kernel"], ff["kernel"], rtol=1e-12)
            np.testing.assert_allclose(got["bias"], ff["bias"], rtol=1e-10, atol=1e-15)
        lasagne = grad(params, RNN(cell, truncate=TheanoTail(1)))

        def last_step_only(params):
            probs = jax.nn.softmax(xs[:, -1] @ params["kernel"] + params["bias"])
            picked = jnp.take_along_axis(probs, labels[:, -1:], -1)
            return -jnp.sum(jnp.log(picked)) / (B * T)

        want = jax.grad(last_step_only)(params)
        np.testing.assert_allclose(lasagne["kernel"], want["kernel"], rtol=1e-12)


def test_rnn_layer_mask_is_batch_major():
    xs, _ = _layer_data()
    mask = np.ones((B, T), bool)
    mask[1, 4:] = False
    cell = SimpleRNN(H)
    params = cell.init(jax.random.key(12), I)
    out = RNN(cell).apply(params, xs, mask=mask)
    full = RNN(cell).apply(params, xs[1:2, :4])
    np.testing.assert_allclose(out[1, :4], full[0], rtol=1e-6)
    np.testing.assert_array_equal(out[1, 4:], 0.0)
    # only_return_final gives each sequence's last unmasked output, as Lasagne returns the
    # hidden state carried past the padding; a sequence masked throughout gives zeros.
    mask[2] = False
    final = jax.jit(RNN(cell, only_return_final=True).apply)(params, xs, mask=mask)
    np.testing.assert_allclose(final[0], RNN(cell).apply(params, xs[:1])[0, -1], rtol=1e-6)
    np.testing.assert_allclose(final[1], full[0, -1], rtol=1e-6)
    np.testing.assert_array_equal(final[2], 0.0)
    backwards = RNN(cell, backwards=True, only_return_final=True).apply(params, xs, mask=mask)
    want = RNN(cell, backwards=True).apply(params, xs[1:2, :4])[0, 0]
    np.testing.assert_allclose(backwards[1], want, rtol=1e-6)
    np.testing.assert_array_equal(backwards[2], 0.0)
    # A numeric mask counts any nonzero value as a step that runs (as scan reads it), also
    # when picking the last one: weights of 2 and 1 are steps, not a ranking.
    weights = np.where(mask, np.linspace(2.0, 1.0, T), 0.0)
    for go_back in (False, True):
        layer = RNN(cell, backwards=go_back, only_return_final=True)
        np.testing.assert_array_equal(
            layer.apply(params, xs, mask=weights), layer.apply(params, xs, mask=mask)
        )


def test_rnn_layer_errors():
    with pytest.raises(ValueError, match=r"gradient_steps must be -1 .* or >= 1; got 0"):
        RNN(GRU(H), gradient_steps=0)
    with pytest.raises(ValueError, match='truncate_mode must be "chunked" or "window"'):
        RNN(GRU(H), 2, truncate_mode="theano")
    with pytest.raises(ValueError, match="give gradient_steps or truncate, not both"):
        RNN(GRU(H), 3, truncate=TheanoTail(3))
    layer = RNN(GRU(H))
    params = layer.init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=r"xs must be \(batch, time, features\); got shape"):
        layer.apply(params, jnp.ones((T, I)))
    with pytest.raises(ValueError, match=r"mask must be \(batch, time\) = \(3, 6\); got \(6, 3\)"):
        layer.apply(params, jnp.ones((B, T, I)), mask=jnp.ones((T, B), bool))
    one = GRU(H).initial_carry()
    for carry in (one, jnp.zeros((B + 1, H))):
        with pytest.raises(
            ValueError,
            match=rf"initial_carry needs a leading batch axis of 3 .*; initial_carry has shape "
            rf"\({carry.shape[0]},",
        ):
            layer.apply(params, jnp.ones((B, T, I)), initial_carry=carry)
    # Inputs of another width than the parameters: said in the layer's terms, for every cell
    # (the cell's own check, meant for one example, told the user to "use RNN").
    for cell in (SimpleRNN(H), GRU(H), LSTM(H)):
        layer = RNN(cell, gradient_steps=2)
        params = layer.init(jax.random.key(0), I)
        for carry in (None, jax.tree.map(lambda a: jnp.stack([a] * B), cell.initial_carry())):
            with pytest.raises(
                ValueError,
                match=rf"RNN.apply: xs has {I + 1} features per step \(shape \({B}, {T}, "
                rf"{I + 1}\)\), but the {type(cell).__name__} parameters take {I} .*"
                rf"input_features={I + 1}",
            ):
                layer.apply(params, jnp.ones((B, T, I + 1)), initial_carry=carry)


# -------------------------------------------------------------------------------------------
# Streaming TBPTT
# -------------------------------------------------------------------------------------------

N = 7  # steps, not a multiple of most k1 below


def _tbptt_problem():
    rng = np.random.default_rng(20)
    params = {
        "w": jnp.asarray(rng.normal(size=(I, H))),
        "u": jnp.asarray(rng.normal(size=(H, H)) * 0.8),
    }
    xs = (jnp.asarray(rng.normal(size=(N, I))), jnp.asarray(rng.normal(size=(N, H))))
    init = jnp.asarray(rng.normal(size=H))
    return params, init, xs


def _loss_step(params, h, inputs):
    x, target = inputs
    h = jnp.tanh(x @ params["w"] + h @ params["u"])
    return h, jnp.sum(jnp.sin(h) * target)


def _brute_force_tbptt(params, init, xs, k1, k2):
    """Every k1 steps, the block's losses back-propagate k2 steps (Williams & Peng)."""
    carries = [init]
    for t in range(N):
        carries.append(_loss_step(params, carries[-1], jax.tree.map(lambda a, t=t: a[t], xs))[0])
    grads = jax.tree.map(jnp.zeros_like, params)
    total = 0.0
    for first in range(0, N, k1):
        last = min(first + k1, N)
        start = max(first + k1 - k2, 0)

        def block_loss(p, start=start, first=first, last=last):
            h, block = lax.stop_gradient(carries[start]), 0.0
            for t in range(start, last):
                h, loss = _loss_step(p, h, jax.tree.map(lambda a, t=t: a[t], xs))
                if t >= first:
                    block += loss
            return block

        value, g = jax.value_and_grad(block_loss)(params)
        total += value
        grads = jax.tree.map(jnp.add, grads, g)
    return total, grads, carries[-1]


_tbptt = jax.jit(tbptt_value_and_grad, static_argnums=0, static_argnames=("k1", "k2"))


@pytest.mark.parametrize(
    ("k1", "k2"), [(1, 1), (2, 2), (3, 3), (2, 3), (2, 5), (1, 3), (3, 7), (7, 7), (4, 9)]
)
def test_tbptt_matches_brute_force_definition(k1, k2):
    with jax.enable_x64():
        params, init, xs = _tbptt_problem()
        loss, grads, final = _tbptt(_loss_step, params, init, xs, k1=k1, k2=k2)
        want_loss, want_grads, want_final = _brute_force_tbptt(params, init, xs, k1, k2)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        np.testing.assert_allclose(final, want_final, rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads, want_grads)


@pytest.mark.parametrize(("k1", "k2", "mode"), [(3, None, Chunked(3)), (1, 3, Window(3))])
def test_tbptt_special_cases_equal_scan_truncation(k1, k2, mode):
    with jax.enable_x64():
        params, init, xs = _tbptt_problem()
        loss, grads, final = _tbptt(_loss_step, params, init, xs, k1=k1, k2=k2)

        def scan_loss(params):
            h, losses = scan(lambda h, x: _loss_step(params, h, x), init, xs, truncate=mode)
            return losses.sum(), h

        (want_loss, want_final), want = jax.value_and_grad(scan_loss, has_aux=True)(params)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        np.testing.assert_allclose(final, want_final, rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads, want)


def test_tbptt_composes_with_optax_and_streams_the_carry():
    with jax.enable_x64():
        params, init, xs = _tbptt_problem()
        optimizer = optax.sgd(0.05, momentum=0.9)

        @jax.jit
        def train_step(params, opt_state, h):
            loss, grads, h = tbptt_value_and_grad(_loss_step, params, h, xs, k1=2, k2=3)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, h, loss

        p, state, h = params, optimizer.init(params), init
        ref_p, ref_state, ref_h = params, optimizer.init(params), init
        for _ in range(3):
            p, state, h, _ = train_step(p, state, h)
            _, g, ref_h_next = _brute_force_tbptt(ref_p, ref_h, xs, 2, 3)
            updates, ref_state = optimizer.update(g, ref_state, ref_p)
            ref_p, ref_h = optax.apply_updates(ref_p, updates), ref_h_next
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), p, ref_p)
        np.testing.assert_allclose(h, ref_h, rtol=1e-10)


def test_tbptt_memory_does_not_grow_with_length():
    # Temporary buffers of the compiled gradient: streaming TBPTT keeps O(k2) activations,
    # full BPTT keeps O(T).
    params = {"w": jnp.eye(32) * 0.3, "u": jnp.eye(32) * 0.5}

    def loss_step(params, h, x):
        h = jnp.tanh(x @ params["w"] + h @ params["u"])
        return h, jnp.sum(h**2)

    def temp_bytes(fn, n):
        xs = jax.ShapeDtypeStruct((n, 32), jnp.float32)
        analysis = jax.jit(fn).lower(params, xs).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    def streaming(params, xs):
        return tbptt_value_and_grad(loss_step, params, jnp.zeros(32), xs, k1=10, k2=20)

    def full(params, xs):
        def total(p):
            _, losses = scan(lambda h, x: loss_step(p, h, x), jnp.zeros(32), xs)
            return losses.sum()

        return jax.value_and_grad(total)(params)

    assert temp_bytes(streaming, 4000) < 1.2 * temp_bytes(streaming, 1000) + 4096
    assert temp_bytes(full, 4000) > 3 * temp_bytes(full, 1000)


def test_tbptt_with_no_steps_returns_zero_loss_and_gradient_and_the_init():
    params, init, xs = _tbptt_problem()
    empty = jax.tree.map(lambda a: a[:0], xs)
    loss, grads, final = tbptt_value_and_grad(_loss_step, params, init, empty, k1=2, k2=3)
    assert loss.shape == () and float(loss) == 0.0
    jax.tree.map(lambda g, p: np.testing.assert_array_equal(g, np.zeros_like(p)), grads, params)
    np.testing.assert_array_equal(final, init)


def test_tbptt_errors():
    params, init, xs = _tbptt_problem()
    with pytest.raises(ValueError, match="k2 must be >= k1; got k1=3, k2=2"):
        tbptt_value_and_grad(_loss_step, params, init, xs, k1=3, k2=2)
    with pytest.raises(ValueError, match="k1 must be >= 1; got k1=0"):
        tbptt_value_and_grad(_loss_step, params, init, xs, k1=0)
    with pytest.raises(TypeError, match=r"k2 must be an int >= 1; got 2\.0"):
        tbptt_value_and_grad(_loss_step, params, init, xs, k1=1, k2=2.0)
    with pytest.raises(TypeError, match=r"floating point; params\['steps'\] is int32. Close over"):
        tbptt_value_and_grad(_loss_step, {**params, "steps": jnp.int32(3)}, init, xs, k1=2)
    with pytest.raises(TypeError, match=r"must return a scalar loss; got shape \(4,\)"):
        tbptt_value_and_grad(lambda p, h, x: (h, h), params, init, xs, k1=2)
    with pytest.raises(
        ValueError, match="tbptt_value_and_grad: the leaves of xs disagree on the number of time"
    ):
        tbptt_value_and_grad(_loss_step, params, init, (xs[0], xs[1][:3]), k1=2)
    with pytest.raises(
        TypeError,
        match=r"tbptt_value_and_grad: loss_step\(params, carry, x\) must return a pair "
        r"\(new_carry, loss\); got one float",
    ):
        tbptt_value_and_grad(lambda p, h, x: jnp.sum(h), params, init, xs, k1=2)
    with pytest.raises(TypeError, match=r"loss_step must return a carry with the same shapes"):
        tbptt_value_and_grad(lambda p, h, x: (h[:2], jnp.sum(h)), params, init, xs, k1=2)


def test_only_return_final_on_a_sequence_without_steps_is_a_clear_error():
    layer = RNN(SimpleRNN(2), only_return_final=True)
    params = SimpleRNN(2).init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"only_return_final=True needs at least one time step"):
        layer.apply(params, jnp.ones((1, 0, 3)))
    # Without only_return_final an empty sequence gives empty outputs, as before.
    assert RNN(SimpleRNN(2)).apply(params, jnp.ones((1, 0, 3))).shape == (1, 0, 2)
