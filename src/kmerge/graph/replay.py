"""The one walk over Keras graphs: every kmerge feature that reads a model's graph uses it.

:func:`walk` flattens a Functional or Sequential model into :class:`Call` records, one per
call of a leaf operation (a layer, or a ``keras.ops`` operation such as the ``NotEqual`` an
``Embedding(mask_zero=True)`` adds), in the order Keras executes them. Nested Sequential and
Functional models are inlined: their inner calls appear in place, once per call of the nested
model (a siamese encoder called twice gives each inner layer calls ``@0`` and ``@1``), and the
nested model's own call is recorded too (``inlined=True``) so it can be tapped. Tensors are
numbered (walk ids); each call reads and writes walk ids.

:func:`replay` re-invokes the calls on new tensors (symbolic or concrete), exactly as
Keras's own ``Function`` runs a graph does: each node's recorded arguments,
constants, keyword arguments and explicit masks are filled in, and a caller-given function
decides what runs in place of each operation (a prefixed copy, the source layer itself).
Masks travel as Keras makes them travel: a copied ``Embedding`` attaches its mask to its
output, and recorded ``mask=`` arguments are filled in from the replayed ``NotEqual``.

:meth:`Walk.find` resolves a tap reference, with one numbering for everything:
``name``, ``index``, ``block/inner`` (nested path), ``name@k`` (k-th call) and ``name[j]``
(j-th output of a multi-output layer, e.g. an LSTM with ``return_state=True``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
from keras import tree

from kmerge import _keras
from kmerge.errors import InvalidModelError, LayerNotFoundError, TapError

LayerRef = int | str

_REF = re.compile(r"^(?P<path>.*?)(?:@(?P<call>[^@\[\]]*))?(?:\[(?P<out>[^\[\]]*)\])?$")


def is_graph_model(model: Any) -> bool:
    """True for models whose layer graph kmerge can see (Functional and Sequential)."""
    return isinstance(model, keras.Sequential) or _keras.is_functional(model)


def graph_of(model: keras.Model) -> Any:
    """The Functional graph behind a Sequential or Functional model."""
    if isinstance(model, keras.Sequential):
        graph = _keras.sequential_graph(model)
        if graph is None:
            raise InvalidModelError(
                f"model {model.name!r} is a Sequential model that has not been built; "
                "give it an input shape (keras.Input(shape=...) as first layer) or call it "
                "on data once before merging"
            )
        return graph
    return model


@dataclass(frozen=True)
class Call:
    """One call of an operation in a flattened graph."""

    op: Any  # a Layer, a keras.ops Operation, or (inlined=True) a nested model
    path: tuple[str, ...]  # names of the nested models it sits in, outermost first
    index: int  # the k-th call of ``op`` in this walk: the '@k' of a tap
    node: Any  # the Keras node; its arguments refer to the tensors of its own graph
    inputs: tuple[int, ...]  # walk ids read, in the order of node.input_tensors
    outputs: tuple[int, ...]  # walk ids written, in the order of node.outputs
    scope: tuple[Any, ...] = ()  # the nested-model calls (Call) it sits in, outermost first
    inlined: bool = False  # a nested model's own call; its inner calls do the work

    @property
    def name(self) -> str:
        return "/".join((*self.path, self.op.name))

    @property
    def is_layer(self) -> bool:
        return isinstance(self.op, keras.layers.Layer)


@dataclass
class Walk:
    """A model's graph, nested models inlined: calls in execution order over numbered tensors."""

    model: keras.Model
    calls: list[Call] = field(default_factory=list)
    tensors: list[Any] = field(default_factory=list)  # walk id -> the source's KerasTensor
    producer: list[tuple[int, int] | None] = field(default_factory=list)  # (call, output)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    _by_op: dict[int, list[Call]] = field(default_factory=dict)

    def record(self, call: Call) -> None:
        """Append a call (used while the walk is built)."""
        self.calls.append(call)
        self._by_op.setdefault(id(call.op), []).append(call)

    # -- reading --------------------------------------------------------------------------
    @property
    def leaf_calls(self) -> list[Call]:
        """The calls that compute (nested models' own calls left out)."""
        return [c for c in self.calls if not c.inlined]

    def calls_of(self, op: Any) -> list[Call]:
        return self._by_op.get(id(op), [])

    def ops(self) -> list[Any]:
        """Every leaf operation once, in first-call order."""
        seen: dict[int, Any] = {}
        for c in self.leaf_calls:
            seen.setdefault(id(c.op), c.op)
        return list(seen.values())

    def shape(self, wid: int) -> tuple:
        return tuple(self.tensors[wid].shape)

    def producer_call(self, wid: int) -> Call | None:
        p = self.producer[wid]
        return None if p is None else self.calls[p[0]]

    def name_of(self, wid: int) -> str:
        """The name of the call that makes tensor ``wid`` (the input's name for an input)."""
        call = self.producer_call(wid)
        return call.name if call is not None else self.tensors[wid].name

    # -- references ------------------------------------------------------------------------
    def find(self, ref: LayerRef, *, source: str) -> tuple[Call, int]:
        """The call and output index a tap reference names.

        ``ref`` is a top-level layer index, or ``'name'``, ``'block/inner'``, with optional
        ``'@k'`` (k-th call of a shared layer or of a nested model's inner layer, counted in
        this walk) and ``'[j]'`` (j-th output of a multi-output layer).
        """
        op, call, out = resolve_ref(self.model, ref, source=source)
        calls = self.calls_of(op)
        if not calls:
            raise TapError(
                f"layer {ref!r} of model {source!r} is not connected to the model's inputs, "
                "so it computes nothing in the merged graph"
            )
        if call is None:
            if len(calls) > 1:
                raise TapError(
                    f"layer {ref!r} of model {source!r} is called {len(calls)} times; say which "
                    f"call with '{_base(ref)}@0' .. '{_base(ref)}@{len(calls) - 1}'"
                )
            call = 0
        if not 0 <= call < len(calls):
            raise TapError(
                f"layer {ref!r} of model {source!r} has calls @0..@{len(calls) - 1}, not @{call}"
            )
        c = calls[call]
        if out is None:
            if len(c.outputs) != 1:
                raise TapError(
                    f"layer {ref!r} of model {source!r} has {len(c.outputs)} outputs; pick one "
                    f"with '{_base(ref)}[0]' .. '{_base(ref)}[{len(c.outputs) - 1}]'"
                )
            out = 0
        if not 0 <= out < len(c.outputs):
            raise TapError(
                f"layer {ref!r} of model {source!r} has outputs [0]..[{len(c.outputs) - 1}], "
                f"not [{out}]"
            )
        return c, out


