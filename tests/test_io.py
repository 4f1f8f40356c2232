"""kmerge.io: load every format, atomic save, and every error path."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import kmerge
from kmerge.errors import InvalidModelError, ModelLoadError, SaveError
from kmerge.io import LoadInfo, load, load_info, save
from kmerge.metadata import attach

BACKEND = keras.backend.backend()


def _mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    i = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="hidden")(i)
    return keras.Model(i, keras.layers.Dense(3, name="out")(h), name="mlp")


def _x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 4)).astype("float32")


def _out(model, x) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _listing(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# ---- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt", [("m.keras", "keras"), ("m.h5", "h5-keras3")])
def test_round_trip(tmp_path, name, fmt):
    model = _mlp()
    written = save(model, tmp_path / name)
    assert written == (tmp_path / name).resolve()
    before = _digest(written)
    loaded = load(written)
    np.testing.assert_array_equal(_out(loaded, _x()), _out(model, _x()))
    info = load_info(loaded)
    assert isinstance(info, LoadInfo)
    assert info.format == fmt and info.path == str(written) and Path(info.path).is_absolute()
    assert info.keras_version == keras.__version__
    assert info.repairs == () and not info.inference_only
    assert not loaded.compiled
    assert _digest(written) == before  # loading never touches the file
    assert _listing(tmp_path) == {name}  # no temp file left


def test_save_without_suffix_adds_keras(tmp_path):
    assert save(_mlp(), tmp_path / "merged") == (tmp_path / "merged.keras").resolve()


def test_load_info_none_for_plain_model():
    assert load_info(_mlp()) is None


def test_kmerge_meta_round_trip_and_plain_keras_loads_it(tmp_path):
    model = _mlp()
    meta = {"kind": "parallel", "sources": ["a", "b"], "n": 2}
    attach(model, meta)
    target = save(model, tmp_path / "m.keras")
    with zipfile.ZipFile(target) as zf:
        assert json.loads(zf.read("kmerge.json")) == meta
    assert kmerge.info(load(target)) == meta
    plain = keras.models.load_model(target, compile=False)
    np.testing.assert_array_equal(_out(plain, _x()), _out(model, _x()))


def test_kmerge_meta_round_trip_h5(tmp_path):
    model = _mlp()
    attach(model, {"kind": "sequential"})
    assert kmerge.info(load(save(model, tmp_path / "m.h5"))) == {"kind": "sequential"}


# ---- save refusals: nothing written ------------------------------------------------------------

def test_save_refuses_bad_suffix(tmp_path):
    with pytest.raises(SaveError, match=r"suffix '\.pt'.*\.keras, \.h5"):
        save(_mlp(), tmp_path / "m.pt")
    assert _listing(tmp_path) == set()


def test_save_refuses_missing_directory(tmp_path):
    with pytest.raises(SaveError, match=r"output directory .*nope does not exist; create it"):
        save(_mlp(), tmp_path / "nope" / "m.keras")
    assert _listing(tmp_path) == set()


def test_save_refuses_existing_without_overwrite(tmp_path):
    target = save(_mlp(0), tmp_path / "m.keras")
    before = _digest(target)
    with pytest.raises(SaveError, match=r"m\.keras: already exists; pass overwrite=True"):
        save(_mlp(1), target)
    assert _digest(target) == before and _listing(tmp_path) == {"m.keras"}
    save(_mlp(1), target, overwrite=True)
    np.testing.assert_array_equal(_out(load(target), _x()), _out(_mlp(1), _x()))
    assert _listing(tmp_path) == {"m.keras"}


def test_save_refuses_to_overwrite_the_loaded_source(tmp_path):
    src = save(_mlp(), tmp_path / "a.keras")
    before = _digest(src)
    model = load(src)
    with pytest.raises(SaveError, match=r"a\.keras: is the file a source model was loaded from"):
        save(model, tmp_path / "." / "a.keras", overwrite=True)
    assert _digest(src) == before and _listing(tmp_path) == {"a.keras"}


def test_save_refuses_source_paths_from_meta(tmp_path):
    src = save(_mlp(), tmp_path / "a.h5")
    merged = _mlp(1)
    attach(merged, {"source_paths": [str(src)]})
    with pytest.raises(SaveError, match="source model"):
        save(merged, src, overwrite=True)
    assert _listing(tmp_path) == {"a.h5"}


def test_save_cleans_temp_file_on_failure(tmp_path, monkeypatch):
    model = _mlp()

    def boom(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save", boom)
    with pytest.raises(SaveError, match="disk full.*nothing was written"):
        save(model, tmp_path / "m.keras")
    assert _listing(tmp_path) == set()


def test_save_refuses_unserializable_meta(tmp_path):
    model = _mlp()
    attach(model, {"bad": object()})
    with pytest.raises(SaveError, match="not JSON-serializable"):
        save(model, tmp_path / "m.keras")
    assert _listing(tmp_path) == set()


def test_save_rejects_non_model(tmp_path):
    with pytest.raises(InvalidModelError, match="received dict"):
        save({}, tmp_path / "m.keras")


# ---- load errors -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nothere\.keras: no such file"):
        load(tmp_path / "nothere.keras")


def test_directory_that_is_not_a_savedmodel(tmp_path):
    with pytest.raises(ModelLoadError, match=r"is a directory but not a TensorFlow SavedModel"):
        load(tmp_path)


def test_truncated_keras(tmp_path):
    good = save(_mlp(), tmp_path / "good.keras")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"bad\.keras: is not a valid \.keras archive.*truncated"):
        load(bad)


@pytest.mark.parametrize("content", [b"\x00garbage" * 100, "truncated"])
def test_corrupt_h5(tmp_path, content):
    bad = tmp_path / "bad.h5"
    if content == "truncated":
        good = save(_mlp(), tmp_path / "good.h5")
        content = good.read_bytes()[:3000]
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"bad\.h5: .*corrupt or truncated"):
        load(bad)


def test_keras3_weights_only_file(tmp_path):
    path = tmp_path / "m.weights.h5"
    _mlp().save_weights(path)
    with pytest.raises(ModelLoadError, match=r"m\.weights\.h5: holds only weights.*load_weights"):
        load(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"notes\.txt: is not a Keras model file.*\.keras"):
        load(path)


def test_npz_file(tmp_path):
    path = tmp_path / "arrays.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ModelLoadError, match=r"arrays\.npz: is a zip archive .*a\.npy.*not a Keras"):
        load(path)


def test_keras_archive_with_wrong_suffix(tmp_path):
    src = save(_mlp(), tmp_path / "m.keras")
    other = tmp_path / "m.zip"
    other.write_bytes(src.read_bytes())
    with pytest.raises(ModelLoadError, match=r"rename it to m\.keras"):
        load(other)


def _lambda_model() -> keras.Model:
    i = keras.Input((3,))
    return keras.Model(i, keras.layers.Lambda(lambda t: t * 2.0)(i))


def test_lambda_refused_under_safe_mode(tmp_path):
    path = save(_lambda_model(), tmp_path / "lam.keras")
    with pytest.raises(ModelLoadError, match=r"lam\.keras: contains a Lambda layer.*safe_mode=False "
                                             r"only if you trust the file"):
        load(path)
    loaded = load(path, safe_mode=False)
    np.testing.assert_allclose(_out(loaded, np.ones((1, 3), "float32")), 2.0)


def test_unknown_custom_class(tmp_path):
    class Twice(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    Twice.__module__ = "kmerge_test_missing_module"
    keras.saving.register_keras_serializable(package="kmerge_test")(Twice)
    i = keras.Input((3,))
    path = save(keras.Model(i, Twice()(i)), tmp_path / "custom.keras")
    keras.saving.get_custom_objects().pop("kmerge_test>Twice")
    with pytest.raises(ModelLoadError, match=r"custom\.keras: uses the custom class 'Twice'.*"
                                             r"custom_objects="):
        load(path)
    loaded = load(path, custom_objects={"kmerge_test>Twice": Twice})
    np.testing.assert_allclose(_out(loaded, np.ones((1, 3), "float32")), 2.0)


# ---- SavedModel --------------------------------------------------------------------------------

@pytest.mark.skipif(BACKEND != "tensorflow", reason="SavedModel export/load needs the tensorflow backend")
def test_savedmodel_round_trip(tmp_path):
    model = _mlp()
    model.export(str(tmp_path / "sm"), verbose=False)
    loaded = load(tmp_path / "sm")
    np.testing.assert_allclose(_out(loaded, _x()), _out(model, _x()), atol=1e-6)
    info = load_info(loaded)
    assert info.format == "savedmodel" and info.inference_only
    assert info.path == str(tmp_path / "sm")


@pytest.mark.skipif(BACKEND == "tensorflow", reason="on tensorflow, SavedModels load")
def test_savedmodel_needs_tensorflow_backend(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"sm: is a TensorFlow SavedModel.*"
                                             r"KERAS_BACKEND=tensorflow.*re-export.*\.keras"):
        load(tmp_path / "sm")
