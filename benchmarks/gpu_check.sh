#!/usr/bin/env bash
# The GPU check: build, GPU tests, benchmark, written into one folder for committing under benchmarks/results/.
#
#   benchmarks/gpu_check.sh OUTDIR [--stage STAGE]... [--all-stages] [--cpu-dry-run] [-- EXTRA BENCH ARGS]
#
# Stages (default: install tests memory bench, at most 9 minutes on an H100 including the build: run it with a 600 s limit):
#   install     pip install --no-build-isolation --no-deps -e .  (MAX_JOBS=$(nproc), TORCH_CUDA_ARCH_LIST this GPU's
#               unless set; torch is never touched). The extension's Hopper engine needs CUTLASS's headers: where
#               nvidia-cutlass is not installed and CUTLASS_PATH is unset, the wheel is taken from .whl/ (fetch it
#               beforehand with `pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl` and carry .whl along)
#   tests       benchmarks/refusal_probe.py (do the CUDA ops' failed input checks raise, or crash?) beside
#               pytest -m gpu, two groups side by side (benchmarks/gpu_tests.sh)
#   tune        python -m fused_resnet.ops.triton_tune for ResNet-50, batch 256, bf16 (the table lands in OUTDIR too)
#   bench       python -m fused_resnet.bench --profile gpu-quick
#   max-autotune  ResNet-50 bf16 inference at batch 256, then 32, against torch.compile(mode="max-autotune"), beside
#               only the rows the issues' targets name (eager_cl+autocast, fused:cuda, fused:triton, compile), the
#               cuda backend's trial engine (fused:cuda+cutlass_trial, the candidate for its next default) and
#               fused:cuda replayed from a CUDA graph (+graph: the eager forward captured; +cudagraphs, batch 32:
#               torch.compile(mode="reduce-overhead")), as max-autotune replays its own: at batch 32 an eager
#               forward is host-bound (5.9 ms of host time per ResNet-50 forward on the H100, 2026-11-27 run2). Its
#               compile alone ran past 180 s on the H100 (2026-11-27 run4), so give this stage 420 s or more
#   train       training groups (those the bench stage did not run into OUTDIR) + the largest batch that fits
#               (ResNet-152 224x224, pre-act ResNet-1001 CIFAR)
#   memory      benchmarks/train_memory.py: peak memory of a ResNet-50 train step (bf16 autocast, batch 256, 224x224),
#               fused vs stock channels_last
#   profile     benchmarks/bn_passes_bench.py: each training pass over ResNet-50's BN layers (batch 256 bf16), ms per
#               step and GB/s, beside ATen's batch norm (and 2 and 4 rows per thread in the 16-byte kernels); then
#               benchmarks/profile_step.py: wall vs kernel time per step (host-bound or not), kernel time by kind and
#               the top kernels, inference and train, stock channels_last vs each fused backend (train: and
#               torch.compile, and where the host's time goes, by Python file and function)
#   sanitize    compute-sanitizer memcheck over `pytest -m gpu -k sanitize` and benchmarks/sanitize_smoke.py
#   full-bench  gpu-full profile, model by model; rerun the same command to continue (--resume)
# Each stage runs under `timeout` (STAGE_TIMEOUT seconds, default 290; the default run shares 540 s in all).
# Compile cost measured on CPU (2 cores, sm_90 through a stand-in driver): the Triton conv per-layer tests with
# three dtypes compiled 56 kernels in 92 s; they now run bf16 and fp32 only.
# A failing stage is reported and the next one runs; the exit code is non-zero if any stage failed.
#
# --cpu-dry-run (or GPU_CHECK_CPU_DRY_RUN=1): no GPU needed. Runs every stage that does not need CUDA, on the
# CPU with the tiny `smoke` profile, and skips the CUDA-only parts with a message. The install stage is skipped
# there unless GPU_CHECK_INSTALL=1 (it would rebuild the extension in the machine's environment).
#
# OUTDIR receives at most 7 files, each under 1 MB: gpu_check.log (each stage's output, trimmed to its last
# 800 lines, then the summary), results.csv, results.json, report.md, throughput.png, layers.png and the tune
# stage's triton_tuned_configs.json.
set -uo pipefail

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$1
shift
ALL_STAGES=(install tests tune bench max-autotune memory train profile sanitize full-bench)  # each has a branch in the loop below
STAGES=()
DRY=${GPU_CHECK_CPU_DRY_RUN:-0}
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --stage) [[ $# -ge 2 ]] || usage; STAGES+=("$2"); shift 2 ;;
        --all-stages) STAGES=("${ALL_STAGES[@]}"); shift ;;
        --cpu-dry-run) DRY=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) usage ;;
    esac
