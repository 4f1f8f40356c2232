"""Contract tests over every registered combine op, and reference values."""

import keras
import numpy as np
import pytest
from conftest import mlp, predict, x_for

import kmerge
from kmerge.graph.combine import combine_ops


@pytest.fixture(scope="module")
def pair():
    return mlp(outputs=4, seed=0), mlp(outputs=4, seed=1)


@pytest.mark.parametrize("op", combine_ops.names())
def test_every_op_builds_verifies_saves_and_loads(op, pair, tmp_path):
    a, b = pair
    weights = [1.0, 3.0] if op == "weighted" else None
    m = kmerge.parallel({"a": a, "b": b}, combine=op, weights=weights)
    x = x_for(a)
    out = predict(m, x)
    expected_shape = (5, 2, 4) if op == "stack" else (5, 8) if op == "concat" else (5, 4)
    assert out.shape == expected_shape
    path = kmerge.save(m, tmp_path / f"{op}.keras")
    np.testing.assert_array_equal(predict(keras.models.load_model(path), x), out)


def test_reference_values(pair):
    a, b = pair
    x = x_for(a)
    pa, pb = predict(a, x), predict(b, x)
    cases = {
        "average": (pa + pb) / 2, "add": pa + pb, "multiply": pa * pb,
        "maximum": np.maximum(pa, pb), "minimum": np.minimum(pa, pb),
        "learned_weights": (pa + pb) / 2,  # logits start at zero: plain average
        "gate": (pa + pb) / 2,  # gate kernel starts at zero: uniform gates
    }
    for op, want in cases.items():
        np.testing.assert_allclose(predict(kmerge.parallel([a, b], combine=op), x), want,
                                   rtol=1e-6, atol=1e-7, err_msg=op)
    weighted = kmerge.parallel([a, b], combine="weighted", weights=[1, 3])
    np.testing.assert_allclose(predict(weighted, x), 0.25 * pa + 0.75 * pb, rtol=1e-6)


def test_learned_weights_and_gate_train(pair):
    a, b = pair
    x = x_for(a, 32)
    y = predict(b, x)  # the target is b: weights should move towards b
    for op in ("learned_weights", "gate"):
        m = kmerge.parallel([a, b], combine=op)
        m.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
        m.fit(x, y, epochs=20, verbose=0, batch_size=32)
        trained = [w for w in m.trainable_weights]
        assert trained and np.any(np.abs(keras.ops.convert_to_numpy(trained[0])) > 0), op


def test_unknown_op_lists_valid_ones(pair):
    with pytest.raises(kmerge.errors.InvalidArgumentError,
                       match="unknown combine op 'avg'.*Valid combine ops: add, average"):
        kmerge.parallel(list(pair), combine="avg")


def test_registering_twice_is_an_error():
    with pytest.raises(kmerge.errors.InvalidArgumentError, match="already registered"):
        combine_ops.register("concat")(combine_ops.get("concat"))
