"""Prove a merge: the merged model reproduces each source where it must.

For every source in a merged model, kmerge evaluates the source on probe inputs (given,
or generated from its input spec) and the merged model's tensors that correspond to the
source's outputs and tapped layers, and compares them bit-exactly (``atol=0``; results
are only comparable within one backend). The source side is computed by Keras's own graph
of the source model, independently of kmerge's copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from kmerge.errors import InvalidArgumentError, InvalidModelError, VerificationError
from kmerge.graph.build import resolve_tensor_ref
from kmerge.graph.rebuild import input_specs, is_graph_model, resolve_ref


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
        return all(c.max_abs_diff <= self.atol for c in self.checks)

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


def _detached(variable) -> Any:
    return keras.ops.convert_to_tensor(np.array(keras.ops.convert_to_numpy(variable.value)))


def _call(model: keras.Model, flat: list):
    """Run ``model`` in inference mode with its weights passed as plain tensors.

    Both sides of a comparison run this way: on torch, whether a weight requires grad
    changes which matmul kernel runs (a frozen copy of an LSTM differs from its trainable
    source in the last bit), so weights are detached on both sides.
    """
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None and not isinstance(model, keras.Sequential):
        args = keras.tree.pack_sequence_as(struct, flat)
    else:
        args = flat[0] if len(flat) == 1 else flat
    outputs, _ = model.stateless_call(
        [_detached(v) for v in model.trainable_variables],
        [_detached(v) for v in model.non_trainable_variables],
        args,
        **({"training": False} if getattr(model, "_call_has_training_arg", False) else {}),
    )
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(outputs)]


def _source_tap(model: keras.Model, ref: Any, flat: list) -> np.ndarray:
    """The value of layer ``ref`` of ``model`` on ``flat``, computed by Keras's own graph.

    Nested paths are followed one model at a time: the value reaching the nested model
    is computed in the outer graph, then fed to the nested model's own sub-graph.
    """
    if isinstance(ref, str) and "@" in ref:
        text, _, k = ref.rpartition("@")
        call = int(k)
    else:
        text, call = ref, 0
    parts = text.split("/") if isinstance(text, str) else [text]
    current, values = model, flat
    for depth, part in enumerate(parts):
        layer, _ = resolve_ref(current, part, source=model.name)
        graph = getattr(current, "_functional", None) or current
        nodes = [n for n in layer._inbound_nodes if _in_graph(graph, n)]
        node = nodes[call if depth == len(parts) - 1 else 0]
        last = depth == len(parts) - 1
        targets = node.outputs if last else node.input_tensors
        sub = keras.Model(graph.inputs, targets)
        values = _call(sub, values)
        current = layer
    return values[0]


def _in_graph(graph, node) -> bool:
    return any(node in nodes for nodes in graph._nodes_by_depth.values())


def _merged_inputs(merged: keras.Model, x: Any) -> dict[str, np.ndarray]:
    if x is None:
        return {}
    names = [t.name for t in merged.inputs]
    if isinstance(x, Mapping):
        unknown = set(x) - set(names)
        if unknown:
            raise InvalidArgumentError(f"x has keys {sorted(unknown)}; the inputs are {names}")
        return {k: np.asarray(v) for k, v in x.items()}
    arrays = list(x) if isinstance(x, list | tuple) else [x]
    if len(arrays) != len(names):
        raise InvalidArgumentError(f"x gives {len(arrays)} arrays for {len(names)} inputs {names}")
    return {n: np.asarray(a) for n, a in zip(names, arrays)}


def verify(merged: keras.Model, sources: Mapping[str, keras.Model] | None = None, *,
           x: Any = None, atol: float = 0.0, batch: int = 4, seed: int = 0) -> VerifyReport:
    """Check that ``merged`` reproduces each of ``sources`` bit-exactly.

    Args:
        merged: A model built by kmerge (in memory, or loaded with ``kmerge.load``).
        sources: ``{name: model}`` as given to the builder; None checks nothing.
        x: Probe inputs for the merged model (array, list, or dict by input name);
            generated from the input specs when None.
        atol: Largest allowed absolute difference (0 = bit-exact).
        batch: Probe batch size when generating.
        seed: Seed for generated probes.

    Returns:
        A :class:`VerifyReport`.

    Raises:
        VerificationError: With the worst mismatch, when a tensor differs by more than atol.

    >>> kmerge.verify(m, {"a": a, "b": b}).ok
    True
    """
    meta = getattr(merged, "_kmerge_meta", None)
    if not isinstance(meta, dict) or "sources" not in meta:
        raise InvalidModelError(
            f"model {getattr(merged, 'name', merged)!r} carries no kmerge metadata; verify "
            "works on models built by kmerge (load saved ones with kmerge.load)"
        )
    sources = dict(sources or {})
    unknown = set(sources) - set(meta["sources"])
    if unknown:
        raise InvalidArgumentError(
            f"{sorted(unknown)} are not sources of this merge; its sources are "
            f"{list(meta['sources'])}"
        )
    given = _merged_inputs(merged, x)
    report = VerifyReport(atol=float(atol))
    for name, src in sources.items():
        info = meta["sources"][name]
        in_tensors = [resolve_tensor_ref(merged, r) for r in info["inputs"]]
        generated = probe(src, batch=batch, seed=seed)
        flat = []
        for t, g in zip(in_tensors, generated):
            flat.append(given.get(t.name, g) if t in merged.inputs else g)
        targets: list[tuple[str, Any, Any]] = []
        if info["outputs"]:
            expected = _call(src, flat)
            for i, r in enumerate(info["outputs"]):
                targets.append((f"output {i}", resolve_tensor_ref(merged, r), expected[i]))
        for ref, r in info.get("taps", []):
            if not is_graph_model(src):
                continue
            targets.append((f"tap {ref!r}", resolve_tensor_ref(merged, r),
                            _source_tap(src, ref, flat)))
        if not targets:
            continue
        sub = keras.Model(in_tensors, [t for _, t, _ in targets])
        got = _call(sub, flat)
        for (what, _, want), have in zip(targets, got):
            diff = _max_diff(want, have, name, what)
            report.checks.append(Check(name, what, tuple(want.shape), diff))
    if not report.ok:
        worst = max(report.checks, key=lambda c: c.max_abs_diff)
        raise VerificationError(
            f"merged model does not reproduce source {worst.source!r} at {worst.what}: "
            f"max |diff| = {worst.max_abs_diff:.6g} > atol {atol:g}. Were the source's weights "
            "changed after merging, or the merge trained with the source unfrozen?\n" + str(report)
        )
    return report


def _max_diff(want: np.ndarray, have: np.ndarray, name: str, what: str) -> float:
    if want.shape != have.shape:
        raise VerificationError(
            f"source {name!r} {what}: merged tensor has shape {have.shape}, source {want.shape}"
        )
    if not np.all(np.isfinite(have) == np.isfinite(want)):
        return float("inf")
    both = np.isfinite(want)
    return float(np.max(np.abs(want[both].astype("float64") - have[both].astype("float64")),
                        initial=0.0))
