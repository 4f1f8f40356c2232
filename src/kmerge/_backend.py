"""The command line's choice of Keras backend, made before Keras is imported.

Keras reads its backend from ``KERAS_BACKEND`` or, failing that, from ``keras.json`` in
``KERAS_HOME`` (default ``~/.keras``), and its import fails with a traceback when that backend is
not installed: a machine whose ``keras.json`` says ``tensorflow`` (Keras writes that file on first
import, and other projects leave it behind) cannot run a kmerge installed with the jax extra. The
CLI therefore falls back to an installed backend and says so in one line; an explicit
``KERAS_BACKEND`` naming a missing backend is an error (the user asked for it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from kmerge.errors import KmergeError

__all__ = ["BACKENDS", "choose_backend", "configured_backend", "import_quietly"]

#: Backend name -> the module it needs, in the order kmerge prefers them.
BACKENDS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def _installed(name: str) -> bool:
    module = BACKENDS.get(name, name)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _keras_imported() -> bool:
    return "keras" in sys.modules


def configured_backend() -> tuple[str, str]:
    """(backend, where it was set): ``KERAS_BACKEND``, the ``keras.json`` file, or Keras's
    default (tensorflow)."""
    env = os.environ.get("KERAS_BACKEND")
    if env:
        return env, "the KERAS_BACKEND environment variable"
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    config = home / "keras.json"
    try:
        backend = json.loads(config.read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    if isinstance(backend, str) and backend:
        return backend, str(config)
    return "tensorflow", "Keras's default"


def choose_backend(note=lambda text: print(text, file=sys.stderr)) -> str | None:
    """Make sure Keras will import an installed backend; returns the backend chosen, or None
    when Keras is already imported (too late to choose: nothing is changed).

    Raises:
        KmergeError: ``KERAS_BACKEND`` names a backend that is not installed, or no backend
            is installed at all.
    """
    if _keras_imported():
        return None
    backend, where = configured_backend()
    if _installed(backend):
        return backend
    if where.startswith("the KERAS_BACKEND"):
        raise KmergeError(
            f"KERAS_BACKEND={backend} but {BACKENDS.get(backend, backend)!r} is not installed; "
            f"install it (pip install 'kmerge[{backend}]') or set KERAS_BACKEND to one of: "
            f"{', '.join(n for n in BACKENDS if _installed(n)) or 'none installed'}")
    for name in BACKENDS:
        if _installed(name):
            os.environ["KERAS_BACKEND"] = name
            note(f"note: Keras is set to '{backend}' ({where}), which is not installed; using "
                 f"'{name}' (set KERAS_BACKEND to choose)")
            return name
    raise KmergeError(
        f"no Keras backend is installed (Keras is set to '{backend}' in {where}); install one: "
        "pip install 'kmerge[jax]' (or [tensorflow] / [torch])")


def import_quietly(backend: str | None) -> None:
    """Import TensorFlow (``backend == "tensorflow"``) with the process's stderr (file
    descriptor 2) pointed at ``/dev/null``; other backends: nothing is done.

    TensorFlow's C++ libraries write log lines while they load (absl's ``WARNING: All log
    messages before absl::InitializeLog() is called ...``, oneDNN's and the CPU feature guard's
    ``I0000`` notes) that ``TF_CPP_MIN_LOG_LEVEL`` does not silence: four lines before every
    command's output that are not kmerge's and that no user action clears. The command line
    calls this before Keras is imported (not ``--debug``); an import error still raises, after
    stderr is back."""
    if backend != "tensorflow" or "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded): import as is
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
