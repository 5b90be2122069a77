#!/usr/bin/env bash
# Ship model v2 (issue 10) as the embedded default in one command, once training has produced a checkpoint:
#
#   bash scripts/ship_v2.sh checkpoints/v2-grow32                     # the real swap, in assets/ (bars enforced)
#   bash scripts/ship_v2.sh CKPT_DIR --dest /tmp/ship --quick         # a rehearsal: nothing in assets/ touched
#   bash scripts/ship_v2.sh checkpoints/v2-grow32 --below-bars        # the swap although bars are missed (the
#                                                                     # card and this log name each one)
#
# Steps, each printed before it runs and skipped when its output exists (rerun to resume; a checkpoint newer than
# the export starts over from the export):
#   1. export the checkpoint (train_llava.export: records "world": "v2") into a staging folder;
#   2. evaluate on held-out questions of v2 and of the independent renderer (JSON into the model folder);
#   3. measure likeness (likeness --json) and put it beside v1's (likeness --compare);
#   4. write the model card from those JSON files (python -m training.model_card --write);
#   5. the gate: issue 10's bars (model_card --check-bars); the real run stops here unless they are met;
#   6. move v1 aside (models/scenes-llava -> models/scenes-llava-v1, with its likeness summary) and install v2;
#   7. regenerate the one-click examples from v2's world.
# --dest DIR: DIR stands in for assets/ (DIR/models/..., DIR/examples; the staging folder is DIR/staging); when
#   DIR has no models yet it gets a copy of today's assets/models/scenes-llava to move aside.
# --quick: small n (N_EVAL, N_LIKE; default 14 and 7), the gate reports but does not stop; needs --dest.
# --below-bars: full n, the gate reports but does not stop: a deliberate swap to a model that is better than v1 on
#   what was measured but misses some of issue 10's bars; the model card says "not met" and names them.
# Environment: THREADS (torch threads, default 1), N_EVAL, N_LIKE, NICE (default 15), PYTHON (default python).
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."

