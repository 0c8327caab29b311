#!/usr/bin/env bash
# How fast the U-Net learns emoji under each min-SNR floor: paired fine-tunes of one model on the
# emoji eval's own 100 emoji (experiments/emoji_subset.py; the test set, so a diagnostic only), same
# seed, data order, lr and steps; each scored by `ember eval emoji`.
#
#   bash experiments/emoji_floor_finetune.sh MODEL EMOJI_DATA OUT [FLOOR ...]   (default floors: 0 0.25 1)
#
# Each arm: 100 steps at batch 64 (64 views of each emoji), lr 2e-4, raw weights (no EMA), about
# 2 minutes of training and 2.5 of eval on 2 cores. Run nothing else meanwhile: two processes
# on two cores slow each other about fourfold.
set -euo pipefail
MODEL=$1 DATA=$2 OUT=$3
shift 3
FLOORS=("$@")
[ ${#FLOORS[@]} -gt 0 ] || FLOORS=(0 0.25 1)
E=${EMBER:-.venv/bin/ember}
mkdir -p "$OUT"
[ -f "$OUT/emoji-100/manifest.jsonl" ] || .venv/bin/python experiments/emoji_subset.py "$DATA" "$OUT/emoji-100"
for F in "${FLOORS[@]}"; do
  R="$OUT/floor-$F"
  [ -f "$R/model.safetensors" ] || $E train unet "$OUT/emoji-100" "$R" --preset ember-small-z8p \
    --vae "$MODEL" --init-from "$MODEL" --steps 100 --batch-size 64 --lr 2e-4 --warmup-steps 10 \
    --min-snr-gamma 5 --min-snr-floor "$F" --ema-decay 0 --checkpoint-every 100 --sample-every 0 \
    --bf16 auto
  $E eval emoji --model "$R/model.safetensors" --data "$DATA" -o "$R/eval" | grep -E 'top|rank'
  .venv/bin/python experiments/emoji_hits_by_tone.py "$R/eval/report.json" "$DATA"
done
