"""The training API in one place (the code lives in :mod:`kmerge.training`).

``from kmerge.train import fit_head, fine_tune, split, StaleCacheWarning`` keeps working.
"""

from kmerge.training.data import device_count
from kmerge.training.fit import StaleCacheWarning, choose_layers, fine_tune, fit_head
from kmerge.training.losses import check_labels, infer_loss, output_activation
from kmerge.training.split import Split, split

__all__ = [
    "StaleCacheWarning", "Split", "check_labels", "choose_layers", "device_count", "fine_tune",
    "fit_head", "infer_loss", "output_activation", "split",
]
