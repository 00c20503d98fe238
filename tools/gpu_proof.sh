#!/usr/bin/env bash
# Everything a GPU session proves in ONE device call (under 10 minutes): build the CUDA
# kernels, run the op and CUDA tests, time the kernels against the issue's targets, and run
# compute-sanitizer (memcheck, racecheck) on a small selection of the CUDA tests.
#
#   bash tools/gpu_proof.sh [stage ...]   stages: build tests bench memcheck racecheck engine e2e
#
# Default: the first five, in that order (the benchmark before the sanitizers, which are the
# likeliest to run long). Each stage is time-boxed and runs whatever the earlier ones did;
# together they stay inside GPU_PROOF_BUDGET_S (default 550 s). On a machine that is still
# warm from a call that built the kernels, `bash tools/gpu_proof.sh tests bench ...` skips
# the build (the in-place library msd_kernels/_C*.so is an ignored file and stays).
# `engine` (the engine tests on CUDA, fp32 and bf16, against HF's generate, for every target
# family and for batches; CUDA-graph replay; the step under sync-debug mode) and `e2e`
# (benchmarks/e2e.py on a LLaVA-1.5-7B-shaped bf16 model: compare and controlled modes) fill
# a second call: `bash tools/gpu_proof.sh engine e2e` on the still-warm machine.
# Logs, cuda_kernels.json/.md, e2e_*.json/.md and summary.txt go to $OUT (a temporary folder if unset);
# the console gets each stage's tail, the benchmark table and the summary, last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.:python

OP_TESTS=(tests/test_tree_build.py tests/test_tree_attention.py tests/test_kv_compact.py tests/test_verify.py
          tests/test_op_api.py tests/test_cuda_ops.py tests/test_cuda_tree_attention.py)
CUDA_TESTS=(tests/test_cuda_tree_attention.py tests/test_cuda_ops.py)
# Under a sanitizer the hypothesis suites are far too slow (their explicit max_examples win
# over any profile), so these select the hand-built cases: every kernel, at model sizes.
MEMCHECK_SELECTION="not random_shapes and not 152064 and not 100k_rows"
RACECHECK_SELECTION="(llava7b_tree and 1024) or gqa_32_over_8 or causal_chunk_q128
  or (head_dims_and_dtypes and dtype1) or (large_vocab and 32000 and dtype2) or (tree_assemble_pool_510 and 59)
  or (verify_greedy_32000 and 59 and dtype2) or verify_sampling_matches or kv_compact_32_layers"
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
SANITIZER_ERROR_RC=99

# One stage, run in its own process so that `timeout` can stop it.
run_one() {
  case $1 in
    build)
      local begin=$SECONDS
      # Only Hopper by default: half the nvcc work of the 8.0;9.0 default.
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        python3 -m pip install -v --no-build-isolation --no-deps -e . || return
      echo "build: pip install -e took $((SECONDS - begin)) s"
      python3 -c '
