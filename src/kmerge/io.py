"""Load Keras models from every format kmerge accepts, and save them atomically.

:func:`load` reads ``.keras`` archives, ``.h5``/``.hdf5`` files written by Keras 3 or by Keras 2
(repaired by :mod:`kmerge.legacy`), and TensorFlow SavedModel directories (tensorflow backend only,
inference only). Every failure is a :class:`~kmerge.errors.ModelLoadError` naming the file, what is
wrong with it and what to do. :func:`save` writes through a temporary file and ``os.replace`` and
refuses to overwrite a file any source model was loaded from.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmerge.errors import InvalidModelError, ModelLoadError, SaveError
from kmerge.metadata import attach, lineage, meta_of

__all__ = ["LoadInfo", "load", "load_info", "save", "SAVE_SUFFIXES"]

SAVE_SUFFIXES = (".keras", ".h5", ".hdf5")
_H5_SUFFIXES = (".h5", ".hdf5")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_META_MEMBER = "kmerge.json"
_META_H5_ATTR = "kmerge_meta"
_FORMATS = "a .keras file, a .h5/.hdf5 model file, or a TensorFlow SavedModel directory"


@dataclass(frozen=True)
class LoadInfo:
    """How a model was loaded.

    Attributes:
        path: Absolute path of the file or directory.
        format: ``"keras"``, ``"h5-keras3"``, ``"h5-keras2"`` or ``"savedmodel"``.
        keras_version: The Keras version stored in the file, if any.
        repairs: One human-readable line per change made to load a Keras 2 file.
        inference_only: True for SavedModels (wrapped in a ``TFSMLayer``: no layers to tap,
            no training).
    """

    path: str
    format: str
    keras_version: str | None = None
    repairs: tuple[str, ...] = ()
    inference_only: bool = False


def load_info(model: Any) -> LoadInfo | None:
    """Return the :class:`LoadInfo` that :func:`load` attached to ``model``, or None.

    >>> load_info(kmerge.io.load("old.h5")).repairs  # doctest: +SKIP
    ("layer 'lstm': dropped Keras 2 argument time_major=False",)
    """
    info = getattr(model, "_kmerge_load", None)
    return info if isinstance(info, LoadInfo) else None


def load(path: str | os.PathLike, *, safe_mode: bool = True,
         custom_objects: dict[str, Any] | None = None) -> Any:
    """Load a model, uncompiled, from any format kmerge supports.

    Args:
        path: A ``.keras`` file, a ``.h5``/``.hdf5`` file (Keras 3 or Keras 2), or a TensorFlow
            SavedModel directory (tensorflow backend only).
        safe_mode: Refuse Lambda layers holding Python bytecode. Pass False only for files you
            trust.
        custom_objects: Classes and functions for custom layers, by the name stored in the file.

    Returns:
        A ``keras.Model``; :func:`load_info` tells how it was loaded and what was repaired.

    Raises:
        ModelLoadError: The path is missing, not a model, corrupt, weights only, holds a Lambda
            layer under ``safe_mode``, or uses an unknown custom class.

    >>> model = load("classifier.h5")  # doctest: +SKIP
    >>> load_info(model).format  # doctest: +SKIP
    'h5-keras2'
    """
    p = Path(path).expanduser().absolute()
    if not p.exists():
        hint = f" (the directory {p.parent} does not exist either)" if not p.parent.exists() else ""
        raise ModelLoadError(f"{p}: no such file or directory{hint}; pass the path of {_FORMATS}")
    if p.is_dir():
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            return _load_savedmodel(p)
        raise ModelLoadError(
            f"{p}: is a directory but not a TensorFlow SavedModel (no saved_model.pb inside); "
            f"pass {_FORMATS}")
    with open(p, "rb") as fh:
        head = fh.read(8)
    suffix = p.suffix.lower()
    if suffix in _H5_SUFFIXES or (suffix != ".keras" and head == _HDF5_MAGIC):
        return _load_h5(p, safe_mode=safe_mode, custom_objects=custom_objects)
    if suffix == ".keras":
        return _load_keras(p, safe_mode=safe_mode, custom_objects=custom_objects)
    if head[:2] == b"PK" and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
        if "config.json" in names:
            raise ModelLoadError(
                f"{p}: looks like a Keras archive but is named '{p.name}'; Keras only reads "
                f"archives named *.keras: copy or rename it to {p.stem}.keras")
        raise ModelLoadError(
            f"{p}: is a zip archive holding {names[:5]}, not a Keras model; pass {_FORMATS}")
    raise ModelLoadError(
        f"{p}: is not a Keras model file (suffix '{p.suffix}', not HDF5 or zip content); "
        f"pass {_FORMATS}")


def _attach(model: Any, info: LoadInfo, meta: dict | None = None) -> Any:
    # object.__setattr__ bypasses Keras' attribute tracking (a dataclass is no layer state).
    object.__setattr__(model, "_kmerge_load", info)
    if meta is not None:
        attach(model, meta)
    return model


_UNKNOWN_CLASS = [
    re.compile(r"Unknown (?:layer|object|class|[a-z ]+): '([^']+)'"),
    re.compile(r"Could not locate (?:class|function) '([^']+)'"),
    re.compile(r"Could not deserialize class '([^']+)'"),
]


def _wrap(exc: BaseException, p: Path, what: str) -> ModelLoadError:
    """Turn a Keras loading error into a ModelLoadError that says what to do."""
    msg = str(exc)
    if "safe_mode" in msg and "Lambda" in msg:
        return ModelLoadError(
            f"{p}: contains a Lambda layer whose Python code would run on load; kmerge refuses it "
            "with safe_mode=True. Pass safe_mode=False only if you trust the file")
    for pattern in _UNKNOWN_CLASS:
        m = pattern.search(msg)
        if m:
            name = m.group(1).split(">")[-1]
            return ModelLoadError(
                f"{p}: uses the custom class '{name}' (stored as '{m.group(1)}'), which is not "
                f"registered; pass custom_objects={{'{m.group(1)}': {name}}} or import the module "
                "that defines it with @keras.saving.register_keras_serializable")
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return ModelLoadError(
        f"{p}: Keras could not load this {what}: {type(exc).__name__}: {first[:500]}; the file may "
        "be corrupt or written by an unsupported Keras version: re-save it from the Keras that "
        "wrote it as .keras (Keras 3) or .h5")


def _load_keras(p: Path, *, safe_mode: bool, custom_objects: dict | None) -> Any:
    import keras

    if not zipfile.is_zipfile(p):
        raise ModelLoadError(
            f"{p}: is not a valid .keras archive (a .keras file is a zip; this one is truncated "
            "or corrupt); copy the file again or re-save the model")
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            if "config.json" not in names:
                raise ModelLoadError(
                    f"{p}: is a zip archive without config.json (holds {sorted(names)[:5]}), not a "
                    f"Keras model; pass {_FORMATS}")
            version = None
            if "metadata.json" in names:
                version = json.loads(zf.read("metadata.json")).get("keras_version")
            meta = json.loads(zf.read(_META_MEMBER)) if _META_MEMBER in names else None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{p}: the .keras archive is corrupt ({exc}); copy the file again "
                             "or re-save the model") from exc
    try:
        model = keras.saving.load_model(p, compile=False, safe_mode=safe_mode,
                                        custom_objects=custom_objects)
    except Exception as exc:  # Keras raises ValueError, TypeError, zipfile/zlib errors, ...
        raise _wrap(exc, p, ".keras file") from exc
    return _attach(model, LoadInfo(str(p), "keras", version), meta)


def _load_h5(p: Path, *, safe_mode: bool, custom_objects: dict | None) -> Any:
    import h5py

    from kmerge import legacy

    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise ModelLoadError(
            f"{p}: is not a readable HDF5 file ({exc}); it is corrupt or truncated: copy the file "
            "again or re-save the model") from exc
    try:
        with f:
            if "model_config" not in f.attrs:
                if legacy.is_keras2_weights_file(f) or legacy.is_keras3_weights_file(f, p):
                    raise ModelLoadError(
                        f"{p}: holds only weights (no model architecture); build the "
                        "architecture in code and call model.load_weights(path), then pass "
                        "that model to kmerge")
                raise ModelLoadError(
                    f"{p}: is an HDF5 file but not a Keras model (no model_config attribute; "
                    f"top-level entries {list(f)[:5]}); pass {_FORMATS}")
            version = f.attrs.get("keras_version")
            version = version.decode() if isinstance(version, bytes) else version
            meta_raw = f.attrs.get(_META_H5_ATTR)
            meta = json.loads(meta_raw) if meta_raw is not None else None
            if version is not None and str(version).startswith("3."):
                fmt, repairs = "h5-keras3", ()
            else:
                fmt = "h5-keras2"
                model, repairs = legacy.load_keras2(
                    f, where=str(p), safe_mode=safe_mode, custom_objects=custom_objects,
                    on_error=lambda e: _wrap(e, p, "Keras 2 .h5 file"))
    except ModelLoadError:
        raise
    except (OSError, KeyError, ValueError) as exc:  # h5py read errors inside a damaged file
        raise ModelLoadError(
            f"{p}: could not read the HDF5 file ({type(exc).__name__}: {exc}); it is corrupt or "
            "truncated: copy the file again or re-save the model") from exc
    if fmt == "h5-keras3":
        import keras

        try:
            model = keras.saving.load_model(p, compile=False, safe_mode=safe_mode,
                                            custom_objects=custom_objects)
        except Exception as exc:  # Keras raises ValueError, TypeError, OSError, ...
            raise _wrap(exc, p, "Keras 3 .h5 file") from exc
    return _attach(model, LoadInfo(str(p), fmt, version, tuple(repairs)), meta)


def _load_savedmodel(p: Path) -> Any:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ModelLoadError(
            f"{p}: is a TensorFlow SavedModel, which kmerge can load only on the tensorflow "
            f"backend (current backend: {keras.backend.backend()}); run with "
            "KERAS_BACKEND=tensorflow, or re-export the model as .keras")
    try:
        layer = keras.layers.TFSMLayer(str(p), call_endpoint="serving_default")
        _, specs = layer.call_endpoint_fn.structured_input_signature
        inputs = [keras.Input(shape=tuple(s.shape)[1:], batch_size=s.shape[0],
                              dtype=s.dtype.name, name=name) for name, s in sorted(specs.items())]
        if not inputs:
            raise ValueError("the serving_default signature takes no named inputs")
        out = layer(inputs[0] if len(inputs) == 1 else inputs)
        if isinstance(out, dict) and len(out) == 1:
            out = next(iter(out.values()))
        model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, out, name=p.name)
    except Exception as exc:  # TensorFlow raises many types here
        raise ModelLoadError(
            f"{p}: could not wrap this SavedModel's serving_default signature "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
            "re-export the model as .keras") from exc
    return _attach(model, LoadInfo(str(p), "savedmodel", None, (), inference_only=True))


def _source_paths(model: Any) -> set[Path]:
    """Every file ``model`` derives from, through every kmerge operation (a merge of merges
    included): :func:`kmerge.metadata.lineage`."""
    return {Path(s) for s in lineage(model)}


def save(model: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save ``model`` atomically as ``.keras`` (default) or legacy ``.h5``.

    The model is written to a hidden temporary file next to the target and moved into place
    with ``os.replace``, so the target is either untouched or complete. A model's
    metadata (:func:`kmerge.info`) travels as a ``kmerge.json`` archive member (ignored by plain Keras).

    Args:
        model: A built ``keras.Model``.
        path: Target file; without a suffix, ``.keras`` is appended.
        overwrite: Replace an existing file (never a file a source model was loaded from).

    Returns:
        The absolute path written.

    Raises:
        SaveError: Bad suffix, missing directory, existing target without ``overwrite``, target
            is a source file, or Keras failed to write (nothing is left behind).
        InvalidModelError: ``model`` is not a Keras model.

    >>> save(merged, "out/merged")  # doctest: +SKIP
    PosixPath('/abs/out/merged.keras')
    """
    import keras

    if not isinstance(model, keras.Model):
        raise InvalidModelError(f"save() needs a keras.Model; received {type(model).__name__}")
    p = Path(path).expanduser()
    if p.suffix == "":
        p = p.with_name(p.name + ".keras")
    if p.suffix.lower() not in SAVE_SUFFIXES:
        raise SaveError(f"{p}: cannot save with suffix '{p.suffix}'; use one of "
                        f"{', '.join(SAVE_SUFFIXES)} (.keras is recommended)")
    parent = p.parent.absolute()
    if not parent.is_dir():
        raise SaveError(f"{p}: the output directory {parent} does not exist; create it first "
                        f"(mkdir -p {parent})")
    target = parent.resolve() / p.name
    if target.resolve() in _source_paths(model):
        raise SaveError(f"{target}: is the file a source model was loaded from (this model "
                        "derives from it); kmerge never overwrites a source: choose another path")
    if target.is_dir():
        raise SaveError(f"{target}: is a directory; pass a file path ending in .keras")
    if target.exists() and not overwrite:
        raise SaveError(f"{target}: already exists; pass overwrite=True to replace it, or choose "
                        "another path")
    meta = meta_of(model)
    meta_json = None
    if meta is not None:
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise SaveError(f"{target}: the model's kmerge metadata is not JSON-serializable "
                            f"({exc}); nothing was written") from exc
    suffix = target.suffix
    tmp = parent.resolve() / f".{target.name}.{secrets.token_hex(4)}.tmp{suffix}"
    try:
        if suffix == ".keras":
            model.save(tmp)
            if meta_json is not None:
                with zipfile.ZipFile(tmp, "a") as zf:
                    zf.writestr(_META_MEMBER, meta_json)
        else:
            import h5py

            keras.saving.save_model(model, tmp)
            if meta_json is not None:
                with h5py.File(tmp, "r+") as f:
                    f.attrs[_META_H5_ATTR] = meta_json
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, SaveError):
            raise SaveError(f"{target}: Keras could not write the model "
                            f"({type(exc).__name__}: {exc}); nothing was written") from exc
        raise
    return target
