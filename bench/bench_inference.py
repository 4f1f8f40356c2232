"""Merged parallel inference vs running the source models one after another.

Two pairs of source models, each trained one epoch on scikit-learn digits, predict the
same 1,792 real digit images (all of load_digits, cut to 7 batches of 256): two CNNs
(8x8 upsampled to 16x16 inside the model, four 3x3 convs) and two Dense-heavy MLPs
(three hidden layers of 512).

  merged   kmerge.parallel({"a": a, "b": b}, combine=...).predict(x)   (one compiled graph)
  naive    a.predict(x); b.predict(x); combine in numpy                  (two graphs)

and the same with a per-batch loop of ``predict_on_batch``. Ratios are merged/naive
measured in the same run (median over interleaved repeats, after warm-up so jit compile
time is excluded). Target: merged/naive <= 0.9.

    KERAS_BACKEND=jax .venv/bin/python bench/bench_inference.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    cnn,
    digits_batch,
    digits_train,
    header,
    interleaved_medians,
    mlp,
    table,
    train_briefly,
)

BATCH = 256
SMALL = 16  # serving-sized batches: per-call overhead matters here
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
TARGET = 0.9


def run_family(kmerge, label: str, a, b, x, *, repeats: int):
    """Agreement and timing of merged vs naive for one pair of source models."""
    m_avg = kmerge.parallel({"a": a, "b": b}, combine="average")
    m_cat = kmerge.parallel({"a": a, "b": b}, combine="concat")
    batches = [x[i:i + BATCH] for i in range(0, len(x), BATCH)]
    small = [x[i:i + SMALL] for i in range(0, 512, SMALL)]

    def merged_avg():
        return m_avg.predict(x, batch_size=BATCH, verbose=0)

    def merged_cat():
        return m_cat.predict(x, batch_size=BATCH, verbose=0)

    def naive_avg():
        pa = a.predict(x, batch_size=BATCH, verbose=0)
        pb = b.predict(x, batch_size=BATCH, verbose=0)
        return (pa + pb) / 2.0

    def naive_cat():
        pa = a.predict(x, batch_size=BATCH, verbose=0)
        pb = b.predict(x, batch_size=BATCH, verbose=0)
        return np.concatenate([pa, pb], axis=-1)

    def loop_merged():
        return np.concatenate([np.asarray(m_avg.predict_on_batch(xb)) for xb in batches])

    def loop_naive():
        out = []
        for xb in batches:
            pa = np.asarray(a.predict_on_batch(xb))
            pb = np.asarray(b.predict_on_batch(xb))
            out.append((pa + pb) / 2.0)
        return np.concatenate(out)

    def small_merged():
        return np.concatenate([np.asarray(m_avg.predict_on_batch(xb)) for xb in small])

    def small_naive():
        return np.concatenate([(np.asarray(a.predict_on_batch(xb))
                                + np.asarray(b.predict_on_batch(xb))) / 2.0 for xb in small])

    # Agreement first; this also warms every way up (jit compile of the full batch and
    # of the short last batch), so the timed runs below exclude compilation.
    checks = {
        "predict average": (merged_avg(), naive_avg()),
        "predict concat": (merged_cat(), naive_cat()),
        "predict_on_batch loop average": (loop_merged(), loop_naive()),
        f"predict_on_batch batch {SMALL} average": (small_merged(), small_naive()),
    }
    agree = {}
    for k, (got, want) in checks.items():
        ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6)
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
        agree[k] = ok
        print(f"agree [{label}, {k}]: allclose={ok}  shape={got.shape}  max|diff|={diff:.2e}")

    med = interleaved_medians(
        {
            "merged_avg": merged_avg,
            "naive_avg": naive_avg,
            "merged_cat": merged_cat,
            "naive_cat": naive_cat,
            "loop_merged": loop_merged,
            "loop_naive": loop_naive,
            "small_merged": small_merged,
            "small_naive": small_naive,
        },
        repeats=repeats,
        warmup=0,
    )
    pairs = [
        ("predict, combine=average", "merged_avg", "naive_avg"),
        ("predict, combine=concat", "merged_cat", "naive_cat"),
        ("predict_on_batch loop, average", "loop_merged", "loop_naive"),
        (f"predict_on_batch, batch {SMALL}, average", "small_merged", "small_naive"),
    ]
    rows = [(label, way, f"{med[m]:.3f}", f"{med[n]:.3f}", f"{med[m] / med[n]:.2f}")
            for way, m, n in pairs]
    return rows, [med[m] / med[n] for _, m, n in pairs], all(agree.values())


def main() -> int:
    t_start = time.perf_counter()
    import kmerge

    header("bench_inference: kmerge.parallel vs sources one after another")
    x = digits_batch(repeat=1)
    x_tr, y_tr = digits_train()
    families = {
        "cnn": (cnn("cnn_a", seed=1, size=16), cnn("cnn_b", seed=2, size=16)),
        "mlp512": (mlp("mlp_a", seed=3), mlp("mlp_b", seed=4)),
    }
    for a, b in families.values():
        train_briefly(a, x_tr, y_tr)
        train_briefly(b, x_tr, y_tr)
    print(f"data: {len(x)} real digit images (8x8x1), batch_size={BATCH}, repeats={REPEATS} "
          "(median, interleaved, after warm-up); sources trained 1 epoch on the digits train split")
    for name, (a, _) in families.items():
        print(f"  {name}: {a.count_params():,} params per source")
    print(f"setup (imports, data, training) took {time.perf_counter() - t_start:.0f} s")

    rows, ratios, agree = [], {}, True
    for name, (a, b) in families.items():
        # The MLPs are cheap: more repeats for the same wall time.
        reps = REPEATS if name == "cnn" else 3 * REPEATS
        r, rat, ok = run_family(kmerge, name, a, b, x, repeats=reps)
        rows += r
        print(f"{name} done at {time.perf_counter() - t_start:.0f} s")
        ratios[name] = rat
        agree &= ok
    print()
    print(table(rows, ("models", "way", "merged s", "naive s", "ratio merged/naive")))
    every = [r for rs in ratios.values() for r in rs]
    verdict = "MEETS" if max(every) <= TARGET else "MISSES"
    print()
    print(f"verdict: {verdict} target merged/naive <= {TARGET} "
          f"(ratios {'; '.join(f'{k}: ' + ', '.join(f'{r:.2f}' for r in v) for k, v in ratios.items())}); "
          f"outputs agree: {agree}; wall {time.perf_counter() - t_start:.0f} s")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
