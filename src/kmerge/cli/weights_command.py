"""``kmerge weights``: a weight-space merge, streamed tensor by tensor from the files when
the method and options allow, else of the loaded models."""

from __future__ import annotations

from kmerge.cli.common import (
    check_output,
    check_sources,
    evaluate,
    load_data,
    load_one,
    model_arg,
    parse_params,
    parse_weights,
    source_names,
)
from kmerge.errors import InvalidArgumentError


def _stream_plan(args) -> tuple[bool, str | None]:
    """Whether ``kmerge weights`` streams (``merge_weights_files``: tensor by tensor from
    the files, the models never loaded), and why not when the files could stream but the
    options need the live models (None: the inputs are not streamable files at all)."""
    from kmerge.weights.stream import NOT_STREAMABLE, STREAMABLE_SUFFIXES

    files = [*args.models, *([args.base] if args.base else [])]
    kinds = set()
    for text in files:
        path, weights = model_arg(text)
        kind = next((k for k in STREAMABLE_SUFFIXES if path.lower().endswith(k)), None)
        if weights is not None or kind is None:
            return False, None
        kinds.add(kind)
    if len(kinds) != 1 or not args.output.lower().endswith(next(iter(kinds))):
        return False, None
    needs = [why for cond, why in [
        (args.method in NOT_STREAMABLE, f"method {args.method} runs the models on data"),
        (args.align is not None, "--align permutes the loaded models"),
        (args.repair is not None, "--repair runs the merged model on data")] if cond]
    return (not needs), ("; ".join(needs) or None)


def _stream_checked(args, data, weights, params: dict, sources: dict):
    """The streamed merge written to a temporary file beside the output, loaded, checked
    (:func:`kmerge.weights.apply.result_checks`: NaN/Inf outputs refused, a collapse warned),
    scored, and saved with those records; nothing is left at the output when a check fails."""
    import os
    import tempfile
    from pathlib import Path

    import kmerge
    from kmerge.metadata import attach, meta_of
    from kmerge.weights import merge_weights_files
    from kmerge.weights.apply import result_checks

    if args.output.lower().endswith(".weights.h5"):
        raise InvalidArgumentError(
            f"--data runs the merged model, but {args.output} (like its sources) holds weights "
            "only, no architecture; merge .keras files to check and score the result, or drop "
            "--data")
    target = Path(args.output).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".keras",
                               dir=target.parent.resolve())
    os.close(fd)
    try:
        merge_weights_files(args.models, tmp, method=args.method, base=args.base,
                            weights=weights, overwrite=True, **params)
        merged = load_one(tmp)
        models = {n: load_one(p) for n, p in sources.items()}
        checks = result_checks(merged, list(models.values()), list(models), args.method,
                               data.x_train, data.y_train)
        # recorded in the file beside the stream's own records, as a merge in memory has them
        attach(merged, {**(meta_of(merged) or {}), **checks})
        out = kmerge.save(merged, args.output, overwrite=args.overwrite)
    finally:
        Path(tmp).unlink(missing_ok=True)
    evaluate(merged, models, data, "merged")
    return out


def _weights(args, echo) -> int:
    import kmerge

    params = parse_params(args.param, args.method)
    flags = {"data": "--data", "repair": "--repair", "align": "--align", "base": "--base",
             "weights": "--weights", "method": "--method"}
    for key in params.keys() & flags.keys():  # merge_weights' own arguments, not the method's
        raise InvalidArgumentError(f"--param {key}=...: {key!r} is not a parameter of method "
                                   f"{args.method!r}; use {flags[key]}")
    weights = parse_weights(args.weights)
    check_output(args.output, args.overwrite, [*args.models, *([args.base] if args.base else [])])
    check_sources([*args.models, *([args.base] if args.base else [])])
    stream, why_not = _stream_plan(args)
    data = load_data(args, echo)
    sources = source_names(args.models)
    if stream:
        from kmerge.weights import merge_weights_files

        echo(f"streaming: {args.method} merge tensor by tensor from the files, without "
             "loading the models")
        if data is None:
            out = merge_weights_files(args.models, args.output, method=args.method,
                                      base=args.base, weights=weights,
                                      overwrite=args.overwrite, **params)
        else:  # checked and scored before it is saved, as a merge of the loaded models is
            out = _stream_checked(args, data, weights, params, sources)
        echo(f"saved {out}")
        return 0
    if why_not:
        echo(f"not streaming (the models are loaded): {why_not}")
    models = {n: load_one(p) for n, p in sources.items()}
    base = load_one(args.base) if args.base else None
    train = (data.x_train, data.y_train) if data is not None else None
    m = kmerge.merge_weights(list(models.values()), method=args.method, base=base,
                             weights=weights, align=args.align, repair=args.repair, data=train,
                             **params)
    if data is not None:
        evaluate(m, models, data, "merged")
    echo(f"saved {kmerge.save(m, args.output, overwrite=args.overwrite)}")
    return 0


COMMANDS = {"weights": _weights}
