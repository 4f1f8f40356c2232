"""Sequential merge: model A's output feeds model B (feature extractor + classifier)."""

from __future__ import annotations

from typing import Any

from kmerge.arguments import flag, model_name
from kmerge.errors import IncompatibleModelsError
from kmerge.graph.build import GraphBuilder, check_adapter_mode, frozen_names, named_models
from kmerge.graph.rebuild import input_specs


def sequential(
    models: Any,
    *,
    adapter: str = "auto",
    freeze: Any = True,
    name: str | None = None,
    verify: bool = True,
    dry_run: bool = False,
):
    """Chain two or more models: each one's output feeds the next.

    Args:
        models: A list or dict of models (or paths), first to last.
        adapter: ``"auto"`` inserts the least lossy adapter where shapes differ
            (reported in the plan and in ``kmerge.info(model)["adapters"]``); ``"none"``
            raises :class:`~kmerge.errors.IncompatibleModelsError` instead.
        freeze: ``True``, ``False``, or a set of source names to freeze.
        name: Name of the merged model.
        verify: Check after building that each source is reproduced bit-exactly.
        dry_run: Return a :class:`~kmerge.graph.build.Plan` instead of a model.

    Returns:
        A new ``keras.Model`` (sources untouched), or a Plan.

    >>> m = kmerge.sequential([extractor, classifier], adapter="auto")
    """
    mode = check_adapter_mode(adapter)
    name, verify, dry_run = model_name(name), flag(verify, "verify"), flag(dry_run, "dry_run")
    sources = named_models(models, minimum=2, what="sequential")
    builder = GraphBuilder("sequential", sources, frozen_names(freeze, sources),
                           name=name, dry_run=dry_run)
    names = list(sources)
    x = None
    for i, n in enumerate(names):
        model = sources[n]
        specs = input_specs(model)
        if i == 0:
            inputs = builder.inputs_for([n], share=True)[n]
        else:
            if len(specs) != 1:
                raise IncompatibleModelsError(
                    f"model {n!r} has {len(specs)} inputs; in a sequential merge each model "
                    "after the first must take exactly one input (merge in parallel instead)"
                )
            prev = names[i - 1]
            shape, dtype, _ = specs[0]
            if "int" in dtype and "int" not in str(x.dtype):
                raise IncompatibleModelsError(
                    f"model {n!r} expects integer input ({dtype}, e.g. token ids) but model "
                    f"{prev!r} gives {x.dtype} features; no adapter turns features into ids"
                )
            x = builder.adapt(
                x, shape, where=f"{prev}_to_{n}", mode=mode,
                fix="put a model between them that maps one to the other",
                what_a=f"model {prev!r}", what_b=f"model {n!r}",
            )
            inputs = [x]
        builder.add_source(n, inputs)
        x = builder.output_of(n)
    return builder.finish(x, verify=verify)

