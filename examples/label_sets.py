"""Models trained on different label sets, merged into one that knows all of them.

A (a small CNN) learned digits 0-4, B (an MLP) learned digits 5-9, each from its own half of
scikit-learn's digits. Neither can name the other's digits: alone, each is right on at most
half of a ten-digit test set. This script builds one model that does all ten, three ways, and
compares them with each source alone and with a rule that needs no training:

- parallel: concatenate A's and B's outputs (their 5 + 5 class probabilities), train a head;
- fuse: concatenate the penultimate layers (the usual guess of taps), train the same head;
- fuse, taps="auto": kmerge.probe ranks every layer of A and B and fuses the best pair.

Every merge is built with keep_outputs=True: one model, one forward pass, outputs
{"a": A's own 5 classes, "b": B's own 5 classes, "head": all 10}; the kept outputs are A's and
B's bit-exactly (kmerge.verify), so the old tasks keep working beside the new one.

Run from the repository root (make demo is not needed):

    python examples/label_sets.py              # 3 seeds: a few minutes on a CPU
    python examples/label_sets.py --seeds 1 --epochs 5

The head trains on the training split labelled 0-9 (the labelled data for the new task); the
sources never see the test split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kmerge  # noqa: E402
from kmerge.demo import digits  # noqa: E402

HEAD = {"hidden": [32]}  # the same head on every merge


def source_a(seed: int) -> keras.Model:
    """A small CNN with BatchNorm and dropout: 5 classes."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(32, activation="relu", name="hidden")(h)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    return keras.Model(inp, keras.layers.Dense(5, activation="softmax", name="out")(h), name="a")


def source_b(seed: int) -> keras.Model:
    """An MLP: 5 classes."""
    keras.utils.set_random_seed(seed + 1000)
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(name="flat"),
        keras.layers.Dense(64, activation="relu", name="hidden_1"),
        keras.layers.Dense(32, activation="relu", name="hidden_2"),
        keras.layers.Dense(5, activation="softmax", name="out")], name="b")


def train_sources(x: np.ndarray, y: np.ndarray, *, seed: int = 0, epochs: int = 15,
                  limit: int | None = None) -> tuple[keras.Model, keras.Model]:
    """A on the examples labelled 0-4, B on those labelled 5-9 (as classes 0-4)."""
    out = []
    for make, keep, shift in ((source_a, y < 5, 0), (source_b, y >= 5, 5)):
        m = make(seed)
        m.compile(optimizer=keras.optimizers.Adam(0.005), loss="sparse_categorical_crossentropy")
        xs, ys = x[keep][:limit], y[keep][:limit] - shift
        m.fit(xs, ys, epochs=epochs, batch_size=32, verbose=0)
        out.append(m)
    return out[0], out[1]


def alone(pa: np.ndarray, pb: np.ndarray) -> dict[str, np.ndarray]:
    """Ten-class predictions of each source alone (from A's and B's class probabilities), and
    of the more confident one."""
    return {"A alone (knows 0-4)": pa.argmax(1),
            "B alone (knows 5-9)": pb.argmax(1) + 5,
            "more confident of A, B (no training)": np.where(pa.max(1) >= pb.max(1),
                                                             pa.argmax(1), pb.argmax(1) + 5)}


def merges(a: keras.Model, b: keras.Model, x: np.ndarray, y: np.ndarray, *, seed: int,
           auto: bool = True) -> dict[str, keras.Model]:
    """The three multi-task merges, untrained heads."""
    head = kmerge.heads.classifier(10, seed=seed, **HEAD)
    common = {"head": head, "keep_outputs": True, "verify": False}  # verified once trained
    out = {
        "parallel: A's and B's outputs + head": kmerge.parallel({"a": a, "b": b}, **common),
        "fuse: penultimate layers + head":
            kmerge.fuse({"a": (a, "hidden"), "b": (b, "hidden_2")}, **common),
    }
    if auto:
        m = kmerge.fuse({"a": a, "b": b}, taps="auto", data=(x, y), **common)
        chosen = ", ".join(f"{n}:{r}" for n, r in kmerge.info(m)["probe"]["chosen"].items())
        out[f"fuse, taps='auto' ({chosen}) + head"] = m
    return out


def compare(a: keras.Model, b: keras.Model, data: tuple, *, seed: int = 0, epochs: int = 30,
            auto: bool = True) -> dict[str, dict]:
    """Test accuracy on all ten digits of each source alone, the rule and each merge, and
    for each merge the accuracy of its kept outputs on their own tasks."""
    x, y, x_te, y_te = data
    rows: dict[str, dict] = {}
    low, high = y_te < 5, y_te >= 5
    for name, m in merges(a, b, x, y, seed=seed, auto=auto).items():
        kmerge.fit_head(m, x, y, epochs=epochs, seed=seed, verbose=0)
        out = m.predict(x_te, verbose=0)
        ok = kmerge.verify(m, {"a": a, "b": b}).ok  # the kept outputs are A's and B's
        if not rows:  # so they are what A and B alone predict
            rows = {k: {"accuracy": float(np.mean(p == y_te))}
                    for k, p in alone(out["a"], out["b"]).items()}
        rows[name] = {"accuracy": float(np.mean(out["head"].argmax(1) == y_te)), "model": m,
                      "kept": ok,
                      "a_on_0_4": float(np.mean(out["a"][low].argmax(1) == y_te[low])),
                      "b_on_5_9": float(np.mean(out["b"][high].argmax(1) + 5 == y_te[high]))}
    return rows


def _label(name: str) -> str:
    """A row's name without the taps a probe chose (they vary with the seed)."""
    return "fuse, taps='auto' + head" if "taps='auto'" in name else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--epochs", type=int, default=30, help="head epochs (default 30)")
    p.add_argument("--source-epochs", type=int, default=15, help="source epochs (default 15)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    x, x_te, y, y_te = digits(0)  # the split `kmerge demo` holds out: 1257 train, 540 test
    table: dict[str, list[float]] = {}
    extra: dict[str, list[tuple]] = {}
    chosen: list[str] = []
    for seed in range(args.seeds):
        a, b = train_sources(x, y, seed=seed, epochs=args.source_epochs)
        rows = compare(a, b, (x, y, x_te, y_te), seed=seed, epochs=args.epochs)
        for name, row in rows.items():
            table.setdefault(_label(name), []).append(row["accuracy"])
            if "model" in row:
                extra.setdefault(_label(name), []).append(
                    (row["kept"], row["a_on_0_4"], row["b_on_5_9"]))
            if "taps='auto'" in name:
                chosen.append(name[name.index("(") + 1:name.index(")")])
    print(f"test accuracy on all ten digits ({len(y_te)} images), {args.seeds} seed(s), "
          f"backend {keras.backend.backend()}; head {HEAD} trained {args.epochs} epochs")
    width = max(map(len, table))
    print(f"{'model'.ljust(width)}  mean   min    max")
    for name, accs in table.items():
        print(f"{name.ljust(width)}  {np.mean(accs):.3f}  {min(accs):.3f}  {max(accs):.3f}")
    print("kept outputs of every merge (verify: bit-exact A and B), on their own tasks:")
    for name, rows in extra.items():
        kept = all(r[0] for r in rows)
        print(f"  {name}: verified {kept}; A on 0-4 "
              f"{np.mean([r[1] for r in rows]):.3f}, B on 5-9 {np.mean([r[2] for r in rows]):.3f}")
    if chosen:
        print(f"taps the probe chose: {'; '.join(chosen)}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
