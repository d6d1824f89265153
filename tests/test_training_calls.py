"""fit(..., steps_per_call=k): k steps per call of the compiled program, in a lax.scan."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradkit import _checkpoint, training
from gradkit.layers import MLP
from gradkit.training import NonFiniteLossError, TrainState, fit, make_train_step

N, D = 40, 3
RNG = np.random.default_rng(1)
X = RNG.normal(size=(N, D)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
MODEL = MLP([D, 8, 1], "tanh")
PARAMS = MODEL.init(jax.random.key(0))
BATCHES = [(X[i : i + 5].copy(), Y[i : i + 5].copy()) for i in range(0, N, 5)]  # 8 batches


def mlp_loss(params, batch):
    x, y = batch
    return jnp.mean((MODEL.apply(params, x)[..., 0] - y) ** 2)


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def _close(a, b, rtol=1e-6):
    """Equal up to rounding: the scanned step may compile differently from the single one."""
    return all(
        np.allclose(x, y, rtol=rtol, atol=1e-7) for x, y in zip(_leaves(a), _leaves(b), strict=True)
    )


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def _fit(data=(X, Y), k=4, **kwargs):
    options = dict(steps=13, batch_size=8, progress=False, seed=2)
    options.update(kwargs)
    return fit(mlp_loss, PARAMS, data, optax.adam(1e-2), steps_per_call=k, **options)


@pytest.mark.parametrize("data", ["arrays", "iterable"])
def test_calls_of_several_steps_train_like_single_steps(data):
    # 13 steps of 5 per epoch (arrays): calls of 4 span epoch boundaries, the last step runs
    # alone; with the iterable, 8 batches re-iterated.
    given, size = ((X, Y), 8) if data == "arrays" else (BATCHES, None)
    single_state, single = _fit(given, k=1, batch_size=size)
    state, history = _fit(given, k=4, batch_size=size)
    assert int(state.step) == 13
    assert _close(state.params, single_state.params)
    assert _close(state.opt_state, single_state.opt_state)
    # Every step's metrics are kept, not only each call's last.
    np.testing.assert_array_equal(history.steps, np.arange(1, 14))
    np.testing.assert_allclose(history["loss"], single["loss"], rtol=1e-6)
    np.testing.assert_allclose(history["grad_norm"], single["grad_norm"], rtol=1e-6)


def test_a_call_is_one_program_compiled_once(monkeypatch):
    compiled = []
    original = training._Run._compile_call

    def spy(self, body, k):
        fn = original(self, body, k)
        compiled.append(fn)
        return fn

    monkeypatch.setattr(training._Run, "_compile_call", spy)
    _, history = _fit(k=4, steps=16, batch_size=4)  # 10 steps per epoch: calls span two
    (fn,) = compiled
    assert fn._cache_size() == 1
    assert len(history) == 16


def test_health_steps_run_alone_and_the_other_calls_stay_scanned(monkeypatch):
    # health_every=6 with calls of 4 (refused before): the monitored steps 0, 6 and 12 are a
    # program of their own, so the calls holding them (steps 0-3, 4-7, 12-15) run one by one
    # and the call of steps 8-11 stays one scanned call.
    calls = []
    original = training._Run._compile_call

    def spy(self, body, k):
        fn = original(self, body, k)

        def counted(*args):
            calls.append(k)
            return fn(*args)

        return counted

    monkeypatch.setattr(training._Run, "_compile_call", spy)
    state, history = _fit(k=4, steps=16, health_every=6)
    assert calls == [4]
    single_state, single = _fit(k=1, steps=16, health_every=6)
    assert _close(state.params, single_state.params)
    norms, expected = history["health/dense_0/grad_norm"], single["health/dense_0/grad_norm"]
    # Rows are steps 1..16; the statistics belong to the steps that started at 0, 6 and 12.
    monitored = [0, 6, 12]
    assert np.all(np.isfinite(norms[monitored])) and np.all(norms[monitored] > 0)
    assert np.isnan(np.delete(norms, monitored)).all()
    np.testing.assert_allclose(norms, expected, rtol=1e-6)


def test_health_every_within_a_call_warns_that_no_call_is_scanned():
    with pytest.warns(UserWarning, match="all steps run one by one"):
        _, history = _fit(k=4, steps=6, health_every=3)
    assert np.isfinite(history["health/dense_0/grad_norm"][[0, 3]]).all()


def test_callbacks_and_evaluations_see_the_last_step_of_each_call():
    seen, evaluated = [], []

    def callback(step, state, metrics):
        seen.append((step, int(state.step), sorted(metrics)))

    def evaluate(params):
        evaluated.append(params)
        return mlp_loss(params, (X, Y))

    _, history = _fit(k=4, steps=10, callbacks=[callback], eval_fn=evaluate, eval_every=8)
    # Calls of steps 1-4 and 5-8; steps 9 and 10 run one by one.
    assert [s for s, _, _ in seen] == [4, 8, 9, 10]
    assert all(step == state_step for step, state_step, _ in seen)
    assert seen[1][2] == ["eval_eval", "grad_norm", "loss"]
    np.testing.assert_array_equal(history.eval_steps, [8, 10])
    reference, _ = _fit(k=1, steps=8)
    assert _close(evaluated[0], reference.params)


def test_a_callback_stop_ends_the_run_after_its_call():
    def stop(step, state, metrics):
        return step == 8

    state, history = _fit(k=4, steps=20, callbacks=[stop])
    assert int(state.step) == 8 and len(history) == 8


def test_a_run_resumed_at_a_multiple_of_k_ends_bit_for_bit_as_the_uninterrupted_one(tmp_path):
    uninterrupted, full = _fit(k=4, steps=16)

    def interrupt(step, state, metrics):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(k=4, steps=16, checkpoint_dir=tmp_path, checkpoint_every=4, callbacks=[interrupt])
    kept = [step for step, _ in _checkpoint.list_checkpoints(tmp_path)]
    assert kept[-1] % 4 == 0 and kept[-1] >= 8, kept  # calls end at multiples of 4
    resumed, history = _fit(k=4, steps=16, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert _equal(resumed.params, uninterrupted.params)
    assert _equal(resumed.opt_state, uninterrupted.opt_state)
    np.testing.assert_array_equal(history["loss"], full["loss"])


def test_a_run_resumed_between_multiples_of_k_steps_singly_up_to_the_next(tmp_path):
    _fit(k=1, steps=6, checkpoint_dir=tmp_path)
    resumed, history = _fit(k=4, steps=13, checkpoint_dir=tmp_path)
    reference, _ = _fit(k=1, steps=13)
    assert int(resumed.step) == 13 and len(history) == 13
    assert _close(resumed.params, reference.params)


@pytest.mark.parametrize("bad_step", [5, 6, 8])
def test_a_nan_inside_a_call_stops_at_its_step_with_the_state_and_batch_before_it(bad_step):
    batches = [(x.copy(), y.copy()) for x, y in BATCHES]
    batches[bad_step - 1][0][0, 0] = np.nan
    optimizer = optax.sgd(0.1)
    step = make_train_step(mlp_loss, optimizer)
    expected = TrainState.create(PARAMS, optimizer)
    for batch in batches[: bad_step - 1]:
        expected = step(expected, batch)[0]
    seen = []
    with pytest.raises(
        NonFiniteLossError, match=rf"training stopped at step {bad_step}: the loss is nan"
    ) as info:
        fit(
            mlp_loss,
            PARAMS,
            batches,
            optimizer,
            steps=8,
            steps_per_call=4,
            callbacks=[lambda step, state, metrics: seen.append(step)],
            progress=False,
        )
    error = info.value
    assert error.step == bad_step and int(error.state.step) == bad_step - 1
    assert _close(error.state.params, expected.params)
    assert error.batch is batches[bad_step - 1]
    # The call's steps before the bad one are in the history; the first call's last step was
    # seen by the callback.
    np.testing.assert_array_equal(error.history.steps, np.arange(1, bad_step))
    assert seen == [4]


def test_a_last_update_of_a_call_that_makes_the_params_non_finite_is_blamed_on_its_step():
    def explode(count):
        return jnp.where(count >= 3, jnp.inf, 1.0)

    optimizer = optax.chain(optax.sgd(0.1), optax.scale_by_schedule(explode))
    with pytest.raises(
        NonFiniteLossError, match=r"step 4: its update made the params non-finite"
    ) as info:
        fit(mlp_loss, PARAMS, BATCHES, optimizer, steps=4, steps_per_call=4, progress=False)
    error = info.value
    assert error.step == 4 and int(error.state.step) == 3
    assert error.batch is BATCHES[3]
    assert all(np.isfinite(leaf).all() for leaf in _leaves(error.state.params))


def test_array_data_of_one_batch_per_epoch_spans_several_epochs_per_call():
    # Full batch, shuffled: each call of 4 steps spans 4 epochs' orders.
    single, _ = _fit(k=1, steps=9, batch_size=None)
    state, history = _fit(k=4, steps=9, batch_size=None)
    assert _close(state.params, single.params)
    assert len(history) == 9


def test_batches_of_different_shapes_within_a_call_are_refused_with_the_steps():
    batches = [*BATCHES[:3], (X[:3], Y[:3])]
    with pytest.raises(ValueError, match=r"stacks the batches of steps 1 to 4, and they differ"):
        fit(mlp_loss, PARAMS, batches, optax.sgd(0.1), steps=4, steps_per_call=4, progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(steps_per_call=0), r"steps_per_call must be a positive int, got"),
        (dict(steps_per_call=2.5), r"steps_per_call must be a positive int, got"),
        (dict(steps_per_call=True), r"steps_per_call must be a positive int, got"),
        (dict(steps_per_call=4, eval_every=6, eval_fn=lambda p: 0.0), r"eval_every=6 is not a"),
        (
            dict(steps_per_call=4, checkpoint_every=2),
            r"checkpoint_every=2 is not a multiple of steps_per_call=4",
        ),
        (dict(steps_per_call=4, data_parallel=True), r"for data parallelism"),
    ],
)
def test_bad_steps_per_call_options_are_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        fit(
            mlp_loss,
            PARAMS,
            (X, Y),
            optax.sgd(0.1),
            steps=8,
            batch_size=8,
            progress=False,
            checkpoint_dir=tmp_path,
            **options,
        )
    assert not list(tmp_path.iterdir())
