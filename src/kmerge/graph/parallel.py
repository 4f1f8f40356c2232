"""Parallel merge: every source sees the input; outputs are combined; a head on top."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from kmerge.arguments import flag, model_name, normalised_weights
from kmerge.errors import InvalidArgumentError
from kmerge.graph.build import (
    GraphBuilder,
    check_adapter_mode,
    check_keep_outputs,
    frozen_names,
    named_models,
)
from kmerge.graph.combine import combine_ops
from kmerge.graph.heads import apply_head, describe_head


def check_weights(weights: Any, n: int, *, op: str, what: str = "model") -> list[float] | None:
    """Validate the fixed weights of ``combine="weighted"``."""
    needs = combine_ops.get(op).needs_weights
    if weights is None:
        if needs:
            raise InvalidArgumentError(
                f"combine={op!r} needs weights=[...] with one non-negative number per model "
                f"({n} models)"
            )
        return None
    if not needs:
        raise InvalidArgumentError(
            f"weights only apply to combine='weighted', not {op!r}; use combine='weighted' or "
            "drop weights (combine='learned_weights' learns them)"
        )
    return normalised_weights(weights, n, what=what)


def gate_context(builder: GraphBuilder):
    """The tensor the gate looks at: the merged input(s), flattened and concatenated."""
    gate = builder.own_prefix("gate")
    flats = []
    for t in builder.inputs:
        x = t
        if "int" in str(x.dtype):
            raise InvalidArgumentError(
                "combine='gate' computes its gate from the inputs, which are integer ids "
                f"here ({t.name}); use combine='learned_weights' instead"
            )
        if len(x.shape) > 2:
            x = keras.layers.Flatten(name=f"{gate}_flatten_{t.name}")(x)
        flats.append(x)
    if len(flats) == 1:
        return flats[0]
    return keras.layers.Concatenate(name=f"{gate}_context")(flats)


def combine_branches(builder: GraphBuilder, tensors: dict, *, combine: str, adapter: str,
                     weights: list[float] | None):
    op = combine_ops.get(combine)
    builder.combine_name = combine
    if op.elementwise:
        tensors = builder.equalize(tensors, mode=adapter, op=combine)
    context = gate_context(builder) if op.needs_context else None
    return op.build(list(tensors.values()), name=f"{builder.own_prefix('combine')}_{combine}",
                    weights=weights,
                    context=context)


def parallel(
    models: Any,
    *,
    combine: str = "concat",
    head: Any = None,
    freeze: Any = True,
    weights: Sequence[float] | None = None,
    output: dict[str, int | str] | None = None,
    share_inputs: bool = True,
    adapter: str = "none",
    keep_outputs: bool = False,
    name: str | None = None,
    verify: bool = True,
    dry_run: bool = False,
):
    """Run models side by side and combine their outputs.

    Args:
        models: A list or dict of models (or paths).
        combine: A registered combine op: ``concat``, ``average``, ``add``, ``multiply``,
            ``maximum``, ``minimum``, ``stack``, ``weighted``, ``learned_weights``, ``gate``.
        head: ``kmerge.heads.classifier(...)``, ``regressor(...)``, any Keras layer, or None.
        freeze: ``True``, ``False``, or a set of source names to freeze.
        weights: One non-negative number per model, for ``combine="weighted"``.
        output: Which output of a multi-output source: ``{"a": "name_or_index"}``.
        share_inputs: Sources whose input specs agree share one Input; False gives each
            its own (same shape, different meaning).
        adapter: ``"auto"`` projects unequal branch shapes for element-wise ops.
        keep_outputs: A multi-task merge: the model's outputs are a dict of each source's
            own output(s), unchanged (``"a"``, or ``"a_0"``, ``"a_1"`` for a source with
            several), and the new output ``"head"``; one forward pass serves the old tasks
            and the new one. Needs every source frozen.
        name: Name of the merged model.
        verify: Check after building that each source is reproduced bit-exactly.
        dry_run: Return a printable plan instead of a model.

    >>> m = kmerge.parallel({"a": a, "b": b}, combine="concat",
    ...                     head=kmerge.heads.classifier(10, hidden=[64]))
    >>> m = kmerge.parallel({"a": a, "b": b}, head=kmerge.heads.classifier(10),
    ...                     keep_outputs=True)
    >>> sorted(m.predict(x))  # a's and b's outputs and the head's, one pass
    ['a', 'b', 'head']
    """
    mode = check_adapter_mode(adapter)
    name, verify, dry_run = model_name(name), flag(verify, "verify"), flag(dry_run, "dry_run")
    share_inputs = flag(share_inputs, "share_inputs")
    combine_ops.get(combine)  # unknown names fail before any work
    sources = named_models(models, minimum=2, what="parallel")
    fixed = check_weights(weights, len(sources), op=combine)
    if output is not None and not isinstance(output, Mapping):
        raise InvalidArgumentError(
            f"output must be {{source name: output name or index}}, e.g. {{'a': 0}}; received "
            f"{output!r}")
    output = dict(output or {})
    unknown = set(output) - set(sources)
    if unknown:
        raise InvalidArgumentError(f"output names {sorted(unknown)} are not sources: {list(sources)}")
    frozen = frozen_names(freeze, sources)
    keep = check_keep_outputs(keep_outputs, frozen, sources)
    builder = GraphBuilder("parallel", sources, frozen, name=name, dry_run=dry_run)
    inputs = builder.inputs_for(list(sources), share=share_inputs)
    tensors = {}
    for n in sources:
        builder.add_source(n, inputs[n])
        tensors[n] = builder.output_of(n, output.get(n))
    x = combine_branches(builder, tensors, combine=combine, adapter=mode, weights=fixed)
    x = apply_head(head, x, name=builder.own_prefix("head"))
    builder.head = describe_head(head)
    return builder.finish(x, verify=verify, keep_outputs=keep)
