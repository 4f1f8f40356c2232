"""Peak memory of merging two big models from files: streaming vs the naive way.

- **naive**: load both models, ``get_weights()``, average in NumPy, ``set_weights()`` and
  save (what users write by hand).
- **stream**: ``kmerge.weights.merge_weights_files([a, b], out, method="linear")``: one tensor
  per source at a time, from the HDF5 file inside each ``.keras`` archive to the output's.

Each way runs in its own subprocess; peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
of that subprocess (it includes the interpreter and the Keras/backend import, measured too).
Prints the ratio stream/naive (target <= 0.3) and tensors per second.

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
                      "seconds": sec, "tensors": n}))


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
        naive, stream = run("naive", d), run("stream", d)
        import contextlib

        import numpy as np

        import kmerge.weights.stream as st

        with contextlib.ExitStack() as s:
            fa = s.enter_context(st._open_weights(d / "naive.keras", s))[0]
            fb = s.enter_context(st._open_weights(d / "stream.keras", s))[0]
            names = st._datasets(fa)
            same = all(np.allclose(fa[k][()], fb[k][()], rtol=1e-6, atol=1e-7) for k in names)
    rows = []
    for r in (naive, stream):
        rows.append((r["way"], f"{r['peak_mb']:.0f}", f"{r['after_import_mb']:.0f}",
                     f"{r['seconds']:.1f}", f"{r['tensors'] / r['seconds']:.1f}"))
    print(table(rows, ("way", "peak RSS MB", "RSS after import MB", "merge s", "tensors/s")))
    ratio = stream["peak_mb"] / naive["peak_mb"]
    extra = (stream["peak_mb"] - stream["after_import_mb"]) / max(
        naive["peak_mb"] - naive["after_import_mb"], 1e-9)
    print(f"results agree: {same}")
    print(f"peak RSS ratio stream/naive: {ratio:.2f} (target <= 0.3: "
          f"{'met' if ratio <= 0.3 else 'missed'}); above-import ratio: {extra:.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) == 3:
        child(sys.argv[1], Path(sys.argv[2]))
    else:
        sys.exit(main())