done
DEFAULT_RUN=0
if [[ ${#STAGES[@]} -eq 0 ]]; then
    STAGES=(install tests memory bench)
    DEFAULT_RUN=1
fi
for s in "${STAGES[@]}"; do
    [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || { echo "unknown stage: $s"; usage; }
done

# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script: point at a real toolkit root.
if [[ -z ${CUDA_HOME:-} ]]; then
    for root in /usr/local/cuda /usr/local/cuda-13.0; do
        if [[ -f $root/include/cuda_runtime.h ]]; then export CUDA_HOME=$root; break; fi
    done
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-290}
TOTAL_BUDGET=${GPU_CHECK_BUDGET:-540}
START=$(date +%s)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export FUSED_RESNET_BENCH_PLAIN=1 PYTHONUNBUFFERED=1
[[ ${GPU_CHECK_APPEND:-0} == 1 ]] || : >"$LOG"  # GPU_CHECK_APPEND=1: a second run adds to the first's log

have_cuda() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [[ $DRY != 1 ]] && ! have_cuda; then
    echo "no CUDA GPU visible to $PY: use --cpu-dry-run to exercise the check on a CPU" | tee -a "$LOG"
    exit 2
fi
if [[ $DRY == 1 ]]; then PROFILE=smoke; FULL_PROFILE=smoke; else PROFILE=gpu-quick; FULL_PROFILE=gpu-full; fi

SUMMARY=()
FAILED=0

# Seconds this stage may run: STAGE_TIMEOUT, or in the default run what is left of the shared budget.
stage_limit() {
    local limit=$STAGE_TIMEOUT
    if [[ $DEFAULT_RUN == 1 ]]; then
        local left=$((TOTAL_BUDGET - ($(date +%s) - START)))
        ((left < limit)) && limit=$left
        ((limit < 30)) && limit=30
    fi
    echo "$limit"
}

# run_stage NAME LIMIT COMMAND...: streams output, appends the last 800 lines to the log, records the result.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local t0 rc status
    t0=$(date +%s)
    echo "=== stage $name (limit ${limit}s): $*" | tee "$TMP/$name.out"
    # What the GPU holds as the stage starts (the 2026-11-27 run3 tune stage died of out-of-memory at its first
    # allocation, right after the tests stage).
    if [[ $DRY != 1 ]] && command -v nvidia-smi >/dev/null; then
        echo "GPU memory in use: $(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader 2>&1)" \
            | tee -a "$TMP/$name.out"
    fi
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$TMP/$name.out"
    rc=${PIPESTATUS[0]}
    local secs=$(($(date +%s) - t0))
    if [[ $rc == 0 ]]; then
        status="ok"
    elif [[ $rc == 5 && $name == tests ]]; then
        status="ok (no tests selected)"
    elif [[ $rc == 124 || $rc == 137 ]]; then
        status="FAILED: timed out after ${limit}s"; FAILED=1
    else
        status="FAILED: exit code $rc"; FAILED=1
    fi
    {
        echo "=== stage $name: $status (${secs}s); last 800 lines of its output:"
        tail -n 800 "$TMP/$name.out"
        echo
    } >>"$LOG"
    SUMMARY+=("$(printf '%-11s %-40s %5ss' "$name" "$status" "$secs")")
    echo "=== stage $name: $status (${secs}s)"
}

skip_stage() {
    local name=$1 why=$2
    echo "=== stage $name: skipped: $why" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-11s %-40s' "$name" "skipped: $why")")
}

# The bench's own budget: stop starting new groups a minute before the stage's limit.
minutes_for() { awk -v l="$1" 'BEGIN { m = (l - 60) / 60; if (m < 0.5) m = 0.5; printf "%.1f", m }'; }

for stage in "${STAGES[@]}"; do
    limit=$(stage_limit)
    case $stage in
        install)
            if [[ $DRY == 1 && ${GPU_CHECK_INSTALL:-0} != 1 ]]; then
                skip_stage install "CPU dry run leaves this environment alone (GPU_CHECK_INSTALL=1 runs it)"
                continue
            fi
            # CUTLASS's headers (the extension's Hopper engine): the GPU machine has no network, so the nvidia-cutlass
            # wheel travels in .whl/ (see the top of this file); unpacked only for the build.
            if [[ -z ${CUTLASS_PATH:-} ]] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
                wheel=$(compgen -G ".whl/nvidia_cutlass-*.whl" | head -1)
                if [[ -n $wheel ]]; then
                    "$PY" -m zipfile -e "$wheel" "$TMP/cutlass" && export CUTLASS_PATH=$TMP/cutlass/cutlass_library/source
                else
                    echo "no CUTLASS headers (.whl/nvidia_cutlass-*.whl not carried): the build leaves out the sm90 engine" | tee -a "$LOG"
                fi
            fi
            run_stage install "$limit" bash -c '
                before=$("$0" -c "import torch; print(torch.__version__)")
                # Only this GPU'"'"'s architecture (sm_90a on a Hopper): half the nvcc work of the default list.
                arch=$("$0" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f\"{m}.{n}\" + (\"a\" if m == 9 else \"\"))")
                export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
                echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
                build_start=$SECONDS
                # -v for setup.py'"'"'s own lines (the sm_90a files'"'"' seconds each); the whole log only if it fails.
                build_log=$(mktemp)
                if ! MAX_JOBS=$(nproc) "$0" -m pip install -v --no-build-isolation --no-deps -e . >"$build_log" 2>&1; then
                    tail -n 80 "$build_log"; exit 1
                fi
                grep -E "^ *fused_resnet: |Successfully installed" "$build_log"
                echo "pip install -e . (the build of _C): $((SECONDS - build_start)) s on $(nproc) cores"
                after=$("$0" -c "import torch; print(torch.__version__)")
                [[ $before == "$after" ]] || { echo "torch changed: $before -> $after"; exit 1; }
                "$0" -c "import fused_resnet, fused_resnet.backends as b; print(\"backends here:\", b.available_backends())"
                "$0" -c "from fused_resnet import _C; print(\"sm90 engine built:\", _C.has_sm90_engine())"
                # What built _C and which C++ runtime it meets (the 2026-11-27 H100 run crashed in std::ostream code
                # that cuda-gdb placed inside _C itself): the compilers, libstdc++ code defined in _C, the runtime.
                echo "c++: $(c++ --version 2>&1 | head -1) | nvcc: $(nvcc --version 2>&1 | tail -1)"
                env | grep -E "^(CC|CXX|CFLAGS|CXXFLAGS|CPPFLAGS|LDFLAGS|LD_PRELOAD|LD_LIBRARY_PATH)="
                so=$(compgen -G "fused_resnet/_C*.so" | head -1)
                ldd "$so" | grep -E "stdc\+\+|gcc_s"
                "$0" -c "import torch; print(\"libstdc++ mapped:\", sorted({l.split()[-1] for l in open(\"/proc/self/maps\") if \"libstdc++\" in l}))"
                # The pattern of setup.py'"'"'s own check (_warn_if_own_libstdcxx), here a failure: such a _C is broken.
                own=$(nm -C --defined-only "$so" | grep -E "std::ostream::_M_insert<|std::num_put<")
                if [[ -n $own ]]; then
                    echo "$so holds its own copy of libstdc++'"'"'s stream code (linked statically?):"; echo "$own" | head -5
                    exit 1
                fi
                # On a Hopper GPU a build without the engine would skip its tests: fail here instead.
                "$0" -c "import sys, torch; from fused_resnet import _C; sys.exit(torch.cuda.get_device_capability() == (9, 0) and not _C.has_sm90_engine())" \
                    || { echo "the sm90 engine was not built on this Hopper GPU: carry .whl/ (nvidia-cutlass) or set CUTLASS_PATH"; exit 1; }
            ' "$PY"
            ;;
        tests)
            if [[ $DRY == 1 ]]; then
                run_stage tests "$limit" bash benchmarks/gpu_tests.sh "$PY"
            else
                # The refusal probe (a crash seen at two input checks in the 2026-11-27 H100 run) beside pytest: each
                # mostly waits on its own processes' imports and compiles, and the machine has cores to spare.
                run_stage tests "$limit" bash -c '
                    probe_out=$(mktemp)
                    trap "echo \"=== refusal probe (stopped):\"; cat \"\$probe_out\"; exit 124" TERM INT
                    "$0" benchmarks/refusal_probe.py >"$probe_out" 2>&1 &
                    probe_pid=$!
                    bash benchmarks/gpu_tests.sh "$0"; tests=$?
                    wait $probe_pid; probe=$?
                    echo "=== refusal probe: exit $probe"; cat "$probe_out"
                    exit $((probe > tests ? probe : tests))
                ' "$PY"
            fi
            ;;
        bench)
            # --resume: the stages add their rows to one results file (without it a run replaces an earlier one's)
            run_stage bench "$limit" "$PY" -m fused_resnet.bench --out "$OUT" --max-minutes "$(minutes_for "$limit")" \
                --profile "$PROFILE" --resume "${EXTRA[@]}"
            ;;
        max-autotune)
            # The CPU dry run: the same command on a small model (no max-autotune row there: it is a GPU contender).
            if [[ $DRY == 1 ]]; then sizes=(--models resnet18 --batch 2); else sizes=(--models resnet50 --batch 256 32); fi
            run_stage max-autotune "$limit" "$PY" -m fused_resnet.bench --out "$OUT" --max-minutes "$(minutes_for "$limit")" \
                --profile "$PROFILE" "${sizes[@]}" --dtypes bf16 --mode inference --no-layers \
                --compile all --max-autotune --graph-replays --resume \
                --contenders eager_cl+autocast fused:cuda fused:cuda+cutlass_trial fused:triton compile \
                compile_max_autotune fused:cuda+graph fused:cuda+cudagraphs "${EXTRA[@]}"
            ;;
        train)
            run_stage train "$limit" "$PY" -m fused_resnet.bench --out "$OUT" --max-minutes "$(minutes_for "$limit")" \
                --profile "$PROFILE" --mode train --no-layers --max-batch-search --resume "${EXTRA[@]}"
            ;;
        tune)
            if [[ $DRY == 1 ]]; then skip_stage tune "the tuner needs a GPU"; continue; fi
            # The Triton conv's table for ResNet-50 at batch 256 in bf16 on this GPU, copied into OUTDIR; later
            # stages of this run use it (the package is installed in place).
            # The tuner writes OUTDIR's copy after each shape, so a stage stopped at its limit still returns those.
            run_stage tune "$limit" bash -c '
                cp fused_resnet/ops/triton_tuned_configs.json "$1/" || exit 1
                "$0" -m fused_resnet.ops.triton_tune --models resnet50 --batch 256 --dtypes bf16 \
                    --out "$1/triton_tuned_configs.json"; rc=$?
                cp "$1/triton_tuned_configs.json" fused_resnet/ops/
                exit $rc
            ' "$PY" "$OUT"
            ;;
        memory)
            if [[ $DRY == 1 ]]; then
                run_stage memory "$limit" "$PY" benchmarks/train_memory.py --batch 4 --size 64
            else
                run_stage memory "$limit" "$PY" benchmarks/train_memory.py --device cuda --bf16 --batch 256 --size 224
            fi
            ;;
        profile)
            if [[ $DRY == 1 ]]; then
                run_stage profile "$limit" bash -c '
                    "$0" benchmarks/profile_step.py --model resnet18 --batch 2 --size 32 --steps 2 --mode inference \
                        || exit 1
                    "$0" benchmarks/bn_passes_bench.py --model resnet18 --batch 2 --size 32 --rounds 1
                ' "$PY"
            else
                run_stage profile "$limit" bash -c '
                    "$0" benchmarks/bn_passes_bench.py --bf16 || exit 1
                    "$0" benchmarks/profile_step.py --bf16 --mode inference || exit 1
                    "$0" benchmarks/profile_step.py --bf16 --mode train --compile --host-profile 12
                ' "$PY"
            fi
            ;;
        sanitize)
            if [[ $DRY == 1 ]]; then
                # No CUDA: check that the sanitize script itself runs, on the CPU, without compute-sanitizer.
                run_stage sanitize "$limit" "$PY" benchmarks/sanitize_smoke.py
                SUMMARY[-1]="${SUMMARY[-1]}  (CPU, no compute-sanitizer)"
            elif ! command -v compute-sanitizer >/dev/null; then
                skip_stage sanitize "compute-sanitizer not on PATH"; FAILED=1
            else
                run_stage sanitize "$limit" bash -c '
                    cs="compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 --target-processes all"
                    $cs "$0" -m pytest -m gpu -k sanitize -q -p no:cacheprovider tests; rc=$?
                    [[ $rc == 0 || $rc == 5 ]] || exit $rc
                    $cs "$0" benchmarks/sanitize_smoke.py
                ' "$PY"
            fi
            ;;
        full-bench)
            run_stage full-bench "$limit" "$PY" -m fused_resnet.bench --out "$OUT" --max-minutes "$(minutes_for "$limit")" \
                --profile "$FULL_PROFILE" --resume "${EXTRA[@]}"
            ;;
        *) echo "gpu_check.sh has no branch for stage $stage"; exit 2 ;;
    esac
done

# At most 1 MB per file: logs keep their end.
for f in "$OUT"/*; do
    size=$(stat -c %s "$f")
    if ((size > 1000000)); then
        if [[ $f == *.log ]]; then
            tail -c 990000 "$f" >"$TMP/trim" && mv "$TMP/trim" "$f"
        else
            echo "warning: $(basename "$f") is $size bytes (over 1 MB)" | tee -a "$LOG"
        fi
    fi
done

{
    echo
    echo "=== gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START))s, dry run: $DRY)"
    "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "| torch", torch.__version__, "| CUDA", torch.version.cuda)' 2>&1
    printf '%s\n' "${SUMMARY[@]}"
    if [[ -f "$OUT/results.json" ]]; then
        echo "results:"
        "$PY" -m fused_resnet.bench.summary "$OUT" 2>&1 | sed 's/^/  /'
    fi
    echo "files in $OUT:"
    (cd "$OUT" && ls -l | tail -n +2 | awk '{printf "  %-16s %9s bytes\n", $NF, $5}')
    if [[ $FAILED != 0 ]]; then echo "RESULT: FAILED (see the stages above)"; else echo "RESULT: all stages ok"; fi
} | tee -a "$LOG"
exit "$FAILED"
