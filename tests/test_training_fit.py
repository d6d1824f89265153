"""Tests for gradkit.training.fit: batching, resume, checkpoints, NaN stops, logging, plots."""

import math
import warnings

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot

from gradkit import _checkpoint, training
from gradkit._tensorboard import read_scalars
from gradkit.layers import MLP
from gradkit.training import (
    History,
    NonFiniteLossError,
    TrainState,
    fit,
    make_train_step,
)

N, D = 40, 3
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N, D)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
MODEL = MLP([D, 8, 1], "tanh")
PARAMS = MODEL.init(jax.random.key(0))


def mlp_loss(params, batch):
    x, y = batch
    return jnp.mean((MODEL.apply(params, x)[..., 0] - y) ** 2)


def linear_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


LINEAR = {"w": jnp.zeros(D), "b": jnp.zeros(())}


def _leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def _same_as_manual(a, b):
    """fit's states against a hand-written loop's: bit for bit on the CPU; on a GPU two
    separately compiled programs of the same maths may round differently (seen: 1 ulp)."""
    if jax.default_backend() == "cpu":
        return _leaves_equal(a, b)
    return all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_fit_shuffles_per_epoch_with_the_key_and_matches_a_manual_loop():
    optimizer = optax.sgd(0.05)
    batch_size, epochs, seed = 16, 3, 7
    state, history = fit(
        linear_loss,
        LINEAR,
        (X, Y),
        optimizer,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    per_epoch = N // batch_size  # the last N % batch_size examples of each order are left out
    assert len(history) == epochs * per_epoch == int(state.step)
    np.testing.assert_array_equal(history.steps, np.arange(1, epochs * per_epoch + 1))

    step = make_train_step(linear_loss, optimizer)
    manual = TrainState.create(LINEAR, optimizer, seed=seed)
    losses = []
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(manual.key, epoch), N))
        for i in range(per_epoch):
            index = order[i * batch_size : (i + 1) * batch_size]
            manual, metrics = step(manual, (X[index], Y[index]))
            losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(history["loss"], losses, rtol=1e-6)
    for ours, theirs in zip(
        jax.tree_util.tree_leaves(state.params),
        jax.tree_util.tree_leaves(manual.params),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_fit_converges_on_a_regression_and_takes_dict_data():
    state, history = fit(
        lambda p, b: linear_loss(p, (b["x"], b["y"])),
        LINEAR,
        {"x": X, "y": Y},
        optax.adam(0.1),
        steps=300,
        batch_size=20,
        progress=False,
    )
    np.testing.assert_allclose(state.params["w"], [1.0, -2.0, 0.5], atol=1e-2)
    np.testing.assert_allclose(state.params["b"], 0.3, atol=1e-2)
    assert history["loss"][-1] < 1e-4 < history["loss"][0]


def test_fit_on_an_iterable_of_batches_uses_them_in_order():
    batches = [(X[i : i + 10], Y[i : i + 10]) for i in range(0, N, 10)]
    optimizer = optax.sgd(0.1)
    state, history = fit(linear_loss, LINEAR, batches, optimizer, epochs=2, progress=False)
    step = make_train_step(linear_loss, optimizer)
    manual = TrainState.create(LINEAR, optimizer)
    for batch in batches * 2:
        manual, _ = step(manual, batch)
    assert len(history) == 8
    assert _same_as_manual(state.params, manual.params)

    generator = (batch for batch in batches)  # one-shot: stops when exhausted
    with pytest.warns(UserWarning, match=r"data ran out after 4 batches; stopping at step 4 of"):
        state, history = fit(linear_loss, LINEAR, generator, optimizer, steps=100, progress=False)
    assert len(history) == 4
    with pytest.raises(ValueError, match=r"data yielded no batches"):
        fit(linear_loss, LINEAR, [], optimizer, steps=3, progress=False)


def test_fit_full_batch_in_order_with_shuffle_off():
    optimizer = optax.sgd(0.1)
    state, _ = fit(linear_loss, LINEAR, (X, Y), optimizer, steps=5, shuffle=False, progress=False)
    step = make_train_step(linear_loss, optimizer)
    manual = TrainState.create(LINEAR, optimizer)
    for _ in range(5):
        manual, _ = step(manual, (X, Y))
    assert _same_as_manual(state.params, manual.params)


def test_fit_compiles_the_step_once():
    traces = []

    def loss(params, batch):
        traces.append(1)
        return linear_loss(params, batch)

    fit(loss, LINEAR, (X, Y), optax.sgd(0.1), epochs=4, batch_size=8, progress=False)
    assert len(traces) == 1


def test_eval_fn_callbacks_and_early_stop():
    seen = []

    def callback(step, state, metrics):
        seen.append((step, int(state.step), sorted(metrics)))
        return step == 6  # stop after step 6

    state, history = fit(
        linear_loss,
        LINEAR,
        (X, Y),
        optax.sgd(0.1),
        steps=50,
        batch_size=10,
        eval_fn=lambda p: {"full": linear_loss(p, (X, Y)), "b": p["b"]},
        eval_every=3,
        callbacks=[callback],
        progress=False,
    )
    assert int(state.step) == 6 and len(history) == 6
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert all(step == state_step for step, state_step, _ in seen)
    assert seen[2][2] == ["eval_b", "eval_full", "grad_norm", "loss"]
    np.testing.assert_array_equal(history.eval_steps, [3, 6])
    np.testing.assert_allclose(
        history.eval_metrics["full"][-1], linear_loss(state.params, (X, Y)), rtol=1e-6
    )


# Eight batches of five examples; numpy copies, so a test may write a NaN into one.
BATCHES = [(X[i : i + 5].copy(), Y[i : i + 5].copy()) for i in range(0, N, 5)]


def _manual_states(loss, params, optimizer, batches):
    """The states ``[state_0, state_1, ...]`` of a plain make_train_step loop over ``batches``."""
    step = make_train_step(loss, optimizer)
    states = [TrainState.create(params, optimizer)]
    for batch in batches:
        states.append(step(states[-1], batch)[0])
    return states


@pytest.mark.parametrize("stop_at", [1, 2, 3, 4, 5, 7])
def test_callbacks_and_evals_see_each_step_with_its_state_and_a_stop_returns_that_step(stop_at):
    # fit handles finished steps in blocks while later steps run: whatever the position of the
    # stopping step in its block, every step up to it is seen once, in order, with its own state,
    # and the run returns that step's state, not a later one already launched.
    optimizer = optax.sgd(0.1)
    expected = _manual_states(linear_loss, LINEAR, optimizer, BATCHES)
    seen = []

    def callback(step, state, metrics):
        seen.append(step)
        assert _same_as_manual(state.params, expected[step].params)
        assert int(state.step) == step
        np.testing.assert_allclose(
            metrics["eval_eval"], linear_loss(expected[step].params, (X, Y)), rtol=1e-6
        )
        return step == stop_at

    state, history = fit(
        linear_loss,
        LINEAR,
        BATCHES,
        optimizer,
        steps=8,
        eval_fn=lambda p: linear_loss(p, (X, Y)),
        eval_every=1,
        callbacks=[callback],
        progress=False,
    )
    assert seen == list(range(1, stop_at + 1))
    assert int(state.step) == stop_at and _same_as_manual(state.params, expected[stop_at].params)
    np.testing.assert_array_equal(
        jax.random.key_data(state.key), jax.random.key_data(jax.random.key(0))
    )
    np.testing.assert_array_equal(history.steps, np.arange(1, stop_at + 1))
    np.testing.assert_array_equal(history.eval_steps, np.arange(1, stop_at + 1))


@pytest.mark.parametrize("stop", [True, np.True_, jnp.array(True)], ids=["python", "numpy", "jax"])
def test_a_callback_stops_with_any_true_boolean_and_not_with_other_values(stop):
    def stopper(step, state, metrics):
        return stop if step == 3 else (1 if step == 1 else jnp.array(False))

    state, history = fit(
        linear_loss, LINEAR, BATCHES, optax.sgd(0.1), steps=8, callbacks=[stopper], progress=False
    )
    assert int(state.step) == 3  # 1 and a JAX False at the other steps did not stop it
    np.testing.assert_array_equal(history.steps, [1, 2, 3])


def test_several_epochs_over_a_one_shot_generator_warn_that_it_ran_dry():
    def generator():
        yield from BATCHES

    with pytest.warns(UserWarning, match=r"pass 2 of 3 over the data gave no batches.*one-shot"):
        state, _ = fit(linear_loss, LINEAR, generator(), optax.sgd(0.1), epochs=3, progress=False)
    assert int(state.step) == len(BATCHES)


def test_fit_runs_ahead_of_the_host_by_at_most_max_steps_in_flight():
    drawn = []

    def batches():
        for batch in BATCHES * 3:
            drawn.append(1)
            yield batch

    ahead = []
    fit(
        linear_loss,
        LINEAR,
        batches(),
        optax.sgd(0.1),
        steps=20,
        callbacks=[lambda step, state, metrics: ahead.append(len(drawn) - step)],
        progress=False,
    )
    assert len(ahead) == 20
    # the device gets later steps while the host handles earlier ones, but no more than the
    # bound (each unhandled step keeps a state alive)
    assert 1 <= max(ahead) <= _depth()
    assert min(ahead) >= 0


def _depth() -> int:
    """How many steps fit keeps in flight here for a small model."""
    return training._queue_depth(jax.devices()[0].platform, 0)[0]


def test_the_queue_is_deeper_on_an_accelerator_unless_the_states_are_large():
    assert training._queue_depth("cpu", 1000) == (4, 2)
    assert training._queue_depth("cpu", 1) == (4, 2)
    assert training._queue_depth("gpu", 10_000) == (16, 8)
    assert training._queue_depth("gpu", 32 * 2**20) == (8, 4)  # 8 states of 32 MiB = 256 MiB
    assert training._queue_depth("gpu", 2**30) == (4, 2)  # a large model keeps the CPU's depth
    assert training._queue_depth("tpu", 0) == (16, 8)


def test_the_accelerator_settings_on_the_cpu_give_the_same_run(monkeypatch):
    # A deep queue, metrics stacked on the device before they are read, the window derived on
    # the device: what a GPU runs, here on the CPU, gives the CPU's run.
    host, host_history = _run(health_every=4)
    monkeypatch.setattr(training, "_STACK_METRICS", True)
    monkeypatch.setattr(training, "_WINDOW_ON_DEVICE", True)
    monkeypatch.setattr(training, "_MAX_STEPS_IN_FLIGHT", 16)
    monkeypatch.setattr(training, "_STEPS_PER_READ", 8)
    device, device_history = _run(health_every=4)
    assert _leaves_equal(device.params, host.params)
    np.testing.assert_array_equal(device_history["loss"], host_history["loss"])
    np.testing.assert_array_equal(device_history.steps, host_history.steps)


@pytest.mark.parametrize("health_every", [None, 3])
def test_the_window_derived_on_the_device_gives_the_same_run_bit_for_bit(
    tmp_path, monkeypatch, health_every
):
    # What an accelerator runs (the step computes its batch window from state.step) against
    # what the CPU runs (the host passes it): the same batches, so the same run, also across
    # epochs (2 batches each) and when resumed from a checkpoint in the middle of an epoch.
    kwargs = {"health_every": health_every}
    monkeypatch.setattr(training, "_WINDOW_ON_DEVICE", False)
    host, host_history = _run(**kwargs)
    monkeypatch.setattr(training, "_WINDOW_ON_DEVICE", True)
    device, device_history = _run(**kwargs)
    assert _leaves_equal(device.params, host.params)
    np.testing.assert_array_equal(device_history["loss"], host_history["loss"])
    _run(tmp_path, steps=5, checkpoint_every=5, **kwargs)
    resumed, _ = _run(tmp_path, checkpoint_every=5, **kwargs)
    assert _leaves_equal(resumed.params, host.params)


def test_progress_bar_shows_steps_loss_and_rate(capsys):
    _, history = fit(
        linear_loss, LINEAR, (X, Y), optax.sgd(0.1), steps=5, batch_size=8, progress=True
    )
    err = capsys.readouterr().err
    assert "5/5" in err and "step/s" in err
    assert err.rstrip().endswith(f"loss={history['loss'][-1]:.4g}]")  # the last loss, not stale


# ---- bad input --------------------------------------------------------------------------------


def test_bad_fit_arguments_fail_before_any_step():
    with pytest.raises(ValueError, match=r"batch_size 64 is larger than the data \(40 examples\)"):
        fit(linear_loss, LINEAR, (X, Y), optax.sgd(0.1), steps=3, batch_size=64)
    with pytest.raises(ValueError, match=r"pass exactly one of steps and epochs"):
        fit(linear_loss, LINEAR, (X, Y), optax.sgd(0.1), steps=3, epochs=1)
    with pytest.raises(ValueError, match=r"pass exactly one of steps and epochs"):
        fit(linear_loss, LINEAR, (X, Y), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"share a non-empty leading"):
        fit(linear_loss, LINEAR, (X, Y[:10]), optax.sgd(0.1), steps=3)
    with pytest.raises(ValueError, match=r"batch_size applies to array data"):
        fit(linear_loss, LINEAR, [(X, Y)], optax.sgd(0.1), steps=3, batch_size=4)
    with pytest.raises(TypeError, match=r"must be an optax GradientTransformation"):
        fit(linear_loss, LINEAR, (X, Y), "sgd", steps=3)
    for listed in ((X.tolist(), Y.tolist()), {"x": X.tolist(), "y": Y.tolist()}):
        with pytest.raises(TypeError, match=r"dict of Python lists of numbers.*np\.asarray"):
            fit(linear_loss, LINEAR, listed, optax.sgd(0.1), steps=3)
    with pytest.raises(TypeError, match=r"callbacks must be callables"):
        fit(linear_loss, LINEAR, (X, Y), optax.sgd(0.1), steps=3, callbacks=[1])
    with pytest.raises(ValueError, match=r"steps must be a positive int, got 0"):
        fit(linear_loss, LINEAR, (X, Y), optax.sgd(0.1), steps=0)


def test_data_that_would_be_iterated_part_by_part_is_refused():
    # Each of these was once iterated as a sequence of "batches", handing the loss x and then
    # y (or the dict's keys) as whole batches: training ran on the wrong data without a word.
    sgd = optax.sgd(0.1)
    with pytest.raises(TypeError, match=r"data\[1\]\[0\] is float, not an array.*np\.asarray"):
        fit(linear_loss, LINEAR, (X, Y.tolist()), sgd, steps=3, progress=False)
    with pytest.raises(TypeError, match=r"data\['scale'\] is float, not an array"):
        fit(linear_loss, LINEAR, {"x": X, "y": Y, "scale": 2.0}, sgd, steps=3, progress=False)
    with pytest.raises(
        TypeError,
        match=r"list of 2 arrays \(float32\[40, 3\], float32\[40\]\).*"
        r"pass them as a tuple",
    ):
        fit(linear_loss, LINEAR, [X, Y], sgd, steps=3, progress=False)
    # A list of batches (same shapes, or tuples) is still an iterable of batches.
    batches = [(X[:20], Y[:20]), (X[20:], Y[20:])]
    _, history = fit(linear_loss, LINEAR, batches, sgd, steps=2, progress=False)
    assert len(history) == 2
    _, history = fit(
        lambda p, x: jnp.sum(x @ p["w"]), LINEAR, [X[:20], X[20:]], sgd, steps=2, progress=False
    )
    assert len(history) == 2


def test_an_eval_fn_returning_an_array_is_a_clear_error():
    common = dict(steps=2, batch_size=8, eval_every=1, progress=False)
    with pytest.raises(ValueError, match=r"eval_fn must return a real scalar.*its result is "):
        fit(linear_loss, LINEAR, (X, Y), optax.sgd(0.1), eval_fn=lambda p: p["w"], **common)
    with pytest.raises(ValueError, match=r"at step 1 result\['w'\] is float32 of shape \(3,\)"):
        fit(
            linear_loss,
            LINEAR,
            (X, Y),
            optax.sgd(0.1),
            eval_fn=lambda p: {"b": p["b"], "w": p["w"]},
            **common,
        )


def test_non_scalar_loss_in_fit_is_reported_before_any_update(tmp_path):
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar, got shape \(8,\)"):
        fit(
            lambda p, b: (b[0] @ p["w"] - b[1]) ** 2,
            LINEAR,
            (X, Y),
            optax.sgd(0.1),
            steps=3,
            batch_size=8,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert _checkpoint.list_checkpoints(tmp_path) == []


def test_data_params_dtype_mismatch_is_refused_before_training():
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match=r"batch\[0\] is float64 but the params are float32"):
            fit(linear_loss, LINEAR, (X.astype(np.float64), Y), optax.sgd(0.1), steps=2)


# ---- checkpoints and resume -------------------------------------------------------------------


def _run(tmp_path=None, steps=20, callbacks=(), **kwargs):
    return fit(
        mlp_loss,
        PARAMS,
        (X, Y),
        optax.adam(1e-2),
        steps=steps,
        batch_size=16,  # 2 batches per epoch: resumes cross epoch boundaries
        checkpoint_dir=tmp_path,
        callbacks=callbacks,
        progress=False,
        seed=3,
        **kwargs,
    )


def test_interrupted_and_resumed_run_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path):
    uninterrupted, full_history = _run()

    def interrupt(step, state, metrics):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, checkpoint_every=3, callbacks=[interrupt])
    steps = [step for step, _ in _checkpoint.list_checkpoints(tmp_path)]
    # the interrupt wrote a final checkpoint of the newest finished step (the steps already
    # launched when the callback ran at step 7 are finished and kept, none is half-written)
    assert 7 <= steps[-1] <= 7 + _depth(), steps

    resumed, history = _run(tmp_path, checkpoint_every=3)
    assert int(resumed.step) == 20
    assert _leaves_equal(resumed.params, uninterrupted.params)
    assert _leaves_equal(resumed.opt_state, uninterrupted.opt_state)
    np.testing.assert_array_equal(history.steps, full_history.steps)
    np.testing.assert_array_equal(history["loss"], full_history["loss"])


