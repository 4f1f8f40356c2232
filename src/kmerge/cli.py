"""The ``kmerge`` command line. Holds no merge logic; Keras is imported only by the
subcommands that need it, so ``kmerge --help``, ``list``, ``schema`` and ``validate`` stay fast.

Exit codes: 0 success, 1 a kmerge error (one line ``error: ...`` on stderr, no traceback
unless ``--debug``) or a closed output pipe (``kmerge schema | head``: quiet), 2 usage,
130 interrupted (Ctrl-C: ``interrupted`` on stderr). Nothing is written when a command fails.
An unexpected exception (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from kmerge.errors import InvalidArgumentError, KmergeError
from kmerge.metadata import meta_of

HEADS = ("classifier", "regressor")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmerge", description="Merge trained Keras models.",
        epilog="A MODEL is a .keras or .h5 file, a SavedModel directory, or ARCH.json+WEIGHTS "
               "(a model.to_json() architecture and its save_weights file). Exit codes: 0 ok, "
               "1 error (one 'error: ...' line), 2 usage, 130 interrupted.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors and results")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train two models on digits, merge them three ways")
    demo.add_argument("--out", help="directory for the demo's files (default: a temp dir)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")

    ins = sub.add_parser("inspect", help="layers, shapes, parameters, repairs, tap points")
    ins.add_argument("model", help="a .keras, .h5 file, SavedModel directory or "
                                   "ARCH.json+WEIGHTS")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--unsafe", action="store_true",
                     help="load with safe_mode=False (only for files you trust)")

    def merge_common(sp):
        sp.add_argument("-o", "--output", required=True, help="where to save the merge (.keras)")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output")
        sp.add_argument("--no-freeze", action="store_true", help="leave the sources trainable")
        sp.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")

    seq = sub.add_parser("sequential", help="chain models: each output feeds the next")
    seq.add_argument("models", nargs="+", metavar="MODEL")
    seq.add_argument("--adapter", choices=("auto", "none"), default="auto")
    merge_common(seq)

    par = sub.add_parser("parallel", help="models side by side, outputs combined")
    par.add_argument("models", nargs="+", metavar="MODEL")
    par.add_argument("--combine", default="concat", help="combine op (kmerge list combine-ops)")
    par.add_argument("--head", help="classifier:N[:H1,H2] or regressor:N[:H1,...]")
    par.add_argument("--weights", help="comma-separated weights for --combine weighted")
    par.add_argument("--adapter", choices=("auto", "none"), default="none")
    merge_common(par)

    fus = sub.add_parser("fuse", help="tap intermediate layers, fuse them, add a head")
    fus.add_argument("taps", nargs="+", metavar="MODEL:LAYER[,LAYER]")
    fus.add_argument("--combine", default="concat")
    fus.add_argument("--head", help="classifier:N[:H1,H2] or regressor:N[:H1,...]")
    fus.add_argument("--pooling", choices=("auto", "avg", "max", "none"), default="auto")
    merge_common(fus)

    wts = sub.add_parser("weights", help="weight-space merge of same-architecture models")
    wts.add_argument("models", nargs="+", metavar="MODEL")
    wts.add_argument("--method", required=True, help="merge method (kmerge list methods)")
    wts.add_argument("--base", help="the pretrained base model (task arithmetic, TIES, DARE)")
    wts.add_argument("--align", choices=("weights", "activations"))
    wts.add_argument("--param", action="append", default=[], metavar="K=V",
                     help="method parameter, e.g. --param density=0.2 (repeatable)")
    wts.add_argument("-o", "--output", required=True)
    wts.add_argument("--overwrite", action="store_true")

    for name, text in (("run", "run a YAML recipe"), ("validate", "check a recipe, load nothing"),
                       ("plan", "validate a recipe and print each merge's plan")):
        r = sub.add_parser(name, help=text)
        r.add_argument("recipe")
        if name in ("run", "validate"):  # validate checks the outputs run would write
            r.add_argument("-o", "--output-dir",
                           help="save outputs here (an existing folder) instead of the recipe's "
                                "paths")
            r.add_argument("--report", metavar="DIR", help="write report.md, figures, report.json")

    ver = sub.add_parser("verify", help="check a saved merge against its source files")
    ver.add_argument("merged")
    ver.add_argument("sources", nargs="+", metavar="[NAME=]PATH")
    ver.add_argument("--json", action="store_true")

    lst = sub.add_parser("list", help="list methods, combine ops or heads")
    lst.add_argument("what", choices=("methods", "combine-ops", "heads"))

    sub.add_parser("schema", help="print the recipe JSON Schema")
    return p


# -- helpers -----------------------------------------------------------------------------------
def parse_head(text: str | None):
    """``classifier:10:64,32`` -> ``kmerge.heads.classifier(10, hidden=[64, 32])``."""
    if not text:
        return None
    parts = text.split(":")
    if parts[0] not in HEADS or len(parts) not in (2, 3):
        raise InvalidArgumentError(
            f"--head {text!r}: use classifier:N[:H1,H2,...] or regressor:N[:H1,...]")
    try:
        units = int(parts[1])
        hidden = [int(h) for h in parts[2].split(",")] if len(parts) == 3 and parts[2] else []
    except ValueError:
        raise InvalidArgumentError(f"--head {text!r}: sizes must be integers") from None
    import kmerge

    try:
        return getattr(kmerge.heads, parts[0])(units, hidden=hidden)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"--head {text!r}: {exc}") from None


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def parse_params(items: Sequence[str], method: str | None = None) -> dict:
    """``["density=0.2", "seed=3"]`` -> ``{"density": 0.2, "seed": 3}``; with ``method``, each
    value is checked against the type in that method's signature."""
    from kmerge.recipe import param_problem

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--param {item!r}: use KEY=VALUE, e.g. density=0.2")
        out[key] = _parse_value(value)
        problem = param_problem(method, key, out[key]) if method else None
        if problem:
            raise InvalidArgumentError(f"--param {item!r}: {problem}")
    return out


