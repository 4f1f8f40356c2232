"""Out-of-core weight merging: tensors stream from the files, one at a time.

:func:`merge_weights_files` never builds the source models. It opens the HDF5 weights inside
each ``.keras`` archive (``model.weights.h5``, stored uncompressed, read in place through a
file window) or each ``.weights.h5`` file with h5py, reads one dataset per source, merges it
with the registered method, and writes it straight into the output's HDF5 file. Peak memory
is a few tensors per source, not whole models.

Datasets are named after their layers: the layer-name path comes from the ``name`` attribute
Keras writes on each ``vars`` group, and the variable name (``kernel``, ``bias``, ...) from a
variable-free skeleton of the model built from ``config.json`` (``keras.StatelessScope``),
so ``params`` and ``exclude`` patterns read as they do for :func:`kmerge.merge_weights`
(``"dense_1/kernel"``). Where the skeleton cannot be built, the name is
``"<layer path>/vars/<i>"``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kmerge.errors import IncompatibleModelsError, InvalidArgumentError, SaveError
from kmerge.metadata import localized, portable
from kmerge.weights.apply import refuse_non_finite, supplied_params, tensor_kwargs
from kmerge.weights.validate import (
    check_fast,
    check_param_names,
    compile_patterns,
    dig,
    first_config_difference,
    normalise_weights,
    path_candidates,
    resolve_method,
)

__all__ = ["merge_weights_files", "STREAMABLE_SUFFIXES"]

STREAMABLE_SUFFIXES = (".keras", ".weights.h5")
_WEIGHTS_MEMBER = "model.weights.h5"
_META_MEMBER = "kmerge.json"
_NOT_STREAMABLE = ("fisher", "regmean", "greedy_soup")
_GRAPH_KEYS = {"name", "trainable", "seed", "inbound_nodes", "input_layers", "output_layers"}


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``[start, start + size)`` of a file (an uncompressed
    zip member), so h5py reads the archive's HDF5 file in place."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _kind(p: Path) -> str:
    name = p.name.lower()
    if name.endswith(".weights.h5"):
        return ".weights.h5"
    if name.endswith(".keras"):
        return ".keras"
    raise InvalidArgumentError(
        f"{p}: merge_weights_files streams .keras and .weights.h5 files only; received "
        f"'{p.name}'. Load other formats with kmerge.load and use kmerge.merge_weights")


def _member_offset(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    if header[:4] != b"PK\x03\x04":
        raise InvalidArgumentError(f"{path}: corrupt zip archive (bad local header for "
                                   f"{info.filename})")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _recorded_lineage(p: Path) -> set[str]:
    """The files a saved merge was derived from, as its kmerge metadata records them (empty
    when it has none or it cannot be read: the metadata only adds protection)."""
    import h5py

    try:
        if _kind(p) == ".weights.h5":
            with h5py.File(p, "r") as f:
                raw = f.attrs.get("kmerge_meta")
        else:
            with zipfile.ZipFile(p) as zf:
                raw = zf.read(_META_MEMBER) if _META_MEMBER in zf.namelist() else None
        meta = json.loads(raw) if raw is not None else {}
        meta = localized(meta, p.parent) if isinstance(meta, dict) else {}
        paths = meta.get("source_paths", [])
        return {str(Path(q).resolve()) for q in paths if isinstance(q, str) and q}
    except (OSError, ValueError, RecursionError, zipfile.BadZipFile):
        return set()


@contextlib.contextmanager
def _open_weights(p: Path, stack: contextlib.ExitStack):
    import h5py

    if _kind(p) == ".weights.h5":
        yield stack.enter_context(h5py.File(p, "r")), None, None
        return
    try:
        zf = stack.enter_context(zipfile.ZipFile(p))
        info = zf.getinfo(_WEIGHTS_MEMBER)
        config = json.loads(zf.read("config.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise InvalidArgumentError(f"{p}: not a readable .keras archive with config.json and "
                                   f"{_WEIGHTS_MEMBER} ({type(exc).__name__}: {exc})") from exc
    if info.compress_type == zipfile.ZIP_STORED:
        raw = stack.enter_context(_Window(p, _member_offset(p, zf, info), info.file_size))
    else:  # compressed by a hand-made archive: spill to disk, never to memory
        tmp = stack.enter_context(tempfile.TemporaryFile())
        with zf.open(info) as src:
            shutil.copyfileobj(src, tmp, 1 << 22)
        tmp.seek(0)
        raw = tmp
    yield stack.enter_context(h5py.File(raw, "r")), config, zf


def _datasets(f) -> list[str]:
    import h5py

    out: list[str] = []
    for top in ("layers", "vars"):  # optimizer and metrics state is ignored
        if top in f:
            f[top].visititems(lambda n, o, t=top: out.append(f"{t}/{n}")
                              if isinstance(o, h5py.Dataset) else None)
    return out


def _layer_chain(f, ds_path: str) -> list[str]:
    """Layer names from the ``vars`` groups' ``name`` attributes ('blk', 'd')."""
    parts = ds_path.split("/")
    chain = []
    for i in range(len(parts)):
        if parts[i] == "vars" and i > 0:
            name = f["/".join(parts[:i + 1])].attrs.get("name")
            if name is not None:
                chain.append(name.decode() if isinstance(name, bytes) else str(name))
    # a layer's own vars group is the last one; ancestors contribute their vars names
    return chain


