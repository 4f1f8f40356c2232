"""GPU check: kmerge.verify stays exact for wide models on an accelerator.

Run on the device (see bench/gpu_check.sh): ``KERAS_BACKEND=jax python3 bench/gpu_verify_wide.py``.
"""

import keras
import numpy as np

import kmerge


def mlp(seed: int, width: int = 1024) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def cnn(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(64, 3, activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(128, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))


def main() -> None:
    device = ""
    if keras.backend.backend() == "torch":
        from keras.src.backend.torch.core import get_device

        device = f" device {get_device()}"
    print(f"{keras.backend.backend()}{device}")
    a, b = mlp(0), mlp(1)
    x = np.random.default_rng(0).normal(size=(256, 64)).astype("float32")
    for combine in ("concat", "average"):
        m = kmerge.parallel({"a": a, "b": b}, combine=combine, verify=False)
        report = kmerge.verify(m, {"a": a, "b": b}, x=x, atol=1.0)
        print(f"parallel {combine}: verify max diffs {[c.max_abs_diff for c in report.checks]}")
    c1, c2 = cnn(0), cnn(1)
    f = kmerge.fuse({"a": (c1, [2, -1]), "b": (c2, 3)}, verify=False)
    xi = np.random.default_rng(1).normal(size=(64, 32, 32, 3)).astype("float32")
    report = kmerge.verify(f, {"a": c1, "b": c2}, x=xi, atol=1.0)
    print(f"fuse cnn: verify max diffs {[c.max_abs_diff for c in report.checks]}")


if __name__ == "__main__":
    main()
