"""Which layers carry the information? A linear probe of every tap of every source.

:func:`probe` runs each source ONCE over the data with every candidate tap as an output of one
compiled function (the source's graph copied as :func:`kmerge.fuse` copies it, frozen, each
layer run once), pools each tapped tensor to a vector exactly as ``fuse(pooling=...)`` would
(global average for feature maps and sequences), and fits a closed-form ridge regression per
tap on one-hot labels (or on the targets, for regression). The ridge strength is chosen on the
training part by exact leave-one-out; the score is the accuracy (R² for regression) on a
seeded held-out part. Then a greedy search over the best taps of *different* models scores
their concatenated features, the way a fused head would see them.

The module is ``kmerge.probing`` (``kmerge.probe`` is the function).

>>> p = kmerge.probe({"a": a, "b": b}, x, y)
>>> print(p)                       # the ranked table
>>> m = kmerge.fuse(p.best, head=kmerge.heads.classifier(10))
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kmerge.arguments import flag, integer, labels, model_inputs, number
from kmerge.errors import InvalidArgumentError, TapError

__all__ = ["probe", "ProbeResult", "TapScore", "Combination", "tap_features"]

POOLINGS = ("auto", "avg", "max", "none")
TASKS = ("auto", "classification", "regression")
_ALPHAS = tuple(10.0 ** k for k in np.arange(-4.0, 2.01, 0.5))  # ridge strength / mean eigenvalue
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TapScore:
    """One row of the ranking: a tap of one model and its probe score."""

    model: str
    tap: str  # a reference fuse accepts: name, nested path, '@k', '[j]'
    depth: int  # layers on the longest path from the model's input to this tensor
    layer: str  # the layer's class (Conv2D, LSTM, ...)
    shape: tuple  # the tapped tensor's shape (without the batch axis)
    features: int  # size after pooling
    used: int  # size the probe saw (smaller when projected)
    score: float  # held-out accuracy (classification) or R² (regression)
    note: str = ""  # "projected 25088 -> 1024", ...


@dataclass(frozen=True)
class Combination:
    """Concatenated taps of different models and the probe score of their fused features."""

    taps: tuple[tuple[str, str], ...]  # ((model, tap), ...)
    score: float
    features: int
    note: str = ""


@dataclass
class ProbeResult:
    """What :func:`probe` found: the ranked taps, the combinations tried, the best one.

    ``str(result)`` is the table; :meth:`to_dict` is JSON-ready; :meth:`plot` draws the score
    against depth per model; :attr:`best` is a ``{name: (model, ref)}`` mapping that
    :func:`kmerge.fuse` takes as it is.
    """

    rows: list[TapScore]
    combinations: list[Combination]
    metric: str  # "accuracy" or "r2"
    n_train: int
    n_val: int
    pooling: str
    seed: int
    seconds: float
    skipped: list[str] = field(default_factory=list)  # candidate taps left out, and why
    models: dict[str, Any] = field(default_factory=dict, repr=False)
    timing: dict[str, float] = field(default_factory=dict)  # seconds: forward, probes, ...

    # -- choices ---------------------------------------------------------------------------
    @property
    def best_taps(self) -> dict[str, str | list[str]]:
        """``{model name: ref}`` (a list when one model gives several taps) of the best
        combination; the best single tap when nothing could be combined."""
        if self.combinations:
            chosen = self.combinations[0].taps
        elif self.rows:
            chosen = ((self.rows[0].model, self.rows[0].tap),)
        else:
            return {}
        out: dict[str, list[str]] = {}
        for m, t in chosen:
            out.setdefault(m, []).append(t)
        return {m: (t[0] if len(t) == 1 else t) for m, t in out.items()}

    @property
    def best(self) -> dict[str, tuple[Any, Any]]:
        """The best combination as the mapping :func:`kmerge.fuse` takes:
        ``{name: (model, ref)}``."""
        return {m: (self.models[m], ref) for m, ref in self.best_taps.items()}

    @property
    def best_score(self) -> float | None:
        if self.combinations:
            return self.combinations[0].score
        return self.rows[0].score if self.rows else None

    def for_model(self, name: str) -> list[TapScore]:
        """The rows of one model, in graph order (by depth)."""
        return sorted((r for r in self.rows if r.model == name), key=lambda r: r.depth)

    # -- output ----------------------------------------------------------------------------
    def table(self, limit: int | None = None) -> str:
        metric = "accuracy" if self.metric == "accuracy" else "R^2"
        rows = [("#", "model", "tap", "layer", "depth", "features", f"probe {metric}", "note")]
        for i, r in enumerate(self.rows[:limit] if limit else self.rows, 1):
            size = str(r.features) if r.used == r.features else f"{r.features}->{r.used}"
            rows.append((str(i), r.model, r.tap, r.layer, str(r.depth), size,
                         f"{r.score:.4f}", r.note))
        return _table(rows)

    def __str__(self) -> str:
        metric = "accuracy" if self.metric == "accuracy" else "R^2"
        lines = [f"kmerge probe: {len(self.rows)} taps of {len(self.models)} model(s), "
                 f"ridge probes on {self.n_train} examples, {metric} on {self.n_val} held out "
                 f"(seed {self.seed}, pooling {self.pooling}, {self.seconds:.1f} s"
                 + (": " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timing.items())
                    if self.timing else "") + ")",
                 self.table()]
        if self.combinations:
            lines.append("")
            rows = [("#", "combination", "features", f"probe {metric}", "note")]
            for i, c in enumerate(self.combinations, 1):
                rows.append((str(i), " + ".join(f"{m}:{t}" for m, t in c.taps),
                             str(c.features), f"{c.score:.4f}", c.note))
            lines.append(_table(rows))
        best = self.best_taps
        if best:
            lines.append("")
            lines.append("best: " + ", ".join(f"{m}: {t}" for m, t in best.items())
                         + f" ({metric} {self.best_score:.4f}); "
                         "kmerge.fuse(result.best, head=...) builds it")
        lines.extend(f"skipped: {s}" for s in self.skipped)
        return "\n".join(lines)

    def to_dict(self, limit: int | None = None) -> dict:
        """Everything but the models, JSON-ready (``json.dumps(result.to_dict())``);
        ``limit`` keeps the first rows only."""
        return {
            "metric": self.metric, "n_train": self.n_train, "n_val": self.n_val,
            "pooling": self.pooling, "seed": self.seed, "seconds": round(self.seconds, 3),
            "timing": {k: round(v, 3) for k, v in self.timing.items()},
            "taps": [{**asdict(r), "shape": list(r.shape)}
                     for r in (self.rows[:limit] if limit else self.rows)],
            "n_taps": len(self.rows),
            "combinations": [{"taps": [list(t) for t in c.taps], "score": c.score,
                              "features": c.features, "note": c.note}
                             for c in self.combinations],
            "best": self.best_taps, "best_score": self.best_score,
            "skipped": list(self.skipped),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def plot(self, ax: Any = None) -> Any:
        """Probe score against depth, one line per model (matplotlib); returns the Figure."""
        if ax is None:
            # a Figure without pyplot: no global state, no GUI window; notebooks show it
            from matplotlib.figure import Figure

            fig = Figure(figsize=(6.4, 4.0))
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        for name in self.models or dict.fromkeys(r.model for r in self.rows):
            rows = self.for_model(name)
            if not rows:
                continue
            ax.plot([r.depth for r in rows], [r.score for r in rows], marker="o", label=name)
        for c in self.combinations[:1]:
            ax.axhline(c.score, linestyle="--", color="grey",
                       label="best combination: " + " + ".join(f"{m}:{t}" for m, t in c.taps))
        ax.set_xlabel("depth (layers from the input)")
        ax.set_ylabel("held-out accuracy" if self.metric == "accuracy" else "held-out R²")
        ax.set_title("linear probe of every tap")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return fig


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- candidate taps ----------------------------------------------------------------------------
@dataclass
class _Tap:
    ref: str
    wid: int
    depth: int
    layer: str
    shape: tuple


def _ref_of(w: Any, call: Any, j: int) -> str:
    ref = call.name
    if len(w.calls_of(call.op)) > 1:
        ref += f"@{call.index}"
    if len(call.outputs) > 1:
        ref += f"[{j}]"
    return ref


def _is_feature(t: Any) -> bool:
    return "float" in str(getattr(t, "dtype", "")) or str(getattr(t, "dtype", "")) == "bfloat16"


def candidate_taps(model: Any, name: str, taps: Any) -> tuple[list[_Tap], list[str]]:
    """The taps to probe in ``model``: every float tensor a fuse could tap ("all"), or the
    given refs. Returns them in graph order and the candidates left out (with why)."""
    from kmerge.graph import inference
    from kmerge.graph.replay import is_graph_model, walk

    if not is_graph_model(model):
        raise TapError(
            f"model {name!r} is a subclassed model ({type(model).__name__}); kmerge treats it as "
            "an opaque block with no layers to tap, so it cannot be probed. Rebuild it as a "
            "Functional model, or leave it out of probe")
    w = walk(model)
    depth = {wid: 0 for wid in w.inputs}
    for call in w.calls:
        if call.inlined:
            continue
        d = 1 + max((depth.get(i, 0) for i in call.inputs), default=0)
        for o in call.outputs:
            depth[o] = d

    def make(call: Any, j: int, ref: str) -> _Tap:
        wid = call.outputs[j]
        return _Tap(ref, wid, depth[wid], type(call.op).__name__, tuple(w.tensors[wid].shape[1:]))

    skipped: list[str] = []
    if isinstance(taps, str) and taps == "all":
        out = []
        for call in w.leaf_calls:
            for j, wid in enumerate(call.outputs):
                ref = _ref_of(w, call, j)
                if not _is_feature(w.tensors[wid]):
                    continue  # masks, token ids, shapes: not features
                if call.is_layer and inference.is_training_only(call.op):
                    continue  # dropout/noise: the identity in a frozen copy (its input is tapped)
                try:
                    found, k = w.find(ref, source=name)
                except Exception:  # noqa: BLE001 (a name the ref syntax cannot express)
                    skipped.append(f"{name}: {call.name} (no tap reference reaches it)")
                    continue
                if found is not call or k != j:
                    skipped.append(f"{name}: {ref} (its reference names another tensor)")
                    continue
                out.append(make(call, j, ref))
        return out, skipped
    refs = list(taps) if isinstance(taps, list | tuple) else [taps]
    if not refs:
        raise InvalidArgumentError(f"taps for model {name!r} is empty; name at least one layer "
                                   "or pass taps='all'")
    out = []
    for ref in refs:
        call, j = w.find(ref, source=name)  # LayerNotFoundError / TapError, with names
        t = w.tensors[call.outputs[j]]
        if not _is_feature(t):
            raise TapError(f"tap {ref!r} of model {name!r} gives {t.dtype} values (a mask or "
                           "ids), not features; tap a layer with float outputs")
        out.append(make(call, j, str(ref)))
    return out, skipped


def _taps_per_model(taps: Any, names: Sequence[str]) -> dict[str, Any]:
    if isinstance(taps, str):
        if taps != "all":
            return {n: [taps] for n in names}
        return {n: "all" for n in names}
    if isinstance(taps, Mapping):
        unknown = [k for k in taps if k not in names]
        if unknown:
            raise InvalidArgumentError(f"taps names models {unknown} that are not probed; the "
                                       f"models are {list(names)}")
        return {n: taps.get(n, "all") for n in names}
    if isinstance(taps, list | tuple) or (isinstance(taps, int) and not isinstance(taps, bool)):
        return {n: list(taps) if isinstance(taps, list | tuple) else [taps] for n in names}
    raise InvalidArgumentError(
        f"taps must be 'all', a list of layer refs, or {{model name: 'all' | [refs]}}; "
        f"received {taps!r}")


# -- features ----------------------------------------------------------------------------------
def _tap_model(model: Any, name: str, taps: list[_Tap], pooling: str) -> Any:
    """One model computing every tap (pooled) of ``model`` in one pass: the graph is copied
    (frozen, as fuse copies a frozen source) and the pooled taps are its outputs."""
    import keras

    from kmerge.graph.fuse import _POOL
    from kmerge.graph.rebuild import input_specs, rebuild
    from kmerge.graph.replay import submodel

    inputs = [keras.Input(shape=s, dtype=d) for s, d, _ in input_specs(model)]
    rb = rebuild(model, inputs, name=f"{name}_probe", freeze=True, taken=set())
    kind = "avg" if pooling == "auto" else pooling
    outs = []
    for i, tap in enumerate(taps):
        t = rb.values[tap.wid]
        rank = len(t.shape) - 2
        if rank >= 1 and kind != "none" and rank in _POOL[kind]:
            t = _POOL[kind][rank](name=f"probe_pool_{i}")(t)
        if len(t.shape) != 2:
            t = keras.layers.Flatten(name=f"probe_flat_{i}")(t) if len(t.shape) > 2 else \
                keras.layers.Reshape((1,), name=f"probe_flat_{i}")(t)
        outs.append(t)
    return submodel(inputs, outs, name=f"{name}_probe")


class _Projection:
    """A seeded sparse random sign projection (feature hashing: each input dimension adds
    +-1 times itself to one of ``k`` outputs; inner products are kept in expectation)."""

    def __init__(self, d: int, k: int, seed: int) -> None:
        from scipy import sparse

        rng = np.random.default_rng(seed)
        cols = rng.integers(0, k, size=d)
        signs = rng.choice(np.array([-1.0, 1.0], dtype="float32"), size=d)
        self.matrix = sparse.csr_matrix((signs, (np.arange(d), cols)), shape=(d, k))

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(self.matrix.T.dot(a.T).T, dtype="float32")


def tap_features(model: Any, x: Any, taps: Any = "all", *, name: str | None = None,
                 pooling: str = "auto", batch_size: int = 256, max_features: int = 1024,
                 memory_budget: int = 1 << 30, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None,
                 ) -> dict[str, tuple[np.ndarray, TapScore]]:
    """Pooled features of every tap of ``model`` on ``x`` from ONE compiled pass per batch.

    Returns ``{ref: (features (n, used), row)}``; ``row`` is a :class:`TapScore` with the
    score left at NaN. Features wider than ``max_features``, or whose ``n * d * 4`` bytes
    exceed ``memory_budget``, are reduced by a seeded random projection, batch by batch.
    """
    from kmerge.graph.compiled import Job, stream

    name = name or model.name
    if pooling not in POOLINGS:
        raise InvalidArgumentError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    xs = model_inputs(model, x, "x")
    n = len(xs[0])
    found, _ = candidate_taps(model, name, taps)
    if not found:
        return {}
    sub = _tap_model(model, name, found, pooling)
    dims = []
    for t in sub.outputs:
        d = t.shape[-1]
        if d is None:
            raise TapError(f"model {name!r}: a tap has an unknown size after pooling "
                           f"({tuple(t.shape)}); use pooling='auto'")
        dims.append(int(d))
    projections: list[_Projection | None] = []
    notes = []
    for tap, d in zip(found, dims):
        k = min(d, max_features, max(1, memory_budget // max(1, 4 * n)))
        if k < d:
            seed_k = (seed * 1_000_003 + zlib.crc32(f"{name}/{tap.ref}".encode())) % 2**32
            projections.append(_Projection(d, k, seed_k))
            notes.append(f"projected {d} -> {k}")
        else:
            projections.append(None)
            notes.append("")
    parts: list[list[np.ndarray]] = [[] for _ in found]
    size = min(batch_size, n)
    starts = list(range(0, n, size))

    def batch(s: int) -> list[np.ndarray]:
        # the last batch is padded with its own rows to the common size: one compiled
        # program per model (inference is per example; the padding rows are dropped)
        part = [a[s:s + size] for a in xs]
        short = size - len(part[0])
        return [np.concatenate([p, p[np.arange(short) % len(p)]]) if short else p
                for p in part]

    jobs = (Job(sub, batch(s)) for s in starts)
    for b, outs in enumerate(stream(jobs)):
        keep = min(size, n - starts[b])
        for i, (o, proj) in enumerate(zip(outs, projections)):
            o = np.asarray(o, dtype="float32")[:keep].reshape(keep, -1)
            parts[i].append(proj(o) if proj is not None else o)
        if progress is not None:
            progress(b + 1, len(starts))
    out = {}
    for tap, d, note, p in zip(found, dims, notes, parts):
        feats = np.concatenate(p, axis=0)
        out[tap.ref] = (feats, TapScore(name, tap.ref, tap.depth, tap.layer, tap.shape, d,
                                        feats.shape[1], float("nan"), note))
    return out


# -- the ridge probe ---------------------------------------------------------------------------
class _Targets:
    """Labels as one-hot rows (classification) or a target matrix (regression)."""

    def __init__(self, y: np.ndarray, task: str) -> None:
        self.task = task
        if task == "classification":
            if y.ndim == 2 and y.shape[1] > 1:
                y = y.argmax(1)
            self.classes, idx = np.unique(y.reshape(len(y)), return_inverse=True)
            self.index = idx
            self.matrix = np.eye(len(self.classes))[idx]
        else:
            self.matrix = y.reshape(len(y), -1).astype(np.float64)
            self.index = None

    def score(self, pred: np.ndarray, rows: np.ndarray) -> float:
        if self.task == "classification":
            return float(np.mean(pred.argmax(1) == self.index[rows]))
        true = self.matrix[rows]
        ss_res = ((true - pred) ** 2).sum(0)
        ss_tot = ((true - true.mean(0)) ** 2).sum(0)
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.maximum(ss_tot, 1e-300), 0.0)
        return float(r2.mean())


class _Std:
    """A tap's features standardised on the training rows (float32), and their Gram matrix
    (float64, computed once: a combination's Gram is assembled from its taps' blocks)."""

    def __init__(self, z: np.ndarray, train: np.ndarray, val: np.ndarray) -> None:
        zt = z[train].astype(np.float64)
        mean, std = zt.mean(0), zt.std(0)
        std[std < 1e-12] = 1.0
        self.train = ((zt - mean) / std).astype(np.float32)
        self.val = ((z[val].astype(np.float64) - mean) / std).astype(np.float32)
        self._gram: np.ndarray | None = None

    @property
    def gram(self) -> np.ndarray:
        if self._gram is None:
            self._gram = (self.train.T @ self.train).astype(np.float64)
        return self._gram


def _ridge(parts: list[_Std], targets: _Targets, train: np.ndarray, val: np.ndarray) -> float:
    """Held-out score of a ridge probe on the concatenated standardised ``parts``; its
    strength chosen on the training rows by generalised cross-validation (one
    eigendecomposition serves every strength)."""
    zt = np.concatenate([q.train for q in parts], axis=1) if len(parts) > 1 else parts[0].train
    zv = np.concatenate([q.val for q in parts], axis=1) if len(parts) > 1 else parts[0].val
    y = targets.matrix[train]
    y_mean = y.mean(0)
    yc = y - y_mean
    n, d = zt.shape
    yy = float((yc ** 2).sum())
    if d <= n:  # primal: eigen of Z^T Z (d x d), from the parts' Gram blocks
        if len(parts) == 1:
            gram = parts[0].gram
        else:
            gram = np.block([[a.gram if a is b else (a.train.T @ b.train).astype(np.float64)
                              for b in parts] for a in parts])
        e, v = np.linalg.eigh(gram)
        e = np.maximum(e, 0.0)
        proj = v.T @ (zt.T @ yc).astype(np.float64)  # (d, k): V^T Z^T y
        pn = (proj ** 2).sum(1)

        def rss(inv: np.ndarray) -> float:  # ||y - Z w||^2 in the eigenbasis: O(d k)
            return yy - 2.0 * float((inv * pn).sum()) + float((e * inv * inv * pn).sum())
    else:  # dual: eigen of Z Z^T (n x n); V = Z^T U / sqrt(e)
        e, u = np.linalg.eigh((zt @ zt.T).astype(np.float64))
        keep = e > 1e-10 * max(e.max(), 1e-300)
        e, u = e[keep], u[:, keep]
        v = (zt.T @ u) / np.sqrt(e)
        c = u.T @ yc
        proj = np.sqrt(e)[:, None] * c
        cn = (c ** 2).sum(1)

        def rss(inv: np.ndarray) -> float:
            return yy - float(cn.sum()) + float((((1.0 - e * inv) ** 2) * cn).sum())
    scale = float(e.mean()) if e.size and e.mean() > 0 else 1.0
    best, best_gcv = None, None
    for alpha in _ALPHAS:
        inv = 1.0 / (e + alpha * scale)
        dof = float((e * inv).sum()) + 1.0  # the intercept is one more
        gcv = max(rss(inv), 0.0) / n / max(1.0 - dof / n, 1e-9) ** 2
        if best_gcv is None or gcv < best_gcv:
            best, best_gcv = inv, gcv
    w = v @ (proj * best[:, None])
    return targets.score(zv @ w + y_mean, val)


def _split(n: int, y: np.ndarray, classification: bool, fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    n_val = int(round(n * fraction))
    if n_val < 1 or n - n_val < 2:
        raise InvalidArgumentError(
            f"validation_split={fraction} of {n} examples leaves {n - n_val} to fit and {n_val} "
            "to score the probes; give more examples (at least a few per class) or another "
            "validation_split")
    if classification:
        labels_ = y.argmax(1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(n)
        _, counts = np.unique(labels_, return_counts=True)
        if counts.min() >= 2 and n_val >= len(counts) and n - n_val >= len(counts):
            from sklearn.model_selection import train_test_split

            train, val = train_test_split(np.arange(n), test_size=n_val, random_state=seed,
                                          stratify=labels_)
            return np.sort(train), np.sort(val)
    order = rng.permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _task(y: np.ndarray, task: str) -> str:
    if task not in TASKS:
        raise InvalidArgumentError(f"task must be one of {TASKS}, got {task!r}")
    if task != "auto":
        return task
    if y.dtype.kind in "biu":
        return "classification"
    if y.ndim == 2 and y.shape[1] > 1 and np.all((y == 0) | (y == 1)) \
            and np.all(y.sum(1) == 1):
        return "classification"  # one-hot rows
    return "regression"


# -- the public function -----------------------------------------------------------------------
def _inputs_per_model(x: Any, sources: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: x}``: per model when ``x`` is a dict keyed by the model names, else shared."""
    if isinstance(x, Mapping) and x and set(x) == set(sources):
        return dict(x)
    return {n: x for n in sources}


