"""Test-run speed settings (jax only): a persistent XLA compilation cache and fast codegen.

Where the jax suite spends its time (issue 10 item 8, measured with ``jax.monitoring``'s
compile events in a first run, 1055 tests): ~3200 compile requests, ~1750 of them new
programs; with the default codegen XLA's backend compile was most of the CPU time. Keras builds
a fresh train/predict function for every model, so two models with the same architecture
compile the same program twice; kmerge's own compiled path does the same across tests. jax's
persistent compilation cache is keyed by the optimized program (debug information, i.e. layer
names, excluded), the jax/jaxlib version, the XLA flags and the device, so a hit returns the
very executable a compile would have produced: no test sees anything different, and nothing
about the code under test changes. Separately, :func:`fast_codegen` makes XLA's CPU code
generation cheap (see there: the cold run's biggest saving).

* within one run, repeated programs are compiled once (~1430 of the ~3200 requests hit);
* across runs, a second ``make test`` finds most programs compiled already.

``KMERGE_TEST_JAX_CACHE=0`` turns it off; ``KMERGE_TEST_JAX_CACHE=/some/dir`` puts it there
(default: ``<tmp>/kmerge-test-jax-cache-<uid>``, pruned to half of 512 MB, oldest entries
first, when a test run starts over 512 MB: :func:`prune`; a first full run writes ~17 MB). The
environment variables are also set, so the suite's subprocesses (CLI, multi-device) use the
same cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MAX_BYTES = 512 * 1024 * 1024


def cache_dir() -> Path | None:
    """The cache folder for this run, or None when turned off."""
    setting = os.environ.get("KMERGE_TEST_JAX_CACHE", "")
    if setting.lower() in ("0", "off", "no", "false"):
        return None
    if setting and setting.lower() not in ("1", "on", "yes", "true"):
        return Path(setting)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"kmerge-test-jax-cache-{uid}"


def fast_codegen() -> bool:
    """Compile the tests' programs with XLA's cheapest CPU code generation (jax only).

    Cold, the suite spends most of its time in XLA's CPU backend compiling a few thousand
    small programs it runs a handful of times each. Two flags leave HLO optimisation (fusion,
    CSE) as it is, so the graphs XLA runs are the same; only the machine code of each fusion
    is made more cheaply:

    * ``--xla_backend_optimization_level=0``: LLVM does not optimise the generated code;
    * ``--xla_cpu_use_fusion_emitters=false`` (jaxlibs that know it): fusions are emitted by
      XLA's elemental emitter instead of the MLIR fusion emitters, which cost most of the
      remaining compile time for small programs.

    Measured on 2 cores, quiet, ``make test``'s command with a fresh ``KMERGE_TEST_JAX_CACHE``
    folder (a first run on a fresh machine), ``/usr/bin/time`` for wall and CPU: XLA's defaults
    602 s wall / 960 s CPU (1052 tests); level 0 alone 358 s / 667 s (1052 tests); both flags
    209 s / 355 s (1055 tests, with a per-test profiler attached); ``/usr/bin/time make test``
    itself: 190 s / 319 s, and 125 s / 227 s with the cache warm; after :func:`prune` replaced
    jax's own eviction, 132 s / 251 s first and 105 s / 199 s warm (1060 tests). Results
    may differ from the default codegen in the last bits (operation order inside a fusion);
    every bit-exact comparison in the suite compares two results computed in one process
    under the same flags, and the suite passes with either setting.
    ``KMERGE_TEST_XLA_FAST=0`` keeps XLA's defaults. Returns whether flags were added."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        return False
    if os.environ.get("KMERGE_TEST_XLA_FAST", "1").lower() in ("0", "off", "no", "false"):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags:
        return False  # the caller chose (or a parent test process did: subprocesses inherit)
    added = ["--xla_backend_optimization_level=0"]
    if _jaxlib_knows("xla_cpu_use_fusion_emitters"):
        added.append("--xla_cpu_use_fusion_emitters=false")
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return True


def _jaxlib_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA defines ``flag``: XLA aborts the process on an
    unknown flag in ``XLA_FLAGS``, and which flags exist depends on the jaxlib release. The
    flag's name is a string in the library that parses it (found without importing jax)."""
    import importlib.util
    import mmap

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = flag.encode()
    for folder in spec.submodule_search_locations:
        for lib in sorted(Path(folder).rglob("*.so")):
            try:
                if lib.stat().st_size < 1 << 20:
                    continue  # the shims; XLA lives in the big libraries
                with lib.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(needle) >= 0:
                        return True
            except (OSError, ValueError):
                continue
    return False


def configure() -> Path | None:
    """Turn the cache on when the backend is jax; returns its folder (None: not used)."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        return None
    fast_codegen()
    path = cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable temp dir costs speed, never a test
    env = {"JAX_COMPILATION_CACHE_DIR": str(path),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # tiny models: cache all
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
           # the suite's subprocesses (CLI tests count their stderr lines): a failed cache
           # read or write is a recompile, as in pyproject.toml's filterwarnings
           "PYTHONWARNINGS": ",".join(dict.fromkeys(filter(None, [
               *os.environ.get("PYTHONWARNINGS", "").split(","),
               "ignore:Error reading persistent compilation cache entry:UserWarning",
               "ignore:Error writing persistent compilation cache entry:UserWarning"])))}
    prune(path)
    for key, value in env.items():  # subprocesses inherit them; the caller's own win
        os.environ.setdefault(key, value)
    os.environ["PYTHONWARNINGS"] = env["PYTHONWARNINGS"]  # the caller's entries kept in it
    try:
        import jax
    except ImportError:
        return None
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
    return path


def prune(path: Path, max_bytes: int = MAX_BYTES) -> int:
    """Keep the cache folder under ``max_bytes``: when it is over, delete the entries written
    longest ago until it holds half of it. Returns the bytes deleted.

    jax can bound the folder itself (``jax_compilation_cache_max_size``), but then every write
    lists and reads the access times of all entries under a file lock: measured on 2 cores,
    a first ``make test`` took 190 s with it and 134 s without. This runs once per test
    process instead. A process killed between jax's two writes (entry, access time) also left
    entries that broke every later write; without jax's eviction there is no second file."""
    try:
        entries = [(f.stat().st_mtime, f.stat().st_size, f) for f in path.iterdir()
                   if f.is_file()]
    except OSError:
        return 0
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return 0
    freed = 0
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total - freed <= max_bytes // 2:
            break
        try:
            f.unlink()
            freed += size
        except OSError:
            pass  # another test process pruned it first
    return freed
