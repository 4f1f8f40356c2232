"""Stitching penalty at two depths: two CNNs trained on real digits from different seeds; A's
bottom, a 1x1-conv stitch (least squares, then 3 epochs of training), B's top. Penalty = B's
test accuracy minus the stitched model's (test split). The least-squares stitch alone (no
training) is shown for comparison.

    KERAS_BACKEND=jax .venv/bin/python bench/bench_stitch.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cnn, header, table  # noqa: E402

DEPTHS = [("conv_1", "conv_1"), ("conv_3", "conv_3")]


def main() -> int:
    import kmerge
    from kmerge.demo import digits

    header("bench_stitch: stitching penalty at two depths")
    x_tr, x_te, y_tr, y_te = digits(0)
    import keras

    a = cnn("a", seed=0, size=16, width=16, bn=True)
    b = cnn("b", seed=1, size=16, width=16, bn=True)
    for m in (a, b):  # trained properly: a stitching penalty against a weak B means little
        m.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr, epochs=8, batch_size=32, verbose=0)
    rows = []
    for at in DEPTHS:
        t0 = time.perf_counter()
        m = kmerge.stitch(a, b, at=at, x=x_tr, y=y_tr, epochs=3, validation_data=(x_te, y_te),
                          seed=0, verbose=0)
        s = kmerge.info(m)["stitch"]
        rows.append((f"{at[0]} -> {at[1]}", f"{s['least_squares_r2']:.3f}",
                     f"{s['b_score']:.3f}", f"{s['least_squares_score']:.3f}",
                     f"{s['stitched_score']:.3f}", f"{s['penalty']:+.3f}",
                     f"{time.perf_counter() - t0:.1f}"))
    print(table(rows, ("at (a -> b)", "LS R^2", "B alone", "LS stitch", "trained stitch",
                       "penalty", "seconds")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