usage() { echo "usage: bash scripts/ship_v2.sh CKPT_DIR [--dest DIR] [--quick]" >&2; exit 2; }
die() { echo "ship_v2: $*" >&2; exit 1; }
run() { echo "+ $*" >&2; "$@"; }  # every step's command is printed before it runs
world_of() { $PY -c "import sys; from sparsevlm.scenes.worlds import world_of_model; print(world_of_model(sys.argv[1]))" "$1"; }
CKPT="" DEST="" QUICK=0 BELOW=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) [ $# -ge 2 ] || usage; DEST=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --below-bars) BELOW=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$CKPT" ] || usage; CKPT=$1; shift ;;
  esac
done
[ -n "$CKPT" ] || usage
abs() { case "$1" in /*|"") echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }  # paths as the caller gave them
[ "$CALLER" -ef "$PWD" ] || { CKPT=$(abs "$CKPT"); DEST=$(abs "$DEST"); }
[ -f "$CKPT/checkpoint.pt" ] || die "no checkpoint.pt in $CKPT"
[ $QUICK = 0 ] || [ -n "$DEST" ] || die "--quick needs --dest (a quick run never touches assets/)"

THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS PYTHONHASHSEED=0  # the generators' exist-no questions depend on the hash seed
PY="nice -n ${NICE:-15} ${PYTHON:-python}"
if [ $QUICK = 1 ]; then N_EVAL=${N_EVAL:-14} N_LIKE=${N_LIKE:-7}; else N_EVAL=${N_EVAL:-3000} N_LIKE=${N_LIKE:-1050}; fi
V1_LIKENESS=docs/likeness-scenes-llava-v1.json  # v1's measurement (1050 questions), the comparison's left column

if [ -n "$DEST" ]; then
  ROOT=$DEST STAGE=$DEST/staging
  if [ ! -e "$ROOT/models/scenes-llava" ] && [ ! -e "$ROOT/models/scenes-llava-v1" ]; then
    V1=assets/models/scenes-llava
    [ ! -d assets/models/scenes-llava-v1 ] || V1=assets/models/scenes-llava-v1  # v2 has shipped already
    mkdir -p "$ROOT/models"
    run cp -r "$V1" "$ROOT/models/scenes-llava"  # the v1 model to move aside
  fi
else
  ROOT=assets STAGE=checkpoints/ship-v2/scenes-llava
fi
NEW=$ROOT/models/scenes-llava OLD=$ROOT/models/scenes-llava-v1

# A JSON step is done when its file exists: evaluate and likeness write it only once they have finished.
json_step() {
  local out=$1; shift
  if [ -f "$out" ]; then echo "= $out exists"; return; fi
  run "$@" "$out"
}

# 1. export
if [ ! -f "$STAGE/config.json" ] || [ "$CKPT/checkpoint.pt" -nt "$STAGE/model.safetensors" ]; then
  rm -rf "$STAGE"
  run $PY -m training.train_llava --out "$CKPT" --export "$STAGE"
else
  echo "= $STAGE is the export of $CKPT/checkpoint.pt"
fi
[ "$(world_of "$STAGE")" = v2 ] || die "$STAGE does not record world v2 (training_state.json): not a model v2 export"

# 2. held-out evaluations (the model's own world: eval_heldout_N.json, as the v1 folder names its own)
json_step "$STAGE/eval_heldout_$N_EVAL.json" \
  $PY -m training.evaluate --model "$STAGE" --world v2 --n "$N_EVAL" --threads "$THREADS" --json
json_step "$STAGE/eval_independent_$N_EVAL.json" \
  $PY -m training.evaluate --model "$STAGE" --world independent --n "$N_EVAL" --threads "$THREADS" --json

# 3. likeness, and beside v1's
json_step "$STAGE/likeness_$N_LIKE.json" $PY -m training.likeness --model "$STAGE" --n "$N_LIKE" \
  --threads "$THREADS" --md "$STAGE/likeness_$N_LIKE.md" --json > /dev/null
run $PY -m training.likeness --compare "$V1_LIKENESS" "$STAGE/likeness_$N_LIKE.json" \
  --md "$STAGE/likeness_compare.md" > /dev/null

# 4. the model card, from those files
run $PY -m training.model_card --model "$STAGE" --write

# 5. the gate
if ! run $PY -m training.model_card --model "$STAGE" --check-bars; then
  if [ $QUICK = 1 ]; then
    echo "(quick run: the bars are reported, not enforced)"
  elif [ $BELOW = 1 ]; then
    SHIPPED_BELOW=1
    echo "(--below-bars: installing although the bars above are not met)"
  else
    die "not shipped: model v2 does not meet issue 10's bars (figures in $STAGE/README.md); assets/ unchanged"
  fi
fi

# 6. v1 aside, v2 in
if [ -d "$NEW" ] && [ "$(world_of "$NEW")" = v1 ]; then
  [ ! -e "$OLD" ] || die "$NEW and $OLD both hold a v1 model: sort them out by hand"
  run mv "$NEW" "$OLD"
fi
if [ -d "$OLD" ] && [ ! -f "$OLD/likeness_1050.json" ]; then  # what the scenes-llava-v1 preset's summary quotes
  run cp "$V1_LIKENESS" "$OLD/likeness_1050.json"
fi
if [ -f "$NEW/model.safetensors" ] && cmp -s "$STAGE/model.safetensors" "$NEW/model.safetensors"; then
  echo "= $NEW already holds this export"
else
  rm -rf "$NEW.part"
  run cp -r "$STAGE" "$NEW.part"
  rm -rf "$NEW"
  run mv "$NEW.part" "$NEW"
fi
run $PY -m training.model_card --model "$NEW" --write  # the card names the installed folder

# 7. the one-click examples, from the model's world
run $PY -m training.examples --world v2 --out "$ROOT/examples" > /dev/null

echo "shipped: $NEW (world $(world_of "$NEW")), v1 at $OLD; sizes:"
[ "${SHIPPED_BELOW:-0}" = 0 ] || echo "shipped BELOW issue 10's bars: $NEW/README.md names each bar it misses"
du -sh "$NEW" "$OLD" "$ROOT/examples"
echo "left to a person: README.md's embedded-model section and docs/model-v2.md from $NEW/README.md (prose is not"
echo "generated), then the full test suite (tests/test_embedded_model.py checks both models) and a commit."
