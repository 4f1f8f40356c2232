"""The CLI runs on an installed backend whatever keras.json says, and says which."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmerge import _backend
from kmerge.errors import KmergeError


def _run(args, env):
    return subprocess.run([sys.executable, "-m", "kmerge.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _env(tmp_path, keras_json_backend=None, keras_backend=None):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    home = tmp_path / "keras_home"
    home.mkdir(exist_ok=True)
    if keras_json_backend:
        (home / "keras.json").write_text(json.dumps({"backend": keras_json_backend}))
    env["KERAS_HOME"] = str(home)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if keras_backend:
        env["KERAS_BACKEND"] = keras_backend
    return env


def test_cli_falls_back_to_an_installed_backend_and_says_so(tmp_path):
    from conftest import mlp

    import kmerge

    path = kmerge.save(mlp(), tmp_path / "m.keras")
    out = _run(["inspect", str(path)], _env(tmp_path, keras_json_backend="mxnet"))
    assert out.returncode == 0, out.stderr
    assert "Dense" in out.stdout
    notes = [line for line in out.stderr.splitlines() if line.startswith("note: Keras is set")]
    assert len(notes) == 1
    assert "'mxnet'" in notes[0] and "not installed; using 'jax'" in notes[0]
    assert "Traceback" not in out.stderr


def test_an_explicit_missing_backend_is_one_error_line(tmp_path):
    out = _run(["inspect", str(tmp_path / "nothing.keras")],
               _env(tmp_path, keras_backend="mxnet"))
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("error: KERAS_BACKEND=mxnet but 'mxnet' is not installed")


def test_choose_backend_rules(monkeypatch, tmp_path):
    assert _backend.choose_backend() is None  # Keras already imported here: too late
    monkeypatch.setattr(_backend, "_keras_imported", lambda: False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "tensorflow"}))
    monkeypatch.setattr(_backend, "_installed", lambda name: name == "torch")
    notes = []
    assert _backend.choose_backend(notes.append) == "torch"
    assert os.environ["KERAS_BACKEND"] == "torch" and len(notes) == 1
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setattr(_backend, "_installed", lambda name: False)
    with pytest.raises(KmergeError, match="no Keras backend is installed"):
        _backend.choose_backend(notes.append)
    monkeypatch.setattr(_backend, "_installed", lambda name: True)
    assert _backend.choose_backend(notes.append) == "tensorflow" and len(notes) == 1
    assert _backend.configured_backend() == ("tensorflow", str(Path(tmp_path) / "keras.json"))


_FAKE_TF = """\
import os
os.write(2, b"I0000 native log line while loading\\n")
{tail}
"""


@pytest.mark.parametrize("fails", [False, True])
def test_quiet_tensorflow_import_silences_native_lines_and_keeps_errors(tmp_path, fails):
    """A stand-in ``tensorflow`` that writes to file descriptor 2 while it loads: nothing of
    it reaches stderr, stderr works afterwards, other imports are untouched, and an import
    error still shows."""
    (tmp_path / "tensorflow.py").write_text(_FAKE_TF.format(
        tail="raise ImportError('broken install')" if fails else ""))
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); "
            "from kmerge._backend import quiet_tensorflow_import; quiet_tensorflow_import(); "
            "quiet_tensorflow_import(); import json, email.utils; "  # once; others untouched
            "assert 'tensorflow' not in sys.modules; import tensorflow; "
            "assert type(tensorflow.__loader__).__name__ == 'SourceFileLoader'; "
            "os.write(2, b'after\\n')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert "native log line" not in out.stderr
    if fails:
        assert out.returncode == 1 and "ImportError: broken install" in out.stderr
    else:
        assert out.returncode == 0 and out.stderr == "after\n", out.stderr


def _tensorflow_suite_only():
    if os.environ.get("KERAS_BACKEND") != "tensorflow":
        pytest.skip("the tensorflow suite runs it (importing TensorFlow costs seconds)")


def test_cli_on_tensorflow_prints_no_native_log_lines(tmp_path):
    _tensorflow_suite_only()
    from conftest import mlp

    import kmerge

    path = kmerge.save(mlp(), tmp_path / "m.keras")
    env = _env(tmp_path, keras_backend="tensorflow")
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    out = _run(["inspect", str(path)], env)
    assert out.returncode == 0 and "Dense" in out.stdout
    assert out.stderr == "", out.stderr


def test_cli_on_jax_reading_h5_prints_no_tensorflow_lines(tmp_path):
    """Keras imports TensorFlow to read a .h5 file on any backend when it is installed."""
    _tensorflow_suite_only()
    pytest.importorskip("jax")
    from conftest import mlp

    path = tmp_path / "m.h5"
    mlp().save(path)
    env = _env(tmp_path, keras_backend="jax")
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    out = _run(["inspect", str(path)], env)
    assert out.returncode == 0 and "Dense" in out.stdout
    assert out.stderr == "", out.stderr
    # --debug keeps whatever TensorFlow prints (what it prints depends on the machine)
    assert _run(["--debug", "inspect", str(path)], env).returncode == 0