def _base(ref: LayerRef) -> str:
    return str(ref).split("@")[0].split("[")[0]


def _all_refs(model: keras.Model, prefix: str = "") -> list[str]:
    names: list[str] = []
    if not is_graph_model(model):
        return names
    for op in _ops_of(model):
        names.append(prefix + op.name)
        if is_graph_model(op):
            names.extend(_all_refs(op, prefix + op.name + "/"))
    return names


def _ops_of(model: keras.Model) -> list:
    """A graph model's layers and keras.ops operations (Input layers left out)."""
    graph = graph_of(model) if is_graph_model(model) else model
    ops = list(getattr(graph, "operations", None) or model.layers)
    return [op for op in ops if not isinstance(op, keras.layers.InputLayer)]


def resolve_ref(model: keras.Model, ref: LayerRef, *,
                source: str) -> tuple[Any, int | None, int | None]:
    """Find what ``ref`` names in ``model``: (operation, call or None, output or None)."""
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise LayerNotFoundError(
            f"layer reference {ref!r} for model {source!r} must be a layer name, an index, "
            "or a nested path like 'block_1/conv' (with optional '@k' call and '[j]' output)"
        )
    if not is_graph_model(model):
        return model, None, None  # opaque: only its final output means anything
    if isinstance(ref, int):
        layers = model.layers
        if not -len(layers) <= ref < len(layers):
            raise LayerNotFoundError(
                f"model {source!r} has {len(layers)} layers (indices 0..{len(layers) - 1}); "
                f"index {ref} is out of range"
            )
        return layers[ref], None, None
    m = _REF.match(ref)
    assert m is not None  # the pattern matches every string
    text, call, out = m.group("path"), m.group("call"), m.group("out")
    for part, what in ((call, "'@'"), (out, "'[...]'")):
        if part is not None and not part.isdigit():
            raise LayerNotFoundError(
                f"layer reference {ref!r}: the part in {what} must be a non-negative integer "
                "(e.g. 'lstm@1' for the second call, 'lstm[2]' for the third output)"
            )
    current: Any = model
    parts = text.split("/")
    for depth, part in enumerate(parts):
        if not is_graph_model(current):
            raise TapError(
                f"cannot look inside layer {'/'.join(parts[:depth])!r} of model {source!r}: "
                f"it is a {type(current).__name__}, not a Functional or Sequential model "
                "(subclassed models are opaque blocks)"
            )
        found = {op.name: op for op in _ops_of(current)}
        if part not in found:
            everything = _all_refs(model)
            close = difflib.get_close_matches(text, everything, n=3, cutoff=0.4)
            hint = f" Nearest: {', '.join(close)}." if close else ""
            shown = ", ".join(everything[:40]) + (" ..." if len(everything) > 40 else "")
            raise LayerNotFoundError(
                f"model {source!r} has no layer {text!r}.{hint} Existing layers are: {shown}"
            )
        current = found[part]
    return (current, None if call is None else int(call), None if out is None else int(out))