def test_a_shorter_run_continued_later_is_identical_too(tmp_path):
    uninterrupted, _ = _run(steps=11)
    _run(tmp_path, steps=5)
    resumed, history = _run(tmp_path, steps=11)
    assert len(history) == 11
    assert _leaves_equal(resumed.params, uninterrupted.params)
    again, _ = _run(tmp_path, steps=11)  # nothing left to do: returns the checkpoint
    assert _leaves_equal(again.params, uninterrupted.params)
    with pytest.warns(UserWarning, match=r"is at step 11, past the 6 steps asked for"):
        shorter, _ = _run(tmp_path, steps=6)
    assert int(shorter.step) == 11


def test_a_run_interrupted_in_its_last_steps_gets_its_final_evaluation_on_resume(tmp_path):
    def evaluate(params):
        return mlp_loss(params, (X, Y))

    _, full_history = _run(steps=8, eval_fn=evaluate)

    def interrupt(step, state, metrics):
        if step == 7:  # the steps already launched finish: the checkpoint is at step 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, steps=8, eval_fn=evaluate, callbacks=[interrupt])
    _, history = _run(tmp_path, steps=8, eval_fn=evaluate)
    np.testing.assert_array_equal(history.eval_steps, [8])
    np.testing.assert_array_equal(history.eval_steps, full_history.eval_steps)
    np.testing.assert_array_equal(history["eval"], full_history["eval"])


