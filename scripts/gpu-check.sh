#!/usr/bin/env bash
# One command for the GPU: everything the project checks on a CUDA GPU, in about 7.5 minutes on one H100.
#   1. tests: tests/test_cuda.py (every method on both architectures in fp16 and bf16, the oracles, loading onto
#      CUDA)
#   2. bench: python -m sparsevlm bench --width 7b: LLaVA-1.5-7B's full shape with random weights, every method in
#      both accountings: prefill and TTFT against dense, time ratio against FLOPs ratio, pruning overhead, peak memory
#   3. bench-next: python -m sparsevlm bench --width 7b --visual next: LLaVA-NeXT-7B's full shape
#      (llava-hf/llava-v1.6-vicuna-7b-hf, anyres) with random weights, a 672 x 672 picture = 2,928 visual tokens,
#      every method at 320 in both accountings, with the same measures
#   4. page: the page answering on CUDA with the LLaVA-1.5-7B-shaped model (scripts/gpu_check.py page), through
#      its API
# then writes docs/bench-gpu.md and docs/bench-gpu.json (scripts/gpu_check.py report).
#
# NOT RUN YET: no GPU was available when this script was written, so docs/bench-gpu.md does not exist yet and
# no GPU figure in the docs comes from it. Run it on a GPU machine and commit what it writes.
#
#   scripts/gpu-check.sh                                  # on a GPU: cuda, 7b, into docs/
#   scripts/gpu-check.sh --device cpu --width tiny --out /tmp/gpu-dry --runs 1 --warmup 0 --requests 1 \
#       --tests-k llama-float16 --limits 900,900,900,900  # a dry run of the script on a CPU (the test suite's)
#
# Each step has its own time limit (--limits TESTS,BENCH,BENCH_NEXT,PAGE seconds; the default 150,120,90,90 adds
# up to 7.5 minutes, estimates until the script has run on a GPU; the older three-value form TESTS,BENCH,PAGE
# still works and gives bench-next the bench's limit); a step that fails or runs out of time is reported as such
# and the others still run. --tests-k picks a subset of tests/test_cuda.py (pytest -k). The
# exit status is 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda; WIDTH=7b; OUT=docs; RUNS=5; WARMUP=2; REQUESTS=5; TESTS_K=""; LIMITS=150,120,90,90
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift ;;
    --width) WIDTH="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --runs) RUNS="$2"; shift ;;
    --warmup) WARMUP="$2"; shift ;;
    --requests) REQUESTS="$2"; shift ;;
    --tests-k) TESTS_K="$2"; shift ;;
    --limits) LIMITS="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

IFS=, read -r -a L <<<"$LIMITS"
case ${#L[@]} in
  4) LIMIT_TESTS=${L[0]}; LIMIT_BENCH=${L[1]}; LIMIT_BENCH_NEXT=${L[2]}; LIMIT_PAGE=${L[3]} ;;
  3) LIMIT_TESTS=${L[0]}; LIMIT_BENCH=${L[1]}; LIMIT_BENCH_NEXT=${L[1]}; LIMIT_PAGE=${L[2]} ;;  # TESTS,BENCH,PAGE
  *) echo "gpu-check: --limits takes TESTS,BENCH,BENCH_NEXT,PAGE seconds (or the older TESTS,BENCH,PAGE), not" \
       "'$LIMITS'" >&2; exit 2 ;;
esac
for x in "$LIMIT_TESTS" "$LIMIT_BENCH" "$LIMIT_BENCH_NEXT" "$LIMIT_PAGE"; do
  [[ $x =~ ^[1-9][0-9]*$ ]] \
    || { echo "gpu-check: --limits '$LIMITS': each limit is a positive whole number of seconds, not '$x'" >&2; exit 2; }
done
PY=${PYTHON:-python}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
say() { echo "gpu-check: [$(( $(date +%s) - START ))s] $*"; }
step() {  # step NAME LIMIT COMMAND...: run it under its time limit, record its seconds and exit status
  local name=$1 limit=$2; shift 2
  local t0 rc took
  t0=$(date +%s)
  say "$name: $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  took=$(( $(date +%s) - t0 ))
  [ "$rc" = 124 ] && say "$name: ran out of its $limit s"
  say "$name: exit $rc after $took s"
  echo "{\"step\": \"$name\", \"seconds\": $took, \"rc\": $rc, \"limit_s\": $limit}" >>"$WORK/steps.jsonl"
}

say "device $DEVICE, width $WIDTH, writing $OUT/bench-gpu.md and $OUT/bench-gpu.json"
say "limits: tests $LIMIT_TESTS s, bench $LIMIT_BENCH s, bench-next $LIMIT_BENCH_NEXT s, page $LIMIT_PAGE s"
if [ "$DEVICE" != cpu ]; then "$PY" -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'" \
  || { echo "gpu-check: CUDA is not available here (use --device cpu --width tiny for a dry run)" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu-check: /'
fi

step tests "$LIMIT_TESTS" env SPARSEVLM_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_cuda.py ${TESTS_K:+-k "$TESTS_K"} --junitxml="$WORK/test_cuda.xml"
step bench "$LIMIT_BENCH" "$PY" -m sparsevlm bench --width "$WIDTH" --device "$DEVICE" --runs "$RUNS" \
  --warmup "$WARMUP" --json --out "$WORK/bench.json"
step bench-next "$LIMIT_BENCH_NEXT" "$PY" -m sparsevlm bench --width "$WIDTH" --visual next --device "$DEVICE" \
  --runs "$RUNS" --warmup "$WARMUP" --json --out "$WORK/bench-next.json"
step page "$LIMIT_PAGE" "$PY" scripts/gpu_check.py page --device "$DEVICE" --width "$WIDTH" --requests "$REQUESTS" \
  --out "$WORK/page.json"

"$PY" scripts/gpu_check.py report --tests "$WORK/test_cuda.xml" --bench "$WORK/bench.json" \
  --bench-next "$WORK/bench-next.json" --page "$WORK/page.json" --steps "$WORK/steps.jsonl" --device "$DEVICE" \
  --out "$OUT/bench-gpu" || exit 1
FAILED=$(grep -vc '"rc": 0,' "$WORK/steps.jsonl")
say "done in $(( $(date +%s) - START )) s; $FAILED of 4 steps failed"
[ "$FAILED" = 0 ]
