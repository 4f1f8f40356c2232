"""Peak memory of merging two big models from files: streaming (CLI and API) vs the naive way.

- **naive**: load both models, ``get_weights()``, average in NumPy, ``set_weights()`` and
  save (what users write by hand).
- **cli**: ``python -m kmerge weights a.keras b.keras -o cli.keras --method linear``, the
  command users run; it streams (``merge_weights_files``) and says so.
- **api**: ``kmerge.weights.merge_weights_files([a, b], out, method="linear")``: one tensor
  per source at a time, from the HDF5 file inside each ``.keras`` archive to the output's.

Each way runs in its own subprocess; peak RSS is ``resource.getrusage`` of that process (it
includes the interpreter and the Keras/backend import, measured too); for the CLI, of the
``python -m kmerge`` process itself (``RUSAGE_CHILDREN`` of a wrapper that starts only it).
"process s" is the wall time of the whole process, import included. Prints the ratios
CLI stream / naive and API stream / naive (target <= 0.3, and time <= naive).

    KERAS_BACKEND=jax .venv/bin/python bench/bench_stream_memory.py        # WIDTH=4096 LAYERS=6
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WIDTH = int(os.environ.get("BENCH_WIDTH", 4096))
LAYERS = int(os.environ.get("BENCH_LAYERS", 6))


T_START = time.perf_counter()


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(way: str, d: Path) -> None:
    import _common  # noqa: F401  (src on sys.path, backend default)
    import keras

    t_import = _rss_mb()
    if way == "make":
        for i, name in enumerate(["a", "b"]):
            keras.utils.set_random_seed(i)
            inp = keras.Input((WIDTH,))
            x = inp
            for j in range(LAYERS):
                x = keras.layers.Dense(WIDTH, activation="relu", name=f"dense_{j}")(x)
            m = keras.Model(inp, keras.layers.Dense(10, name="out")(x), name=name)
            m.save(d / f"{name}.keras")
            del m
        print("{}")
        return
    if way == "cli":  # the command itself, in its own process
        import resource

        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "kmerge", "weights", str(d / "a.keras"),
               str(d / "b.keras"), "-o", str(d / "cli.keras"), "--method", "linear"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"kmerge weights failed:\n{out.stderr[-3000:]}")
        sec = time.perf_counter() - t0
        said = [line for line in out.stdout.splitlines() if line.startswith("streaming")]
        print(json.dumps({"way": "cli", "peak_mb": resource.getrusage(
            resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "after_import_mb": t_import,
            "seconds": None, "process_seconds": sec, "tensors": _count(d / "cli.keras"),
            "said": said}))
        return
    t0 = time.perf_counter()
    if way == "naive":
        import kmerge

        a, b = kmerge.load(d / "a.keras"), kmerge.load(d / "b.keras")
        wa, wb = a.get_weights(), b.get_weights()
        a.set_weights([(x + y) / 2 for x, y in zip(wa, wb)])
        a.save(d / "naive.keras")
        n = len(wa)
    else:
        from kmerge.weights import merge_weights_files

        out = merge_weights_files([d / "a.keras", d / "b.keras"], d / "stream.keras",
                                  method="linear")
        n = _count(out)
    sec = time.perf_counter() - t0
    print(json.dumps({"way": way, "peak_mb": _rss_mb(), "after_import_mb": t_import,
                      "seconds": sec, "tensors": n,
                      "process_seconds": time.perf_counter() - T_START}))


def _count(path: Path) -> int:
    import contextlib

    import kmerge.weights.stream as st

    with contextlib.ExitStack() as s, st._open_weights(path, s) as opened:
        return len(st._datasets(opened[0]))


def run(way: str, d: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, way, str(d)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"{way} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from _common import header, table

    header("weight merge from files: streaming vs naive, peak RSS")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run("make", d)
        size = (d / "a.keras").stat().st_size / 2**20
        print(f"models: {LAYERS + 1} Dense layers, width {WIDTH}: {size:.0f} MB per .keras file, "
              f"two sources")
        naive, cli, stream = run("naive", d), run("cli", d), run("stream", d)
        import contextlib

        import numpy as np

        import kmerge.weights.stream as st

        same = {}
        with contextlib.ExitStack() as s:
            fa = s.enter_context(st._open_weights(d / "naive.keras", s))[0]
            names = st._datasets(fa)
            for way in ("cli", "stream"):
                fb = s.enter_context(st._open_weights(d / f"{way}.keras", s))[0]
                same[way] = all(np.allclose(fa[k][()], fb[k][()], rtol=1e-6, atol=1e-7)
                                for k in names)
    rows = []
    for r, label in ((naive, "naive"), (cli, "cli stream"), (stream, "api stream")):
        rows.append((label, f"{r['peak_mb']:.0f}", f"{r['process_seconds']:.1f}",
                     "-" if r["seconds"] is None else f"{r['seconds']:.1f}"))
    print(table(rows, ("way", "peak RSS MB", "process s", "merge s")))
    print(f"RSS after importing Keras and the backend: {naive['after_import_mb']:.0f} MB")
    print(f"the CLI said: {cli['said'][0] if cli['said'] else '(nothing: it did not stream)'}")
    print(f"results agree with naive: cli {same['cli']}, api {same['stream']}")
    for label, r in (("CLI stream", cli), ("API stream", stream)):
        ratio = r["peak_mb"] / naive["peak_mb"]
        extra = (r["peak_mb"] - naive["after_import_mb"]) / max(
            naive["peak_mb"] - naive["after_import_mb"], 1e-9)
        speed = r["process_seconds"] / naive["process_seconds"]
        print(f"{label} / naive: peak RSS {ratio:.2f} (target <= 0.3: "
              f"{'met' if ratio <= 0.3 else 'missed'}), above-import {extra:.3f}, "
              f"process time {speed:.2f} (target <= 1: {'met' if speed <= 1 else 'missed'})")
    return 0 if all(same.values()) and cli["said"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3:
        child(sys.argv[1], Path(sys.argv[2]))
    else:
        sys.exit(main())