def _friendly_names(f, config: dict | None, datasets: list[str]) -> dict[str, str]:
    groups: dict[str, list[str]] = {}
    for d in datasets:
        groups.setdefault(d.rsplit("/", 1)[0], []).append(d)
    names: dict[str, str] = {}
    skeleton = _skeleton(config) if config is not None else None
    for group, members in groups.items():
        members.sort(key=lambda d: int(d.rsplit("/", 1)[1]) if d.rsplit("/", 1)[1].isdigit() else 0)
        chain = _layer_chain(f, members[0])
        layer_path = "/".join(chain) if chain else group
        var_names = None
        if skeleton is not None and chain:
            try:
                layer = skeleton
                for n in chain:
                    layer = layer.get_layer(n)
                vs = layer.weights
                if len(vs) == len(members) and all(tuple(v.shape) == f[m].shape
                                                   for v, m in zip(vs, members)):
                    var_names = [v.name for v in vs]
            except Exception:  # any lookup failure: fall back to vars/<i>
                var_names = None
        for i, m in enumerate(members):
            names[m] = f"{layer_path}/{var_names[i]}" if var_names else \
                f"{layer_path}/vars/{m.rsplit('/', 1)[1]}"
    return names


def _skeleton(config: dict):
    """The model built from its config without allocating any variable."""
    try:
        import keras

        from kmerge import _keras

        with _keras.skeleton_scope():
            return keras.models.model_from_json(json.dumps(config))
    except Exception:  # custom or unusual models: names fall back to vars/<i>
        return None


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()
                if k not in _GRAPH_KEYS and not k.endswith("_initializer")}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _check_configs(configs: list[dict], names: list[str]) -> None:
    fix = "weight merges need one architecture; merge different models with kmerge.parallel"
    ref = configs[0]
    for cfg, name in zip(configs[1:], names[1:]):
        la = ref.get("config", {}).get("layers", [])
        lb = cfg.get("config", {}).get("layers", [])
        for a, b in zip(la, lb):
            lname = a.get("config", {}).get("name", "?")
            if a.get("class_name") != b.get("class_name"):
                raise IncompatibleModelsError(
                    f"{names[0]} and {name} differ at layer {lname!r}: {a.get('class_name')} "
                    f"vs {b.get('class_name')}; {fix}")
            ca, cb = _clean(a.get("config", {})), _clean(b.get("config", {}))
            diff = first_config_difference(ca, cb)
            if diff is not None:
                raise IncompatibleModelsError(
                    f"{names[0]} and {name} differ at layer {lname!r}: config {diff!r} is "
                    f"{dig(ca, diff)!r} vs {dig(cb, diff)!r}; {fix}")
        if len(la) != len(lb):
            raise IncompatibleModelsError(f"{names[0]} has {len(la)} layers but {name} has "
                                          f"{len(lb)}; {fix}")


