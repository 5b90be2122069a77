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
#     tenth of a trained layer's) learn at 3x the rate, meant to make them trained layers (LLaMA Pro trains only
#     its added blocks); measured, it did not (step 2).
#   The family weights, fonts, stroke labels and tinted backgrounds are the installed model's last phase's.
#   320 steps, 67 CPU-minutes on one thread.
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
# Step 2, llava-readers: every layer a fixed-layer method reads becomes a trained layer. The installed model was
#   grown with its 8 trained layers at 0, 2, 6, 15, 18, 22, 27, 31 (parts.grown_positions): FastV's K-1 = 1 and
#   PyramidDrop's ranking layers 8 and 16 are grown ones. training/regrow.py moves the trained layers, in their
#   order, to 0, 1, 2, 6, 8, 15, 16, 31 (parts.reader_positions) and the grown layers, in theirs, to the other
#   indices; no weight changes. Step 1 trained the grown layers at 3x the rate and layer 1 still barely moved (its
#   o_proj norm 1.19 -> 1.33 in 320 steps, a trained layer's ~11): moving them is what makes it a trained layer.
#   No training: measured as it is.
[ -f checkpoints/llava-readers/checkpoint.pt ] || python -m training.regrow checkpoints/llava-data checkpoints/llava-readers
[ -f checkpoints/llava-readers-export/config.json ] || \
   python -m training.train_llava --out checkpoints/llava-readers --export checkpoints/llava-readers-export
# Step 3, llava-readers-aligned: step 1's instruction tuning on from step 2, so the decoder re-aligns around the
#   moved layers (every layer at the common rate: the trained ones are no longer where --grown-lr-scale looks).
#   150 steps, 26 CPU-minutes on one thread.
S3="${STEP3_STEPS:-150}"
python -m training.train_llava --threads "$T" --device "$D" --phase instruct --out checkpoints/llava-readers-aligned \
   --init-from checkpoints/llava-readers/checkpoint.pt --until "$S3" \
   --batch 8 --turns 12 --caption-p 0.5 --whole-p 0.25 --lr 5e-5 --warmup 20 --decay-from 60 --lr-end 5e-6 \
   --projector-lr-scale 2 --tower-lr-scale 0 --patch-weight 0 --grid-weight 0 \
   "${DATA[@]}" --ckpt-minutes 3 --log-every 5 --seed 43
[ -f checkpoints/llava-readers-aligned-export/config.json ] || python -m training.train_llava \
   --out checkpoints/llava-readers-aligned --export checkpoints/llava-readers-aligned-export
# Step 4, llava-running: language training on running text, from step 3 (the text phase: the decoder and LM head
#   learn, the tower and projector do not). LLaVA's decoder is a language model pretrained on long running text;
#   this one's language pretraining put each scene's words at its patches' positions and asked about them from
#   after the picture, never running text. Here every sequence is a document of 6 scenes at consecutive positions
#   (about 660 tokens, a picture conversation's length): each scene's description, then 3 questions about it, every
#   token a next-token target (--lm-weight 1). 200 steps, 27 CPU-minutes on one thread.
S4="${STEP4_STEPS:-200}"
python -m training.train_llava --threads "$T" --device "$D" --phase text --out checkpoints/llava-running \
   --init-from checkpoints/llava-readers-aligned/checkpoint.pt --until "$S4" \
   --batch 8 --running-scenes 6 --running-turns 3 --lm-weight 1 --whole-p 0.25 \
   --lr 1e-4 --warmup 20 --decay-from 100 --lr-end 1e-5 "${DATA[@]}" --ckpt-minutes 3 --log-every 5 --seed 47
[ -f checkpoints/llava-running-export/config.json ] || python -m training.train_llava \
   --out checkpoints/llava-running --export checkpoints/llava-running-export
# Step 5, llava-running-aligned: step 3's instruction tuning on from step 4, with one running-text document (6
#   scenes, 3 questions each) beside the 8 pictures of every step, as LLaVA-1.5's instruction mix keeps text-only
#   conversations (40K of its 665K; here 1 sequence in 9). 150 steps, 27 CPU-minutes on one thread.
S5="${STEP5_STEPS:-150}"
python -m training.train_llava --threads "$T" --device "$D" --phase instruct --out checkpoints/llava-running-aligned \
   --init-from checkpoints/llava-running/checkpoint.pt --until "$S5" \
   --batch 8 --turns 12 --caption-p 0.5 --whole-p 0.25 --lr 5e-5 --warmup 20 --decay-from 60 --lr-end 5e-6 \
   --projector-lr-scale 2 --tower-lr-scale 0 --patch-weight 0 --grid-weight 0 \
   --text-docs 1 --running-scenes 6 --running-turns 3 "${DATA[@]}" --ckpt-minutes 3 --log-every 5 --seed 49
[ -f checkpoints/llava-running-aligned-export/config.json ] || python -m training.train_llava \
   --out checkpoints/llava-running-aligned --export checkpoints/llava-running-aligned-export
# Then measure each export E (one thread each, one at a time):
#   bash scripts/measure_step.sh E            # likeness (raters, tower, attention profile), dense accuracy, goals
#   N_ORDER=800 bash scripts/measure_step.sh E  # and the ordering of every method at 64 tokens (800 questions)
