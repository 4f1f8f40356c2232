"""Start-up time of the kmerge commands that must not import Keras, against the naive
`import keras` (which every Keras-using CLI pays), measured in the same run.

    .venv/bin/python bench/bench_cli.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
TARGET = 0.5  # seconds


def wall(argv: list[str]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    py = sys.executable
    kmerge = [py, "-m", "kmerge"]
    cases = {
        "kmerge --help": kmerge + ["--help"],
        "kmerge list methods": kmerge + ["list", "methods"],
        "kmerge schema": kmerge + ["schema"],
    }
    # validate needs the example's model files only for the existence check: use a recipe
    # whose models exist in any checkout (the legacy fixtures).
    recipe = ROOT / "bench" / ".bench_cli_recipe.yaml"
    recipe.write_text("models:\n  a: {path: ../tests/data/legacy/mlp.h5}\n"
                      "  b: {path: ../tests/data/legacy/mlp_old.h5}\n"
                      "steps:\n  - {name: soup, kind: weights, models: [a, b], method: ties, "
                      "base: a, params: {density: 0.3}}\n")
    cases["kmerge validate RECIPE"] = kmerge + ["validate", str(recipe)]
    naive = wall([py, "-c", "import keras"])
    python_only = wall([py, "-c", "pass"])
    print(f"python {sys.version.split()[0]}, KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}, "
          f"cpus={os.cpu_count()}, median of {REPEATS}")
    print(f"{'command':<28} {'seconds':>8} {'ratio to import keras':>22}")
    print(f"{'python -c pass':<28} {python_only:>8.3f} {python_only / naive:>22.2f}")
    print(f"{'python -c import keras':<28} {naive:>8.3f} {1.0:>22.2f}")
    ok = True
    for name, argv in cases.items():
        s = wall(argv)
        ok &= s < TARGET
        print(f"{name:<28} {s:>8.3f} {s / naive:>22.2f}")
    recipe.unlink()
    print(f"verdict: every command under {TARGET} s: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
