"""Weight-space merges: models of one architecture in, one model of that architecture out.

>>> from kmerge.weights import merge_weights, merge_weights_files
>>> m = merge_weights([a, b], method="linear")  # doctest: +SKIP
>>> merge_weights_files(["a.keras", "b.keras"], "soup.keras", method="linear")  # doctest: +SKIP
"""

from __future__ import annotations

from kmerge.weights.apply import MergeCollapseWarning, merge_weights, method_names
from kmerge.weights.methods import merge_methods
from kmerge.weights.stream import merge_weights_files

__all__ = ["merge_weights", "merge_weights_files", "merge_methods", "method_names",
           "MergeCollapseWarning"]
