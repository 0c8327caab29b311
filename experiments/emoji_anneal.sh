#!/usr/bin/env bash
# Does a short low-learning-rate phase on shapes + emoji give the shapes back after a late emoji
# phase, and keep the emoji? Continues a model from experiments/emoji_side_finetune.sh (e.g. its
# `EXTRA=900 LR=4e-4 ... 64:250` arm) on 8k shapes scenes (the bundled U-Net's generator settings)
# merged with 4 copies of that arm's emoji set (emoji a third of the items), min-SNR 5 with the
# 0.25 floor on the emoji only, raw weights; then scores it with both evals.
#
#   bash experiments/emoji_anneal.sh BUNDLED_MODEL PHASE_MODEL EMOJI_SET EMOJI_DATA OUT [STEPS] [LR]
#
# BUNDLED_MODEL gives the VAE, PHASE_MODEL the U-Net to continue, EMOJI_SET the arm's emoji folder
# (OUT_OF_SIDE/emoji-100+900), EMOJI_DATA the emoji eval's candidates (`ember data emoji DIR`).
# Defaults: 150 steps, batch 64, lr 1e-4 with 10 warmup steps (cosine to a tenth).
set -euo pipefail
MODEL=$1 PHASE=$2 SET=$3 DATA=$4 OUT=$5 STEPS=${6:-150} LR=${7:-1e-4}
E=${EMBER:-.venv/bin/ember}
mkdir -p "$OUT"
[ -f "$OUT/shapes-8k/manifest.jsonl" ] ||
  $E data shapes "$OUT/shapes-8k" --n 8000 --seed 0 --no-png --no-mirror-captions
[ -f "$OUT/data/manifest.jsonl" ] ||
  $E data merge "$OUT/data" "$OUT/shapes-8k" "$SET" "$SET" "$SET" "$SET"
R="$OUT/anneal-$STEPS-lr$LR"
[ -f "$R/model.safetensors" ] || $E train unet "$OUT/data" "$R" --preset ember-small-z8p \
  --vae "$MODEL" --init-from "$PHASE" --steps "$STEPS" --batch-size 64 --lr "$LR" \
  --warmup-steps 10 --min-snr-gamma 5 --min-snr-floor 0.25 --min-snr-floor-files '*-emoji-*/*' \
  --ema-decay 0 --checkpoint-every "$STEPS" --sample-every 0 --bf16 auto >"$R.log" 2>&1
[ -f "$R/eval-emoji/report.json" ] ||
  $E eval emoji --model "$R/model.safetensors" --data "$DATA" -o "$R/eval-emoji" >/dev/null
[ -f "$R/eval-in/report.json" ] || $E eval geneval --model "$R/model.safetensors" \
  --split in-distribution -o "$R/eval-in" >/dev/null
PY=${PYTHON:-.venv/bin/python}
$PY - "$R" <<'EOF'
import json, sys
r = sys.argv[1]
card = json.load(open(f"{r}/model_card.json"))["run"]
emoji = json.load(open(f"{r}/eval-emoji/report.json"))
shapes = json.load(open(f"{r}/eval-in/report.json"))
print(f"{r}: training loop {card['wall_seconds']:.0f} s")
print("emoji", {k: emoji[k] for k in ("top1", "top5", "median_rank")})
print("in-distribution", round(shapes["overall"], 3),
      {k: round(v, 2) for k, v in shapes["per_category"].items()})
EOF
$PY experiments/emoji_hits_by_tone.py "$R/eval-emoji/report.json" "$DATA"
