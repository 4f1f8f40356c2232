"""``kmerge probe``: rank every layer of the models for fusion with linear probes."""

from __future__ import annotations

import json
from pathlib import Path

from kmerge.cli.common import check_sources, load_all, load_data, model_files, source_names
from kmerge.errors import InvalidArgumentError


def _probe(args, echo) -> int:
    import kmerge
    from kmerge.runner import inputs_for

    if not args.data:
        raise InvalidArgumentError("kmerge probe needs labelled data: --data digits (or wine, "
                                   "breast_cancer, mnist_sample, a .npz or a .csv file)")
    if not args.validation_split:
        raise InvalidArgumentError("--validation-split must be above 0: the probes are scored "
                                   "on that part")
    if args.report:
        target = Path(args.report).expanduser().resolve()
        if any(target == Path(f).expanduser().resolve() for f in model_files(args.models)):
            raise InvalidArgumentError(f"--report {args.report} is a source file; choose a "
                                       "folder")
        if target.exists() and not target.is_dir():
            raise InvalidArgumentError(f"--report {args.report} is an existing file; give a "
                                       "folder")
    if args.json:  # stdout is the JSON document alone
        def echo(text: str) -> None:
            pass
    check_sources(args.models)
    data = load_data(args, echo)
    models = load_all(source_names(args.models))
    x = {n: inputs_for(m, data.x_train) for n, m in models.items()}
    echo(f"probing {len(models)} model(s) on the training split ({len(data.x_train)} "
         "examples)")
    if args.quiet or args.json:
        result = kmerge.probe(models, x, data.y_train, pooling=args.pooling, seed=args.seed,
                              top=args.top, validation_split=args.validation_split)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("probing", total=None)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            result = kmerge.probe(models, x, data.y_train, pooling=args.pooling,
                                  seed=args.seed, top=args.top,
                                  validation_split=args.validation_split, progress=progress)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    if args.report:
        from kmerge.report import write_probe_report

        echo(f"report: {write_probe_report(args.report, result)}")
    return 0


COMMANDS = {"probe": _probe}
