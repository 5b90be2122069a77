#!/usr/bin/env bash
# The contrastive (CLIP) objective on the embedded model's vision tower, continued from the installed model: the
# last instruction-tuning phase's settings plus CLIP's loss between the pooled [CLS] and a small text encoder
# (training/clip_tower.py; docs/model.md "A contrastive (CLIP) objective for the tower"). Resumable: rerun it.
# 400 steps took about 64 minutes on 2 CPU cores (~9 s a step). Then measure the result:
#   python -m training.clip_tower checkpoints/v2-clip/checkpoint.pt          # [CLS] figures + caption retrieval
#   bash scripts/ship_v2.sh checkpoints/v2-clip --dest /tmp/clip-ship          # bars, likeness, card (no install)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m training.train_llava --threads "${THREADS:-2}" --device "${DEVICE:-cpu}" --phase instruct \
   --out checkpoints/v2-clip --init-from assets/models/scenes-llava --until "${CLIP_STEPS:-400}" \
   --batch 8 --turns 12 --caption-p 0.2 --lr 5e-5 --warmup 30 --decay-from 250 --lr-end 5e-6 \
   --background-keep-start 1 --family-weights read=5,shape=3,count=6,exist=2,colour=1.5,relation=1.5,position=1.5 \
   --tower-lr-scale 0.4 --patch-weight 0.5 --label-fonts --stroke-labels 0.5 --tinted-backgrounds 0.4 \
   --clip-weight 1 --clip-batch 32 --clip-lr-scale 6 --ckpt-minutes 3 --log-every 5 --seed 21
