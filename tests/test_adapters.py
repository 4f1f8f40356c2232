"""The adapter planner picks the least lossy adapter; sequential applies and reports it."""

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, predict, x_for

import kmerge
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError
from kmerge.graph.adapters import plan


@pytest.mark.parametrize(
    ("src", "dst", "kinds"),
    [
        ((10,), (10,), []),
        ((None, 4), (7, 4), []),
        ((4, 4, 2), (32,), ["flatten"]),
        ((64,), (8, 8, 1), ["reshape"]),
        ((4, 4, 8), (8,), ["global_pool"]),
        ((4, 4, 8), (5,), ["global_pool", "dense"]),
        ((7, 16), (16,), ["global_pool"]),
        ((4, 4, 3), (8, 8, 3), ["resize"]),
        ((4, 4, 3), (8, 8, 5), ["resize", "conv1x1"]),
        ((8, 8, 3), (8, 8, 5), ["conv1x1"]),
        ((10,), (7,), ["dense"]),
        ((10,), (4, 4, 2), ["dense", "reshape"]),
        ((None, 6), (None, 9), ["dense"]),
    ],
)
def test_planner_prefers_least_lossy(src, dst, kinds):
    assert [s.kind for s in plan(src, dst)] == kinds


def test_planner_gives_up_on_unknown_target():
    assert plan((10,), (None, 3)) is None


def test_none_raises_naming_both_models_shapes_and_fix():
    a, b = mlp(outputs=5), mlp(inputs=8)
    with pytest.raises(IncompatibleModelsError) as err:
        kmerge.sequential({"a": a, "b": b}, adapter="none")
    msg = str(err.value)
    assert "model 'a' gives (None, 5)" in msg and "model 'b' expects (None, 8)" in msg
    assert 'adapter="auto"' in msg


def test_auto_inserts_reports_and_trains_only_adapter():
    a, b = cnn(outputs=64), cnn(shape=(8, 8, 1), seed=1)  # a: 64 outputs -> b: 8x8x1
    m = kmerge.sequential({"a": a, "b": b}, adapter="auto")
    assert [s["kind"] for s in kmerge.info(m)["adapters"]] == ["reshape"]
    m2 = kmerge.sequential({"a": mlp(outputs=5), "b": mlp(inputs=8)})
    steps = kmerge.info(m2)["adapters"]
    assert [s["kind"] for s in steps] == ["dense"] and steps[0]["trainable"]
    assert [w.name for w in m2.trainable_weights] == ["kernel", "bias"]
    assert m2.get_layer("adapter_a_to_b_dense").trainable


def test_no_adapter_when_compatible_and_output_is_the_chain():
    a, b = mlp(outputs=8, seed=2), mlp(inputs=8)
    m = kmerge.sequential([a, b])
    assert kmerge.info(m)["adapters"] == []
    x = x_for(a)
    np.testing.assert_array_equal(predict(m, x), predict(b, predict(a, x)))


def test_features_cannot_become_token_ids():
    inp = keras.Input((5,), dtype="int32")
    emb = keras.Model(inp, keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(inp)))
    with pytest.raises(IncompatibleModelsError, match="integer input"):
        kmerge.sequential({"a": mlp(outputs=5), "tok": emb})


def test_bad_adapter_mode_and_too_few_models():
    with pytest.raises(InvalidArgumentError, match='"auto" or "none"'):
        kmerge.sequential([mlp(), mlp()], adapter="magic")
    with pytest.raises(InvalidArgumentError, match="at least 2 models"):
        kmerge.sequential([mlp()])
