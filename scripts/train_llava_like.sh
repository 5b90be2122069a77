#!/usr/bin/env bash
# The embedded model's recipe moved toward LLaVA's, one measured step at a time (docs/model.md "Toward LLaVA's
# recipe"). Each step continues the one before; rerun the script and every step resumes from its checkpoint (a
# finished step exits at once). Nothing is installed: a step is exported to checkpoints/<step>-export, measured
# (commands below) and installed only through scripts/ship_v2.sh when every goal is met.
#
# Step 1, llava-data: from the installed model (its export: the auxiliary heads are not in it), instruction tuning
#   with what LLaVA-1.5's stage 2 has and nothing else:
#   - no auxiliary head at all: no per-patch heads on the tower (the installed model's last legs had them at 0.5),
#     no contrastive term, no grid / where / order / referent head, no background curriculum;
#   - the tower frozen, as LLaVA-1.5 freezes CLIP (so the [CLS] figures are the installed model's, unchanged);
#   - wider data: a caption turn ("describe the picture .") in half the conversations (0.2 before) and a quarter
#     of the 12 question turns about the whole picture or a part of it, empty parts included (training/wide.py:
#     how many objects, is there an object at the bottom left, describe the top right, how many in a row);
#   - the 24 layers block expansion added (layer 1, FastV's K-1, among them; their residual outputs are about a
#     tenth of a trained layer's) learn at 3x the rate, so they become trained layers; LLaMA Pro trains only its
#     added blocks.
#   The family weights, fonts, stroke labels and tinted backgrounds are the installed model's last phase's.
#   320 steps, ~11 s a step on one CPU thread (about an hour).
set -euo pipefail
cd "$(dirname "$0")/.."
T="${THREADS:-1}"
D="${DEVICE:-cpu}"
export OMP_NUM_THREADS="$T"
DATA=(--label-fonts --stroke-labels 0.5 --tinted-backgrounds 0.4
      --family-weights read=5,shape=3,count=6,exist=2,colour=1.5,relation=1.5,position=1.5)
S1="${STEP1_STEPS:-320}"
python -m training.train_llava --threads "$T" --device "$D" --phase instruct --out checkpoints/llava-data \
   --init-from "${INIT_FROM:-assets/models/scenes-llava}" --until "$S1" \
   --batch 8 --turns 12 --caption-p 0.5 --whole-p 0.25 --lr 1e-4 --warmup 20 --decay-from 100 --lr-end 1e-5 \
   --projector-lr-scale 2 --tower-lr-scale 0 --patch-weight 0 --grid-weight 0 --grown-lr-scale 3 \
   "${DATA[@]}" --ckpt-minutes 3 --log-every 5 --seed 41
[ -f checkpoints/llava-data-export/config.json ] || \
   python -m training.train_llava --out checkpoints/llava-data --export checkpoints/llava-data-export
# Then measure (one thread each, one at a time):
#   PYTHONHASHSEED=0 python -m training.likeness --model checkpoints/llava-data-export --profile-only \
#       --json checkpoints/llava-data-export/profile.json
#   PYTHONHASHSEED=0 python -m training.evaluate --model checkpoints/llava-data-export --world v2 --n 3000 --threads 1
#   PYTHONHASHSEED=0 python -m training.evaluate --model checkpoints/llava-data-export --world independent --n 3000 --threads 1
#   PYTHONHASHSEED=0 python -m training.likeness --model checkpoints/llava-data-export --n 1050 \
#       --json checkpoints/llava-data-export/likeness_1050.json --md checkpoints/llava-data-export/likeness_1050.md
