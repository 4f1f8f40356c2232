"""Load Keras models from every format kmerge accepts, and save them atomically.

:func:`load` reads ``.keras`` archives, ``.h5``/``.hdf5`` files written by Keras 3 or by Keras 2
(repaired by :mod:`kmerge.legacy`), JSON architectures (``model.to_json()``) with a weights file,
and TensorFlow SavedModel directories (tensorflow backend only, inference only). Every failure is
a :class:`~kmerge.errors.ModelLoadError` naming the file, what is wrong with it and what to do.
Loading never writes to the file, reads only regular files, checks archive members' sizes before
Keras opens them, and keeps ``safe_mode`` in force whatever Keras' process-wide switch says.
:func:`save` writes through a temporary file and ``os.replace`` and refuses to overwrite a file
any source model was loaded from.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmerge.errors import InvalidArgumentError, InvalidModelError, ModelLoadError, SaveError
from kmerge.metadata import attach, fingerprint, lineage, localized, meta_of, portable

__all__ = ["LoadInfo", "load", "load_info", "save", "SAVE_SUFFIXES"]

SAVE_SUFFIXES = (".keras", ".h5", ".hdf5")
_H5_SUFFIXES = (".h5", ".hdf5")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_META_MEMBER = "kmerge.json"
_META_H5_ATTR = "kmerge_meta"
_FORMATS = ("a .keras file, a .h5/.hdf5 model file, a model.to_json() .json file with weights=, "
            "or a TensorFlow SavedModel directory")

# Limits checked before Keras reads anything (a small file must not cost gigabytes of memory).
MAX_JSON_BYTES = 64 << 20  # config.json, metadata.json, kmerge.json, a .json, an HDF5 attribute
MAX_MEMBERS = 10_000  # a .keras holds 3 members plus its assets
MAX_EXPANSION = 100  # uncompressed / compressed, for a member (or the archive) above...
EXPANSION_FLOOR = 16 << 20  # ...this many uncompressed bytes (Keras stores members uncompressed)
MAX_META_DEPTH = 64  # nesting of kmerge's metadata (kmerge writes at most a few levels)
_JSON_MEMBERS = ("config.json", "metadata.json", _META_MEMBER)
# Keras before 3.11 wrote a single input/output of a Functional model as a one-element list.
_LISTED_SINGLE_TENSORS_BEFORE = (3, 11)


@dataclass(frozen=True)
class LoadInfo:
    """How a model was loaded.

    Attributes:
        path: Absolute path of the file or directory.
        format: ``"keras"``, ``"h5-keras3"``, ``"h5-keras2"``, ``"json-keras3"``,
            ``"json-keras2"`` or ``"savedmodel"``.
        keras_version: The Keras version stored in the file, if any.
        repairs: One human-readable line per change made to load the file (Keras 2 configs,
            Keras 3.0-3.10 single-tensor lists).
        inference_only: True for SavedModels (wrapped in a ``TFSMLayer``: no layers to tap,
            no training).
        weights: Absolute path of the weights file, for a JSON architecture (else None).
    """

    path: str
    format: str
    keras_version: str | None = None
    repairs: tuple[str, ...] = ()
    inference_only: bool = False
    weights: str | None = None


def load_info(model: Any) -> LoadInfo | None:
    """Return the :class:`LoadInfo` that :func:`load` attached to ``model``, or None.

    >>> load_info(kmerge.io.load("old.h5")).repairs  # doctest: +SKIP
    ("layer 'lstm': dropped Keras 2 argument time_major=False",)
    """
    info = getattr(model, "_kmerge_load", None)
    return info if isinstance(info, LoadInfo) else None


def load(path: str | os.PathLike, *, safe_mode: bool = True,
         custom_objects: dict[str, Any] | None = None,
         weights: str | os.PathLike | None = None) -> Any:
    """Load a model, uncompiled, from any format kmerge supports.

    Args:
        path: A ``.keras`` file, a ``.h5``/``.hdf5`` file (Keras 3 or Keras 2), a ``.json``
            architecture written by ``model.to_json()`` (Keras 2 or 3; needs ``weights``), or a
            TensorFlow SavedModel directory (tensorflow backend only).
        safe_mode: Refuse Lambda layers holding Python bytecode, even after
            ``keras.config.enable_unsafe_deserialization()``. Pass False only for files you trust.
        custom_objects: Classes and functions for custom layers, by the name stored in the file.
        weights: For a ``.json`` architecture only: the weights file, as written by Keras 2
            ``model.save_weights("w.h5")`` or Keras 3 ``model.save_weights("w.weights.h5")``.

    Returns:
        A ``keras.Model``; :func:`load_info` tells how it was loaded and what was repaired.

    Raises:
        ModelLoadError: The path is missing, unreadable, not a regular file, not a model,
            corrupt, too large for its size, weights only, holds a Lambda layer under
            ``safe_mode``, uses an unknown custom class, or carries corrupt kmerge metadata.
        InvalidArgumentError: ``path`` or ``weights`` is not a path, or ``weights`` is given
            for a file that holds its own weights.

    >>> model = load("classifier.h5")  # doctest: +SKIP
    >>> load_info(model).format  # doctest: +SKIP
    'h5-keras2'
    """
    p = _as_path(path, "path")
    st = _stat(p)
    suffix = p.suffix.lower()
    if weights is not None and (stat.S_ISDIR(st.st_mode) or suffix != ".json"):
        raise InvalidArgumentError(
            f"{p}: weights= is only for a .json architecture (model.to_json()); this file holds "
            "its own weights: drop the weights argument")
    if stat.S_ISDIR(st.st_mode):
        if not os.access(p, os.R_OK | os.X_OK):
            raise ModelLoadError(f"{p}: permission denied (the directory cannot be read); check "
                                 "its permissions (ls -ld) or load it as a user who can read it")
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            return _load_savedmodel(p)
        raise ModelLoadError(
            f"{p}: is a directory but not a TensorFlow SavedModel (no saved_model.pb inside); "
            f"pass {_FORMATS}")
    head = _read_head(p, st)
    if suffix == ".json":
        return _load_json(p, weights, safe_mode=safe_mode, custom_objects=custom_objects)
    if suffix in _H5_SUFFIXES or (suffix != ".keras" and head == _HDF5_MAGIC):
        return _load_h5(p, safe_mode=safe_mode, custom_objects=custom_objects)
    if suffix == ".keras":
        return _load_keras(p, safe_mode=safe_mode, custom_objects=custom_objects)
    if head[:2] == b"PK" and zipfile.is_zipfile(p):
        with _open_archive(p) as zf:
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


# ---- checks made before any file is opened by Keras ---------------------------------------------

def _as_path(path: Any, what: str) -> Path:
    if isinstance(path, bytes | str | os.PathLike):
        try:
            text = os.fsdecode(os.fspath(path))
        except (TypeError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"load(): {what} {path!r:.100} is not a usable path "
                                       f"({exc}); pass {_FORMATS}") from exc
    else:
        raise InvalidArgumentError(
            f"load(): {what} must be a str or os.PathLike, received {type(path).__name__} "
            f"({path!r:.100}); pass {_FORMATS}")
    if not text:
        raise InvalidArgumentError(f"load(): {what} is an empty string; pass {_FORMATS}")
    if "\x00" in text:
        raise InvalidArgumentError(f"load(): {what} {text!r:.100} contains a NUL character; "
                                   "pass a real file path")
    return Path(text).expanduser().absolute()


def check_exists(path: Any, what: str = "path") -> Path:
    """The absolute path of a model file or folder that exists, or the typed error
    :func:`load` would raise for it (callers check every source before reading data)."""
    p = _as_path(path, what)
    _stat(p)
    return p


def _stat(p: Path) -> os.stat_result:
    try:
        return os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        hint = ""
        try:
            if not p.parent.exists():
                hint = f" (the directory {p.parent} does not exist either)"
        except OSError:
            pass
        raise ModelLoadError(f"{p}: no such file or directory{hint}; pass the path of "
                             f"{_FORMATS}") from None
    except PermissionError:
        raise ModelLoadError(f"{p}: permission denied (a directory on the path cannot be "
                             "searched); check the permissions (ls -ld) or load it as a user who "
                             "can read it") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ModelLoadError(
                f"{p}: file name too long for this file system ({len(p.name)} characters in "
                f"the last component, {len(str(p))} in the path); shorten the path") from None
        raise ModelLoadError(f"{p}: cannot be read ({exc.strerror or exc}); check the path")\
            from None


_KINDS = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]


def _check_regular(p: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise ModelLoadError(
        f"{p}: is {kind}, not a regular file; kmerge reads models only from regular files "
        "(reading it could block forever or never end): save or copy the model to a file")


def _read_head(p: Path, st: os.stat_result, *, n: int = 8) -> bytes:
    """The first bytes of a regular, readable, non-empty file (opened without blocking)."""
    _check_regular(p, st.st_mode)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise ModelLoadError(f"{p}: permission denied (the file cannot be read); check its "
                             "permissions (ls -l) or load it as a user who can read it") from None
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot be opened ({exc.strerror or exc}); check the path")\
            from None
    try:
        st = os.fstat(fd)  # the file opened, in case the path was replaced after the stat
        _check_regular(p, st.st_mode)
        head = os.read(fd, n)
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot be read ({exc.strerror or exc}); copy the file again")\
            from None
    finally:
        os.close(fd)
    if st.st_size == 0:
        raise ModelLoadError(f"{p}: is empty (0 bytes); the copy or download that made it "
                             "failed: copy the file again or re-save the model")
    return head


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _zip_entry_count(p: Path) -> int | None:
    """The member count from the archive's end record, read before ``zipfile`` builds its list
    (a forged central directory of millions of entries costs gigabytes to list)."""
    try:
        with open(p, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - (22 + 65535)))
            tail = fh.read()
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or len(tail) - at < 22:
                return None
            count = struct.unpack("<H", tail[at + 10:at + 12])[0]
            if count != 0xFFFF:
                return count
            loc = tail.rfind(b"PK\x06\x07", 0, at)  # Zip64 end-of-directory locator
            if loc < 0 or len(tail) - loc < 20:
                return None
            offset = struct.unpack("<Q", tail[loc + 8:loc + 16])[0]
            fh.seek(offset)
            record = fh.read(56)
            if record[:4] != b"PK\x06\x06" or len(record) < 40:
                return None
            return struct.unpack("<Q", record[32:40])[0]
    except (OSError, struct.error, ValueError):
        return None


def _check_archive(p: Path, zf: zipfile.ZipFile) -> None:
    """Refuse archives whose members would cost far more memory than the file's size."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ModelLoadError(f"{p}: the archive holds {len(infos)} members (a .keras model holds "
                             f"a few; kmerge's limit is {MAX_MEMBERS}); refusing it")
    total = 0
    for info in infos:
        if info.filename in _JSON_MEMBERS and info.file_size > MAX_JSON_BYTES:
            raise ModelLoadError(
                f"{p}: the archive member '{info.filename}' declares {_mib(info.file_size)} "
                f"uncompressed (kmerge's limit for it is {_mib(MAX_JSON_BYTES)}; Keras writes a "
                "few KB); refusing it: the file is corrupt or crafted")
        if info.file_size > EXPANSION_FLOOR and \
                info.file_size > MAX_EXPANSION * max(info.compress_size, 1):
            raise ModelLoadError(
                f"{p}: the archive member '{info.filename}' declares {_mib(info.file_size)} "
                f"uncompressed from {_mib(info.compress_size)} stored (more than "
                f"{MAX_EXPANSION}x; Keras stores members uncompressed); refusing a likely "
                "decompression bomb")
        total += info.file_size
    on_disk = p.stat().st_size
    if total > EXPANSION_FLOOR and total > MAX_EXPANSION * max(on_disk, 1):
        raise ModelLoadError(
            f"{p}: the archive's {len(infos)} members declare {_mib(total)} uncompressed from a "
            f"{_mib(on_disk)} file (more than {MAX_EXPANSION}x); refusing a likely decompression "
            "bomb")


