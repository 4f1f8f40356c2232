"""Write ``legacy/keras38_nested.keras`` (+ ``.npz``) with genuine Keras 3.8.0.

Keras 3.0-3.10 wrote every single input/output of a Functional model as a one-element list;
tests/test_legacy.py checks that kmerge unwraps them (on the oldest and the newest Keras it
supports). Keras 3.8 must not go into the project venv; run this with a separate one::

    python3 -m venv /tmp/venv-k38 && /tmp/venv-k38/bin/pip install keras==3.8.0 jax numpy h5py
    KERAS_BACKEND=jax /tmp/venv-k38/bin/python tests/data/make_keras38.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT = Path(__file__).parent / "legacy"


def main() -> None:
    assert keras.__version__ == "3.8.0", f"needs Keras 3.8.0, not {keras.__version__}"
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)
    ii = keras.Input((4,), name="enc_in")
    h = keras.layers.Dense(5, activation="relu", name="enc_h")(ii)
    encoder = keras.Model(ii, keras.layers.Dense(3, name="enc_out")(h), name="encoder")
    i = keras.Input((4,), name="x")
    model = keras.Model(i, keras.layers.Dense(2, name="head")(encoder(i)), name="outer")
    model.save(OUT / "keras38_nested.keras")
    x = rng.normal(size=(3, 4)).astype("float32")
    np.savez(OUT / "keras38_nested.npz", x=x, y=np.asarray(model(x, training=False)))
    print(f"wrote {OUT / 'keras38_nested.keras'}")


if __name__ == "__main__":
    main()