class _LengthlessLoader:
    """Batches from a fresh iterator on every pass, without ``__len__`` (like many loaders)."""

    def __init__(self, examples=N):
        self.examples = examples

    def __iter__(self):
        return iter([(X[i : i + 8], Y[i : i + 8]) for i in range(0, self.examples, 8)])


def test_a_finished_epochs_run_over_a_lengthless_loader_resumes_to_its_end(tmp_path):
    kwargs = dict(epochs=2, checkpoint_dir=tmp_path, progress=False)
    state, history = fit(linear_loss, LINEAR, _LengthlessLoader(), optax.sgd(0.1), **kwargs)
    assert int(state.step) == 10
    again, again_history = fit(linear_loss, LINEAR, _LengthlessLoader(), optax.sgd(0.1), **kwargs)
    assert int(again.step) == 10 and _leaves_equal(again.params, state.params)
    np.testing.assert_array_equal(again_history["loss"], history["loss"])
    # the same checkpoint with data of half the length: said, not silently accepted
    with pytest.warns(UserWarning, match=r"2 passes over the data gave 6 batches, fewer than"):
        fit(linear_loss, LINEAR, _LengthlessLoader(24), optax.sgd(0.1), **kwargs)


def test_checkpoints_are_npz_without_pickles_written_atomically(tmp_path):
    state, _ = _run(tmp_path, steps=9, checkpoint_every=2, keep_checkpoints=2)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["ckpt_00000008.npz", "ckpt_00000009.npz"]  # no temporary files remain
    with np.load(tmp_path / "ckpt_00000009.npz", allow_pickle=False) as archive:
        kernel_index = next(
            i
            for i, leaf in enumerate(_checkpoint.read_metadata(archive.fid.name)["leaves"])
            if leaf["path"] == ".params['dense_0']['kernel']"
        )
        np.testing.assert_array_equal(
            archive[f"leaf_{kernel_index:05d}"], state.params["dense_0"]["kernel"]
        )


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    tree = {"w": jnp.arange(3.0)}
    first = _checkpoint.save(tmp_path, 1, tree)

    def crash(handle, **arrays):
        handle.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    for step in (2, 1):  # a new step, and a rewrite of the existing one
        with pytest.raises(OSError, match="disk full"):
            _checkpoint.save(tmp_path, step, {"w": jnp.zeros(3)})
    monkeypatch.undo()
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no temporary left
    restored, _, _ = _checkpoint.restore(first, tree)
    np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])


