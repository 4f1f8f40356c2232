"""Permutation alignment: spec derived from the graph, exact round trips, fences, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, nested, predict, same_weights, weights_of, x_for

import kmerge
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError, KmergeError
from kmerge.weights.align import align, random_permute


def residual_mlp(seed: int = 0) -> keras.Model:
    """Two residual blocks on one 12-wide stream, a LayerNorm, and a side Concatenate."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8,))
    x = keras.layers.Dense(12, name="stem")(inp)
    for i in range(2):
        h = keras.layers.Dense(10, activation="relu", name=f"up_{i}")(x)
        h = keras.layers.Dense(12, name=f"down_{i}")(h)
        x = keras.layers.Add(name=f"add_{i}")([x, h])
    x = keras.layers.LayerNormalization(name="ln")(x)
    side = keras.layers.Dense(5, activation="tanh", name="side")(inp)
    x = keras.layers.Concatenate(name="cat")([x, side])
    out = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inp, out, name="residual_mlp")


def residual_cnn(seed: int = 0) -> keras.Model:
    """A conv stem, one residual conv block with BatchNorm, global pooling."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inp)
    x = keras.layers.BatchNormalization(name="bn_stem")(x)
    x = keras.layers.ReLU()(x)
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="c1")(x)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.Conv2D(4, 1, name="c2")(h)
    h = keras.layers.BatchNormalization(name="bn_c2")(h)
    x = keras.layers.Add(name="add")([x, h])
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inp, out, name="residual_cnn")
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # non-trivial moving statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=n).astype("float32"))
            layer.gamma.assign(rng.normal(1.0, 0.3, size=n).astype("float32"))
    return model


def lstm_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 4))
    x = keras.layers.Dense(6, activation="relu", name="proj")(inp)
    x = keras.layers.LSTM(7, name="lstm")(x)
    x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    return keras.Model(inp, keras.layers.Dense(2, name="out")(x), name="lstm_model")


def attention_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 4))
    x = keras.layers.MultiHeadAttention(2, 3, name="mha")(inp, inp)
    return keras.Model(inp, keras.layers.Dense(2, name="out")(x), name="attention_model")


FACTORIES = {
    "mlp": lambda seed=0: mlp(hidden=16, seed=seed),
    "cnn_bn_flatten": lambda seed=0: cnn(filters=4, seed=seed),
    "nested_shared": lambda seed=0: nested(seed=seed),
    "residual_mlp": residual_mlp,
    "residual_cnn": residual_cnn,
}


@pytest.mark.parametrize("kind", FACTORIES)
def test_round_trip_weight_matching_restores_weights_exactly(kind):
    b = FACTORIES[kind]()
    shuffled = random_permute(b, seed=3)
    x = x_for(b, 64)
    assert not same_weights(weights_of(b), weights_of(shuffled))  # the shuffle did something
    np.testing.assert_allclose(predict(shuffled, x), predict(b, x), atol=1e-5)
    restored = align(b, shuffled)
    assert same_weights(weights_of(restored), weights_of(b))
    assert kmerge.info(restored)["kind"] == "align"
    assert kmerge.info(restored)["iterations"] >= 1


@pytest.mark.parametrize("kind", FACTORIES)
def test_round_trip_activation_matching_restores_weights_exactly(kind):
    b = FACTORIES[kind]()
    shuffled = random_permute(b, seed=5)
    x = x_for(b, 128, seed=2)
    restored = align(b, shuffled, method="activations", data=x, batch_size=50)
    assert same_weights(weights_of(restored), weights_of(b))
    assert kmerge.info(restored)["method"] == "activations"


def test_hand_permuted_mlp_is_restored():
    """A permutation written by hand (independent of kmerge's spec) is undone."""
    b = mlp(hidden=16, seed=4)
    k1, b1, k2, b2 = b.get_weights()
    perm = np.random.default_rng(0).permutation(16)
    shuffled = keras.models.clone_model(b)
    shuffled.set_weights([k1[:, perm], b1[perm], k2[perm], b2])
    restored = align(b, shuffled)
    assert same_weights(weights_of(restored), weights_of(b))


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn_flatten", "residual_mlp"])
def test_align_different_models_keeps_function_and_sources(kind):
    a, b = FACTORIES[kind](0), FACTORIES[kind](1)
    before_a, before_b = weights_of(a), weights_of(b)
    x = x_for(b, 32)
    for method in ("weights", "activations"):
        aligned = align(a, b, method=method, data=x)
        assert aligned is not b
        np.testing.assert_allclose(predict(aligned, x), predict(b, x), atol=1e-5)
    assert same_weights(weights_of(a), before_a) and same_weights(weights_of(b), before_b)


def test_weight_matching_moves_b_closer_to_a():
    a, b = mlp(hidden=32, seed=0), mlp(hidden=32, seed=1)
    aligned = align(a, b)

    def dist(m):
        return sum(float(np.sum((x - y) ** 2)) for x, y in zip(weights_of(a), weights_of(m)))

    assert dist(aligned) < dist(b)


def test_groups_follow_the_graph():
    meta = kmerge.info(align(residual_mlp(0), residual_mlp(1)))
    sizes = sorted(g["size"] for g in meta["groups"])
    assert sizes == [5, 10, 10, 12]  # side, up_0, up_1, and ONE residual stream
    stream = next(g for g in meta["groups"] if g["size"] == 12)
    for name in ("stem", "down_0", "down_1", "ln", "up_0", "up_1", "head"):
        assert name in stream["layers"]
    assert meta["fenced"] == []

    meta = kmerge.info(align(cnn(filters=4, seed=0), cnn(filters=4, seed=1)))
    assert [g["size"] for g in meta["groups"]] == [4]  # conv -> BN -> pool -> Flatten -> dense
    layers = meta["groups"][0]["layers"]
    assert any(n.startswith("conv2d") for n in layers)
    assert any(n.startswith("batch_normalization") for n in layers)


def test_lstm_fences_and_is_reported():
    a, b = lstm_model(0), lstm_model(1)
    x = x_for(b, 16)
    aligned = align(a, b)
    meta = kmerge.info(aligned)
    fenced = {f["layer"]: f["reason"] for f in meta["fenced"]}
    assert "lstm" in fenced and "recurrent" in fenced["lstm"]
    assert [g["layers"] for g in meta["groups"]] == [["hidden", "out"]]  # proj is fenced
    np.testing.assert_allclose(predict(aligned, x), predict(b, x), atol=1e-5)
    assert np.array_equal(weights_of(aligned)[0], weights_of(b)[0])  # proj is not permuted


def test_everything_fenced_is_an_error_that_names_the_layer():
    with pytest.raises(InvalidArgumentError, match="nothing to align.*mha.*attention"):
        align(attention_model(0), attention_model(1))


def test_different_architectures_are_refused():
    with pytest.raises(IncompatibleModelsError, match="variable shapes"):
        align(mlp(hidden=16), mlp(hidden=8))
    with pytest.raises(IncompatibleModelsError, match="different architectures"):
        align(mlp(hidden=16), cnn())
    with pytest.raises(IncompatibleModelsError, match="config 'activation'"):
        relu = mlp(hidden=16)
        keras.utils.set_random_seed(0)
        tanh = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                 keras.layers.Dense(3, activation="softmax")])
        align(relu, tanh)


def test_bad_arguments_are_typed_errors():
    a, b = mlp(), mlp(seed=1)
    with pytest.raises(InvalidArgumentError, match="needs data"):
        align(a, b, method="activations")
    with pytest.raises(InvalidArgumentError, match="valid methods are: weights, activations"):
        align(a, b, method="greedy")
    with pytest.raises(InvalidArgumentError, match="max_iter"):
        align(a, b, max_iter=0)
    with pytest.raises(KmergeError):
        align(a, "not a model")


def test_aligned_model_saves_and_loads(tmp_path):
    a, b = cnn(filters=4, seed=0), cnn(filters=4, seed=1)
    aligned = align(a, b)
    path = tmp_path / "aligned.keras"
    aligned.save(path)
    x = x_for(b, 8)
    np.testing.assert_array_equal(predict(keras.models.load_model(path), x), predict(aligned, x))