import msd_kernels
where = msd_kernels.load_library()
print("build: kernels loaded from", where)
assert where.endswith(".so"), "no in-place library: every later stage would compile the kernels again"'
      ;;
    tests)
      local parallel=()
      if python3 -c "import xdist" 2>/dev/null; then
        parallel=(-n 8)
        export OMP_NUM_THREADS=2  # 8 workers x 2 threads on the 16 cores
      fi
      python3 -m pytest "${OP_TESTS[@]}" -q -x -p no:cacheprovider "${parallel[@]}"
      ;;
    bench)
      python3 benchmarks/cuda_kernels.py --out "$OUT/cuda_kernels.json"
      ;;
    engine)
      # The engine on CUDA against HF's generate (every family), batches, CUDA-graph replay and the
      # sync-debug check of the decoding step.
      python3 -m pytest tests/test_engine.py tests/test_target_families.py tests/test_batches.py -q \
        -p no:cacheprovider -k "cuda"
      ;;
    e2e)
      local e2e=(python3 benchmarks/e2e.py --preset llava-1.5-7b --dtype bfloat16 --device cuda)
      "${e2e[@]}" --mode compare --out "$OUT/e2e_compare.json" && "${e2e[@]}" --mode controlled --out "$OUT/e2e_controlled.json"
      ;;
    memcheck | racecheck)
      local selection=$MEMCHECK_SELECTION
      [[ $1 == racecheck ]] && selection=$RACECHECK_SELECTION
      # Without the caching allocator every tensor is its own allocation, so memcheck sees an
      # access past a tensor's end instead of a read inside the allocator's larger block.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$1" --error-exitcode "$SANITIZER_ERROR_RC" \
        --print-limit 20 python3 -m pytest "${CUDA_TESTS[@]}" -q -p no:cacheprovider -k "$selection"
      ;;
    *)
      echo "unknown stage $1 (stages: build tests bench memcheck racecheck engine e2e)" >&2
      return 2
      ;;
  esac
}

if [[ ${1:-} == --one ]]; then
  run_one "$2"
  exit
fi

OUT=${OUT:-$(mktemp -d)}
export OUT
BUDGET_S=${GPU_PROOF_BUDGET_S:-550}
declare -A CAP_S=([build]=240 [tests]=150 [bench]=150 [memcheck]=120 [racecheck]=90 [engine]=240 [e2e]=300)
(($# > 0)) || set -- build tests bench memcheck racecheck
summary=()

# The line of a stage's log worth reading in the summary: pytest's count, the sanitizer's
# error summary, the build time, the benchmark's mismatches.
key_lines() {
  grep -E "[0-9]+ (passed|failed)|no tests ran|ERROR SUMMARY|MISMATCHES|^build: |^Traceback" "$1" | tail -n 3 |
    tr '\n' ';' | sed 's/;$//'
}

run_stage() {
  local name=$1 log="$OUT/$1.log"
  local left=$((BUDGET_S - SECONDS - 10))
  local limit=$((CAP_S[$name] < left ? CAP_S[$name] : left))
  if ((limit < 20)); then
    summary+=("$(printf '%-9s %-9s %s' "$name" skipped "only ${left} s of the ${BUDGET_S} s budget left")")
    return
  fi
  echo "=== $name (time box ${limit} s)"
  local begin=$SECONDS
  timeout --kill-after=10 "$limit" bash "$0" --one "$name" >"$log" 2>&1
  local rc=$? status=ok
  if ((rc == 124 || rc == 137)); then status="TIMED OUT"
  elif ((rc == SANITIZER_ERROR_RC)); then status="SANITIZER ERRORS"
  elif ((rc != 0)); then status=FAILED
  fi
  tail -n 12 "$log" | cut -c1-300  # nvcc command lines run to thousands of characters
  summary+=("$(printf '%-9s %-9s rc=%-3s %4s s  %s' "$name" "$status" "$rc" $((SECONDS - begin)) "$(key_lines "$log")")")
}

for stage in "$@"; do
  [[ -v CAP_S[$stage] ]] || { echo "unknown stage $stage (stages: ${!CAP_S[*]})" >&2; exit 2; }
done
info=$(
  echo "gpu_proof: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), out $OUT"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1
  python3 -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")'
  "$SANITIZER" --version 2>&1 | tail -n 1
)
echo "$info"

for stage in "$@"; do
  run_stage "$stage"
done

for table in "$OUT"/cuda_kernels.md "$OUT"/e2e_*.md; do
  if [[ -f $table ]]; then
    echo
    cat "$table"
  fi
done
{
  echo
  echo "=== gpu_proof summary ($SECONDS s in all; logs in $OUT)"
  echo "$info"
  printf '%s\n' "${summary[@]}"
} | tee "$OUT/summary.txt"
! printf '%s\n' "${summary[@]}" | grep -qvE '^\S+ +ok '
