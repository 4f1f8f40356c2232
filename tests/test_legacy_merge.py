"""Genuine Keras 2 files (written by tf_keras, some edited to older eras) merged with each
other: CNN with SeparableConv2D + BatchNorm, LSTM/Bidirectional GRU, old Sequentials, nested."""

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import predict

import kmerge

LEGACY = Path(__file__).parent / "data" / "legacy"


def _load(name):
    return kmerge.load(LEGACY / name)


def _ref(name):
    """Reference input ``x`` and tf_keras output ``y`` stored beside each fixture."""
    return np.load(LEGACY / name.replace(".h5", ".npz"))


def test_same_legacy_file_twice_in_parallel_and_old_era_copy():
    a, b = _load("cnn.h5"), _load("cnn_old.h5")  # identical layer names, two eras
    m = kmerge.parallel({"new": a, "old": b}, combine="average",
                        head=kmerge.heads.classifier(3))
    assert [t.name for t in m.inputs] == ["input"]
    report = kmerge.verify(m, {"new": a, "old": b})
    assert report.ok and len(report.checks) == 2


def test_cnn_lstm_and_old_sequential_become_a_multi_input_model(tmp_path):
    cnn, rnn, mlp = _load("cnn.h5"), _load("rnn.h5"), _load("mlp_old.h5")
    m = kmerge.parallel({"cnn": cnn, "rnn": rnn, "mlp": mlp}, combine="concat",
                        head=kmerge.heads.classifier(4, hidden=[8]))
    assert [t.name for t in m.inputs] == ["cnn", "rnn", "mlp"]
    xs = [np.random.default_rng(i).normal(size=(6, *t.shape[1:])).astype("float32")
          for i, t in enumerate(m.inputs)]
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    m.fit(xs, np.arange(6) % 4, epochs=2, verbose=0)
    kmerge.verify(m, {"cnn": cnn, "rnn": rnn, "mlp": mlp})  # still exact after training
    path = kmerge.save(m, tmp_path / "three.keras")
    np.testing.assert_array_equal(predict(keras.models.load_model(path), xs), predict(m, xs))


def test_fuse_taps_inside_nested_keras2_models():
    nested, seq = _load("nested.h5"), _load("nested_sequential.h5")
    enc = nested.get_layer("encoder")
    inner = enc.layers[-1].name
    m = kmerge.fuse({"n": (nested, [f"encoder/{inner}", "head"]), "s": (seq, "block")},
                    head=kmerge.heads.regressor(1))
    report = kmerge.verify(m, {"n": nested, "s": seq})
    assert any("encoder/" in c.what for c in report.checks)
    ref = _ref("nested.h5")
    np.testing.assert_allclose(predict(nested, ref["x"]), ref["y"], atol=1e-5)


def test_sequential_chain_of_legacy_models_with_adapter():
    mlp, cnn = _load("mlp.h5"), _load("cnn.h5")
    m = kmerge.sequential({"mlp": mlp, "cnn": cnn}, adapter="auto")
    kinds = [s["kind"] for s in kmerge.info(m)["adapters"]]
    assert kinds == ["dense", "reshape"]
    with pytest.raises(kmerge.errors.IncompatibleModelsError, match="model 'mlp' gives"):
        kmerge.sequential({"mlp": mlp, "cnn": cnn}, adapter="none")
