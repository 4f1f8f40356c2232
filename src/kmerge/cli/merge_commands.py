"""``kmerge sequential``, ``parallel`` and ``fuse``: load the sources, merge, then print the
plan (``--dry-run``), or train the new parts on ``--data`` and print test scores, and save
(never an untrained merge without ``--untrained``)."""

from __future__ import annotations

from collections.abc import Sequence

from kmerge.cli.common import (
    check_output,
    check_sources,
    evaluate,
    load_all,
    load_data,
    parse_head,
    parse_weights,
    source_names,
    warn,
)
from kmerge.errors import InvalidArgumentError
from kmerge.metadata import meta_of


def _check_training_args(args) -> None:
    """Training options without ``--data`` would be ignored: refuse them."""
    given = [flag for flag, value in (("--epochs", args.epochs),
                                      ("--batch-size", args.batch_size),
                                      ("--validation-split", args.validation_split))
             if value is not None]
    if given and not args.data:
        raise InvalidArgumentError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} "
                                   "--data (the data to train on), e.g. --data digits")


def untrained_parts(model) -> list[str]:
    """Names of the layers kmerge added to ``model`` (head, trainable adapters, learned
    combine weights or gate) that have trainable weights: they start from random or uniform
    values and need training. Source layers (trained, also when not frozen) are not listed."""
    meta = meta_of(model) or {}
    source_layers = {name for src in meta.get("sources", {}).values()
                     for name in src.get("layers", [])}
    return [layer.name for layer in model.layers
            if layer.trainable_weights and layer.name not in source_layers]


def _short_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _train(model, data, args, echo) -> None:
    """``kmerge.fit_head`` on the training split (last ``--validation-split`` held out)."""
    import time

    import kmerge
    from kmerge.runner import inputs_for

    parts = untrained_parts(model)
    if not model.trainable_weights:
        echo("nothing to train (no head, trainable adapter or learned combine): "
             "evaluating only")
        return
    x, y = data.x_train, data.y_train
    validation = None
    if args.validation_split:
        n_val = int(round(len(x) * args.validation_split))
        if n_val < 1 or n_val >= len(x):
            raise InvalidArgumentError(
                f"--validation-split {args.validation_split} leaves {len(x) - n_val} training "
                f"and {n_val} validation examples of {len(x)}; choose another fraction")
        x, y, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
        validation = (inputs_for(model, xv), yv)
    epochs = args.epochs or 10
    unfrozen = any(layer.trainable_weights and layer.name not in parts
                   for layer in model.layers)  # --no-freeze: the sources train too
    what = " and ".join(filter(None, [_short_list(parts) if parts else "",
                                      "the unfrozen sources" if unfrozen else ""]))
    echo(f"training {what}: {epochs} epochs on {len(x)} examples"
         + (f" ({len(validation[1])} held out for validation)" if validation else ""))
    t0 = time.perf_counter()
    history = kmerge.fit_head(model, inputs_for(model, x), y, epochs=epochs,
                              batch_size=args.batch_size or 32, validation_data=validation,
                              seed=args.seed, verbose=0)
    last = ", ".join(f"{k} {v[-1]:.4f}" for k, v in history.history.items() if v)
    echo(f"trained in {time.perf_counter() - t0:.1f} s: {last}")


def _finish(model, args, echo, sources: dict, data) -> int:
    """Print the plan (``--dry-run``), or train and evaluate (``--data``), refuse untrained
    parts (neither ``--data`` nor ``--untrained``), and save."""
    import kmerge

    if args.dry_run:
        print(model)
        return 0
    for step in meta_of(model).get("adapters", []):
        echo(f"adapter {step['where']}: {step['step']}")
    parts = untrained_parts(model)
    if data is not None:
        _train(model, data, args, echo)
        evaluate(model, sources, data, "merged")
    elif parts and not args.untrained:
        raise InvalidArgumentError(
            f"not saving {args.output}: the merge has untrained parts ({_short_list(parts)}); "
            "pass --data DATA to train them first (a built-in name such as digits, or a .npz "
            "or .csv file), or --untrained to save it as it is")
    saved = kmerge.save(model, args.output, overwrite=args.overwrite)
    if parts and data is None:
        warn(f"saved {saved} with untrained parts ({_short_list(parts)}): train them "
             "before use (this command with --data, or kmerge.fit_head)")
    else:
        echo(f"saved {saved}")
    return 0


def _prepare(args, echo, sources: Sequence[str]):
    """Checks before any work (output, training options), ``--seed``, and the data."""
    _check_training_args(args)
    if args.dry_run:
        if args.data:
            echo("--dry-run: the plan only; --data is not loaded, nothing trains or is written")
        return None
    check_output(args.output, args.overwrite, sources)
    check_sources(sources)
    data = load_data(args, echo)
    if data is not None or args.untrained:  # a merge that is saved: seed its new layers
        import keras

        keras.utils.set_random_seed(args.seed)
    return data


def _sequential(args, echo) -> int:
    import kmerge

    data = _prepare(args, echo, args.models)
    models = load_all(source_names(args.models))
    m = kmerge.sequential(models, adapter=args.adapter, freeze=not args.no_freeze,
                          dry_run=args.dry_run)
    return _finish(m, args, echo, models, data)


def _parallel(args, echo) -> int:
    import kmerge

    weights = parse_weights(args.weights)
    head = parse_head(args.head, args.seed)
    data = _prepare(args, echo, args.models)
    models = load_all(source_names(args.models))
    m = kmerge.parallel(models, combine=args.combine, head=head, freeze=not args.no_freeze,
                        weights=weights, adapter=args.adapter, keep_outputs=args.keep_outputs,
                        dry_run=args.dry_run)
    return _finish(m, args, echo, models, data)


def _fuse(args, echo) -> int:
    import kmerge

    pairs = []
    for tap in args.taps:
        path, sep, layers = tap.rpartition(":")
        if not sep or not path or not layers:
            raise InvalidArgumentError(f"tap {tap!r}: use MODEL:LAYER or MODEL:LAYER1,LAYER2")
        refs = [int(r) if r.lstrip("-").isdigit() else r for r in layers.split(",")]
        pairs.append((path, refs))
    head = parse_head(args.head, args.seed)
    data = _prepare(args, echo, [p for p, _ in pairs])
    names = source_names([p for p, _ in pairs])
    models = load_all(names)
    taps = {n: (models[n], refs if len(refs) > 1 else refs[0])
            for n, (_, refs) in zip(names, pairs)}
    m = kmerge.fuse(taps, combine=args.combine, head=head, pooling=args.pooling,
                    freeze=not args.no_freeze, keep_outputs=args.keep_outputs,
                    dry_run=args.dry_run)
    return _finish(m, args, echo, models, data)


COMMANDS = {"sequential": _sequential, "parallel": _parallel, "fuse": _fuse}
