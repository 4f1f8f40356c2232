"""kmerge: merge trained Keras models, correctly by construction.

>>> import kmerge
>>> m = kmerge.parallel({"a": a, "b": b}, combine="concat",
...                     head=kmerge.heads.classifier(10))

The public names below are imported on first use, so ``import kmerge`` (and the
``kmerge`` command line) stays fast and does not import Keras until it is needed. kmerge's
own layers are registered with Keras as soon as Keras is imported, so a saved merge loads
with plain ``keras.models.load_model`` after ``import kmerge``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "kmerge.io",
    "save": "kmerge.io",
    "load_info": "kmerge.io",
    "sequential": "kmerge.graph.sequential",
    "parallel": "kmerge.graph.parallel",
    "fuse": "kmerge.graph.fuse",
    "probe": "kmerge.probing",
    "ProbeResult": "kmerge.probing",
    "verify": "kmerge.verification",
    "info": "kmerge.metadata",
    "merge_weights": "kmerge.weights.apply",
    "merge_methods": "kmerge.weights.methods",
    "align": "kmerge.weights.align",
    "fit_head": "kmerge.training.fit",
    "fine_tune": "kmerge.training.fit",
    "stitch": "kmerge.stitching",
    "distill": "kmerge.distillation",
    "students": "kmerge.students",  # a module
    "heads": "kmerge.graph.heads",  # a module: kmerge.heads.classifier(...)
    "combine_ops": "kmerge.graph.combine",
    "Plan": "kmerge.graph.build",
    "VerifyReport": "kmerge.verification",
    "errors": "kmerge.errors",  # a module
    "io": "kmerge.io",  # a module
}
_MODULES = {"heads", "errors", "io", "students"}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kmerge' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name in _MODULES else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def _register_layers() -> None:
    importlib.import_module("kmerge.graph.layers")
    importlib.import_module("kmerge.legacy_activations")  # exact Keras 2 hard_sigmoid


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Registers kmerge's layers right after ``keras`` finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_layers()

        spec.loader.exec_module = exec_then_register
        return spec


if "keras" in sys.modules:
    _register_layers()
elif not any(isinstance(f, _AfterKerasImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterKerasImport())
