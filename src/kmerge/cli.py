"""The ``kmerge`` command line. Holds no merge logic; Keras is imported only by the
subcommands that need it, so ``kmerge --help`` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kmerge.errors import KmergeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kmerge", description="Merge trained Keras models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train two models on digits, merge them three ways")
    demo.add_argument("--out", help="directory for the demo's files (default: a temp dir)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")

    ins = sub.add_parser("inspect", help="layers, shapes, parameters, repairs, tap points")
    ins.add_argument("model", help="a .keras, .h5 file or SavedModel directory")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--unsafe", action="store_true",
                     help="load with safe_mode=False (only for files you trust)")
    return p


def _demo(args) -> int:
    from kmerge.demo import run

    run(args.out, epochs=args.epochs)
    return 0


def _inspect(args) -> int:
    from kmerge.inspect import summarize
    from kmerge.io import load

    summary = summarize(load(args.model, safe_mode=not args.unsafe))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary)
    return 0


_COMMANDS = {"demo": _demo, "inspect": _inspect}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 kmerge error, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return _COMMANDS[args.command](args)
    except KmergeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
