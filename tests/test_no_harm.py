"""A failed call leaves the caller's models exactly as they were (on jax, Keras's ``predict``
would empty them), and bad data is refused before anything runs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import mlp, weights_of

import kmerge
from kmerge.errors import InvalidArgumentError, KmergeError
from kmerge.graph.compiled import predict
from kmerge.report import write_report

X = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
Y = np.random.default_rng(1).integers(0, 3, 40)
BAD_X = np.zeros((40, 5), "float32")  # 5 features for models that take 8


def _snapshot(models):
    return [(m, weights_of(m), predict(m, X)[0]) for m in models]


def _unchanged(snap):
    for m, w, out in snap:
        after = weights_of(m)
        assert all(np.array_equal(a, b) for a, b in zip(w, after)), m.name
        np.testing.assert_array_equal(predict(m, X)[0], out)
        # still a usable Keras model (an emptied jax model raises here)
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(m(X[:2], training=False))))


@pytest.mark.parametrize("kwargs", [
    {"method": "linear", "data": (BAD_X, Y)},
    {"method": "fisher", "data": BAD_X},
    {"method": "regmean", "data": BAD_X},
    {"method": "greedy_soup", "data": (BAD_X, Y)},
    {"method": "linear", "data": (X, np.array(["cat"] * 40))},
    {"method": "linear", "data": (X, Y[:10])},
    {"method": "linear", "data": (np.where(X > 1.5, np.nan, X), Y)},
], ids=["probe", "fisher", "regmean", "greedy", "string-labels", "short-y", "nan-x"])
def test_merge_weights_refuses_bad_data_and_keeps_sources(kwargs):
    a, b = mlp(seed=0), mlp(seed=1)
    snap = _snapshot([a, b])
    with pytest.raises(InvalidArgumentError, match=r"data (x|y)"):
        kmerge.merge_weights([a, b], **kwargs)
    _unchanged(snap)


def test_stitch_refuses_data_b_cannot_take_and_keeps_both():
    a = mlp(seed=0)
    b = mlp(seed=1, inputs=6)
    snap = _snapshot([a])
    with pytest.raises(InvalidArgumentError, match=r"input .* of model .* takes \(batch, 6\)"):
        kmerge.stitch(a, b, at=(1, 1), x=X, y=Y, epochs=0, seed=0)
    _unchanged(snap)
    b2 = mlp(seed=1)
    snap = _snapshot([a, b2])
    with pytest.raises(InvalidArgumentError, match="validation_data x"):
        kmerge.stitch(a, b2, at=(1, 1), x=X, y=Y, epochs=0, seed=0,
                      validation_data=(BAD_X, Y))
    _unchanged(snap)


def test_write_report_refuses_bad_x_and_writes_nothing(tmp_path):
    a, b = mlp(seed=0), mlp(seed=1)
    snap = _snapshot([a, b])
    with pytest.raises(InvalidArgumentError, match=r"has shape \(40, 5\)"):
        write_report(tmp_path / "r", models={"a": a, "b": b}, x=BAD_X, y=Y, final="b")
    with pytest.raises(InvalidArgumentError, match="not numbers"):
        write_report(tmp_path / "r", models={"a": a, "b": b}, x=X,
                            y=np.array(["x"] * 40), final="b")
    assert not (tmp_path / "r").exists()
    _unchanged(snap)


def _merged():
    return kmerge.parallel({"a": mlp(seed=0), "b": mlp(seed=1)},
                           head=kmerge.heads.classifier(3))


@pytest.mark.parametrize("bad", ["nan-x", "string-y", "shape"])
def test_fit_head_refuses_bad_arrays_and_leaves_the_head(bad):
    m = _merged()
    x, y = X, Y
    if bad == "nan-x":
        x = X.copy()
        x[3, 2] = np.nan
    elif bad == "string-y":
        y = np.array(["zero", "one", "two"] * 13 + ["one"])
    else:
        x = BAD_X
    snap = _snapshot([m])
    with pytest.raises(InvalidArgumentError, match=r"NaN|not numbers|shape"):
        kmerge.fit_head(m, x, y, epochs=1, seed=0, verbose=0)
    _unchanged(snap)


def test_fit_head_restores_the_head_when_training_fails_or_diverges():
    m = _merged()
    snap = _snapshot([m])

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kmerge.fit_head(m, X, Y, epochs=1, batch_size=8, seed=0, verbose=0, callbacks=[Boom()])
    _unchanged(snap)

    def nan_batches():
        for i in range(0, 40, 8):
            yield np.full((8, 8), np.inf, np.float32), Y[i:i + 8]

    with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
        kmerge.fit_head(m, nan_batches, epochs=1, seed=0, verbose=0)
    _unchanged(snap)

    class Diverge(keras.callbacks.Callback):  # what a diverged run leaves behind
        def on_train_end(self, logs=None):
            w = self.model.trainable_weights[0]
            w.assign(np.full(tuple(w.shape), np.nan, "float32"))

    with pytest.raises(InvalidArgumentError, match="diverged.*weights were restored"):
        kmerge.fit_head(m, X, Y, epochs=1, seed=0, verbose=0, callbacks=[Diverge()])
    _unchanged(snap)


def test_distill_refuses_bad_data_before_any_teacher_runs():
    t, s = mlp(seed=0), mlp(seed=3, hidden=4)
    snap = _snapshot([t, s])
    for kwargs, match in [({"x": BAD_X}, "takes"), ({"x": X, "y": np.array(["a"] * 40)},
                                                    "not numbers"),
                          ({"x": X, "temperature": float("nan")}, "temperature"),
                          ({"x": X, "epochs": "3"}, "epochs")]:
        kwargs.setdefault("epochs", 1)
        with pytest.raises(KmergeError, match=match):
            kmerge.distill(t, s, verbose=0, **kwargs)
    _unchanged(snap)


def test_weights_that_overflow_their_sum_still_average():
    a, b = mlp(seed=0), mlp(seed=1)
    big = kmerge.merge_weights([a, b], method="linear", weights=[1e308, 1e308])
    plain = kmerge.merge_weights([a, b], method="linear")
    assert kmerge.info(big)["weights"] == [0.5, 0.5]
    for u, v in zip(weights_of(big), weights_of(plain)):
        np.testing.assert_array_equal(u, v)


def test_mixed_dtype_sources_are_refused():
    a = mlp(seed=0)
    keras.utils.set_random_seed(1)
    b = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu",
                                                                dtype="float16"),
                          keras.layers.Dense(3, activation="softmax", dtype="float16")])
    with pytest.raises(KmergeError, match="float16"):
        kmerge.merge_weights([a, b], method="linear")


def test_weighted_combine_with_overflowing_weights_is_an_even_average():
    a, b = mlp(seed=0), mlp(seed=1)
    big = kmerge.parallel([a, b], combine="weighted", weights=[1e308, 1e308])
    even = kmerge.parallel([a, b], combine="average")
    np.testing.assert_allclose(predict(big, X)[0], predict(even, X)[0], rtol=1e-6, atol=1e-7)
    taps = {"a": (a, 0), "b": (b, 0)}
    fused = kmerge.fuse(taps, combine="weighted", weights=[1e308, 1e308])
    np.testing.assert_allclose(predict(fused, X)[0],
                               predict(kmerge.fuse(taps, combine="average"), X)[0],
                               rtol=1e-6, atol=1e-7)


def test_mixed_precision_and_float32_sources_are_refused():
    a = mlp(seed=0)
    keras.utils.set_random_seed(1)
    b = keras.Sequential([keras.Input((8,)),
                          keras.layers.Dense(16, activation="relu", dtype="mixed_float16"),
                          keras.layers.Dense(3, activation="softmax", dtype="mixed_float16")])
    with pytest.raises(KmergeError, match="dtype policy mixed_float16.*one dtype policy"):
        kmerge.merge_weights([a, b], method="linear")
