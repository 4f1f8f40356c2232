"""The command line's choice of Keras backend, made before Keras is imported.

Keras reads its backend from ``KERAS_BACKEND`` or, failing that, from ``keras.json`` in
``KERAS_HOME`` (default ``~/.keras``), and its import fails with a traceback when that backend is
not installed: a machine whose ``keras.json`` says ``tensorflow`` (Keras writes that file on first
import, and other projects leave it behind) cannot run a kmerge installed with the jax extra. The
CLI therefore falls back to an installed backend and says so in one line; an explicit
``KERAS_BACKEND`` naming a missing backend is an error (the user asked for it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from kmerge.errors import KmergeError

__all__ = ["BACKENDS", "choose_backend", "configured_backend", "quiet_tensorflow_import"]

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


def quiet_tensorflow_import() -> None:
    """Make TensorFlow's first import, whenever it happens, run with the process's stderr
    (file descriptor 2) pointed at ``/dev/null``.

    TensorFlow's C++ libraries write log lines while they load (absl's ``WARNING: All log
    messages before absl::InitializeLog() is called ...``, oneDNN's and the CPU feature guard's
    ``I0000`` notes) that ``TF_CPP_MIN_LOG_LEVEL`` does not silence. Keras imports TensorFlow
    on the tensorflow backend, and on every backend when it reads a Keras 2 ``.h5`` file (if
    TensorFlow is installed): two to four lines before a command's output that are not
    kmerge's and that no user action clears. The command line calls this first (not with
    ``--debug``); nothing is imported here, and an import error still raises, after stderr is
    back. A no-op when TensorFlow is imported already or not installed."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlow())


class _QuietTensorFlow:
    """A meta path finder for the top-level ``tensorflow`` package only: the real spec, with
    a loader that runs the package's code (where the native libraries load) with fd 2
    silenced. Removes itself on first use."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilencedLoader(spec.loader)
        return spec


class _SilencedLoader:
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, attr):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, attr)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with _stderr_silenced():
            self.loader.exec_module(module)


@contextlib.contextmanager
def _stderr_silenced():
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded): as it is
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
