"""Every exception kmerge raises.

Each error subclasses :class:`KmergeError` and the built-in exception callers would
naturally catch (``ValueError``, ``KeyError``, ``OSError``), so ``except ValueError``
keeps working for code that does not know kmerge.
"""

from __future__ import annotations


class KmergeError(Exception):
    """Root of every error kmerge raises on purpose."""


class ModelLoadError(KmergeError, OSError):
    """A file or directory could not be loaded as a Keras model."""


class SaveError(KmergeError, OSError):
    """A model could not be written where asked (nothing was written)."""


class InvalidModelError(KmergeError, TypeError):
    """An argument that should be a built Keras model is not one."""


class IncompatibleModelsError(KmergeError, ValueError):
    """Two models (or a model and a head/adapter) cannot be joined as asked."""


class LayerNotFoundError(KmergeError, KeyError):
    """A layer reference (name, index or nested path) matches no layer."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class TapError(KmergeError, ValueError):
    """A layer exists but cannot be tapped (e.g. inside a subclassed model)."""


class InvalidArgumentError(KmergeError, ValueError):
    """An argument has a value kmerge cannot use (unknown name, bad weights, ...)."""


class VerificationError(KmergeError, AssertionError):
    """A merged model does not reproduce its sources where it must."""


class RecipeError(KmergeError, ValueError):
    """A recipe file is malformed or refers to something that does not exist."""