def test_a_foreign_npz_file_is_not_taken_for_a_checkpoint(tmp_path):
    np.savez(tmp_path / "ckpt_00000003.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match=r"is not a gradkit checkpoint \(it has no __metadata__"):
        _run(tmp_path, steps=4)


def test_fit_resumes_from_a_state_saved_without_history(tmp_path):
    optimizer = optax.sgd(0.1)
    state, _ = fit(linear_loss, LINEAR, (X, Y), optimizer, steps=3, shuffle=False, progress=False)
    _checkpoint.save(tmp_path, 3, state)
    resumed, history = fit(
        linear_loss,
        LINEAR,
        (X, Y),
        optimizer,
        steps=5,
        shuffle=False,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    np.testing.assert_array_equal(history.steps, [4, 5])
    again, _ = fit(linear_loss, LINEAR, (X, Y), optimizer, steps=5, shuffle=False, progress=False)
    assert _leaves_equal(resumed.params, again.params)


def test_checkpoint_round_trip_keeps_typed_keys_and_bfloat16(tmp_path):
    tree = {
        "key": jax.random.key(5),
        "half": jnp.arange(4, dtype=jnp.bfloat16) / 3,
        "int": jnp.arange(3, dtype=jnp.int32),
    }
    path = _checkpoint.save(tmp_path, 1, tree)
    restored, _, metadata = _checkpoint.restore(path, tree)
    assert metadata["step"] == 1
    assert restored["half"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(restored["half"], np.float32), np.asarray(tree["half"], np.float32)
    )
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"])
    )
    np.testing.assert_array_equal(restored["int"], tree["int"])


def test_a_checkpoint_of_another_model_is_refused_with_the_differences(tmp_path):
    _run(tmp_path, steps=2)
    other = MLP([D, 5, 1], "tanh").init(jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"different model or optimizer(.|\n)*"
        r"\.params\['dense_0'\]\['kernel'\]: float32\(3, 8\) in the checkpoint, "
        r"float32\(3, 5\) in this run",
    ):
        fit(
            mlp_loss,
            other,
            (X, Y),
            optax.adam(1e-2),
            steps=4,
            batch_size=16,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match=r"different model or optimizer(.|\n)*opt_state"):
        fit(
            mlp_loss,
            PARAMS,
            (X, Y),
            optax.sgd(1e-2),
            steps=4,
            batch_size=16,
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_resuming_with_another_seed_warns_and_keeps_the_runs_key(tmp_path):
    # The checkpoint's key wins (the run ends as it would have); a different seed= was once
    # ignored without a word.
    common = dict(batch_size=16, checkpoint_dir=tmp_path, progress=False)
    fit(mlp_loss, PARAMS, (X, Y), optax.adam(1e-2), steps=3, seed=3, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(mlp_loss, PARAMS, (X, Y), optax.adam(1e-2), steps=4, seed=3, **common)
    with pytest.warns(UserWarning, match=r"another PRNG key than seed=4 gives.*its own key"):
        state, _ = fit(mlp_loss, PARAMS, (X, Y), optax.adam(1e-2), steps=5, seed=4, **common)
    np.testing.assert_array_equal(
        jax.random.key_data(state.key), jax.random.key_data(jax.random.key(3))
    )


def test_resume_false_refuses_a_folder_with_checkpoints(tmp_path):
    _run(tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"already holds checkpoints.*pass resume=True"):
        _run(tmp_path, steps=4, resume=False)


# ---- NaN stop ---------------------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    def loss(params, batch):
        x, y = batch
        # log of a quantity that the large learning rate drives negative
        return jnp.mean(jnp.log(1.0 + x @ params["w"]) - y)

    with pytest.raises(
        NonFiniteLossError, match=r"training stopped at step \d+: the loss is nan"
    ) as info:
        fit(
            loss,
            LINEAR,
            (X, Y),
            optax.sgd(5.0),
            steps=50,
            batch_size=8,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            progress=False,
        )
    error = info.value
    assert error.step > 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(error.state.params))
    assert int(error.state.step) == error.step - 1
    assert not np.isfinite(loss(error.state.params, error.batch))  # it reproduces the NaN
    assert len(error.history) == error.step - 1
    newest = _checkpoint.list_checkpoints(tmp_path)[-1][0]
    assert newest == error.step - 1 and error.checkpoint.name == f"ckpt_{newest:08d}.npz"
    restored, _, _ = _checkpoint.restore(error.checkpoint, error.state)
    assert _leaves_equal(restored.params, error.state.params)


@pytest.mark.parametrize("bad_step", [1, 2, 3, 4, 6])
def test_a_nan_at_any_step_stops_there_with_the_state_and_batch_before_it(bad_step):
    batches = [(x.copy(), y.copy()) for x, y in BATCHES]
    batches[bad_step - 1][0][0, 0] = np.nan
    optimizer = optax.sgd(0.1)
    expected = _manual_states(linear_loss, LINEAR, optimizer, batches[: bad_step - 1])
    seen = []
    with pytest.raises(
        NonFiniteLossError, match=rf"training stopped at step {bad_step}: the loss is nan"
    ) as info:
        fit(
            linear_loss,
            LINEAR,
            batches,
            optimizer,
            steps=8,
            callbacks=[lambda step, state, metrics: seen.append(step)],
            progress=False,
        )
    error = info.value
    assert error.step == bad_step
    assert int(error.state.step) == bad_step - 1
    assert _same_as_manual(error.state.params, expected[-1].params)
    assert error.batch is batches[bad_step - 1]
    # the steps launched after the bad one are neither recorded nor shown to callbacks
    np.testing.assert_array_equal(error.history.steps, np.arange(1, bad_step))
    assert seen == list(range(1, bad_step))


def test_a_nan_example_in_array_data_is_reported_with_its_gathered_batch():
    seed, batch_size, bad_step = 4, 8, 3
    order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), 0), N))
    index = order[(bad_step - 1) * batch_size : bad_step * batch_size]
    x = X.copy()
    x[index[5], 1] = np.nan  # drawn in epoch 0 at step 3 only
    with pytest.raises(
        NonFiniteLossError, match=r"training stopped at step 3: the loss is nan"
    ) as info:
        fit(
            linear_loss,
            LINEAR,
            (x, Y),
            optax.sgd(0.1),
            steps=10,
            batch_size=batch_size,
            seed=seed,
            progress=False,
        )
    error = info.value
    np.testing.assert_array_equal(error.batch[0], x[index])  # NaNs compare equal here
    np.testing.assert_array_equal(error.batch[1], Y[index])
    assert int(error.state.step) == 2 and len(error.history) == 2


