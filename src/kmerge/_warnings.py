"""kmerge's own warnings (and errors) as one line each, for the command line and recipe runs.

A Python warning prints as ``/path/to/kmerge/runner.py:704: MergeCollapseWarning: ...``
followed by a source line; the CLI prints ``warning: ...`` instead (one line, no path).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator


def one_line(message: object) -> str:
    """A (multi-line) message or exception as one line, its lines joined with ``; ``."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


@contextlib.contextmanager
def routed(warn: Callable[[str], None], prefix: str = "") -> Iterator[None]:
    """Inside, warnings raised by kmerge's modules go to ``warn(prefix + one line)``; other
    warnings are re-emitted as they were (the caller's filters apply). Each distinct warning
    (text, category and place) is said once, as Python's default filter does: a warning
    raised in a training loop is not repeated per batch. Also when the body raises: what was
    warned before the error is still said."""
    pending: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pending = caught
            yield
    finally:
        seen: set = set()
        for w in pending:
            key = (w.category, str(w.message), w.filename, w.lineno)
            if key in seen:
                continue
            seen.add(key)
            if type(w.message).__module__.startswith("kmerge"):
                warn(prefix + one_line(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