def probe(
    models: Any,
    x: Any,
    y: Any,
    *,
    taps: Any = "all",
    validation_split: float = 0.2,
    pooling: str = "auto",
    seed: int = 0,
    top: int = 3,
    task: str = "auto",
    batch_size: int = 256,
    max_features: int = 1024,
    memory_budget: int = 1 << 30,
    combine: bool = True,
    progress: Progress | None = None,
) -> ProbeResult:
    """Rank every tap of every model by how much of ``y`` a linear probe reads from it.

    Each model runs once over ``x`` (in batches of ``batch_size``) with all its candidate
    taps as outputs of one compiled function; each tapped tensor is pooled as
    ``kmerge.fuse(pooling=...)`` pools it. A ridge regression on one-hot labels (or the
    targets) is fitted per tap on the training part, its strength chosen by leave-one-out,
    and scored on the held-out part (``validation_split``, seeded, stratified for
    classification). The ``top`` taps of each model then enter a greedy search over taps of
    different models (all cross-model pairs, then one more model at a time while the score
    improves), scored on their concatenated features.

    Args:
        models: A list or ``{name: model}`` dict of Keras models (or paths).
        x: Inputs: one array (or list / dict by input name) for every model, or
            ``{model_name: inputs}`` when the models take different inputs.
        y: Integer labels or one-hot rows (accuracy), or numeric targets (R²).
        taps: ``"all"`` (every float tensor a fuse can tap: every layer output but the
            inputs; dropout and noise layers, the identity when frozen, are left out), a
            list of refs for every model, or ``{name: "all" | [refs]}``.
        validation_split: Fraction held out to score the probes.
        pooling: ``"auto"``/``"avg"``/``"max"`` global pooling of maps and sequences (as
            in fuse); ``"none"`` flattens them.
        seed: Seeds the split and the random projections.
        top: Taps per model that enter the combination search.
        task: ``"auto"``, ``"classification"`` or ``"regression"``.
        batch_size: Examples per forward-pass batch (features are pooled batch by batch).
        max_features: Taps wider than this (after pooling) are reduced to it by a seeded
            random projection; the table says so.
        memory_budget: Bytes one tap's features may take (``n * d * 4``); wider taps are
            projected to fit.
        combine: Search combinations (False: rank single taps only).
        progress: ``progress(what, done, total)`` after each step (models' passes and taps).

    Returns:
        A :class:`ProbeResult`: ``str()`` prints the ranking, ``.best`` is the best
        combination as the mapping :func:`kmerge.fuse` takes, ``.to_dict()``, ``.plot()``.

    Raises:
        InvalidArgumentError: bad data (shapes, NaN, labels), arguments or split.
        LayerNotFoundError, TapError: a tap that names no layer or no feature tensor.

    >>> p = kmerge.probe({"a": a, "b": b}, x, y)
    >>> fused = kmerge.fuse(p.best, head=kmerge.heads.classifier(10))
    """
    from kmerge.graph.build import named_models

    t0 = time.perf_counter()
    sources = named_models(models, minimum=1, what="probe")
    number(validation_split, "validation_split", low=0.0, high=1.0, low_open=True,
           high_open=True)
    if pooling not in POOLINGS:
        raise InvalidArgumentError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    seed = integer(seed, "seed", low=0)
    top = integer(top, "top")
    batch_size = integer(batch_size, "batch_size")
    max_features = integer(max_features, "max_features")
    memory_budget = integer(memory_budget, "memory_budget")
    combine = flag(combine, "combine")
    per_model = _taps_per_model(taps, list(sources))
    # every input checked (and every tap resolved) before any model runs
    xs = {n: model_inputs(m, v, "x" if not isinstance(x, Mapping) or set(x) != set(sources)
                          else f"x[{n!r}]")
          for (n, m), v in zip(sources.items(), _inputs_per_model(x, sources).values())}
    sizes = {n: len(a[0]) for n, a in xs.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidArgumentError(f"the models get different numbers of examples {sizes}; "
                                   "give every model the same examples, in the same order")
    n = next(iter(sizes.values()))
    y_arr = labels(y, n, "y")
    kind = _task(y_arr, task)
    targets = _Targets(y_arr, kind)
    train, val = _split(n, y_arr, kind == "classification", validation_split, seed)
    found = {nm: candidate_taps(m, nm, per_model[nm]) for nm, m in sources.items()}
    skipped = [s for _, sk in found.values() for s in sk]
    total = sum(len(t) for t, _ in found.values())
    if total == 0:
        raise TapError(f"no model has a tap with float outputs to probe ({list(sources)})")
    done = 0
    rows: list[TapScore] = []
    pool: dict[str, list[tuple[TapScore, _Std]]] = {}
    timing = {"forward": 0.0, "probes": 0.0, "combinations": 0.0}
    for nm, model in sources.items():
        if progress is not None:
            progress(f"{nm}: forward pass", done, total)
        t1 = time.perf_counter()
        feats = tap_features(model, xs[nm], per_model[nm], name=nm, pooling=pooling,
                             batch_size=batch_size, max_features=max_features,
                             memory_budget=memory_budget, seed=seed)
        t2 = time.perf_counter()
        timing["forward"] += t2 - t1
        scored = []
        for ref, (z, row) in feats.items():
            std = _Std(z, train, val)
            row = TapScore(**{**asdict(row), "score": _ridge([std], targets, train, val)})
            scored.append((row, std))
            done += 1
            if progress is not None:
                progress(f"{nm}: {ref}", done, total)
        timing["probes"] += time.perf_counter() - t2
        rows += [r for r, _ in scored]
        ranked = sorted(scored, key=lambda rz: (-rz[0].score, rz[0].used, rz[0].depth))
        pool[nm] = ranked[:top]  # only these features are kept
    rows.sort(key=lambda r: (-r.score, r.used, r.depth))
    t3 = time.perf_counter()
    combos = _combinations(pool, targets, train, val, max_features=max_features, seed=seed,
                           progress=progress) if combine else []
    timing["combinations"] = time.perf_counter() - t3
    return ProbeResult(rows=rows, combinations=combos, metric="accuracy"
                       if kind == "classification" else "r2", n_train=len(train),
                       n_val=len(val), pooling=pooling, seed=seed,
                       seconds=time.perf_counter() - t0, skipped=skipped, models=dict(sources),
                       timing=timing)


def _combinations(pool: dict[str, list[tuple[TapScore, _Std]]], targets: _Targets,
                  train: np.ndarray, val: np.ndarray, *, max_features: int, seed: int,
                  progress: Progress | None) -> list[Combination]:
    """All pairs of pool taps of different models (of one model when there is one), then
    greedily one more model at a time while the score improves. Sorted, best first."""
    names = [n for n in pool if pool[n]]
    entries = [(n, r, z) for n in names for r, z in pool[n]]
    if len(names) >= 2:
        pairs = [(a, b) for i, a in enumerate(entries) for b in entries[i + 1:] if a[0] != b[0]]
    else:
        pairs = [(a, b) for i, a in enumerate(entries) for b in entries[i + 1:]]
    tried: dict[tuple, Combination] = {}

    def score(members: tuple) -> Combination:
        key = tuple((m, r.tap) for m, r, _ in members)
        if key in tried:
            return tried[key]
        parts = [q for _, _, q in members]
        width = sum(q.train.shape[1] for q in parts)
        note = ""
        if width > max_features:
            z = np.empty((len(train) + len(val), width), dtype=np.float32)
            z[train] = np.concatenate([q.train for q in parts], axis=1)
            z[val] = np.concatenate([q.val for q in parts], axis=1)
            proj = _Projection(width, max_features,
                               (seed * 1_000_003 + zlib.crc32(repr(key).encode())) % 2**32)
            note = f"projected {width} -> {max_features}"
            parts = [_Std(proj(z), train, val)]
        c = Combination(key, _ridge(parts, targets, train, val),
                        sum(r.used for _, r, _ in members), note)
        tried[key] = c
        if progress is not None:
            progress("combination " + " + ".join(f"{m}:{t}" for m, t in key), len(tried),
                     len(pairs))
        return c

    if not pairs:
        return []
    for a, b in pairs:
        score((a, b))
    best_members = max(pairs, key=lambda ab: _rank(tried[tuple((m, r.tap) for m, r, _ in ab)]))
    current = tuple(best_members)
    while True:
        used = {m for m, _, _ in current}
        options = [current + (e,) for e in entries if e[0] not in used]
        if not options:
            break
        cands = [(score(o), o) for o in options]
        c, o = max(cands, key=lambda co: _rank(co[0]))
        if c.score <= tried[tuple((m, r.tap) for m, r, _ in current)].score:
            break
        current = o
    return sorted(tried.values(), key=_rank, reverse=True)


def _rank(c: Combination) -> tuple:
    return (c.score, -c.features, -len(c.taps))


def describe(result: ProbeResult, limit: int = 20) -> dict:
    """What a merge records of the probe that chose its taps (kmerge.info(m)["probe"])."""
    d = result.to_dict(limit=limit)
    d["chosen"] = d.pop("best")
    d["chosen_score"] = d.pop("best_score")
    d["combinations"] = d["combinations"][:limit]
    return d

