"""Out-of-core weight merging: tensors stream from the files, one at a time.

:func:`merge_weights_files` never builds the source models. It opens the HDF5 weights inside
each ``.keras`` archive (``model.weights.h5``, stored uncompressed, read in place through a
file window) or each ``.weights.h5`` file with h5py, reads one dataset per source, merges it
with the registered method, and writes it straight into the output's HDF5 file. Peak memory
is a few tensors per source, not whole models.

It is the same merge as :func:`kmerge.merge_weights` on the loaded models: the configs are
compared by :func:`kmerge.weights.validate.same_architecture`, datasets get the canonical
variable paths of :func:`kmerge.weights.validate.variable_paths` (layer names from the
``name`` attribute Keras writes on each ``vars`` group, variable names from a variable-free
skeleton of ``config.json`` built in a ``keras.StatelessScope``, or for a ``.weights.h5``
file from the built-in layer's class; ``"<layer path>/vars/<i>"`` where neither knows),
BatchNorm/Normalization statistics are averaged, and bfloat16 data (``|V2`` tagged
``dtype='bfloat16'``) is merged in float32 and written back tagged.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
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
from kmerge.weights.apply import (
    refuse_non_finite,
    resolved_params,
    supplied_params,
    tensor_kwargs,
)
from kmerge.weights.validate import (
    check_fast,
    check_param_names,
    compile_patterns,
    normalise_weights,
    owned_variables,
    path_candidates,
    resolve_method,
    same_architecture,
    variable_name,
)

__all__ = ["merge_weights_files", "STREAMABLE_SUFFIXES"]

STREAMABLE_SUFFIXES = (".keras", ".weights.h5")
_WEIGHTS_MEMBER = "model.weights.h5"
_META_MEMBER = "kmerge.json"
NOT_STREAMABLE = ("fisher", "regmean", "greedy_soup")
_NOT_STREAMABLE = NOT_STREAMABLE
#: Variable names of Keras's built-in layers in the order ``save_own_variables`` writes
#: them, by the file's group name (the class name in snake case): how a ``.weights.h5``
#: file, which has no config, gets the names a model in memory has. Optional trailing
#: variables (``bias``) may be absent; other counts fall back to ``vars/<i>``.
_KNOWN_VARIABLES = {
    **dict.fromkeys(("dense", "einsum_dense", "conv1d", "conv2d", "conv3d", "conv1d_transpose",
                     "conv2d_transpose", "conv3d_transpose", "depthwise_conv1d",
                     "depthwise_conv2d"), ("kernel", "bias")),
    **dict.fromkeys(("separable_conv1d", "separable_conv2d"),
                    ("depthwise_kernel", "pointwise_kernel", "bias")),
    "embedding": ("embeddings",),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "layer_normalization": ("gamma", "beta"),
    "group_normalization": ("gamma", "beta"),
    "rms_normalization": ("scale",),
    "p_re_lu": ("alpha",),
}


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


def _recorded(p: Path) -> tuple[set[str], set[str]]:
    """The files a saved merge was derived from and their weight fingerprints, as its kmerge
    metadata records them (empty when it has none or it cannot be read: the metadata only
    adds protection)."""
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
        prints = meta.get("source_fingerprints", [])
        return ({str(Path(q).resolve()) for q in paths if isinstance(q, str) and q},
                {q for q in prints if isinstance(q, str)} if isinstance(prints, list) else set())
    except (OSError, ValueError, RecursionError, zipfile.BadZipFile, AttributeError):
        return set(), set()


def _recorded_lineage(p: Path) -> set[str]:
    return _recorded(p)[0]


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
    """The names of the layers from below the model down to the one that owns the dataset
    (``layers/sequential/layers/dense/vars/0`` -> ``['block_1', 'conv']``): the ``name``
    attribute Keras writes on the ``vars`` group of each layer on the way."""
    parts = ds_path.split("/")[:-2]  # drop 'vars/<i>'
    chain = []
    for i in range(1, len(parts) + 1):
        group = f.get("/".join(parts[:i] + ["vars"]))
        name = None if group is None else group.attrs.get("name")
        if name is not None:
            chain.append(name.decode() if isinstance(name, bytes) else str(name))
    return chain


def _known_names(group_key: str, count: int) -> list[str] | None:
    """Variable names of a built-in layer from its group name and variable count."""
    full = _KNOWN_VARIABLES.get(re.sub(r"_\d+$", "", group_key))
    if full is None:
        return None
    if count == len(full):
        return list(full)
    if full[-1] == "bias" and count == len(full) - 1:
        return list(full[:-1])
    if full[-1] == "moving_variance" and count in (2, 3):  # center/scale switched off
        return ["vars/0"] * (count - 2) + list(full[-2:])
    return None


_STATISTIC_LAYERS = ("BatchNormalization", "Normalization")


def _friendly_names(f, config: dict | None,
                    datasets: list[str]) -> tuple[dict[str, str], set[str]]:
    """Each dataset's canonical variable path, as :func:`kmerge.weights.variable_paths`
    names it in memory (``"block_1/conv/kernel"``), and the datasets that are statistics
    (the non-trainable float variables of BatchNormalization and Normalization layers:
    a merge averages them, as ``merge_weights`` does)."""
    groups: dict[str, list[str]] = {}
    for d in datasets:
        groups.setdefault(d.rsplit("/", 1)[0], []).append(d)
    skeleton = _skeleton(config) if config is not None else None
    owned: dict[tuple, list] = {}
    if skeleton is not None:
        try:
            for chain, layer, v in owned_variables(skeleton):
                stat = type(layer).__name__ in _STATISTIC_LAYERS and not v.trainable
                owned.setdefault(chain, []).append((v, stat))
        except Exception:  # an unusual model: built-in names, else vars/<i>
            owned = {}
    names: dict[str, str] = {}
    stats: set[str] = set()
    for group, members in groups.items():
        members.sort(key=lambda d: int(d.rsplit("/", 1)[1]) if d.rsplit("/", 1)[1].isdigit() else 0)
        chain = _layer_chain(f, members[0])
        vs = owned.get(tuple(chain))
        var_names = None
        if vs is not None and len(vs) == len(members) and all(
                tuple(v.shape) == f[m].shape for (v, _), m in zip(vs, members)):
            var_names = [variable_name(v) for v, _ in vs]
            stats.update(m for (_, stat), m in zip(vs, members) if stat)
        parts = group.split("/")
        if var_names is None and len(parts) >= 2:
            var_names = _known_names(parts[-2], len(members))
            if var_names and re.sub(r"_\d+$", "", parts[-2]) == "batch_normalization":
                stats.update(m for m, v in zip(members, var_names) if v.startswith("moving_"))
        prefix = "/".join(chain) + "/" if chain else ""
        for i, m in enumerate(members):
            names[m] = prefix + (var_names[i] if var_names else f"vars/{m.rsplit('/', 1)[1]}")
    return names, stats


def _skeleton(config: dict):
    """The model built from its config without allocating any variable."""
    try:
        import keras

        from kmerge import _keras

        with _keras.skeleton_scope():
            return keras.models.model_from_json(json.dumps(config))
    except Exception:  # custom or unusual models: names fall back to vars/<i>
        return None


def _value(raw: np.ndarray, bf16: bool) -> np.ndarray:
    """A dataset's data as Keras reads it: ``|V2`` data with a ``dtype='bfloat16'``
    attribute is bfloat16 (``ml_dtypes``)."""
    if not bf16:
        return raw
    import ml_dtypes

    return raw.view(ml_dtypes.bfloat16)


def _is_bfloat16(ds) -> bool:
    tag = ds.attrs.get("dtype")
    return (tag.decode() if isinstance(tag, bytes) else tag) == "bfloat16"


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"


def _digest(a: np.ndarray) -> str | None:
    """One array's part of :func:`kmerge.metadata.fingerprint` (as stored in the file)."""
    import hashlib

    if a.dtype.kind != "f" or a.size < 2:
        return None
    h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=16)
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _fingerprint(digests: list[str]) -> str | None:
    import hashlib

    if not digests:
        return None
    return hashlib.blake2b("".join(sorted(digests)).encode(), digest_size=16).hexdigest()


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
    run_params = resolved_params(method, method_params, weights, norm_w)  # slerp: t
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
    recorded = [_recorded(p) for p in all_in]
    ancestry = sorted({str(p.resolve()) for p in all_in}.union(*(r[0] for r in recorded)))
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
                for cfg, name in zip(configs[1:], names[1:]):
                    same_architecture(configs[0], cfg, (names[0], name))
            dsets = [_datasets(f) for f in files]
            ref = dsets[0]
            friendly, statistics = _friendly_names(files[0], configs[0], ref)
            for f, ds, name in zip(files[1:], dsets[1:], names[1:]):
                for a, b in zip(ref, ds):
                    if a != b or files[0][a].shape != f[b].shape:
                        raise IncompatibleModelsError(
                            f"{names[0]} and {name} differ at variable {friendly[a]!r} ({a}): "
                            f"shape {files[0][a].shape} vs "
                            f"{f[b].shape if b in f else 'absent'} ({b}); weight merges need "
                            "one architecture")
                    ta, tb = _dtype_name(files[0][a]), _dtype_name(f[b])
                    if ta != tb:
                        raise IncompatibleModelsError(
                            f"{names[0]} and {name} store variable {friendly[a]!r} as {ta} and "
                            f"{tb}: a merge would silently round one of them; save both with "
                            "one dtype policy and merge again")
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
            # statistics are averaged with the merge's coefficients, as in memory
            linear = resolve_method("linear")
            t = float(run_params.get("t", 0.5))
            coeffs = [1.0 - t, t] if method == "slerp" else list(norm_w)
            drift: dict[str, list[float]] = {}
            copied = []
            digests: list[list[str]] = [[] for _ in all_in]
            with h5py.File(tmp_h5, "w") as dst:
                _mirror_groups(files[0], dst)
                for k, (d, name) in enumerate(zip(ref, fnames)):
                    raw = [np.asarray(f[d][()]) for f in files[:n]]
                    base_raw = np.asarray(files[n][d][()]) if base is not None else None
                    for i, a in enumerate(raw + ([base_raw] if base is not None else [])):
                        digest = _digest(a)
                        if digest is not None:
                            digests[i].append(digest)
                    bf16 = _is_bfloat16(files[0][d])
                    vals = [_value(a, bf16) for a in raw]
                    first = vals[0]
                    if not _is_float(first) or name in excluded:
                        merged = first
                        copied.append(name)
                    else:
                        # bfloat16 is upcast (exactly) to float32 for the method and the
                        # result cast back once: the same numbers as the merge in memory
                        up = [t.astype(np.float32) for t in vals] if bf16 else vals
                        b = None
                        if "base" in sup:
                            b = _value(base_raw, bf16)
                            b = b.astype(np.float32) if bf16 else b
                        kwargs = tensor_kwargs(sup, name, run_params, compiled,
                                               weights=norm_w, base=b)
                        with np.errstate(over="ignore", invalid="ignore"):
                            if d in statistics:  # statistics stay statistics: averaged
                                merged = np.asarray(linear(up, weights=coeffs))
                            else:
                                merged = np.asarray(fn(up, **kwargs))
                            merged = merged.astype(first.dtype)
                        check = merged.astype(np.float32) if bf16 else merged
                        refuse_non_finite([check], [name], [[t] for t in up], names[:n], method)
                        drift[name] = [_relative_distance(merged, t) for t in up]
                        del up, kwargs, check, b
                    out_ds = dst.create_dataset(d, data=merged)
                    if bf16:
                        out_ds.attrs["dtype"] = "bfloat16"  # how Keras tags bfloat16 data
                    del merged, first, raw, base_raw, vals
                    if progress:
                        print(f"[{k + 1}/{len(ref)}] {name} {files[0][d].shape}",
                              file=sys.stderr, flush=True)
                prints = {p for p in map(_fingerprint, digests) if p}.union(
                    *(r[1] for r in recorded))
                if out.exists():
                    from kmerge.io import file_fingerprint

                    if file_fingerprint(out) in prints:
                        raise SaveError(
                            f"{out}: holds the weights of a source (or of a model a source "
                            "was derived from); kmerge never overwrites a source: choose "
                            "another path")
                meta = {"kind": "weights", "method": method, "method_params": method_params,
                        "params": {p: o for p, _, o in compiled},
                        "exclude": [p for p, _ in excl], "weights": norm_w, "streamed": True,
                        "source_paths": ancestry, "source_fingerprints": sorted(prints),
                        "drift": drift, "copied": copied,
                        "excluded_variables": sorted(excluded),
                        **({"statistics": {
                            "variables": [fnames[i] for i, d in enumerate(ref)
                                          if d in statistics and fnames[i] not in excluded],
                            "rule": "weighted average with the merge's coefficients"}}
                           if statistics else {}),
                        "copied_non_float": [c for c in copied if c not in excluded],
                        "seconds": time.perf_counter() - t0}
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


def _dtype_name(ds) -> str:
    return "bfloat16" if _is_bfloat16(ds) else str(ds.dtype)


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
