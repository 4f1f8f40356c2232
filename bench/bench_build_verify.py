"""Merge-time cost: kmerge.parallel (build + bit-exact verify) vs the same work in plain Keras.

For two pairs of keras.applications architectures (``weights=None``, 64x64 inputs):

- **kmerge**: ``kmerge.parallel({"a": a, "b": b}, combine="concat")`` with its default
  ``verify=True`` (every layer re-created and its state copied, then each source and its
  copy run once on a probe batch of 4 and compared bit-exactly). Build and verify are also
  timed apart (``verify=False``, then ``kmerge.verify``).
- **plain Keras**: ``keras.models.clone_model`` of both sources (re-creates every layer, no
  weight copy) plus one compiled ``predict`` of each source on the same probe batch (its
  first call: trace and compile).

Target: kmerge / plain <= 2.0. Then the build time (``verify=False``) of a parallel merge of
two Dense chains of 25..400 layers each, to show it grows linearly with the layer count.
Exit status 0 when every verify passed.
"""

from __future__ import annotations

import gc
import sys
import time

from _common import header

TARGET = 2.0


def _pairs():
    import keras

    apps = keras.applications
    shape = (64, 64, 3)
    yield "MobileNetV2(0.35)+ResNet50", (
        lambda: apps.MobileNetV2(input_shape=shape, alpha=0.35, weights=None),
        lambda: apps.ResNet50(input_shape=shape, weights=None))
    yield "EfficientNetB0+DenseNet121", (
        lambda: apps.EfficientNetB0(input_shape=shape, weights=None),
        lambda: apps.DenseNet121(input_shape=shape, weights=None))


def _timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _chain(n: int, seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((16,))
    h = inp
    for _ in range(n - 1):
        h = keras.layers.Dense(16, activation="relu")(h)
    return keras.Model(inp, keras.layers.Dense(4)(h))


def _measure(a, b, probe):
    """(kmerge, build, verify, clone, predict, ratio) seconds for one pair, and verify's ok."""
    import keras

    import kmerge

    _, t_kmerge = _timed(lambda: kmerge.parallel({"a": a, "b": b}, combine="concat"))
    built, t_build = _timed(lambda: kmerge.parallel({"a": a, "b": b}, combine="concat",
                                                    verify=False))
    report, t_verify = _timed(lambda: kmerge.verify(built, {"a": a, "b": b}, x=probe))
    _, t_clone = _timed(lambda: (keras.models.clone_model(a), keras.models.clone_model(b)))
    _, t_predict = _timed(lambda: (a.predict(probe, verbose=0), b.predict(probe, verbose=0)))
    plain = t_clone + t_predict
    return (t_kmerge, t_build, t_verify, t_clone, t_predict, t_kmerge / plain), report.ok


def main() -> int:
    import keras
    import numpy as np

    import kmerge

    header("bench_build_verify: kmerge.parallel (build + verify) vs clone_model + predict")
    ok = True
    rows = []
    _measure(_chain(3, 0), _chain(3, 1), np.zeros((4, 16), "float32"))  # warm-up
    for label, (make_a, make_b) in _pairs():
        a, b = make_a(), make_b()
        probe = np.random.default_rng(0).standard_normal((4, 64, 64, 3)).astype("float32")
        row, report_ok = _measure(a, b, probe)
        ok = ok and report_ok
        rows.append((label, len(a.layers) + len(b.layers), *row))
        del a, b
        keras.backend.clear_session()
    print(f"{'pair':<28} {'layers':>6} {'kmerge':>7} {'build':>6} {'verify':>7} "
          f"{'clone':>6} {'predict':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r[0]:<28} {r[1]:>6} {r[2]:>6.1f}s {r[3]:>5.1f}s {r[4]:>6.1f}s "
              f"{r[5]:>5.1f}s {r[6]:>6.1f}s {r[7]:>6.2f}")
    worst = max(r[7] for r in rows)
    print(f"kmerge (build+verify) / plain Keras (clone_model + compiled predict): worst "
          f"{worst:.2f} (target <= {TARGET}: {'met' if worst <= TARGET else 'MISSED'})")

    print("\nbuild time (verify=False) against layers per source:")
    print(f"{'layers':>7} {'build':>7} {'ms/layer':>9}")
    for n in (25, 50, 100, 200, 400):
        a, b = _chain(n, 0), _chain(n, 1)
        _, t = _timed(lambda a=a, b=b: kmerge.parallel({"a": a, "b": b}, combine="concat",
                                                       verify=False))
        print(f"{n:>7} {t:>6.2f}s {1000 * t / (2 * n):>9.2f}")
        keras.backend.clear_session()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
