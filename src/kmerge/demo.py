"""The built-in demo: two models trained on scikit-learn's digits, saved as a user would,
loaded back, merged three ways, heads trained, and a table of test accuracy."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kmerge.metadata import meta_of

#: The models the demo writes, in its output folder: the files examples/*.yaml read from
#: examples/models (``make demo`` writes them there). ``merged_parallel.keras`` is its merge.
FILES = ("model_a.h5", "model_b.keras", "model_c.h5", "denoiser.keras")
MERGED = "merged_parallel.keras"


def digits(seed: int = 0):
    """Digits as 8x8x1 images in [0, 1]: (x_train, x_test, y_train, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    return train_test_split(x, d.target.astype("int32"), test_size=0.3, random_state=seed,
                            stratify=d.target)


def _mlp():
    import keras

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def _cnn():
    import keras

    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))


def _denoiser():
    import keras

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="sigmoid"),  # a flat image: (64,), not (8, 8, 1)
    ])


def _fit(model, x, y, *, epochs: int, loss="sparse_categorical_crossentropy"):
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"] if "entropy" in loss else None)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def _acc(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, verbose=0, batch_size=256), -1) == y))


def run(out_dir: str | None = None, *, epochs: int = 20, seed: int = 0, echo=print) -> dict:
    """Run the demo; returns ``{row: test accuracy}`` and prints a table."""
    import keras

    import kmerge

    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    x_tr, x_te, y_tr, y_te = digits(seed)
    rng = np.random.default_rng(seed)
    noisy_tr = np.clip(x_tr + rng.normal(0, 0.35, x_tr.shape), 0, 1).astype("float32")
    noisy_te = np.clip(x_te + rng.normal(0, 0.35, x_te.shape), 0, 1).astype("float32")
    temporary = out_dir is None
    work = Path(out_dir or tempfile.mkdtemp(prefix="kmerge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def wrote(path: Path, what: str) -> None:
        written.append(path)
        echo(f"wrote {path}: {what}")

    echo(f"writing the demo's files to {work}"
         + (" (a new temporary folder; --out DIR chooses one)" if temporary else ""))
    echo(f"training four models on digits ({len(x_tr)} train / {len(x_te)} test) ...")
    _fit(_mlp(), x_tr, y_tr, epochs=epochs).save(work / "model_a.h5")
    wrote(work / "model_a.h5", "A, an MLP (Keras .h5)")
    keras.utils.set_random_seed(seed + 1)  # A's architecture, another seed: for weight merges
    _fit(_mlp(), x_tr, y_tr, epochs=epochs).save(work / "model_c.h5")
    wrote(work / "model_c.h5", "C, A's architecture trained from another seed (weight merges)")
    _fit(_cnn(), x_tr, y_tr, epochs=epochs).save(work / "model_b.keras")
    wrote(work / "model_b.keras", "B, a CNN")
    _fit(_denoiser(), noisy_tr, x_tr.reshape(len(x_tr), -1), epochs=epochs,
         loss="mse").save(work / "denoiser.keras")
    wrote(work / "denoiser.keras", "a denoiser of noisy digits (flat 64-vector output)")

    a = kmerge.load(work / "model_a.h5")
    b = kmerge.load(work / "model_b.keras")
    d = kmerge.load(work / "denoiser.keras")
    rows = {"A: MLP (model_a.h5)": _acc(a, x_te, y_te),
            "B: CNN (model_b.keras)": _acc(b, x_te, y_te)}

    par = kmerge.parallel({"a": a, "b": b}, combine="concat",
                          head=kmerge.heads.classifier(10, hidden=[32]))
    rows["parallel concat + head"] = _acc(_fit(par, x_tr, y_tr, epochs=max(3, epochs // 4)),
                                          x_te, y_te)
    avg = kmerge.parallel({"a": a, "b": b}, combine="average")
    rows["parallel average (no training)"] = _acc(avg, x_te, y_te)

    # Tap A's hidden layer and B's last feature map, by the names the files hold.
    tap_a = a.layers[-2].name
    tap_b = [layer.name for layer in b.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    taps = {"a": (a, tap_a), "b": (b, tap_b)}
    echo(str(kmerge.fuse(taps, head=kmerge.heads.classifier(10), dry_run=True)))
    fused = kmerge.fuse(taps, head=kmerge.heads.classifier(10))
    rows[f"fuse a:{tap_a} + b:{tap_b} + head"] = _acc(
        _fit(fused, x_tr, y_tr, epochs=max(3, epochs // 2)), x_te, y_te)

    seq = kmerge.sequential({"denoise": d, "b": b}, adapter="auto")
    for step in meta_of(seq)["adapters"]:
        echo(f"sequential adapter: {step['where']}: {step['step']}")
    rows["B on noisy digits"] = _acc(b, noisy_te, y_te)
    rows["sequential denoiser -> B, noisy"] = _acc(seq, noisy_te, y_te)

    report = kmerge.verify(par, {"a": a, "b": b})
    saved = kmerge.save(par, work / MERGED, overwrite=True)
    wrote(Path(saved), "the parallel merge, saved with kmerge.save")
    reloaded = keras.models.load_model(saved)
    same = np.array_equal(par.predict(x_te, verbose=0), reloaded.predict(x_te, verbose=0))

    width = max(len(k) for k in rows)
    echo("")
    echo(f"{'model'.ljust(width)}  test accuracy")
    echo(f"{'-' * width}  -------------")
    for k, v in rows.items():
        echo(f"{k.ljust(width)}  {v:.3f}")
    echo("")
    echo(f"frozen sources verified: {report.ok} ({len(report.checks)} tensors bit-exact)")
    echo(f"reloaded {Path(saved).name} with keras.models.load_model: identical predictions: "
         f"{same}")
    echo(f"files written ({len(written)}, left in {work}): "
         + ", ".join(p.name for p in written))
    echo(f"demo took {time.perf_counter() - start:.0f} s (KERAS_BACKEND={keras.backend.backend()})")
    return {"accuracy": rows, "verified": report.ok, "reload_identical": same,
            "dir": os.fspath(work)}
