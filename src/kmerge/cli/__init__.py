"""The ``kmerge`` command line. Holds no merge logic; Keras is imported only by the
subcommands that need it, so ``kmerge --help``, ``list``, ``schema`` and ``validate`` stay fast.

Exit codes: 0 success, 1 a kmerge error (one line ``error: ...`` on stderr, no traceback
unless ``--debug``) or a closed output pipe (``kmerge schema | head``: quiet), 2 usage,
130 interrupted (Ctrl-C: ``interrupted`` on stderr). Nothing is written when a command fails.
An unexpected exception (a bug) keeps its traceback.

One module per group of commands (``merge_commands``, ``weights_command``, ``probe_command``,
``recipe_commands``, ``info_commands``), each with a ``COMMANDS`` table; the parser is in
``parser``, what they share in ``common``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from kmerge._warnings import one_line, routed
from kmerge.cli import (
    info_commands,
    merge_commands,
    probe_command,
    recipe_commands,
    weights_command,
)
from kmerge.cli.common import (
    HEADS,
    model_arg,
    parse_head,
    parse_params,
    parse_weights,
    warn,
)
from kmerge.cli.info_commands import COMBINE_DESCRIPTIONS, descriptions
from kmerge.cli.merge_commands import untrained_parts
from kmerge.cli.parser import build_parser
from kmerge.errors import KmergeError

__all__ = ["COMBINE_DESCRIPTIONS", "HEADS", "build_parser", "descriptions", "main", "model_arg",
           "parse_head", "parse_params", "parse_weights", "untrained_parts"]

_COMMANDS = {**info_commands.COMMANDS, **merge_commands.COMMANDS, **probe_command.COMMANDS,
             **weights_command.COMMANDS, **recipe_commands.COMMANDS}


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


_KERAS_FREE = {"list", "schema", "validate"}  # commands that never import Keras


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "dry_run", True) is False and not args.output:  # a merge command
            args._parser.error("the following arguments are required: -o/--output (or "
                               "--dry-run to print the plan only)")
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)

    def echo(text: str) -> None:
        if not args.quiet:
            print(text)

    try:
        if args.command not in _KERAS_FREE:
            from kmerge._backend import choose_backend, quiet_tensorflow_import

            choose_backend()  # an installed backend, whatever keras.json says (one-line note)
            if not args.debug:  # TensorFlow's native log lines when (if) it loads
                quiet_tensorflow_import()
        with routed(warn):  # kmerge's own warnings as one 'warning: ...' line each
            code = _COMMANDS[args.command](args, echo)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except KmergeError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