def _dead_relu_loss(params, batch):
    x, y = batch
    return jnp.mean((jax.nn.relu(x @ params["w"] + params["b"]) - y) ** 2)


# Every unit is dead, so the gradient is exactly 0, and Adam with eps=0 divides 0 by 0: the loss
# and gradient of step 1 are finite, the params it produces are not.
DEAD = {"w": jnp.full(D, 0.1), "b": jnp.full((), -100.0)}


def test_an_update_that_makes_the_params_non_finite_is_blamed_on_its_step():
    with pytest.raises(
        NonFiniteLossError,
        match=r"stopped at step 1: its update made the params non-finite \(\['b'\], \['w'\]\) "
        r"although its loss and gradient were finite",
    ) as info:
        fit(_dead_relu_loss, DEAD, (X, Y), optax.adam(0.1, eps=0.0), steps=5, progress=False)
    error = info.value
    assert error.step == 1 and int(error.state.step) == 0
    assert _leaves_equal(error.state.params, DEAD)
    updates, _ = optax.adam(0.1, eps=0.0).update(
        jax.grad(_dead_relu_loss)(DEAD, error.batch), optax.adam(0.1, eps=0.0).init(DEAD)
    )
    assert np.isnan(np.asarray(updates["w"])).all()  # it reproduces the NaN update


