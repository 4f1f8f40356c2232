"""The three classic merges end to end on real data: digits, saved .h5 and .keras files
with default layer names, loaded, merged, heads trained, saved and loaded back."""

import keras
import numpy as np
import pytest
from conftest import same_weights

import kmerge
from kmerge.errors import SaveError


def _acc(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def _train(model, x, y, epochs=4):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


@pytest.fixture(scope="module")
def loaded(trained):
    path_a, path_b = trained
    return kmerge.load(path_a), kmerge.load(path_b)


def test_sources_share_layer_names_yet_merge(loaded):
    a, b = loaded
    # files saved separately both hold "flatten"/"dense"-style default names
    m = kmerge.parallel({"a": a, "b": b}, combine="average")
    assert len({layer.name for layer in m.layers}) == len(m.layers)


def test_parallel_head_trains_above_threshold(loaded, digits, tmp_path):
    a, b = loaded
    x_tr, y_tr, x_te, y_te = digits
    before = [np.array(w) for w in a.get_weights() + b.get_weights()]
    m = kmerge.parallel({"a": a, "b": b}, combine="concat",
                        head=kmerge.heads.classifier(10, hidden=[16]))
    _train(m, x_tr, y_tr)
    acc = _acc(m, x_te, y_te)
    assert acc > 0.9, acc
    assert same_weights(before, [np.array(w) for w in a.get_weights() + b.get_weights()])
    kmerge.verify(m, {"a": a, "b": b})
    path = kmerge.save(m, tmp_path / "parallel.keras")
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(m.predict(x_te, verbose=0), again.predict(x_te, verbose=0))


def test_fuse_head_trains_above_threshold(loaded, digits):
    a, b = loaded
    x_tr, y_tr, x_te, y_te = digits
    conv = [layer.name for layer in b.layers if isinstance(layer, keras.layers.Conv2D)][0]
    m = kmerge.fuse({"a": (a, -2), "b": (b, conv)}, head=kmerge.heads.classifier(10))
    _train(m, x_tr, y_tr, epochs=6)
    assert _acc(m, x_te, y_te) > 0.9
    kmerge.verify(m, {"a": a, "b": b})


def test_sequential_stitch_trains_adapter(loaded, digits):
    a, b = loaded
    x_tr, y_tr, x_te, y_te = digits
    # A's 10 class probabilities, projected by a trainable Dense + Reshape, feed B.
    m = kmerge.sequential({"a": a, "b": b}, adapter="auto")
    assert [s["kind"] for s in kmerge.info(m)["adapters"]] == ["dense", "reshape"]
    _train(m, x_tr, y_tr, epochs=6)
    assert _acc(m, x_te, y_te) > 0.8
    kmerge.verify(m, {"a": a, "b": b})


def test_save_refuses_a_source_file(loaded, trained, tmp_path):
    a, b = loaded
    m = kmerge.parallel({"a": a, "b": b})
    before = trained[1].read_bytes()
    with pytest.raises(SaveError):
        kmerge.save(m, trained[1], overwrite=True)
    assert trained[1].read_bytes() == before