def merge_weights_files(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, *,
                        method: str, base: str | os.PathLike | None = None,
                        weights: Sequence[float] | None = None,
                        params: Mapping[str, Mapping[str, Any]] | None = None,
                        exclude: Sequence[str] | None = None, overwrite: bool = False,
                        progress: bool = False, **method_params: Any) -> Path:
    """Merge saved models tensor by tensor, from disk to disk, without loading them.

    Same methods and parameters as :func:`kmerge.merge_weights` except those that need data
    (``fisher``, ``regmean``, ``greedy_soup``). Memory stays at a few tensors per source.
    The output is a ``.keras`` archive (config of the first source, no optimizer) or a
    ``.weights.h5`` file, matching the inputs; its ``kmerge.json`` member (or the HDF5
    attribute ``kmerge_meta``) holds the drift report, as :func:`kmerge.save` writes it.

    Args:
        paths: Two or more ``.keras`` files, or two or more ``.weights.h5`` files.
        out_path: Where to write the result (same kind as the inputs); written atomically,
            never over a source.
        method: ``linear``, ``slerp``, ``task_arithmetic``, ``ties`` or ``dare``.
        base: The pretrained model's file, for the task-vector methods.
        weights: One non-negative weight per source (normalised).
        params: ``{regex: {parameter: value}}`` per-tensor overrides (``re.fullmatch`` on
            names such as ``"dense_1/kernel"``).
        exclude: Regexes of layer names / variable names copied from the first source.
        overwrite: Replace an existing ``out_path``.
        progress: Print one line per tensor to stderr.
        **method_params: The method's parameters.

    Returns:
        The absolute path written.

    >>> merge_weights_files(["a.keras", "b.keras"], "soup.keras", method="linear")  # doctest: +SKIP
    PosixPath('/abs/soup.keras')
    """
    if method in _NOT_STREAMABLE:
        raise InvalidArgumentError(
            f"method {method!r} needs data and the live models; it cannot stream from files: "
            "use kmerge.merge_weights([kmerge.load(p) for p in paths], ...)")
    fn = resolve_method(method)
    check_param_names(method, fn, method_params, "merge_weights_files")
    params = dict(params or {})
    compiled = []
    for (pat, rx), ov in zip(compile_patterns(params, "params"), params.values()):
        if not isinstance(ov, Mapping):
            raise InvalidArgumentError(f"params[{pat!r}] must be a dict; received {ov!r}")
        check_param_names(method, fn, ov, f"params[{pat!r}]")
        compiled.append((pat, rx, dict(ov)))
    excl = compile_patterns(list(exclude or []), "exclude")
    srcs = [Path(p).expanduser().absolute() for p in paths]
    if len(srcs) < 2 and method not in ("task_arithmetic", "ties", "dare"):
        raise InvalidArgumentError(f"merge_weights_files needs at least two files; received "
                                   f"{len(srcs)}")
    n = len(srcs)
    norm_w = normalise_weights(weights, n)
    sup = supplied_params(fn)
    if sup.get("base") and base is None:
        raise InvalidArgumentError(f"method {method!r} needs base=, the pretrained model's file")
    if base is not None and "base" not in sup:
        raise InvalidArgumentError(f"method {method!r} does not use base=; drop it")
    check_fast(method, fn, n, norm_w, base is not None, method_params,
                {p: o for p, _, o in compiled})
    all_in = srcs + ([Path(base).expanduser().absolute()] if base is not None else [])
    for p in all_in:
        if not p.is_file():
            raise InvalidArgumentError(f"{p}: no such file; pass saved .keras or .weights.h5 "
                                       "files")
    kinds = {_kind(p) for p in all_in}
    if len(kinds) != 1:
        raise InvalidArgumentError(f"mix of {sorted(kinds)} files; pass all .keras or all "
                                   ".weights.h5")
    kind = kinds.pop()
    out = Path(out_path).expanduser().absolute()
    if not out.name.lower().endswith(kind):
        raise SaveError(f"{out}: the inputs are {kind} files, so the output must end in {kind}")
    if not out.parent.is_dir():
        raise SaveError(f"{out}: the directory {out.parent} does not exist; create it first")
    ancestry = sorted({str(p.resolve()) for p in all_in}.union(
        *(_recorded_lineage(p) for p in all_in)))
    if str(out.resolve()) in ancestry:
        raise SaveError(f"{out}: is a source file (or a file a source was derived from); kmerge "
                        "never overwrites a source: choose another path")
    if out.exists() and not overwrite:
        raise SaveError(f"{out}: already exists; pass overwrite=True or choose another path")

    import h5py

    names = [f"{p.name}" for p in srcs] + (["base"] if base is not None else [])
    tmp_h5 = out.parent / f".{out.name}.{secrets.token_hex(4)}.weights.tmp.h5"
    tmp_out = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp{kind}"
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            opened = [stack.enter_context(_open_weights(p, stack)) for p in all_in]
            files = [o[0] for o in opened]
            configs = [o[1] for o in opened]
            if kind == ".keras":
                _check_configs(configs, names)
            dsets = [_datasets(f) for f in files]
            ref = dsets[0]
            friendly = _friendly_names(files[0], configs[0], ref)
            for f, ds, name in zip(files[1:], dsets[1:], names[1:]):
                for a, b in zip(ref, ds):
                    if a != b or files[0][a].shape != f[b].shape:
                        raise IncompatibleModelsError(
                            f"{names[0]} and {name} differ at variable {friendly[a]!r} ({a}): "
                            f"shape {files[0][a].shape} vs "
                            f"{f[b].shape if b in f else 'absent'} ({b}); weight merges need "
                            "one architecture")
                if len(ds) != len(ref):
                    raise IncompatibleModelsError(
                        f"{names[0]} has {len(ref)} variables but {name} has {len(ds)}; weight "
                        "merges need one architecture")
            fnames = [friendly[d] for d in ref]
            excluded = set()
            for pat, rx in excl:
                hits = [fn_ for fn_ in fnames if any(rx.fullmatch(c)
                                                     for c in path_candidates(fn_))]
                if not hits:
                    raise InvalidArgumentError(f"exclude pattern {pat!r} matches no variable; "
                                               f"variables are: {', '.join(fnames[:12])}")
                excluded.update(hits)
            for pat, rx, _ in compiled:
                if not any(rx.fullmatch(fn_) for fn_ in fnames):
                    raise InvalidArgumentError(f"params pattern {pat!r} matches no variable; "
                                               f"variables are: {', '.join(fnames[:12])}")
            drift: dict[str, list[float]] = {}
            copied = []
            with h5py.File(tmp_h5, "w") as dst:
                _mirror_groups(files[0], dst)
                for k, (d, name) in enumerate(zip(ref, fnames)):
                    first = files[0][d][()]
                    is_float = np.issubdtype(first.dtype, np.floating)
                    if not is_float or name in excluded:
                        merged = first
                        copied.append(name)
                    else:
                        tensors = [first] + [f[d][()] for f in files[1:n]]
                        kwargs = tensor_kwargs(
                            sup, name, method_params, compiled, weights=norm_w,
                            base=files[n][d][()] if "base" in sup else None)
                        with np.errstate(over="ignore", invalid="ignore"):
                            merged = np.asarray(fn(tensors, **kwargs)).astype(first.dtype)
                        refuse_non_finite([merged], [name], [[t] for t in tensors],
                                           names[:n], method)
                        drift[name] = [_relative_distance(merged, t) for t in tensors]
                        del tensors, kwargs
                    dst.create_dataset(d, data=merged)
                    del merged, first
                    if progress:
                        print(f"[{k + 1}/{len(ref)}] {name} {files[0][d].shape}",
                              file=sys.stderr, flush=True)
                meta = {"kind": "weights", "method": method, "method_params": method_params,
                        "params": {p: o for p, _, o in compiled},
                        "exclude": [p for p, _ in excl], "weights": norm_w, "streamed": True,
                        "source_paths": ancestry, "drift": drift,
                        "copied": copied, "seconds": time.perf_counter() - t0}
                if drift:
                    worst = max(drift, key=lambda k_: max(drift[k_]))
                    meta["max_drift"] = {"variable": worst, "value": max(drift[worst])}
                meta_json = json.dumps(portable(meta, out.parent.resolve()), sort_keys=True,
                                       default=str)
                if kind == ".weights.h5":
                    dst.attrs["kmerge_meta"] = meta_json
            if kind == ".keras":
                _write_archive(opened[0][2], configs[0], tmp_h5, tmp_out, meta_json)
                tmp_h5.unlink()
            else:
                os.replace(tmp_h5, tmp_out)
        os.replace(tmp_out, out)
    finally:
        tmp_h5.unlink(missing_ok=True)
        tmp_out.unlink(missing_ok=True)
    return out


