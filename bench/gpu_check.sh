#!/usr/bin/env bash
# Run on a GPU machine from the repo root, with keras, namex, optree and pydantic wheels
# for its Python in .whl/ (see bench/README.md "On a GPU"). Writes logs to $OUT when set.
# GPU check: bit-exact verify / frozen weights / combine ops on a GPU, jax and torch; inference bench.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L
TESTS="tests/test_rebuild.py tests/test_verify.py tests/test_freeze.py tests/test_combine.py tests/test_legacy_merge.py tests/test_builders.py tests/test_e2e.py"
for b in jax torch; do
  KERAS_BACKEND=$b timeout 150 python3 bench/gpu_verify_wide.py 2>&1 | tail -4
  echo "=== $b"
  KERAS_BACKEND=$b timeout 170 python3 -c "import keras; print(keras.backend.backend(), keras.__version__); import kmerge; print('devices:', keras.distribution.list_devices())" 2>&1 | tail -3
  KERAS_BACKEND=$b timeout 170 python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee ${OUT:-/tmp}/gpu_tests_$b.log | grep -E "passed|failed|Error|FAILED" | tail -15
done
echo "=== bench_inference (jax, GPU)"
KERAS_BACKEND=jax BENCH_REPEATS=5 timeout 150 python3 bench/bench_inference.py 2>&1 | tee ${OUT:-/tmp}/bench_inference_gpu.log | tail -14
