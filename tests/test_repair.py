"""BatchNorm reset and REPAIR: statistics match NumPy on the same data; sources untouched."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, predict, same_weights, weights_of, x_for

import kmerge
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError
from kmerge.weights.repair import repair


def midpoint(models, weights=None) -> keras.Model:
    weights = weights or [1 / len(models)] * len(models)
    out = keras.models.clone_model(models[0])
    out.set_weights([sum(w * x for w, x in zip(weights, xs))
                     for xs in zip(*(m.get_weights() for m in models))])
    return out


def two_bn_cnn(seed: int = 0) -> keras.Model:
    """Conv -> BN -> Conv -> BN: the second BN's input depends on the repaired first."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(2, name="head")(x), name="two_bn")


def deep_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(12, activation="relu"),
                             keras.layers.Dense(10, activation="relu"),
                             keras.layers.Dense(3), keras.layers.Softmax()])


def _np_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return flat.mean(0), flat.var(0)


def test_bn_reset_equals_numpy_statistics_layer_by_layer():
    merged = midpoint([two_bn_cnn(0), two_bn_cnn(1)])
    x = x_for(merged, 300, seed=3)
    repair(merged, method="bn", data=x, batch_size=64)  # 5 batches, last one partial
    c1, bn1, c2, bn2 = (merged.get_layer(n) for n in ("c1", "bn1", "c2", "bn2"))
    h1 = predict(c1, x)
    mean, var = _np_stats(h1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn1.moving_mean), mean, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn1.moving_variance), var, rtol=1e-4)
    # bn2 sees the output of the already-repaired bn1.
    h2 = predict(c2, np.maximum(predict(bn1, h1), 0))
    mean, var = _np_stats(h2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn2.moving_mean), mean, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn2.moving_variance), var, rtol=1e-4)
    assert kmerge.info(merged)["repair"] == {"method": "bn", "layers": ["bn1", "bn2"]}


def test_bn_reset_leaves_other_weights_and_the_sources_alone():
    a, b = cnn(filters=4, seed=0), cnn(filters=4, seed=1)
    before = weights_of(a), weights_of(b)
    merged = midpoint([a, b])
    untouched = [w for w, v in zip(weights_of(merged), merged.weights) if "moving" not in v.path]
    repair(merged, [a, b], method="bn", data=x_for(a, 50))
    assert same_weights(untouched, [w for w, v in zip(weights_of(merged), merged.weights)
                                    if "moving" not in v.path])
    assert same_weights(weights_of(a), before[0]) and same_weights(weights_of(b), before[1])


def _pre(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    """Pre-activations of the two hidden Dense layers, in NumPy."""
    out, h = [], x.astype(np.float64)
    for layer in model.layers[:2]:
        k, b = (keras.ops.convert_to_numpy(v) for v in (layer.kernel, layer.bias))
        z = h @ k + b
        out.append(z)
        h = np.maximum(z, 0)
    return out


@pytest.mark.parametrize("weights", [None, (0.25, 0.75)])
def test_repair_matches_interpolated_source_statistics(weights):
    a, b = deep_mlp(0), deep_mlp(1)
    before = weights_of(a), weights_of(b)
    merged = midpoint([a, b], list(weights) if weights else None)
    x = x_for(a, 400, seed=7)
    out = repair(merged, [a, b], method="repair", data=x, weights=weights, batch_size=128)
    assert out is merged
    w = np.array(weights or (0.5, 0.5))
    for za, zb, zm in zip(_pre(a, x), _pre(b, x), _pre(merged, x)):
        np.testing.assert_allclose(zm.mean(0), w[0] * za.mean(0) + w[1] * zb.mean(0),
                                   atol=1e-4)
        np.testing.assert_allclose(zm.std(0), w[0] * za.std(0) + w[1] * zb.std(0),
                                   rtol=1e-3, atol=1e-5)
    layers = [entry["layer"] for entry in kmerge.info(merged)["repair"]["layers"]]
    assert layers == [merged.layers[0].name, merged.layers[1].name]  # not the logits layer
    assert same_weights(weights_of(a), before[0]) and same_weights(weights_of(b), before[1])


def test_repair_of_identical_sources_changes_nothing_that_matters():
    a = deep_mlp(0)
    merged = midpoint([a, a])
    x = x_for(a, 200)
    repair(merged, [a, a], method="repair", data=x)
    np.testing.assert_allclose(predict(merged, x), predict(a, x), atol=1e-5)


def test_repair_errors_name_the_fix():
    a, b = deep_mlp(0), deep_mlp(1)
    merged = midpoint([a, b])
    x = x_for(a, 20)
    with pytest.raises(InvalidArgumentError, match="needs data"):
        repair(merged, [a, b], method="repair")
    with pytest.raises(InvalidArgumentError, match="needs data"):
        repair(merged, method="bn", data=None)
    with pytest.raises(InvalidArgumentError, match="valid methods are: bn, repair"):
        repair(merged, [a, b], method="zip", data=x)
    with pytest.raises(InvalidArgumentError, match="no BatchNormalization.*repair='repair'"):
        repair(merged, method="bn", data=x)
    with pytest.raises(InvalidArgumentError, match="needs the source models"):
        repair(merged, method="repair", data=x)
    with pytest.raises(InvalidArgumentError, match="weights must be 2"):
        repair(merged, [a, b], method="repair", data=x, weights=[1.0])
    with pytest.raises(IncompatibleModelsError):
        repair(merged, [a, mlp()], method="repair", data=x)
