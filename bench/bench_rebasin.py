"""Git Re-Basin + REPAIR on real digits: two 2x128 MLPs from different seeds, merged.

Rows: A, B, their output ensemble, and the weight midpoint after no alignment ("naive"),
weight matching and activation matching, each with and without REPAIR; the loss barrier
max_l L((1-l) A + l B') - (L(A) + L(B)) / 2 on a 25-point grid (test cross-entropy). The
last columns are METHODS.md's numbers from a NumPy trial (one seed: expect the ordering
naive < WM <= AM, not the decimals).

    KERAS_BACKEND=jax .venv/bin/python bench/bench_rebasin.py [--epochs 30] [--width 128]

Exit status 1 when weight matching does not beat the naive midpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _common import header, table  # noqa: E402

# METHODS.md, digits 2x128: (accuracy %, + REPAIR %, barrier)
PAPER = {
    "A": ("98.0", "", ""),
    "B": ("98.1", "", ""),
    "ensemble (avg probs)": ("97.8", "", ""),
    "naive midpoint": ("72.4", "85.2", ".81"),
    "weight matching": ("95.0", "96.1", ".08"),
    "activation matching": ("96.5", "96.9", ".05"),
}


def mlp(seed: int, width: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def probs(model, x) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=1024, verbose=0), np.float64)


def acc_loss(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    acc = float(np.mean(p.argmax(-1) == y))
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
    return acc, loss


def interpolate(template, a, b, lam: float):
    """``template`` with weights (1 - lam) * a + lam * b (plain NumPy averaging)."""
    for v, x, y in zip(template.weights, a, b):
        v.assign(((1 - lam) * x + lam * y).astype(x.dtype))
    return template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--grid", type=int, default=25)
    args = parser.parse_args(argv)

    import keras

    import kmerge
    from kmerge.demo import digits
    from kmerge.weights.align import align
    from kmerge.weights.repair import repair

    header(f"bench_rebasin: 2x{args.width} MLPs on digits, merged at the midpoint")
    start = time.perf_counter()
    x_tr, x_te, y_tr, y_te = digits(0)
    x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)

    models = []
    for seed in (1, 2):
        m = mlp(seed, args.width)
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        m.fit(x_tr, y_tr, epochs=args.epochs, batch_size=32, verbose=0)
        models.append(m)
    a, b = models
    t_train = time.perf_counter() - start

    pa, pb = probs(a, x_te), probs(b, x_te)
    (acc_a, loss_a), (acc_b, loss_b) = acc_loss(pa, y_te), acc_loss(pb, y_te)
    rows = {"A": (acc_a, None, None), "B": (acc_b, None, None),
            "ensemble (avg probs)": (acc_loss((pa + pb) / 2, y_te)[0], None, None)}

    t0 = time.perf_counter()
    b_wm = align(a, b, method="weights")
    t_wm = time.perf_counter() - t0
    t0 = time.perf_counter()
    b_am = align(a, b, method="activations", data=x_tr)
    t_am = time.perf_counter() - t0

    wa = [np.asarray(keras.ops.convert_to_numpy(v)) for v in a.weights]
    template = keras.models.clone_model(a)
    lams = np.linspace(0.0, 1.0, args.grid)
    for name, other in (("naive midpoint", b), ("weight matching", b_wm),
                        ("activation matching", b_am)):
        wb = [np.asarray(keras.ops.convert_to_numpy(v)) for v in other.weights]
        losses = [acc_loss(probs(interpolate(template, wa, wb, lam), x_te), y_te)[1]
                  for lam in lams]
        barrier = max(losses) - (loss_a + loss_b) / 2
        mid = interpolate(keras.models.clone_model(a), wa, wb, 0.5)
        acc_mid = acc_loss(probs(mid, x_te), y_te)[0]
        repair(mid, [a, other], method="repair", data=x_tr)
        rows[name] = (acc_mid, acc_loss(probs(mid, x_te), y_te)[0], barrier)

    def pct(v):
        return "" if v is None else f"{100 * v:.1f}"

    print(f"train {len(x_tr)} / test {len(x_te)} digits; {args.epochs} epochs each; "
          f"weight matching {t_wm:.1f} s ({kmerge.info(b_wm)['iterations']} sweeps), "
          f"activation matching {t_am:.1f} s; training {t_train:.0f} s")
    print()
    print(table([(k, pct(acc), pct(rep), "" if bar is None else f"{bar:.2f}", *PAPER[k])
                 for k, (acc, rep, bar) in rows.items()],
                ("model", "test acc %", "+REPAIR %", "barrier",
                 "METHODS acc", "METHODS +REPAIR", "METHODS barrier")))
    naive, wm, am = (rows[k][0] for k in ("naive midpoint", "weight matching",
                                          "activation matching"))
    print()
    print(f"ordering naive < WM: {naive < wm}; WM <= AM: {wm <= am}  "
          f"(took {time.perf_counter() - start:.0f} s, KERAS_BACKEND={keras.backend.backend()})")
    return 0 if naive < wm else 1


if __name__ == "__main__":
    sys.exit(main())