def test_non_finite_params_are_never_checkpointed(tmp_path):
    common = dict(checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    fit(_dead_relu_loss, DEAD, (X, Y), optax.adam(0.1), steps=2, **common)  # finite: eps > 0
    with pytest.raises(
        NonFiniteLossError, match=r"step 3: its update.*ckpt_00000002\.npz, is the last good one"
    ) as info:
        fit(_dead_relu_loss, DEAD, (X, Y), optax.adam(0.1, eps=0.0), steps=8, **common)
    assert [step for step, _ in _checkpoint.list_checkpoints(tmp_path)] == [1, 2]
    assert info.value.checkpoint.name == "ckpt_00000002.npz"
    assert int(info.value.state.step) == 2 and _leaves_equal(info.value.state.params, DEAD)


def test_a_last_update_that_makes_the_params_non_finite_stops_without_a_checkpoint_folder():
    # The loss and gradient of every step are finite; the third update is infinite. Without a
    # checkpoint folder nothing else reads the final params, and they must not be returned.
    def explode(count):
        return jnp.where(count >= 2, jnp.inf, 1.0)

    optimizer = optax.chain(optax.sgd(0.1), optax.scale_by_schedule(explode))
    evaluated = []
    with pytest.raises(NonFiniteLossError, match=r"step 3: its update made the params non-finite"):
        fit(
            linear_loss,
            LINEAR,
            (X, Y),
            optimizer,
            steps=3,
            batch_size=8,
            eval_fn=lambda params: evaluated.append(1) or 0.0,
            eval_every=10,
            progress=False,
        )
    assert evaluated == []  # the final evaluation does not run on them either


def test_an_optimizer_state_with_python_int_leaves_resumes(tmp_path):
    def counting_sgd():
        return optax.GradientTransformation(
            lambda params: {"count": 0},
            lambda grads, state, params=None: (
                jax.tree_util.tree_map(lambda g: -0.05 * g, grads),
                {"count": state["count"] + 1},
            ),
        )

    kwargs = dict(batch_size=8, checkpoint_dir=tmp_path, progress=False)
    fit(linear_loss, LINEAR, (X, Y), counting_sgd(), steps=3, **kwargs)
    state, history = fit(linear_loss, LINEAR, (X, Y), counting_sgd(), steps=6, **kwargs)
    assert int(state.opt_state["count"]) == 6
    np.testing.assert_array_equal(history.steps, np.arange(1, 7))


def test_array_data_is_put_on_the_device_once():
    x = RNG.normal(size=(4096, D)).astype(np.float32)
    y = RNG.normal(size=4096).astype(np.float32)
    copies = []

    def count(step, state, metrics):
        copies.append(sum(a.shape == x.shape for a in jax.live_arrays()))

    fit(linear_loss, LINEAR, (x, y), optax.sgd(0.01), steps=1, batch_size=64, callbacks=[count])
    assert copies == [1]


# ---- TensorBoard and plots --------------------------------------------------------------------


def test_tensorboard_scalars_can_be_read_back(tmp_path):
    _, history = fit(
        linear_loss,
        LINEAR,
        (X, Y),
        optax.sgd(0.1),
        steps=6,
        batch_size=8,
        eval_fn=lambda p: linear_loss(p, (X, Y)),
        eval_every=2,
        log_dir=tmp_path,
        progress=False,
    )
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], history["loss"], rtol=1e-6)
    np.testing.assert_allclose(
        [v for _, v in scalars["train/grad_norm"]], history["grad_norm"], rtol=1e-6
    )
    assert [step for step, _ in scalars["eval/eval"]] == [2, 4, 6]


