#!/usr/bin/env bash
# Rebuild ember's bundled default model from scratch, exactly as shipped (see the model card).
# About 4 hours of CPU on a 2-core machine; every step resumes: rerun the script after a stop.
# Stages (see the model card): VAE, U-Net, then a second U-Net stage continuing from the first
# (the shipped model was continued in a later session), then a decoder-only VAE fine-tune that
# keeps the latent space, swapped into the shipped file by scripts/ship_default_model.py.
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

[ -f "$W/unet2/model.safetensors" ] || $E train unet "$W/unet-data" "$W/unet2" --preset ember-small \
  --vae "$W/vae/vae.safetensors" --init-from "$W/unet/model.safetensors" --steps 4000 --batch-size 64 \
  --lr 3e-4 --warmup-steps 100 --min-snr-gamma 5 --checkpoint-every 250 --sample-every 1000 \
  --bf16 auto --seed 1 $(resume "$W/unet2")
[ -f "$W/vae2/vae.safetensors" ] || $E train vae "$W/unet-data" "$W/vae2" --preset ember-small \
  --init-from "$W/vae/vae.safetensors" --freeze-encoder --edge-weight 1.0 --steps 600 --batch-size 32 --lr 1e-4 \
  --warmup-steps 20 --ema-decay 0.99 \
  --checkpoint-every 100 --sample-every 100 --bf16 auto $(resume "$W/vae2")

OUT="$W/shipped"
.venv/bin/python scripts/ship_default_model.py "$W/vae" "$W/unet" "$W/unet2" "$W/vae2" --out "$OUT"
M="$OUT/ember-small.safetensors"
$E eval geneval --model "$M" --split in-distribution -o "$W/eval-in"
$E eval geneval --model "$M" --split held-out -o "$W/eval-held-out"
$E eval emoji --model "$M" --data "$W/emoji" -o "$W/eval-emoji"
.venv/bin/python scripts/ship_default_model.py "$W/vae" "$W/unet" "$W/unet2" "$W/vae2" --out "$OUT" \
  --evals "$W/eval-in" "$W/eval-held-out" "$W/eval-emoji"
echo "model: $M (card: $OUT/MODEL_CARD.md); copy $OUT/* to src/ember/assets/default-model/ to ship it"