def parse_weights(text: str | None) -> list[float] | None:
    """``--weights 1,3`` -> ``[1.0, 3.0]``."""
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(
            f"--weights {text!r}: use comma-separated numbers, one per model, e.g. 1,3") from None
    if not all(math.isfinite(w) for w in weights):
        raise InvalidArgumentError(f"--weights {text!r}: weights must be finite numbers")
    return weights


def _names(paths: Sequence[str]) -> dict[str, str]:
    """Source names from file names (``model_a.h5`` -> ``model_a``), made unique."""
    out: dict[str, str] = {}
    for p in paths:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in Path(p).name.split(".")[0])
        base = base if base[:1].isalpha() else f"m_{base}"
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out[name] = p
    return out


_JSON_ARG = re.compile(r"(?P<arch>.+\.json)\+(?P<weights>.+)", re.IGNORECASE)


def model_arg(text: str) -> tuple[str, str | None]:
    """A model argument: a path, or ``ARCH.json+WEIGHTS`` (a ``model.to_json()`` architecture
    and its ``save_weights`` file) -> ``(path, weights or None)``."""
    m = _JSON_ARG.fullmatch(text)
    if m and not Path(text).exists():
        return m["arch"], m["weights"]
    if text.lower().endswith(".json"):
        raise InvalidArgumentError(
            f"{text}: a JSON architecture needs its weights file; pass {text}+WEIGHTS.h5 "
            "(the file written by model.save_weights)")
    return text, None


def _files(texts: Sequence[str]) -> list[str]:
    """Every file the model arguments name (architectures and weights)."""
    return [p for t in texts for p in model_arg(t) if p]


def _load_one(text: str, *, safe_mode: bool = True):
    from kmerge.io import load

    path, weights = model_arg(text)
    return load(path, safe_mode=safe_mode, weights=weights)


def _check_output(path: str, overwrite: bool, sources: Sequence[str]) -> None:
    """Fail before any work when the output cannot be written."""
    target = Path(path).expanduser().resolve()
    if any(target == Path(s).expanduser().resolve() for s in _files(sources)):
        raise InvalidArgumentError(f"-o {path} is one of the source files; choose another path")
    if target.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise InvalidArgumentError(f"directory {target.parent} does not exist; create it first")


def _load_all(paths: dict[str, str]) -> dict:
    return {n: _load_one(p) for n, p in paths.items()}