# -- building a walk ---------------------------------------------------------------------------


def walk(model: keras.Model) -> Walk:
    """Flatten ``model``'s graph (nested models inlined) into calls over numbered tensors."""
    graph = graph_of(model)
    w = Walk(model)

    def new_tensor(t: Any, producer: tuple[int, int] | None) -> int:
        w.tensors.append(t)
        w.producer.append(producer)
        return len(w.tensors) - 1

    def inline(g: Any, inputs: list[int], path: tuple[str, ...], scope: tuple) -> list[int]:
        ids = {id(x): y for x, y in zip(g.inputs, inputs)}
        for node in _keras.graph_nodes(g):
            op = node.operation
            if any(id(x) not in ids for x in node.input_tensors):
                continue  # not computable from the inputs (Keras skips it too)
            ins = tuple(ids[id(x)] for x in node.input_tensors)
            index = len(w.calls_of(op))
            if is_graph_model(op):
                sub = graph_of(op)
                own = Call(op, path, index, node, ins, (), scope, inlined=True)
                arg_tensors = nested_inputs(own)
                if len(arg_tensors) != len(sub.inputs):
                    raise InvalidModelError(
                        f"model {'/'.join((*path, op.name))!r} expects {len(sub.inputs)} "
                        f"inputs, but its call in the graph passes {len(arg_tensors)}"
                    )
                outs = inline(sub, [ids[id(t)] for t in arg_tensors], (*path, op.name),
                              (*scope, own))
                w.record(Call(op, path, index, node, ins, tuple(outs), scope, inlined=True))
            else:
                n = len(w.calls)
                outs = [new_tensor(t, (n, j)) for j, t in enumerate(node.outputs)]
                w.record(Call(op, path, index, node, ins, tuple(outs), scope))
            for x, y in zip(node.outputs, outs):
                ids[id(x)] = y
        missing = [x for x in g.outputs if id(x) not in ids]
        if missing:
            raise InvalidModelError(
                f"model {'/'.join(path) or model.name!r}: output(s) not reachable from its "
                "inputs"
            )
        return [ids[id(x)] for x in g.outputs]

    w.inputs = [new_tensor(t, None) for t in graph.inputs]
    w.outputs = inline(graph, list(w.inputs), (), ())
    return w


