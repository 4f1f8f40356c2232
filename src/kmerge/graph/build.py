"""What every output-space builder shares: naming the sources, inputs, freezing,
output selection, shape matching, the finished model's metadata, and the dry-run plan."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from kmerge.arguments import load_if_path
from kmerge.errors import IncompatibleModelsError, InvalidArgumentError
from kmerge.graph import adapters as _adapters
from kmerge.graph.rebuild import Rebuilt, check_model, input_specs, rebuild
from kmerge.graph.replay import tensor_ref, walk
from kmerge.metadata import attach, derivation, meta_of, own_path
from kmerge.verification import verify as check

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
FREEZE_DOC = "freeze must be True, False, or a set of source names"
NEW_OUTPUT = "head"  # the output a multi-task merge adds beside the kept ones


def named_models(models: Any, *, minimum: int, what: str) -> dict[str, keras.Model]:
    """``{name: model}`` from a list, a dict or paths; validated and loaded."""
    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, Sequence) and not isinstance(models, str | bytes):
        items = []
        used: set[str] = set()
        for m in models:
            base = _default_name(m)
            name, k = base, 2
            while name in used:
                name, k = f"{base}_{k}", k + 1
            used.add(name)
            items.append((name, m))
    else:
        raise InvalidArgumentError(
            f"{what} takes a list or a dict of models (or paths), got {type(models).__name__}"
        )
    if len(items) < minimum:
        raise InvalidArgumentError(f"{what} needs at least {minimum} models, got {len(items)}")
    out: dict[str, keras.Model] = {}
    for name, m in items:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgumentError(
                f"model name {name!r} is not usable as a layer-name prefix; use a non-empty "
                "name of letters, digits and '_' starting with a letter"
            )
        if name in out:
            raise InvalidArgumentError(f"model name {name!r} is used twice; names must be unique")
        out[name] = check_model(load_if_path(m), name)
    return out


def _default_name(m: Any) -> str:
    if isinstance(m, str | os.PathLike):
        stem = os.path.basename(os.fspath(m)).split(".")[0]
        name = re.sub(r"[^A-Za-z0-9_]", "_", stem)
    else:
        name = getattr(m, "name", None) or "model"
    return name if _NAME.match(name) else f"m_{name}"


def frozen_names(freeze: Any, names: Iterable[str]) -> set[str]:
    names = list(names)
    if freeze is True:
        return set(names)
    if freeze is False or freeze is None:
        return set()
    if isinstance(freeze, str):
        freeze = {freeze}
    try:
        chosen = set(freeze)
    except TypeError:
        raise InvalidArgumentError(f"{FREEZE_DOC}, got {freeze!r}") from None
    unknown = chosen - set(names)
    if unknown:
        raise InvalidArgumentError(
            f"freeze names {sorted(unknown)} are not sources; sources are {names}"
        )
    return chosen


def check_keep_outputs(keep_outputs: Any, frozen: set[str], names: Iterable[str]) -> bool:
    """``keep_outputs`` as a bool; the kept outputs must stay the sources' own, so every
    source must be frozen."""
    from kmerge.arguments import flag

    keep = flag(keep_outputs, "keep_outputs")
    loose = [n for n in names if n not in frozen]
    if keep and loose:
        raise InvalidArgumentError(
            f"keep_outputs=True keeps each source's own outputs unchanged, but freeze leaves "
            f"{loose} trainable (training would change their outputs); pass freeze=True, or "
            "keep_outputs=False"
        )
    return keep


def task_output(model: keras.Model) -> int:
    """The position in ``model.outputs`` of the output a task is trained and scored on: the
    new output of a multi-task merge (``keep_outputs=True``), else the first."""
    new = ((meta_of(model) or {}).get("keep_outputs") or {}).get("new")
    if new is None:
        return 0
    named = model.output  # a Functional model's output structure: here {name: tensor}
    if not isinstance(named, Mapping) or new not in named:
        return 0
    return [id(t) for t in model.outputs].index(id(named[new]))


def task_model(model: keras.Model) -> keras.Model:
    """``model`` itself, or for a multi-task merge (``keep_outputs=True``) a view of it with
    only its new output (:func:`task_output`): the same layers and variables, nothing copied.
    What a consumer of one output sees (a distillation teacher, a student's template)."""
    if len(model.outputs) < 2 or not (meta_of(model) or {}).get("keep_outputs"):
        return model
    # one input: the bare tensor, so the view is called with an array as the merge is
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.input
    return keras.Model(inputs, model.outputs[task_output(model)], name=model.name)


def shape_of(t) -> tuple:
    return tuple(t.shape[1:])


@dataclass
class Plan:
    """What a builder will make; printable. Returned by ``dry_run=True``."""

    kind: str
    name: str
    branches: list[dict] = field(default_factory=list)
    adapters: list[dict] = field(default_factory=list)
    combine: str | None = None
    head: str = "none"
    inputs: list[str] = field(default_factory=list)
    output_shape: str = ""
    trainable_params: int = 0
    frozen_params: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [("branch", "inputs", "uses", "shape", "params", "frozen")]
        for b in self.branches:
            rows.append((b["name"], ", ".join(b["inputs"]), b["uses"], b["shape"],
                         f"{b['params']:,}", "yes" if b["frozen"] else "no"))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        lines = [f"kmerge {self.kind} plan: {self.name}"]
        for j, r in enumerate(rows):
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
            if j == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        for a in self.adapters:
            lines.append(f"  adapter  {a['where']}: {a['step']}"
                         f"{' (trainable)' if a['trainable'] else ''}")
        if self.combine:
            lines.append(f"  combine  {self.combine}")
        lines.append(f"  head     {self.head}")
        lines.append(f"  inputs   {', '.join(self.inputs)}")
        lines.append(f"  output   {self.output_shape}")
        lines.append(f"  params   {self.trainable_params:,} trainable, "
                     f"{self.frozen_params:,} frozen")
        lines.extend(f"  note     {n}" for n in self.notes)
        return "\n".join(lines)


class GraphBuilder:
    """Builds one merged graph. The builders in sequential/parallel/fuse drive it."""

    def __init__(self, kind: str, sources: dict[str, keras.Model], frozen: set[str], *,
                 name: str | None, dry_run: bool) -> None:
        self.kind = kind
        self.sources = sources
        self.frozen = frozen
        self.name = name or f"kmerge_{kind}_" + "_".join(sources)
        self.dry_run = dry_run
        self.taken: set[str] = set()
        self.inputs: list = []
        self.rebuilt: dict[str, Rebuilt] = {}
        self.taps: dict[str, list[tuple[Any, Any]]] = {}  # source -> [(ref, tensor)]
        self.adapters: list[dict] = []
        self.combine_name: str | None = None
        self.head = "none"

    def own_prefix(self, base: str) -> str:
        """A prefix for kmerge's own layers (``head``, ``combine``, ``gate``) that no copied
        layer name starts with: a source named ``head`` keeps its ``head_*`` layers and the
        new head becomes ``head2_*``."""
        prefix, k = base, 2
        while any(n == prefix or n.startswith(prefix + "_") for n in self.taken):
            prefix, k = f"{base}{k}", k + 1
        return prefix

    # -- inputs -------------------------------------------------------------------
    def new_input(self, shape: tuple, dtype: str, name: str):
        base, k = name, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        t = keras.Input(shape=shape, dtype=dtype, name=name)
        self.inputs.append(t)
        return t

    def inputs_for(self, names: Sequence[str], *, share: bool) -> dict[str, list]:
        """Merged-graph Inputs for each source: shared where specs agree (if ``share``)."""
        groups: dict[tuple, list[str]] = {}
        for n in names:
            spec = tuple((s, d) for s, d, _ in input_specs(self.sources[n]))
            key = spec if share else (n,)
            groups.setdefault(key, []).append(n)
        result: dict[str, list] = {}
        for members in groups.values():
            first = self.sources[members[0]]
            specs = input_specs(first)
            if len(groups) == 1:
                labels = ["input"] if len(specs) == 1 else [s[2] for s in specs]
            else:
                labels = ([members[0]] if len(specs) == 1
                          else [f"{members[0]}_{s[2]}" for s in specs])
            tensors = [self.new_input(s, d, lab) for (s, d, _), lab in zip(specs, labels)]
            for n in members:
                result[n] = tensors
        return result

    # -- sources ------------------------------------------------------------------
    def add_source(self, name: str, inputs: list) -> Rebuilt:
        r = rebuild(self.sources[name], inputs, name=name, freeze=name in self.frozen,
                    taken=self.taken, copy=not self.dry_run)
        self.rebuilt[name] = r
        self.taps[name] = []
        return r

    def tap(self, name: str, ref: Any):
        """The merged-graph tensor of source ``name``'s layer ``ref``; recorded for verify."""
        t = self.rebuilt[name].tap(ref)
        self.taps[name].append((ref, t))
        return t

    def output_of(self, name: str, choice: Any = None):
        """The single output of source ``name`` (``choice`` picks one of several)."""
        r = self.rebuilt[name]
        outs = r.outputs
        model = self.sources[name]
        if choice is None:
            if len(outs) != 1:
                raise IncompatibleModelsError(
                    f"model {name!r} has {len(outs)} outputs ({', '.join(_output_names(model))}); "
                    f"pick one with output={{{name!r}: <name or index>}}"
                )
            return outs[0]
        names = _output_names(model)
        if isinstance(choice, int) and not isinstance(choice, bool):
            if not -len(outs) <= choice < len(outs):
                raise InvalidArgumentError(
                    f"model {name!r} has outputs 0..{len(outs) - 1}; output index {choice} "
                    "is out of range"
                )
            return outs[choice]
        if choice in names:
            return outs[names.index(choice)]
        raise InvalidArgumentError(
            f"model {name!r} has no output {choice!r}; its outputs are {names}"
        )

    # -- adapters -----------------------------------------------------------------
    def adapt(self, tensor, target: tuple, *, where: str, mode: str, fix: str,
              what_a: str, what_b: str):
        src = shape_of(tensor)
        steps = _adapters.plan(src, target)
        if steps == []:
            return tensor
        if mode == "none" or steps is None:
            extra = "" if steps is None else ' or pass adapter="auto"'
            raise _adapters.mismatch_error(what_a, src, what_b, target, fix + extra)
        out = _adapters.adapt(tensor, steps, name=f"adapter_{where}", taken=self.taken)
        for s in steps:
            self.adapters.append({"where": where, "step": s.describe(), "kind": s.kind,
                                  "trainable": s.trainable})
        return out

    def equalize(self, tensors: dict[str, Any], *, mode: str, op: str) -> dict[str, Any]:
        """Make branch tensors one shape for an element-wise op (project to the first)."""
        names = list(tensors)
        target = shape_of(tensors[names[0]])
        out = {names[0]: tensors[names[0]]}
        for n in names[1:]:
            t = tensors[n]
            if _adapters.compatible(shape_of(t), target):
                out[n] = t
                continue
            if mode != "auto":
                raise IncompatibleModelsError(
                    f"combine={op!r} is element-wise, but branch {names[0]!r} gives "
                    f"{_adapters.fmt(target)} and branch {n!r} gives "
                    f"{_adapters.fmt(shape_of(t))}; use combine='concat', or pass "
                    'adapter="auto" to project them to one shape'
                )
            out[n] = self.adapt(t, target, where=n, mode="auto", fix="", what_a=n,
                                what_b=names[0])
        return out

    # -- finish -------------------------------------------------------------------
    def kept_outputs(self, new) -> tuple[dict[str, Any], dict[str, list[str]], str]:
        """The outputs of a multi-task merge: each source's own output(s), named after the
        source (``"a"``, or ``"a_0"``, ``"a_1"`` for several), then ``new`` as ``"head"``
        (``"head2"`` ... if a source took that name). The kept tensors are the rebuilt
        graph's own: the layers the taps and the combine read run once for every output."""
        outputs: dict[str, Any] = {}
        kept: dict[str, list[str]] = {}
        for n, r in self.rebuilt.items():
            keys = [n] if len(r.outputs) == 1 else [f"{n}_{i}" for i in range(len(r.outputs))]
            kept[n] = []
            for key, t in zip(keys, r.outputs):
                base, k = key, 2
                while key in outputs:
                    key, k = f"{base}_{k}", k + 1
                outputs[key] = t
                kept[n].append(key)
        key, k = NEW_OUTPUT, 2
        while key in outputs:
            key, k = f"{NEW_OUTPUT}{k}", k + 1
        outputs[key] = new
        return outputs, kept, key

    def finish(self, output, *, verify: bool, probe=None, keep_outputs: bool = False):
        """The merged model (or its plan), its metadata, verified. ``keep_outputs``: a
        multi-task merge whose outputs are a dict, the sources' own beside ``output``."""
        ins = self.inputs[0] if len(self.inputs) == 1 else self.inputs
        kept = None
        if keep_outputs:
            output, kept, new = self.kept_outputs(output)
        model = keras.Model(ins, output, name=self.name)
        w = walk(model)
        present = {id(t) for t in w.tensors}

        def refs(tensors):  # only tensors the finished model computes (fuse drops tails)
            if not all(id(t) in present for t in tensors):
                return []
            return [tensor_ref(w, t) for t in tensors]

        meta = {
            "kind": self.kind,
            "sources": {
                n: {
                    "inputs": [tensor_ref(w, t) for t in r.inputs],
                    "outputs": refs(r.outputs),
                    "taps": [[ref, tensor_ref(w, t)] for ref, t in self.taps[n]],
                    "frozen": n in self.frozen,
                    "path": own_path(self.sources[n]),
                    # by identity, not name prefix: a source named "head" must not claim
                    # kmerge's own head_* layers
                    "layers": [layer.name for layer in model.layers
                               if id(layer) in {id(c) for c in r.layers.values()}],
                }
                for n, r in self.rebuilt.items()
            },
            "adapters": self.adapters,
            "combine": self.combine_name,
            "head": self.head,
            **derivation(*self.sources.values()),
            "notes": [f"{n}: {note}" for n, r in self.rebuilt.items() for note in r.notes],
        }
        if kept is not None:
            # which model outputs are each source's own (verify compares them with the
            # sources) and which one is new (fit_head trains it, reports score it)
            meta["keep_outputs"] = {"kept": kept, "new": new}
        attach(model, meta)
        if self.dry_run:
            return self.plan(model, meta)
        if verify:
            check(model, self.sources, x=probe)
        return model

    def plan(self, model: keras.Model, meta: dict) -> Plan:
        trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
        total = sum(math.prod(w.shape) for w in model.weights)
        branches = []
        for n, r in self.rebuilt.items():
            m = self.sources[n]
            branches.append({
                "name": n,
                "inputs": [t.name for t in r.inputs] if r.inputs and hasattr(r.inputs[0], "name")
                else [],
                "uses": ", ".join(str(ref) for ref, _ in self.taps[n]) or "output",
                "shape": ", ".join(_adapters.fmt(shape_of(t))
                                   for t in ([t for _, t in self.taps[n]] or r.outputs)),
                "params": int(m.count_params()),
                "frozen": n in self.frozen,
            })
        named = model.output if isinstance(model.output, Mapping) else None
        out_shapes = ([f"{k} {_adapters.fmt(shape_of(t))}" for k, t in named.items()] if named
                      else [_adapters.fmt(shape_of(t)) for t in model.outputs])
        return Plan(
            kind=self.kind, name=self.name, branches=branches, adapters=self.adapters,
            combine=self.combine_name, head=self.head,
            inputs=[f"{t.name} {_adapters.fmt(shape_of(t))}" for t in model.inputs],
            output_shape=", ".join(out_shapes), trainable_params=int(trainable),
            frozen_params=int(total - trainable), notes=meta["notes"],
        )


def _output_names(model: keras.Model) -> list[str]:
    names = getattr(model, "output_names", None)
    if names and len(names) == len(model.outputs):
        return list(names)
    from kmerge import _keras

    return [_keras.history(t)[0].name for t in model.outputs]


def check_adapter_mode(adapter: str) -> str:
    if adapter not in ("auto", "none"):
        raise InvalidArgumentError(f'adapter must be "auto" or "none", got {adapter!r}')
    return adapter