def _relative_distance(m: np.ndarray, t: np.ndarray, chunk: int = 1 << 20) -> float:
    """||m - t|| / ||t|| in float64, a million entries at a time (no full-size temporaries)."""
    mf, tf = m.reshape(-1), t.reshape(-1)
    num = den = 0.0
    for s in range(0, mf.size, chunk):
        a, b = mf[s:s + chunk].astype(np.float64), tf[s:s + chunk].astype(np.float64)
        num += float(np.sum((a - b) ** 2))
        den += float(np.sum(b * b))
    return float(np.sqrt(num) / max(np.sqrt(den), 1e-12))


def _mirror_groups(src, dst) -> None:
    import h5py

    for k, v in src.attrs.items():
        dst.attrs[k] = v

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and name.split("/")[0] in ("layers", "vars"):
            g = dst.require_group(name)
            for k, v in obj.attrs.items():
                g.attrs[k] = v

    src.visititems(visit)
    if "vars" not in dst:
        dst.require_group("vars")


def _write_archive(src_zip: zipfile.ZipFile, config: dict, weights_h5: Path, out: Path,
                   meta_json: str) -> None:
    config = dict(config)
    config.pop("compile_config", None)  # optimizer state is not merged: the result is uncompiled
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zo:
        for info in src_zip.infolist():
            if info.filename in (_WEIGHTS_MEMBER, "config.json", _META_MEMBER):
                continue
            with src_zip.open(info) as fi, zo.open(info.filename, "w", force_zip64=True) as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)
        zo.writestr("config.json", json.dumps(config))
        zo.write(weights_h5, _WEIGHTS_MEMBER)
        zo.writestr(_META_MEMBER, meta_json)