def _finish(model, args, echo) -> int:
    import kmerge

    if args.dry_run:
        print(model)
        return 0
    saved = kmerge.save(model, args.output, overwrite=args.overwrite)
    for step in meta_of(model).get("adapters", []):
        echo(f"adapter {step['where']}: {step['step']}")
    echo(f"saved {saved}")
    return 0


# -- commands ----------------------------------------------------------------------------------
def _demo(args, echo) -> int:
    from kmerge.demo import run

    run(args.out, epochs=args.epochs, echo=print)
    return 0


def _inspect(args, echo) -> int:
    from kmerge.inspect import summarize

    if args.unsafe:
        _warn(f"{args.model}: loading with safe_mode off (--unsafe): Lambda layers in it run "
              "their Python code; only for files you trust")
    summary = summarize(_load_one(args.model, safe_mode=not args.unsafe))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary)
    return 0


def _sequential(args, echo) -> int:
    import kmerge

    if not args.dry_run:
        _check_output(args.output, args.overwrite, args.models)
    models = _load_all(_names(args.models))
    m = kmerge.sequential(models, adapter=args.adapter, freeze=not args.no_freeze,
                          dry_run=args.dry_run)
    return _finish(m, args, echo)


def _parallel(args, echo) -> int:
    import kmerge

    weights = parse_weights(args.weights)
    head = parse_head(args.head)
    if not args.dry_run:
        _check_output(args.output, args.overwrite, args.models)
    models = _load_all(_names(args.models))
    m = kmerge.parallel(models, combine=args.combine, head=head, freeze=not args.no_freeze,
                        weights=weights, adapter=args.adapter, dry_run=args.dry_run)
    return _finish(m, args, echo)


def _fuse(args, echo) -> int:
    import kmerge

    pairs = []
    for tap in args.taps:
        path, sep, layers = tap.rpartition(":")
        if not sep or not path or not layers:
            raise InvalidArgumentError(f"tap {tap!r}: use MODEL:LAYER or MODEL:LAYER1,LAYER2")
        refs = [int(r) if r.lstrip("-").isdigit() else r for r in layers.split(",")]
        pairs.append((path, refs))
    head = parse_head(args.head)
    if not args.dry_run:
        _check_output(args.output, args.overwrite, [p for p, _ in pairs])
    names = _names([p for p, _ in pairs])
    models = _load_all(names)
    taps = {n: (models[n], refs if len(refs) > 1 else refs[0])
            for n, (_, refs) in zip(names, pairs)}
    m = kmerge.fuse(taps, combine=args.combine, head=head, pooling=args.pooling,
                    freeze=not args.no_freeze, dry_run=args.dry_run)
    return _finish(m, args, echo)


def _weights(args, echo) -> int:
    import kmerge

    params = parse_params(args.param, args.method)
    _check_output(args.output, args.overwrite, [*args.models, *([args.base] if args.base else [])])

    models = [_load_one(p) for p in args.models]
    base = _load_one(args.base) if args.base else None
    m = kmerge.merge_weights(models, method=args.method, base=base, align=args.align, **params)
    echo(f"saved {kmerge.save(m, args.output, overwrite=args.overwrite)}")
    return 0


def _validate(args, echo) -> int:
    from kmerge.recipe import check_outputs, load_recipe, unsafe_warnings

    recipe = load_recipe(args.recipe)
    outputs = check_outputs(recipe, out_dir=args.output_dir, report=args.report)
    for line in unsafe_warnings(recipe):
        _warn(line)
    echo(f"{args.recipe}: OK ({len(recipe.models)} models, {len(recipe.steps)} steps: "
         f"{', '.join(s.kind for s in recipe.steps)})")
    for t in outputs.saves:
        echo(f"  steps[{t.step}] writes {t.path}" + (" (overwrite)" if t.overwrite else ""))
    if outputs.report is not None:
        echo(f"  --report writes {outputs.report}")
    return 0