# -- replaying it ----------------------------------------------------------------------------

CallFn = Callable[[Call, tuple, dict], Any]


def replay(w: Walk, values: dict[int, Any], fn: CallFn, *,
           on_partial: Callable[[Call, list[int]], None] | None = None,
           calls: list[Call] | None = None) -> dict[int, Any]:
    """Re-run ``w``'s calls on new tensors; returns walk id -> value (``values`` extended).

    Args:
        w: The walk.
        values: Values for some walk ids (usually ``w.inputs``; a stitch starts mid-graph).
        fn: ``fn(call, args, kwargs)`` computes one call; ``args``/``kwargs`` are the
            node's recorded arguments with new values filled in.
        on_partial: Called for a call that has some inputs but not all (a skip connection
            around a cut); by default such calls are skipped like unreachable ones.
        calls: Replay only these calls (in walk order); default all.
    """
    for call in (w.calls if calls is None else calls):
        if call.inlined:
            continue
        have = [wid in values for wid in call.inputs]
        if not all(have):
            if any(have) and on_partial is not None:
                on_partial(call, [wid for wid, h in zip(call.inputs, have) if not h])
            continue
        local = {id(t): values[wid] for t, wid in zip(call.node.input_tensors, call.inputs)}
        args, kwargs = _keras.fill_in(call.node, local)
        outs = tree.flatten(fn(call, args, kwargs))
        if len(outs) != len(call.outputs):
            raise InvalidModelError(
                f"layer {call.name!r} returned {len(outs)} tensors when replayed; the source "
                f"graph recorded {len(call.outputs)}"
            )
        for wid, y in zip(call.outputs, outs):
            values[wid] = y
    return values


def run_source_ops(call: Call, args: tuple, kwargs: dict) -> Any:
    """A :func:`replay` function that runs each call with the source's own operation."""
    return call.op(*args, **kwargs)


# -- naming tensors of a graph in a way that survives save/load ---------------------------------


def tensor_ref(w: Walk, tensor: Any) -> list:
    """``[operation name, call index, output index]`` of a tensor of ``w``'s graph.

    Call indices are counted by the walk, so the same reference finds the same tensor in the
    model after it is saved and loaded. Inputs are ``[input name, 0, 0]``.
    """
    ids = {id(t): i for i, t in enumerate(w.tensors)}
    if id(tensor) not in ids:
        raise InvalidModelError(f"tensor {getattr(tensor, 'name', tensor)!r} is not in the graph "
                                f"of model {w.model.name!r}")
    wid = ids[id(tensor)]
    call = w.producer_call(wid)
    if call is None:
        return [w.tensors[wid].name, 0, 0]
    return [call.op.name, call.index, call.outputs.index(wid)]


def find_tensor(w: Walk, ref: Any) -> int:
    """The walk id a :func:`tensor_ref` names."""
    name, k, j = ref
    for i in w.inputs:
        if w.tensors[i].name == name:
            return i
    for op in w.ops():
        if op.name == name:
            calls = w.calls_of(op)
            if k < len(calls) and j < len(calls[k].outputs):
                return calls[k].outputs[j]
    raise InvalidModelError(
        f"model {w.model.name!r} has no tensor {ref!r} (its kmerge metadata does not match "
        "its graph: was the model edited after merging?)"
    )


def nested_inputs(call: Call) -> list:
    """The graph tensors a nested model's call feeds to the nested model's inputs."""
    args, _ = _keras.node_call_args(call.node)
    return [t for t in tree.flatten(args) if isinstance(t, keras.KerasTensor)]


def submodel(inputs: list, outputs: Any, *, name: str | None = None) -> keras.Model:
    """``keras.Model(inputs, outputs)`` with a single input passed as a tensor, not a list
    of one (Keras warns on every call when the structure it was built with differs)."""
    inputs = list(inputs)
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=name)
