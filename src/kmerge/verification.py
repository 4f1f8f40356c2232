"""Prove a merge: the merged model reproduces each source where it must.

For every source in a merged model, kmerge evaluates the source on probe inputs (given,
or generated from its input spec) and the merged model's tensors that correspond to the
source's outputs and tapped layers, and compares them bit-exactly (``atol=0``; results
are only comparable within one backend). The source side is computed by Keras's own graph
of the source model (its own layer objects and weights), independently of kmerge's copy.
Each side runs as one compiled function per batch (:mod:`kmerge.graph.compiled`).

A check must check something: comparing no tensor, an empty batch, or non-finite values
(NaN equals nothing, so it hides every difference) is a :class:`VerificationError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from kmerge.arguments import integer, load_if_path, number
from kmerge.errors import InvalidArgumentError, InvalidModelError, VerificationError
from kmerge.graph.compiled import Job, run_all
from kmerge.graph.rebuild import check_model, input_specs
from kmerge.graph.replay import (
    find_tensor,
    graph_of,
    is_graph_model,
    nested_inputs,
    submodel,
    walk,
)
from kmerge.metadata import info


@dataclass(frozen=True)
class Check:
    source: str
    what: str  # "output 0", "tap 'dense_1'"
    shape: tuple
    max_abs_diff: float

    @property
    def exact(self) -> bool:
        return self.max_abs_diff == 0.0


@dataclass
class VerifyReport:
    """Result of :func:`verify`: one :class:`Check` per compared tensor."""

    checks: list[Check] = field(default_factory=list)
    atol: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.max_abs_diff <= self.atol for c in self.checks)

    def __str__(self) -> str:
        lines = [f"kmerge verify: {'OK' if self.ok else 'FAILED'} ({len(self.checks)} tensors, "
                 f"atol={self.atol:g})"]
        for c in self.checks:
            mark = "exact" if c.exact else f"max |diff| {c.max_abs_diff:.3g}"
            lines.append(f"  {c.source:<12} {c.what:<24} {str(c.shape):<18} {mark}")
        return "\n".join(lines)


def probe(model: keras.Model, *, batch: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Random inputs that fit ``model``'s input spec (ints in [0, 2) for id inputs)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, dtype, _ in input_specs(model):
        full = (batch, *(8 if d is None else d for d in shape))
        if "int" in dtype:
            out.append(rng.integers(0, 2, size=full).astype(dtype))
        elif dtype == "bool":
            out.append(rng.integers(0, 2, size=full).astype(bool))
        else:
            out.append(rng.standard_normal(full).astype(dtype))
    return out


def _source_jobs(model: keras.Model, name: str, taps: list, flat: list) -> tuple[Job, list]:
    """The compiled job that computes the source's outputs and its top-level taps, and for
    each tap its place: an index into that job's outputs, or the nested calls to follow.

    Everything at the top level comes from one function of the source's own graph. A tap
    inside a nested model is reached one model at a time (:func:`_nested_tap`).
    """
    if not is_graph_model(model):
        return Job(model, flat), []
    w = walk(model)
    graph = graph_of(model)
    found = [w.find(ref, source=name) for ref in taps]
    top = [c.node.outputs[j] for c, j in found if not c.scope]
    places, k = [], len(graph.outputs)
    for call, j in found:
        if call.scope:
            places.append((call, j))
        else:
            places.append(k)
            k += 1
    return Job(submodel(graph.inputs, [*graph.outputs, *top]), flat), places


def _nested_tap(model: keras.Model, call: Any, j: int, flat: list) -> np.ndarray:
    """The value of a tap inside nested models: the value reaching each nested model's call
    is computed in the outer graph, then fed to the nested graph."""
    current, feed = graph_of(model), flat
    for outer in call.scope:
        feed = run_all([Job(submodel(current.inputs, nested_inputs(outer)), feed)])[0]
        current = graph_of(outer.op)
    return run_all([Job(submodel(current.inputs, [call.node.outputs[j]]), feed)])[0][0]


def _merged_inputs(merged: keras.Model, x: Any) -> dict[str, np.ndarray]:
    """The given probe arrays by input name, checked before anything runs."""
    if x is None:
        return {}
    inputs = {t.name: t for t in merged.inputs}
    names = list(inputs)
    if isinstance(x, Mapping):
        unknown = set(x) - set(names)
        if unknown:
            raise InvalidArgumentError(f"x has keys {sorted(unknown)}; the inputs are {names}")
        given = {k: np.asarray(v) for k, v in x.items()}
    else:
        arrays = list(x) if isinstance(x, list | tuple) else [x]
        if len(arrays) != len(names):
            raise InvalidArgumentError(
                f"x gives {len(arrays)} arrays for {len(names)} inputs {names}")
        given = {n: np.asarray(a) for n, a in zip(names, arrays)}
    for n, a in given.items():
        if a.dtype.kind not in "biuf":
            raise InvalidArgumentError(
                f"x for input {n!r} of model {merged.name!r} has dtype {a.dtype} (not numbers); "
                "pass numeric arrays")
        want = tuple(inputs[n].shape[1:])
        if a.ndim != len(want) + 1 or any(
                w is not None and w != g for w, g in zip(want, a.shape[1:])):
            raise InvalidArgumentError(
                f"x for input {n!r} of model {merged.name!r} has shape {a.shape}; the input "
                f"takes (batch, {', '.join('?' if d is None else str(d) for d in want)})"
            )
        if a.shape[0] == 0:
            raise VerificationError(
                f"x for input {n!r} holds no example: a check on an empty batch compares "
                "nothing; pass at least one example"
            )
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            raise VerificationError(
                f"x for input {n!r} holds NaN or infinite values: they would make the "
                "comparison meaningless (NaN equals nothing); pass finite inputs"
            )
    return given


@dataclass
class _Pair:
    """One source and its copy in the merge, as two compiled jobs to compare."""

    name: str
    model: keras.Model
    labels: list[str]  # "output 0", "tap 'x'"
    n_outputs: int
    source_job: Job
    places: list  # per tap: index into the source job's outputs, or (call, j) for nested
    merged_job: Job


def verify(merged: keras.Model, sources: Mapping[str, keras.Model] | None = None, *,
           x: Any = None, atol: float = 0.0, batch: int = 4, seed: int = 0) -> VerifyReport:
    """Check that ``merged`` reproduces each of ``sources`` bit-exactly.

    Args:
        merged: A model built by kmerge (in memory, or loaded with ``kmerge.load``).
        sources: ``{name: model}`` as given to the builder (at least one).
        x: Probe inputs for the merged model (array, list, or dict by input name);
            generated from the input specs when None.
        atol: Largest allowed absolute difference (0 = bit-exact).
        batch: Probe batch size when generating (at least 1).
        seed: Seed for generated probes.

    Returns:
        A :class:`VerifyReport`.

    Raises:
        VerificationError: With the worst mismatch, when a tensor differs by more than atol;
            also when the check would compare nothing (no source, no recorded tensor, an
            empty batch) or compares non-finite values.

    >>> kmerge.verify(m, {"a": a, "b": b}).ok
    True
    """
    meta = info(merged)
    if meta is None or "sources" not in meta:
        raise InvalidModelError(
            f"model {getattr(merged, 'name', merged)!r} carries no kmerge metadata; verify "
            "works on models built by kmerge (load saved ones with kmerge.load)"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise VerificationError(
            f"batch={batch!r}: a check on an empty batch compares nothing; use batch >= 1")
    atol = number(atol, "atol", low=0.0)
    seed = integer(seed, "seed", low=0)
    if isinstance(sources, Sequence) and not isinstance(sources, str | bytes):
        order = list(meta["sources"])  # the builder's order
        if len(sources) != len(order):
            raise InvalidArgumentError(
                f"sources is a list of {len(sources)} models but this merge has "
                f"{len(order)} sources {order}; pass them in that order, or as {{name: model}}")
        sources = dict(zip(order, sources))
    elif sources is not None and not isinstance(sources, Mapping):
        raise InvalidArgumentError(
            f"sources must be {{name: model}} or a list of models in the builder's order; "
            f"received {type(sources).__name__}")
    sources = {name: check_model(load_if_path(m), name) for name, m in (sources or {}).items()}
    if not sources:
        raise VerificationError(
            "no source given: verify compares the merge with its sources; pass them as "
            f"{{name: model}} (this merge's sources are {list(meta['sources'])})"
        )
    unknown = set(sources) - set(meta["sources"])
    if unknown:
        raise InvalidArgumentError(
            f"{sorted(unknown)} are not sources of this merge; its sources are "
            f"{list(meta['sources'])}"
        )
    given = _merged_inputs(merged, x)
    mw = walk(merged)
    report = VerifyReport(atol=float(atol))
    pairs: list[_Pair] = []
    for name, src in sources.items():
        entry = meta["sources"][name]
        in_ids = [find_tensor(mw, r) for r in entry["inputs"]]
        generated = probe(src, batch=batch, seed=seed)
        flat = [given.get(mw.tensors[i].name, g) if i in mw.inputs else g
                for i, g in zip(in_ids, generated)]
        taps = entry.get("taps", []) if is_graph_model(src) else []
        outputs = entry["outputs"]
        if not outputs and not taps:
            continue
        source_job, places = _source_jobs(src, name, [ref for ref, _ in taps], flat)
        targets = [find_tensor(mw, r) for r in outputs] + [find_tensor(mw, r) for _, r in taps]
        merged_job = Job(submodel([mw.tensors[i] for i in in_ids],
                                  [mw.tensors[i] for i in targets]), flat)
        labels = [f"output {i}" for i in range(len(outputs))] + [f"tap {r!r}" for r, _ in taps]
        kept = ((meta.get("keep_outputs") or {}).get("kept") or {}).get(name)
        if kept is not None:
            _check_kept(merged, mw, name, kept, targets[:len(outputs)])
            labels[:len(kept)] = [f"output {i} (kept as {k!r})" for i, k in enumerate(kept)]
        pairs.append(_Pair(name, src, labels, len(outputs), source_job, places, merged_job))
    # Each source next to its copy: on jax, identical programs compile once.
    results = run_all([job for p in pairs for job in (p.source_job, p.merged_job)])
    for k, p in enumerate(pairs):
        src_values, have = results[2 * k], results[2 * k + 1]
        want = list(src_values[:p.n_outputs])
        for place in p.places:
            want.append(src_values[place] if isinstance(place, int)
                        else _nested_tap(p.model, *place, p.source_job.flat))
        for label, a, b in zip(p.labels, want, have):
            report.checks.append(Check(p.name, label, tuple(a.shape),
                                       _max_diff(a, b, p.name, label)))
    if not report.checks:
        raise VerificationError(
            f"nothing to compare: the metadata of {merged.name!r} records no output or tap of "
            f"the given sources {list(sources)}; a check that compares nothing proves nothing"
        )
    if not report.ok:
        worst = max(report.checks, key=lambda c: c.max_abs_diff)
        failed = sum(c.max_abs_diff > report.atol for c in report.checks)
        error = VerificationError(
            f"merged model does not reproduce source {worst.source!r} at {worst.what}: "
            f"max |diff| = {worst.max_abs_diff:.6g} > atol {atol:g} ({failed} of "
            f"{len(report.checks)} tensors differ; the exception's .report has the table). The "
            "source's weights may have changed after merging, or the merge was trained with the "
            "source unfrozen; if neither, this is a kmerge bug: please report it with the model")
        error.report = report
        raise error
    return report


def _check_kept(merged: keras.Model, mw: Any, name: str, kept: list, targets: list) -> None:
    """A multi-task merge's kept outputs are the source's outputs: the model output each name
    in ``kept`` gives is the tensor recorded as the source's output (``targets``, walk ids),
    so comparing those tensors with the source checks what the model returns."""
    named = merged.output if isinstance(merged.output, Mapping) else {}
    ids = {id(t): i for i, t in enumerate(mw.tensors)}
    if len(kept) != len(targets):
        raise VerificationError(
            f"model {merged.name!r} keeps {len(kept)} output(s) {kept} of source {name!r}, "
            f"which has {len(targets)}: its kmerge metadata does not match its graph")
    for i, (key, wid) in enumerate(zip(kept, targets)):
        if key not in named or ids.get(id(named[key])) != wid:
            raise VerificationError(
                f"model {merged.name!r}'s output {key!r} is not source {name!r}'s output {i} "
                f"(its outputs are {list(named)}): the model or its kmerge metadata was edited "
                "after merging; merge again with keep_outputs=True")


def _max_diff(want: np.ndarray, have: np.ndarray, name: str, what: str) -> float:
    if want.shape != have.shape:
        raise VerificationError(
            f"source {name!r} {what}: merged tensor has shape {have.shape}, source {want.shape}"
        )
    for side, arr in (("source", want), ("merged model", have)):
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise VerificationError(
                f"source {name!r} {what}: the {side} computes NaN or infinite values on the "
                "probe batch, so the comparison would hide any difference; pass finite probe "
                "inputs the source handles (x=...)"
            )
    if want.size == 0:
        raise VerificationError(f"source {name!r} {what}: the tensor is empty; nothing compared")
    return float(np.max(np.abs(want.astype("float64") - have.astype("float64")), initial=0.0))