def _plan(args, echo) -> int:
    import kmerge
    from kmerge.recipe import load_recipe, unsafe_warnings
    from kmerge.runner import build_head, freeze_arg

    recipe = load_recipe(args.recipe)
    for line in unsafe_warnings(recipe):
        _warn(line)
    models = {n: kmerge.load(**recipe.load_args(n)) for n in recipe.models}
    for i, step in enumerate(recipe.steps):
        if step.kind in ("sequential", "parallel", "fuse"):
            common = {"freeze": freeze_arg(step.freeze), "dry_run": True, "verify": False,
                      "name": step.name or f"step_{i}"}
            if step.kind == "sequential":
                plan = kmerge.sequential({m: models[m] for m in step.models},
                                         adapter=step.adapter, **common)
            elif step.kind == "parallel":
                plan = kmerge.parallel({m: models[m] for m in step.models},
                                       combine=step.combine, head=build_head(step.head),
                                       weights=step.weights, output=step.output,
                                       share_inputs=step.share_inputs, adapter=step.adapter,
                                       **common)
            else:
                plan = kmerge.fuse({m: (models[m], r) for m, r in step.taps.items()},
                                   combine=step.combine, head=build_head(step.head),
                                   pooling=step.pooling, share_inputs=step.share_inputs,
                                   adapter=step.adapter, **common)
            print(f"steps[{i}]: {plan}")
        else:
            print(f"steps[{i}]: {step.kind} " + json.dumps(
                step.model_dump(exclude={"kind"}, exclude_none=True), default=str))
    return 0


def _run(args, echo) -> int:
    from kmerge.recipe import load_recipe
    from kmerge.runner import run

    recipe = load_recipe(args.recipe)
    # run() checks every output (and --report's need for data) before any work
    run(recipe, echo=echo, out=args.output_dir, report=args.report, warn=_warn)
    return 0


def _verify(args, echo) -> int:
    from kmerge.verification import verify

    merged = _load_one(args.merged)
    meta = meta_of(merged) or {}
    by_path = {str(Path(v.get("path") or "").resolve()): n
               for n, v in meta.get("sources", {}).items() if v.get("path")}
    sources = {}
    for item in args.sources:
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            name = by_path.get(str(Path(model_arg(item)[0]).resolve()))
            if name is None:
                raise InvalidArgumentError(
                    f"{item} is not recorded as a source of {args.merged}; name it as NAME=PATH "
                    f"(sources: {', '.join(meta.get('sources', {})) or 'none recorded'})")
        sources[name] = _load_one(path)
    from kmerge.errors import VerificationError

    try:
        report = verify(merged, sources)
    except VerificationError as exc:  # the table on stdout, the one-line error on stderr
        report = getattr(exc, "report", None)
        if report is None:
            raise
        _print_report(report, args.json)
        raise
    _print_report(report, args.json)
    return 0


def _print_report(report, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": report.ok, "checks": [
            {"source": c.source, "what": c.what, "shape": list(c.shape),
             "max_abs_diff": c.max_abs_diff} for c in report.checks]}, indent=2))
    else:
        print(report)


def _list(args, echo) -> int:
    if args.what == "combine-ops":
        from kmerge.recipe import COMBINE_OPS

        names = list(COMBINE_OPS)
    elif args.what == "heads":
        names = list(HEADS)
    else:
        from kmerge.recipe import WEIGHT_EXTRA_METHODS
        from kmerge.weights.methods import merge_methods

        names = sorted([*merge_methods.names(), *WEIGHT_EXTRA_METHODS])
    print("\n".join(names))
    return 0


def _schema(args, echo) -> int:
    from kmerge.recipe import schema

    print(json.dumps(schema(), indent=2))
    return 0


_COMMANDS = {
    "demo": _demo, "inspect": _inspect, "sequential": _sequential, "parallel": _parallel,
    "fuse": _fuse, "weights": _weights, "run": _run, "validate": _validate, "plan": _plan,
    "verify": _verify, "list": _list, "schema": _schema,
}


def _warn(text: str) -> None:
    """A warning line on stderr (also under --quiet)."""
    print(f"warning: {text}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 kmerge error, 2 usage,
    130 interrupted)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``kmerge schema | head``). Point stdout at devnull so the
        # interpreter's final flush does not fail again, and exit quietly (Python docs,
        # "Note on SIGPIPE").
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout replaced (tests): nothing to do
            pass
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)

    def echo(text: str) -> None:
        if not args.quiet:
            print(text)

    try:
        code = _COMMANDS[args.command](args, echo)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KmergeError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
