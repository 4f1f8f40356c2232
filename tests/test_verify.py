"""verify proves parity, and catches a merge that does not reproduce its source."""

import keras
import numpy as np
import pytest
from conftest import cnn, mlp, nested, predict, x_for

import kmerge
from kmerge.errors import InvalidArgumentError, InvalidModelError, KmergeError, VerificationError


def test_report_lists_every_tensor_exact():
    a, b = cnn(), nested()
    m = kmerge.fuse({"a": (a, [1, -1]), "b": (b, ["block_1/conv", "out"])}, share_inputs=False)
    report = kmerge.verify(m, {"a": a, "b": b})
    # two taps each, and both final outputs (they are in the merged graph too)
    assert report.ok and len(report.checks) == 6 and all(c.exact for c in report.checks)
    assert "tap 'block_1/conv'" in str(report)


def test_detects_a_changed_source():
    a, b = mlp(), mlp(seed=1)
    m = kmerge.parallel({"a": a, "b": b})
    w = a.layers[-1].get_weights()
    a.layers[-1].set_weights([w[0] + 1e-3, w[1]])
    with pytest.raises(VerificationError, match="source 'a' at output 0: max \\|diff\\|"):
        kmerge.verify(m, {"a": a, "b": b})


def test_user_probe_and_tolerance():
    a, b = mlp(), mlp(seed=1)
    m = kmerge.parallel({"a": a, "b": b})
    report = kmerge.verify(m, {"a": a}, x=x_for(a, 7))
    assert report.checks[0].shape == (7, 3)
    with pytest.raises(InvalidArgumentError, match="not sources of this merge"):
        kmerge.verify(m, {"zz": a})
    with pytest.raises(InvalidArgumentError, match="arrays for 1 inputs"):
        kmerge.verify(m, {"a": a}, x=[x_for(a), x_for(a)])


def test_needs_kmerge_metadata():
    with pytest.raises(InvalidModelError, match="no kmerge metadata"):
        kmerge.verify(mlp(), {"a": mlp()})


def test_metadata_survives_save_and_kmerge_load(tmp_path):
    a, b = cnn(), mlp(inputs=64, seed=1)
    m = kmerge.sequential({"a": a, "b": mlp(inputs=3, seed=2)})
    path = kmerge.save(m, tmp_path / "seq.keras")
    loaded = kmerge.load(path)
    assert kmerge.verify(loaded, {"a": a}).ok
    x = x_for(a)
    np.testing.assert_array_equal(predict(loaded, x), predict(m, x))
    plain = keras.models.load_model(path)
    np.testing.assert_array_equal(predict(plain, x), predict(m, x))
    del b


def test_verify_takes_a_list_in_the_builders_order_and_refuses_bad_arguments():
    a, b = mlp(seed=0), mlp(seed=1)
    m = kmerge.parallel([a, b], combine="average")
    assert kmerge.verify(m, [a, b]).ok
    for kwargs, match in [({"sources": [a]}, "list of 1 models but this merge has 2"),
                          ({"sources": 3}, "received int"),
                          ({"sources": [a, b], "atol": "x"}, "atol must be a number"),
                          ({"sources": [a, b], "atol": float("nan")}, "atol"),
                          ({"sources": [a, b], "seed": -1}, "seed must be an integer"),
                          ({"sources": [a, "x"]}, "x")]:
        with pytest.raises(KmergeError, match=match):
            kmerge.verify(m, **kwargs)
