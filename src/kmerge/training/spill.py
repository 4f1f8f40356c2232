"""Storage for computed features: memory, or a memory-mapped file when they do not fit."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np


def memory_budget() -> int:
    override = os.environ.get("KMERGE_CACHE_MEMORY")
    if override:
        return int(float(override))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(min(4 << 30, avail // 4))


class Spool:
    """Append batches of one array stream; keep them in memory or spill to a disk file."""

    def __init__(self, mode: str, folder: Callable[[], str], name: str):
        self.mode = mode  # "memory", "disk" or "auto"
        self.folder = folder
        self.name = name
        self.parts: list[np.ndarray] = []
        self.bytes = 0
        self.file = None
        self.path = ""
        self.n = 0
        self.tail: tuple = ()
        self.dtype = None

    def add(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        if self.dtype is None:
            self.dtype, self.tail = a.dtype, a.shape[1:]
        self.n += len(a)
        if self.file is None and (self.mode == "disk" or (
                self.mode == "auto" and self.bytes + a.nbytes > memory_budget())):
            self.path = os.path.join(self.folder(), f"{self.name}.bin")
            self.file = open(self.path, "wb")  # noqa: SIM115 (closed in finish)
            for p in self.parts:
                self.file.write(p.tobytes())
            self.parts = []
        if self.file is not None:
            self.file.write(a.tobytes())
        else:
            self.parts.append(a)
        self.bytes += a.nbytes

    def finish(self) -> np.ndarray:
        if self.file is not None:
            self.file.close()
            return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n, *self.tail))
        return np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]

    @property
    def on_disk(self) -> bool:
        return self.file is not None
