"""kmerge.io: load every format, atomic save, and every error path."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import kmerge
from kmerge.errors import InvalidArgumentError, InvalidModelError, ModelLoadError, SaveError
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


# ---- loading security --------------------------------------------------------------------------

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture
def unsafe_switch_on():
    """keras.config.enable_unsafe_deserialization() for the test, then the switch as it was."""
    from kmerge import _keras

    with _keras.safe_mode_scope(None):  # restores Keras' (per-thread) switch on exit
        keras.config.enable_unsafe_deserialization()
        yield


@pytest.mark.parametrize("kind", ["keras", "h5-keras3", "h5-keras2"])
def test_safe_mode_wins_over_enable_unsafe_deserialization(tmp_path, unsafe_switch_on, kind):
    probe = _lambda_model()
    probe.save(tmp_path / "probe.keras")
    if kind == "h5-keras2":
        path = tmp_path / "lambda.h5"
        path.write_bytes((LEGACY / "lambda.h5").read_bytes())
    else:
        path = tmp_path / ("lam.keras" if kind == "keras" else "lam.h5")
        probe.save(path)
    before = _digest(path)
    with pytest.raises(ModelLoadError, match=r"contains a Lambda layer.*safe_mode=False only if"):
        load(path)
    assert _digest(path) == before
    # the process-wide switch is untouched: plain Keras still follows it after kmerge's load
    plain = keras.saving.load_model(tmp_path / "probe.keras", safe_mode=True)
    np.testing.assert_allclose(_out(plain, np.ones((1, 3), "float32")), 2.0)
    # and an explicit safe_mode=False still loads
    assert load(path, safe_mode=False) is not None


def _archive(src: Path, dst: Path, replace: dict[str, bytes] | None = None,
             extra: dict[str, bytes] | None = None, compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for name in zin.namelist():
            zout.writestr(name, (replace or {}).get(name, zin.read(name)))
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def _refused(path: Path, match: str, **kwargs) -> None:
    listing, before = _listing(path.parent), _digest(path)
    with pytest.raises(ModelLoadError, match=match) as err:
        load(path, **kwargs)
    assert "\n" not in str(err.value)  # one line
    assert _listing(path.parent) == listing and _digest(path) == before


def test_oversized_config_member_is_refused(tmp_path):
    good = save(_mlp(), tmp_path / "good.keras")
    big = b'{"class_name": "Functional"' + b" " * (65 << 20) + b"}"
    bad = _archive(good, tmp_path / "bad.keras", replace={"config.json": big},
                   compression=zipfile.ZIP_DEFLATED)
    assert bad.stat().st_size < 1 << 20
    _refused(bad, r"bad\.keras: the archive member 'config\.json' declares 65\.0 MiB "
                  r"uncompressed \(kmerge's limit for it is 64\.0 MiB")


@pytest.mark.parametrize("member", ["model.weights.h5", "assets/junk.bin"])
def test_decompression_bomb_member_is_refused(tmp_path, monkeypatch, member):
    monkeypatch.setattr(kmerge.io, "EXPANSION_FLOOR", 1 << 20)  # the same check, smaller files
    good = save(_mlp(), tmp_path / "good.keras")
    bomb = bytes(20 << 20)
    kwargs = {"replace": {member: bomb}} if member == "model.weights.h5" else \
        {"extra": {member: bomb}}
    bad = _archive(good, tmp_path / "bad.keras", compression=zipfile.ZIP_DEFLATED, **kwargs)
    _refused(bad, rf"bad\.keras: the archive member '{member}' declares 20\.0 MiB uncompressed "
                  r"from .* stored \(more than 100x.*decompression bomb")


def test_archive_total_expansion_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(kmerge.io, "EXPANSION_FLOOR", 1 << 20)
    good = save(_mlp(), tmp_path / "good.keras")
    parts = {f"assets/part{i}": bytes(900 << 10) for i in range(40)}  # each under the floor
    bad = _archive(good, tmp_path / "bad.keras", extra=parts, compression=zipfile.ZIP_DEFLATED)
    _refused(bad, r"bad\.keras: the archive's 43 members declare .* MiB uncompressed from a "
                  r".* file \(more than 100x\)")


def test_absurd_member_count_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(kmerge.io, "MAX_MEMBERS", 50)
    good = save(_mlp(), tmp_path / "good.keras")
    bad = _archive(good, tmp_path / "bad.keras", extra={f"assets/{i}": b"" for i in range(60)})
    _refused(bad, r"bad\.keras: the archive declares 63 members .*limit is 50")


@pytest.mark.parametrize("name", ["model.keras", "model.h5", "model"])
def test_fifo_is_refused_without_blocking(tmp_path, name):
    os.mkfifo(tmp_path / name)
    with pytest.raises(ModelLoadError, match=rf"{name}: is a FIFO \(named pipe\), not a regular "
                                             r"file; kmerge reads models only from regular files"):
        load(tmp_path / name)


def test_fifo_weights_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "w.h5")
    with pytest.raises(ModelLoadError, match=r"w\.h5: is a FIFO"):
        load(LEGACY / "keras2_arch.json", weights=tmp_path / "w.h5")


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="no /dev/null")
def test_character_device_is_refused():
    with pytest.raises(ModelLoadError, match=r"/dev/null: is a character device, not a regular"):
        load("/dev/null")


def _meta_archive(tmp_path: Path, member: str, data: bytes) -> Path:
    good = save(_mlp(), tmp_path / "good.keras")
    with zipfile.ZipFile(good) as zf:
        present = member in zf.namelist()
    path = _archive(good, tmp_path / "m.keras", **{"replace" if present else "extra":
                                                   {member: data}})
    good.unlink()
    return path


CORRUPT_JSON = {
    "list": (b"[1, 2, 3]", r"a JSON list, not an object"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, r"JSON nested too deeply to read"),
    "deep-but-parsable": (b'{"a": ' * 200 + b"1" + b"}" * 200, r"nested more than 64 levels"),
    "bytes": (b"\xff\xfe\x00garbage", r"not UTF-8 text"),
    "not-json": (b"{kind: parallel", r"not JSON"),
    "source_paths": (b'{"source_paths": 5}', r"source_paths is not a list of paths"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_JSON))
def test_corrupt_kmerge_metadata_in_keras_archive(tmp_path, case):
    data, reason = CORRUPT_JSON[case]
    path = _meta_archive(tmp_path, "kmerge.json", data)
    _refused(path, r"m\.keras: its kmerge metadata \(archive member kmerge\.json\) is corrupt "
                   rf"\(.*{reason}.*the model itself may be intact.*zip -d m\.keras kmerge\.json")


@pytest.mark.parametrize("case", ["list", "deep", "bytes", "int-array"])
def test_corrupt_kmerge_metadata_in_h5(tmp_path, case):
    import h5py

    path = save(_mlp(), tmp_path / "m.h5")
    data = b"[" * 5000 + b"]" * 5000 if case == "deep" else CORRUPT_JSON.get(case, (b"",))[0]
    with h5py.File(path, "r+") as f:  # (an HDF5 attribute holds at most 64 KB)
        f.attrs["kmerge_meta"] = np.arange(3) if case == "int-array" else \
            np.void(data) if case == "bytes" else data.decode()
    reason = r"stored as .*, not JSON text" if case in ("int-array", "bytes") \
        else CORRUPT_JSON[case][1]
    _refused(path, r"m\.h5: its kmerge metadata \(HDF5 attribute kmerge_meta\) is corrupt "
                   rf"\({reason}.*del h5py\.File")


@pytest.mark.parametrize("case", ["list", "deep", "bytes", "version"])
def test_corrupt_keras_metadata_json(tmp_path, case):
    data = b'{"keras_version": 3}' if case == "version" else CORRUPT_JSON[case][0]
    reason = r"keras_version is a int" if case == "version" else CORRUPT_JSON[case][1]
    path = _meta_archive(tmp_path, "metadata.json", data)
    _refused(path, rf"m\.keras: the archive member metadata\.json is corrupt \({reason}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    path = save(_mlp(), tmp_path / "m.keras")
    path.chmod(0)
    try:
        with pytest.raises(ModelLoadError, match=r"m\.keras: permission denied"):
            load(path)
    finally:
        path.chmod(0o644)


def test_unreadable_file_message(tmp_path, monkeypatch):
    """The same path as chmod 000, also when the tests run as root."""
    path = save(_mlp(), tmp_path / "m.keras")
    real_open = os.open

    def deny(p, *args, **kwargs):
        if Path(p) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ModelLoadError, match=r"m\.keras: permission denied \(the file cannot be "
                                             r"read\); check its permissions"):
        load(path)


def test_file_name_too_long(tmp_path):
    name = "m" * 300 + ".keras"
    with pytest.raises(ModelLoadError, match=r"file name too long for this file system \(306 "
                                             r"characters.*shorten the path"):
        load(tmp_path / name)


@pytest.mark.parametrize("arg", [None, 123, 1.5, ["m.keras"], ""])
def test_non_path_argument(arg):
    with pytest.raises(InvalidArgumentError, match=r"load\(\): path (must be a str or "
                                                   r"os\.PathLike|is an empty string)"):
        load(arg)


@pytest.mark.parametrize("name", ["m.keras", "m.h5", "m.json", "model"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    _refused(tmp_path / name, rf"{name}: is empty \(0 bytes\)")


def test_keras3_json_with_weights(tmp_path):
    model = _mlp()
    (tmp_path / "arch.json").write_text(model.to_json())
    model.save_weights(tmp_path / "w.weights.h5")
    loaded = load(tmp_path / "arch.json", weights=tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(_out(loaded, _x()), _out(model, _x()))
    info = load_info(loaded)
    assert info.format == "json-keras3" and info.repairs == ()
    assert info.weights == str(tmp_path / "w.weights.h5")
    assert _listing(tmp_path) == {"arch.json", "w.weights.h5"}


def test_json_that_is_not_an_architecture(tmp_path):
    (tmp_path / "a.json").write_text('{"hello": 1}')
    _refused(tmp_path / "a.json", r"a\.json: is JSON but not a Keras model architecture",
             weights=LEGACY / "keras2_arch_weights.h5")


def test_json_lambda_refused_under_safe_mode(tmp_path, unsafe_switch_on):
    model = _lambda_model()
    (tmp_path / "lam.json").write_text(model.to_json())
    model.save_weights(tmp_path / "lam.weights.h5")
    _refused(tmp_path / "lam.json", r"lam\.json: contains a Lambda layer",
             weights=tmp_path / "lam.weights.h5")
