"""``kmerge demo``, ``inspect``, ``verify``, ``list`` and ``schema``: everything that
describes models, merges and kmerge itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kmerge.cli.common import HEADS, load_one, model_arg, warn
from kmerge.errors import InvalidArgumentError
from kmerge.metadata import meta_of


def _demo(args, echo) -> int:
    from kmerge.demo import run

    run(args.out, epochs=args.epochs, echo=print)
    return 0


def _inspect(args, echo) -> int:
    from kmerge.inspect import summarize

    if args.unsafe:
        warn(f"{args.model}: loading with safe_mode off (--unsafe): Lambda layers in it run "
         "their Python code; only for files you trust")
    summary = summarize(load_one(args.model, safe_mode=not args.unsafe))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary)
    return 0


def _verify(args, echo) -> int:
    from kmerge.verification import verify

    merged = load_one(args.merged)
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
        sources[name] = load_one(path)
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


#: One line per combine op (kmerge.graph.combine registers them as lambdas and Keras layers,
#: which carry no description of their own); a test keeps it equal to the registry.
COMBINE_DESCRIPTIONS = {
    "add": "element-wise sum (equal shapes)",
    "average": "element-wise mean (equal shapes)",
    "concat": "concatenate along the last axis (shapes may differ there)",
    "gate": "trainable input-dependent softmax gate over the branches (a small mixture of "
            "experts; starts uniform)",
    "learned_weights": "one trainable softmax weight per branch (starts at the plain average)",
    "maximum": "element-wise maximum (equal shapes)",
    "minimum": "element-wise minimum (equal shapes)",
    "multiply": "element-wise product (equal shapes)",
    "stack": "stack the branches on a new axis (equal shapes)",
    "weighted": "fixed weighted sum, --weights W1,W2,... (normalised to sum 1)",
}


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring on one line, without reST markup."""
    first = (doc or "").strip().split("\n\n")[0].replace("``", "")
    return " ".join(re.sub(r":\w+:`~?([^`]*)`", r"\1", first).split())


def _docstring(module: str, function: str) -> str:
    """The docstring of ``module.function``, read from its source without importing it
    (``kmerge list`` never imports Keras)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec(module).origin
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_docstring(node) or ""
    return ""


def descriptions(what: str) -> dict[str, str]:
    """``kmerge list``: each name with its one-line description, from the registries'
    docstrings (methods, heads) or :data:`COMBINE_DESCRIPTIONS`."""
    if what == "combine-ops":
        from kmerge.recipe import COMBINE_OPS

        return {n: COMBINE_DESCRIPTIONS.get(n, "") for n in COMBINE_OPS}
    if what == "heads":
        return {n: _summary(_docstring("kmerge.graph.heads", n))
                + f" [--head {n}:N[:H1,H2,...]]" for n in HEADS}
    import inspect

    from kmerge.recipe import WEIGHT_EXTRA_METHODS
    from kmerge.weights.methods import merge_methods, supplied_params

    out = {}
    for name in merge_methods.names():
        fn = merge_methods.get(name)
        supplied = supplied_params(fn)
        needs = [flag for flag, wanted in (("--base", "base" in supplied and supplied["base"]),
                                           ("--data", {"fishers", "grams"} & set(supplied)))
                 if wanted]
        out[name] = _summary(inspect.getdoc(fn)) + (f" [needs {', '.join(needs)}]"
                                                    if needs else "")
    for name in WEIGHT_EXTRA_METHODS:  # methods of merge_weights itself (_greedy_soup, ...)
        out[name] = _summary(_docstring("kmerge.weights.apply", f"_{name}")) + \
            " [needs --data with labels]"
    return dict(sorted(out.items()))


def _list(args, echo) -> int:
    items = descriptions(args.what)
    width = max(map(len, items))
    print("\n".join(f"{name.ljust(width)}  {text}".rstrip() for name, text in items.items()))
    return 0


def _schema(args, echo) -> int:
    from kmerge.recipe import schema

    print(json.dumps(schema(), indent=2))
    return 0


COMMANDS = {"demo": _demo, "inspect": _inspect, "verify": _verify, "list": _list,
            "schema": _schema}
