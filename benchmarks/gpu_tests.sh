#!/usr/bin/env bash
# The GPU check's test stage: `pytest -m gpu` in two processes side by side, so that a kernel fault in the
# extension's tests cannot hide the Triton tests' results and Triton's compiles use more than one core.
#
#   benchmarks/gpu_tests.sh PYTHON
#
#   extension  the files of EXT_FILES below (the extension's kernels), with CUDA_LAUNCH_BLOCKING=1 so a fault is
#              reported at the launch that made it
#   rest       every other file's gpu tests (Triton kernels, models, torch.compile)
# With pytest-xdist each group is spread over workers (a worker whose CUDA context broke is replaced: see
# tests/conftest.py); with pytest-timeout no single test runs past PER_TEST_TIMEOUT seconds (default 240).
# Each group's output is printed whole when it ends, or when this script is stopped.
set -uo pipefail
PY=${1:-python}
EXT_FILES=(tests/test_cpp_ops.py tests/test_cuda_sm90_engine.py tests/test_training_passes.py tests/test_max_pool_kernels.py
           tests/test_stats_finalize.py tests/test_grad_sums_coefficients.py tests/test_training_cuda_graph.py
           tests/test_projection_train.py)
TMP=$(mktemp -d)

has() { "$PY" -c "import $1" 2>/dev/null; }
common=(-m gpu -q -rfEs --tb=short -p no:cacheprovider)
has pytest_timeout && common+=(--timeout "${PER_TEST_TIMEOUT:-240}")
workers() { has xdist && echo "-n $1"; }

pids=()
report() {
    for g in extension rest; do
        echo "=== pytest group $g: $(cat "$TMP/$g.rc" 2>/dev/null || echo 'did not finish')"
        cat "$TMP/$g.out" 2>/dev/null
    done
}
trap 'kill "${pids[@]}" 2>/dev/null; report; exit 124' TERM INT

ignores=()
for f in "${EXT_FILES[@]}"; do ignores+=(--ignore "$f"); done
# shellcheck disable=SC2046
(CUDA_LAUNCH_BLOCKING=1 "$PY" -m pytest "${common[@]}" $(workers 4) "${EXT_FILES[@]}" >"$TMP/extension.out" 2>&1
 echo $? >"$TMP/extension.rc") &
pids+=($!)
# shellcheck disable=SC2046
("$PY" -m pytest "${common[@]}" $(workers 8) "${ignores[@]}" tests >"$TMP/rest.out" 2>&1; echo $? >"$TMP/rest.rc") &
pids+=($!)
wait
report
rc=0
for g in extension rest; do
    code=$(cat "$TMP/$g.rc")
    [[ $code == 0 || $code == 5 ]] || rc=1
done
rm -rf "$TMP"
exit $rc
