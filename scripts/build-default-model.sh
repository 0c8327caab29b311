#!/usr/bin/env bash
# Rebuild ember's bundled default model from scratch, exactly as shipped (see the model card).
# About 2.5 hours of CPU on a 2-core machine; every step resumes: rerun the script after a stop.
# Usage: bash scripts/build-default-model.sh [WORK_DIR]   (default: runs/default-model)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
W=${1:-runs/default-model}
E=.venv/bin/ember
mkdir -p "$W"
[ -f "$W/shapes/manifest.jsonl" ] || $E data shapes "$W/shapes" --n 50000 --seed 0
[ -f "$W/emoji/manifest.jsonl" ] || $E data emoji "$W/emoji"                      # npm pack, pinned
[ -f "$W/vae-data/manifest.jsonl" ] || $E data merge "$W/vae-data" "$W/shapes" "$W/emoji"
[ -f "$W/shapes-20k/manifest.jsonl" ] || $E data shapes "$W/shapes-20k" --n 20000 --seed 0 --no-png
[ -f "$W/emoji-wb/manifest.jsonl" ] || $E data emoji "$W/emoji-wb" --backgrounds white,blue
[ -f "$W/unet-data/manifest.jsonl" ] || \
  $E data merge "$W/unet-data" "$W/shapes-20k" "$W/emoji-wb" --max-captions 1

resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
[ -f "$W/vae/vae.safetensors" ] || $E train vae "$W/vae-data" "$W/vae" --preset ember-small \
  --steps 1000 --batch-size 32 --lr 4e-4 --warmup-steps 100 --checkpoint-every 200 --sample-every 250 \
  --bf16 auto $(resume "$W/vae")
[ -f "$W/unet/model.safetensors" ] || $E train unet "$W/unet-data" "$W/unet" --preset ember-small \
  --vae "$W/vae/vae.safetensors" --steps 5600 --batch-size 64 --lr 4e-4 --warmup-steps 200 \
  --min-snr-gamma 5 --checkpoint-every 250 --sample-every 1000 --bf16 auto $(resume "$W/unet")

$E eval geneval --model "$W/unet/model.safetensors" --split in-distribution -o "$W/eval-in"
$E eval geneval --model "$W/unet/model.safetensors" --split held-out -o "$W/eval-held-out"
$E eval emoji --model "$W/unet/model.safetensors" --data "$W/emoji" -o "$W/eval-emoji"
echo "model: $W/unet/model.safetensors (card: $W/unet/MODEL_CARD.md)"
