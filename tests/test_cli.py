"""The command line: fast help, inspect, demo, errors without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import cnn

from kmerge.cli import main

LEGACY = Path(__file__).parent / "data" / "legacy"


def test_help_does_not_import_keras():
    code = ("import sys\nfrom kmerge.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().endswith("False")
    assert "inspect" in out.stdout


def test_usage_error_is_exit_2(capsys):
    assert main(["no-such-command"]) == 2
    assert main(["inspect"]) == 2


def test_inspect_legacy_file_reports_repairs(capsys):
    path = LEGACY / "rnn.h5"  # LSTM + Bidirectional GRU written by tf_keras
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "saved by Keras 2" in out and "time_major" in out


def test_inspect_json_and_tap_suggestions(tmp_path, capsys):
    path = tmp_path / "cnn.keras"
    cnn().save(path)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "keras"
    assert data["suggested_taps"]  # the last feature map before Flatten
    types = {row["path"]: row["type"] for row in data["layers"]}
    assert types[data["suggested_taps"][0]] in ("MaxPooling2D", "BatchNormalization", "Conv2D")


def test_errors_are_one_line_exit_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.keras")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.keras" in err and "Traceback" not in err


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "parallel concat + head" in out and "identical predictions: True" in out
    assert (tmp_path / "model_a.h5").exists() and (tmp_path / "merged_parallel.keras").exists()