def _open_archive(p: Path) -> zipfile.ZipFile:
    """A checked, open zip archive (see :func:`_check_archive`)."""
    count = _zip_entry_count(p)
    if count is not None and count > MAX_MEMBERS:
        raise ModelLoadError(f"{p}: the archive declares {count} members (a .keras model holds "
                             f"a few; kmerge's limit is {MAX_MEMBERS}); refusing it")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ModelLoadError(f"{p}: the archive is corrupt ({exc}); copy the file again or "
                             "re-save the model") from exc
    try:
        _check_archive(p, zf)
    except BaseException:
        zf.close()
        raise
    return zf


# ---- JSON the loader reads itself --------------------------------------------------------------

def _depth(obj: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _decode_json(raw: Any, p: Path, what: str, fix: str) -> Any:
    """Decode ``raw`` (str or bytes) or raise a ModelLoadError saying ``what`` is corrupt."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{p}: {what} is corrupt (not UTF-8 text); {fix}") from None
    if not isinstance(raw, str):
        raise ModelLoadError(f"{p}: {what} is corrupt (stored as {type(raw).__name__}, not "
                             f"JSON text); {fix}")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ModelLoadError(f"{p}: {what} is corrupt (JSON nested too deeply to read); "
                             f"{fix}") from None
    except ValueError as exc:
        raise ModelLoadError(f"{p}: {what} is corrupt (not JSON: {exc}); {fix}") from None


def _kmerge_meta(raw: Any, p: Path, where: str, strip: str) -> dict:
    fix = (f"the model itself may be intact: load it with plain Keras and pass that model to "
           f"kmerge (its kmerge record is lost), or remove the {where} ({strip})")
    meta = _decode_json(raw, p, f"its kmerge metadata ({where})", fix)
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{p}: its kmerge metadata ({where}) is corrupt (a JSON "
                             f"{type(meta).__name__}, not an object); {fix}")
    if _depth(meta) > MAX_META_DEPTH:
        raise ModelLoadError(f"{p}: its kmerge metadata ({where}) is corrupt (nested more than "
                             f"{MAX_META_DEPTH} levels; kmerge writes a few); {fix}")
    paths = meta.get("source_paths")
    if paths is not None and not (isinstance(paths, list)
                                  and all(isinstance(s, str) for s in paths)):
        raise ModelLoadError(f"{p}: its kmerge metadata ({where}) is corrupt (source_paths is "
                             f"not a list of paths); {fix}")
    return localized(meta, p.parent)


def _keras_metadata(raw: bytes, p: Path) -> str | None:
    fix = ("the archive is damaged: copy the file again, or load it with plain Keras (which does "
           "not read metadata.json) and re-save it")
    meta = _decode_json(raw, p, "the archive member metadata.json", fix)
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{p}: the archive member metadata.json is corrupt (a JSON "
                             f"{type(meta).__name__}, not an object); {fix}")
    version = meta.get("keras_version")
    if version is not None and not isinstance(version, str):
        raise ModelLoadError(f"{p}: the archive member metadata.json is corrupt (keras_version "
                             f"is a {type(version).__name__}); {fix}")
    return version


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _unwrap_single_tensors(config: Any, version: str) -> list[str]:
    """Keras 3.0-3.10 wrote a Functional model's single input/output as ``[["x", 0, 0]]``;
    Keras 3.11+ reads that as a one-element list (a structure warning on every call). Unwrap it
    at every nesting level, as the writing version meant."""
    repairs: list[str] = []
    queue = collections.deque([config])  # breadth first: outer models before nested ones
    while queue:
        obj = queue.popleft()
        if isinstance(obj, list):
            queue.extend(obj)
            continue
        if not isinstance(obj, dict):
            continue
        cfg = obj.get("config")
        if obj.get("class_name") in ("Functional", "Model") and isinstance(cfg, dict):
            for key in ("input_layers", "output_layers"):
                refs = cfg.get(key)
                if isinstance(refs, list) and len(refs) == 1 and isinstance(refs[0], list) \
                        and len(refs[0]) == 3 and isinstance(refs[0][0], str):
                    cfg[key] = refs[0]
                    repairs.append(f"model '{cfg.get('name')}': single {key.split('_')[0]} "
                                   f"{refs[0][0]!r} unwrapped from a one-element list (Keras "
                                   f"{version} wrote single tensors that way)")
        queue.extend(obj.values())
    return repairs


# ---- loaders -----------------------------------------------------------------------------------

def _keras_safe_mode(safe_mode: bool):
    """Keras' safe-mode switch set to ``safe_mode`` for the duration of a load, then restored.

    ``keras.config.enable_unsafe_deserialization()`` sets a (per-thread) switch that Keras
    prefers over the ``safe_mode`` argument; inside this scope, ``safe_mode`` wins.
    """
    from kmerge import _keras

    return _keras.safe_mode_scope(bool(safe_mode))


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
    if ("safe_mode" in msg and "Lambda" in msg) or "deserialization of a Python lambda" in msg:
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
    repairs: list[str] = []
    with _open_archive(p) as zf:
        try:
            names = set(zf.namelist())
            if "config.json" not in names:
                raise ModelLoadError(
                    f"{p}: is a zip archive without config.json (holds {sorted(names)[:5]}), not "
                    f"a Keras model; pass {_FORMATS}")
            version = (_keras_metadata(zf.read("metadata.json"), p)
                       if "metadata.json" in names else None)
            meta = (_kmerge_meta(zf.read(_META_MEMBER), p, f"archive member {_META_MEMBER}",
                                 f"zip -d {p.name} {_META_MEMBER}")
                    if _META_MEMBER in names else None)
            config = None
            parsed = _version_tuple(version)
            if parsed is not None and parsed < _LISTED_SINGLE_TENSORS_BEFORE:
                config = _decode_json(zf.read("config.json"), p, "the archive member config.json",
                                      "copy the file again or re-save the model")
                repairs = _unwrap_single_tensors(config, version)
            with contextlib.ExitStack() as stack:
                source = p
                if repairs:  # Keras reads only files: load a repaired copy of the archive
                    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kmerge-"))
                    source = Path(tmp) / "repaired.keras"
                    _rewrite_archive(zf, source, {"config.json": json.dumps(config).encode()})
                try:
                    with _keras_safe_mode(safe_mode):
                        model = keras.saving.load_model(source, compile=False,
                                                        safe_mode=safe_mode,
                                                        custom_objects=custom_objects)
                except Exception as exc:  # ValueError, TypeError, zipfile/zlib errors, ...
                    raise _wrap(exc, p, ".keras file") from exc
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"{p}: the .keras archive is corrupt ({exc}); copy the file "
                                 "again or re-save the model") from exc
    return _attach(model, LoadInfo(str(p), "keras", version, tuple(repairs)), meta)


def _rewrite_archive(zf: zipfile.ZipFile, dst: Path, replace: dict[str, bytes]) -> None:
    """Copy every member of ``zf`` to a new archive at ``dst``, with some members replaced."""
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as out:
        for info in zf.infolist():
            if info.filename in replace:
                out.writestr(info.filename, replace[info.filename])
                continue
            with zf.open(info) as src, out.open(info.filename, "w", force_zip64=True) as sink:
                shutil.copyfileobj(src, sink, 1 << 20)


def _h5_attr(f: Any, name: str, p: Path) -> Any:
    """An HDF5 root attribute, refused when it is larger than any Keras writes."""
    if name not in f.attrs:
        return None
    size = f.attrs.get_id(name).get_storage_size()
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{p}: the HDF5 attribute '{name}' holds {_mib(size)} (kmerge's "
                             f"limit is {_mib(MAX_JSON_BYTES)}); refusing it: the file is "
                             "corrupt or crafted")
    return f.attrs[name]


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
            _h5_attr(f, "model_config", p)
            version = _h5_attr(f, "keras_version", p)
            version = version.decode() if isinstance(version, bytes) else version
            version = version if isinstance(version, str) else None
            meta_raw = _h5_attr(f, _META_H5_ATTR, p)
            meta = (_kmerge_meta(meta_raw, p, f"HDF5 attribute {_META_H5_ATTR}",
                                 f"h5py: del h5py.File(path, 'r+').attrs['{_META_H5_ATTR}']")
                    if meta_raw is not None else None)
            if version is not None and str(version).startswith("3."):
                fmt, repairs = "h5-keras3", ()
            else:
                fmt = "h5-keras2"
                with _keras_safe_mode(safe_mode):
                    model, repairs = legacy.load_keras2(
                        f, where=str(p), safe_mode=safe_mode, custom_objects=custom_objects,
                        on_error=lambda e: _wrap(e, p, "Keras 2 .h5 file"))
    except ModelLoadError:
        raise
    except RecursionError as exc:
        raise ModelLoadError(f"{p}: the stored model_config is corrupt (nested too deeply to "
                             "read); copy the file again or re-save the model") from exc
    except (OSError, KeyError, ValueError, AttributeError, TypeError) as exc:
        # h5py read errors inside a damaged file, a non-JSON model_config, ...
        raise ModelLoadError(
            f"{p}: could not read the HDF5 file ({type(exc).__name__}: {exc}); it is corrupt or "
            "truncated: copy the file again or re-save the model") from exc
    if fmt == "h5-keras3":
        import keras

        try:
            with _keras_safe_mode(safe_mode):
                model = keras.saving.load_model(p, compile=False, safe_mode=safe_mode,
                                                custom_objects=custom_objects)
        except Exception as exc:  # Keras raises ValueError, TypeError, OSError, ...
            raise _wrap(exc, p, "Keras 3 .h5 file") from exc
    return _attach(model, LoadInfo(str(p), fmt, version, tuple(repairs)), meta)


def _load_json(p: Path, weights: Any, *, safe_mode: bool, custom_objects: dict | None) -> Any:
    """A ``model.to_json()`` architecture (Keras 2 or 3) plus the weights file."""
    import h5py
    import keras

    from kmerge import legacy

    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{p}: is {_mib(size)}, too large for a model architecture "
                             f"(kmerge's limit is {_mib(MAX_JSON_BYTES)}); pass the JSON "
                             "written by model.to_json()")
    fix = "pass the file written by model.to_json()"
    with open(p, "rb") as fh:
        config = _decode_json(fh.read(), p, "the JSON architecture", fix)
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str) \
            or "config" not in config:
        raise ModelLoadError(f"{p}: is JSON but not a Keras model architecture (no class_name "
                             f"and config at the top); {fix}")
    if weights is None:
        raise ModelLoadError(
            f"{p}: is a model architecture without weights; pass the weights file too: "
            f"kmerge.load('{p.name}', weights='weights.h5') (written by model.save_weights)")
    w = _as_path(weights, "weights")
    w_head = _read_head(w, _stat(w))
    if w_head != _HDF5_MAGIC:
        raise ModelLoadError(f"{w}: is not an HDF5 weights file (written by "
                             "model.save_weights('w.h5') in Keras 2 or "
                             "model.save_weights('w.weights.h5') in Keras 3); pass that file")
    version = config.get("keras_version")
    version = version if isinstance(version, str) else None
    keras2 = version.startswith(("1.", "2.")) if version else "module" not in config
    fmt = "json-keras2" if keras2 else "json-keras3"
    repairs: tuple[str, ...] = ()
    try:
        with _keras_safe_mode(safe_mode):
            if keras2:
                model, repairs = legacy.build_keras2(
                    config, where=str(p), safe_mode=safe_mode, custom_objects=custom_objects,
                    on_error=lambda e: _wrap(e, p, "Keras 2 JSON architecture"))
            else:
                objects = {**keras.saving.get_custom_objects(), **(custom_objects or {})}
                model = keras.saving.deserialize_keras_object(
                    config, custom_objects=objects, safe_mode=safe_mode)
    except ModelLoadError:
        raise
    except RecursionError as exc:
        raise ModelLoadError(f"{p}: the JSON architecture is nested too deeply to build; "
                             f"{fix}") from exc
    except Exception as exc:  # Keras raises ValueError, TypeError, AttributeError, ...
        raise _wrap(exc, p, "JSON architecture") from exc
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{p}: describes a {type(model).__name__}, not a model; "
                             f"{fix}")
    try:
        with h5py.File(w, "r") as f:
            group = f if legacy.is_keras2_weights_file(f) else (
                f["model_weights"] if "model_config" in f.attrs and "model_weights" in f
                else None)  # a Keras 2 save_weights file, or a whole Keras 2 model file
            if group is not None:
                try:
                    legacy.load_h5_weights(group, model, where=str(w))
                except ModelLoadError as exc:
                    raise ModelLoadError(f"{exc}; pass the weights saved from the model in "
                                         f"{p.name}") from exc
            elif legacy.is_keras3_weights_file(f, w):
                if not w.name.endswith(".weights.h5"):
                    raise ModelLoadError(f"{w}: is a Keras 3 weights file, which Keras reads "
                                         "only under a name ending in .weights.h5; copy or "
                                         f"rename it to {w.name.split('.')[0]}.weights.h5")
                model.load_weights(w)
            else:
                raise ModelLoadError(f"{w}: is an HDF5 file but holds no Keras weights "
                                     f"(top-level entries {list(f)[:5]}); pass the file written "
                                     "by model.save_weights")
    except ModelLoadError:
        raise
    except Exception as exc:  # h5py errors, Keras' ValueError on a mismatch, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        raise ModelLoadError(f"{w}: these weights do not fit the architecture in {p.name} "
                             f"({type(exc).__name__}: {first}); pass the weights saved from "
                             "that model") from exc
    return _attach(model, LoadInfo(str(p), fmt, version, tuple(repairs), weights=str(w)))


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


def _is_recorded_source(model: Any, target: Path) -> bool:
    """Whether the model file ``target`` holds the weights of one of ``model``'s sources, by
    the fingerprints kmerge records (read only when replacing a file with recorded sources)."""
    recorded = (meta_of(model) or {}).get("source_fingerprints")
    if not isinstance(recorded, list) or not recorded:
        return False
    return file_fingerprint(target) in set(recorded)


def file_fingerprint(path: Path) -> str | None:
    """:func:`kmerge.metadata.fingerprint` of the layer weights stored in a saved model
    (``.keras`` or ``.h5``; optimizer state left out); None when it cannot be read."""
    import tempfile

    import h5py

    arrays: list = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith(("optimizer", "metrics")):
            arrays.append(obj[()])

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf, tempfile.TemporaryFile() as tmp:
                with zf.open("model.weights.h5") as member:
                    shutil.copyfileobj(member, tmp, 1 << 22)  # spilled to disk, not memory
                tmp.seek(0)
                with h5py.File(tmp, "r") as f:
                    f.visititems(visit)
        else:
            with h5py.File(path, "r") as f:
                (f["model_weights"] if "model_weights" in f else f).visititems(visit)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return fingerprint(arrays)


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
    from kmerge.arguments import flag

    if not isinstance(path, str | os.PathLike) or not str(path):
        raise SaveError(f"save() needs a file path (a str or os.PathLike); received {path!r}")
    try:
        return _save(model, Path(path).expanduser(), overwrite=flag(overwrite, "overwrite"))
    except OSError as exc:
        if isinstance(exc, SaveError):
            raise
        # a name longer than the file system allows, a read-only or vanished directory...
        raise SaveError(f"{path}: cannot write there ({exc.strerror or exc}); choose another "
                        "path (nothing was written)") from exc


def _save(model: Any, p: Path, *, overwrite: bool) -> Path:
    import keras

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
    if target.is_file() and _is_recorded_source(model, target):
        raise SaveError(f"{target}: holds the weights of a model this one was made from (a "
                        "source loaded with plain Keras: kmerge knows its weights, not its "
                        "path); kmerge never overwrites a source: choose another path")
    meta = meta_of(model)
    meta_json = None
    if meta is not None:
        try:
            meta_json = json.dumps(portable(meta, parent.resolve()), sort_keys=True)
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
