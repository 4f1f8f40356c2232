"""fit_head, fine_tune and distill under keras.distribution.DataParallel on 4 forced host
devices (jax), in a subprocess: batches that do not divide by 4 are padded, never a crash, and
the losses match a single-device run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("jax")

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import keras, numpy as np
    sys.path.insert(0, sys.argv[2])
    from conftest import cnn
    import kmerge
    if sys.argv[1] == "4":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    from kmerge.train import device_count
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8, 8, 1)).astype("float32")   # 50 = 4 * 12 + 2
    y = rng.integers(0, 3, 50).astype("int32")
    m = kmerge.parallel({"a": cnn(seed=0), "b": cnn(seed=1)},
                        head=kmerge.heads.classifier(3, hidden=[8]))
    out = {"devices": device_count()}
    out["fit_head"] = kmerge.fit_head(m, x, y, epochs=2, batch_size=10, seed=0, verbose=0,
                                      validation_data=(x[:7], y[:7])).history
    out["fine_tune"] = kmerge.fine_tune(m, x, y, unfreeze="top:1", learning_rate=1e-3,
                                        epochs=1, batch_size=10, seed=0, verbose=0).history
    # No BatchNorm in this student: a training BatchNorm sees the padding samples in its
    # batch statistics (documented), which would make 4 devices differ from 1.
    keras.utils.set_random_seed(2)
    student = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(8, activation="relu"),
                                keras.layers.Dense(3, activation="softmax")])
    kmerge.distill(m, student, x, y=y, epochs=2, batch_size=10, seed=0, verbose=0)
    out["distill"] = kmerge.info(student)["distill"]["history"]
    print("RESULT" + json.dumps(out))
""")


def _start(devices: str) -> subprocess.Popen:
    flags = os.environ.get("XLA_FLAGS", "")  # the suite's own (tests/_speed.py) stay
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip())
    tests = str(Path(__file__).parent)
    src = str(Path(__file__).parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, devices, tests], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_data_parallel_on_four_host_devices_matches_one_device():
    import numpy as np

    procs = _start("4"), _start("1")  # side by side: each is mostly single-threaded
    four, one = _result(procs[0]), _result(procs[1])
    assert four["devices"] == 4 and one["devices"] == 1
    for key, metric in [("fit_head", "loss"), ("fit_head", "val_loss"), ("fine_tune", "loss"),
                        ("distill", "loss")]:
        np.testing.assert_allclose(four[key][metric], one[key][metric], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{key} {metric}")
