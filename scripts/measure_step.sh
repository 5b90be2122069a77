#!/usr/bin/env bash
# Measure one exported step of scripts/train_llava_like.sh (docs/model.md "Toward LLaVA's recipe"): likeness
# (raters, the tower's [CLS], the attention profile: FasterVLM's shift and dispersion), dense accuracy on the own
# world and on the independent renderer, the side-by-side with the installed model, the model card and the goals.
#   bash scripts/measure_step.sh checkpoints/llava-data-export                    # 3000 / 3000 / 1050 questions
#   N_EVAL=1000 N_LIKE=350 bash scripts/measure_step.sh checkpoints/llava-data-export   # when time is short
#   N_ORDER=800 ...: also every method at 64 tokens on the 800-question set (E/order64/benchmark.md)
# One thread, one job at a time; every output that exists is kept (rerun to finish an interrupted measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
E=${1:?usage: bash scripts/measure_step.sh EXPORT_DIR}
N_EVAL=${N_EVAL:-3000} N_LIKE=${N_LIKE:-1050} N_TOWER=${N_TOWER:-120}
export OMP_NUM_THREADS=${THREADS:-1} PYTHONHASHSEED=0
PY="python"
run() { echo "+ $*" >&2; "$@"; }
[ -f "$E/likeness_$N_LIKE.json" ] || run $PY -m training.likeness --model "$E" --n "$N_LIKE" --tower-n "$N_TOWER" \
   --threads 1 --json "$E/likeness_$N_LIKE.json" --md "$E/likeness_$N_LIKE.md" > /dev/null
[ -f "$E/eval_heldout_$N_EVAL.json" ] || run $PY -m training.evaluate --model "$E" --world v2 --n "$N_EVAL" \
   --threads 1 --json "$E/eval_heldout_$N_EVAL.json" > /dev/null
[ -f "$E/eval_independent_$N_EVAL.json" ] || run $PY -m training.evaluate --model "$E" --world independent \
   --n "$N_EVAL" --threads 1 --json "$E/eval_independent_$N_EVAL.json" > /dev/null
if [ "${N_ORDER:-0}" -gt 0 ] && [ ! -f "$E/order64/benchmark.json" ]; then  # the ordering at 64 tokens
  L=dense; for m in sparsevlm fastv fastervlm random sparsevlm-v2 visionzip divprune pyramiddrop dart; do L=$L,$m-64-paper; done
  run $PY -m sparsevlm eval --model "$E" --n "$N_ORDER" --methods "$L" --accounting paper --out "$E/order64" > /dev/null
fi
run $PY -m training.likeness --compare assets/models/scenes-llava/likeness_1050.json "$E/likeness_$N_LIKE.json" \
   --md "$E/likeness_compare.md" > /dev/null
run $PY -m training.model_card --model "$E" --write
run $PY -m training.model_card --model "$E" --check-attention-goals || true