def test_history_plot_writes_a_real_image(tmp_path):
    history = History()
    for step in range(1, 11):
        history.record(step, {"loss": 1.0 / step, "grad_norm": 10.0**-step})
    history.record_eval(10, {"accuracy": 0.9})
    path = tmp_path / "history.png"
    figure = history.plot(path=path)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert len(figure.axes) == 3 and figure.axes[1].get_yscale() == "log"
    assert np.ptp(image[..., :3]) > 0.5  # not a blank canvas
    with pytest.raises(KeyError, match=r"no metric 'nope'"):
        history.plot(["nope"])


def test_history_plot_draws_metrics_recorded_every_k_steps():
    history = History()
    for step in range(1, 101):
        metrics = {"loss": 1.0 / step}
        if step % 10 == 1:  # as fit records health/<layer>/grad_norm with health_every=10
            metrics["health/dense_0/grad_norm"] = 10.0**-step
        history.record(step, metrics)
    figure = history.plot()
    (line,) = figure.axes[1].lines
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 101, 10))
    np.testing.assert_array_equal(line.get_ydata(), 10.0 ** -np.arange(1, 101, 10))
    assert figure.axes[1].get_yscale() == "log"
    assert len(figure.axes[0].lines[0].get_xdata()) == 100
    matplotlib.pyplot.close(figure)


def test_history_keeps_an_eval_metric_named_like_a_train_metric_apart():
    # eval_fn=lambda p: {"loss": ...} is the usual evaluation; plot() once drew the training
    # loss twice and the evaluation's could not be read by name.
    history = History()
    for step in range(1, 11):
        history.record(step, {"loss": 1.0 / step})
    for step in (5, 10):
        history.record_eval(step, {"loss": 2.0 / step})
    np.testing.assert_array_equal(history["loss"], 1.0 / np.arange(1, 11))
    np.testing.assert_array_equal(history["eval/loss"], [0.4, 0.2])
    for figure in (history.plot(), history.plot(["loss", "eval/loss"])):
        train, evaluation = (axis.lines[0] for axis in figure.axes)
        np.testing.assert_array_equal(train.get_xdata(), np.arange(1, 11))
        np.testing.assert_array_equal(evaluation.get_xdata(), [5, 10])
        np.testing.assert_array_equal(evaluation.get_ydata(), [0.4, 0.2])
        assert [axis.get_ylabel() for axis in figure.axes] == ["loss", "eval loss"]
        matplotlib.pyplot.close(figure)
    with pytest.raises(KeyError, match=r"no metric 'eval/accuracy'"):
        history["eval/accuracy"]


def test_history_pads_metrics_that_appear_late_and_round_trips():
    history = History()
    history.record(1, {"loss": 1.0})
    history.record(2, {"loss": 0.5, "extra": 3.0})
    np.testing.assert_array_equal(history["extra"], [math.nan, 3.0])
    arrays, metadata = history.to_arrays()
    again = History.from_arrays(arrays, metadata)
    np.testing.assert_array_equal(again["loss"], history["loss"])
    np.testing.assert_array_equal(again.steps, [1, 2])
