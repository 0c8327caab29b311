#!/usr/bin/env bash
# Rebuild ember's bundled default model from scratch, exactly as shipped (see the model card).
# About 4 hours of CPU on a 2-core machine; every step resumes: rerun the script after a stop.
# Stages (see the model card): an 8-channel VAE (ember-small-z8), one U-Net run on it
# (ember-small-z8p: the same model reading MiniLM's penultimate layer), then a fine-tune of the
# VAE's decoder alone (the encoder, and so the latent space the U-Net learned, is kept). The model
# holds the U-Net run's raw weights of its last step, not their EMA (--unet-weights raw).
# The VAE was trained for 600 steps and then extended to 1,200 (its cosine schedule restarted
# from the middle), so the script does the same: two calls, the second with --steps 1200.
# Usage: bash scripts/build-default-model.sh [WORK_DIR]   (default: runs/default-model)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
W=${1:-runs/default-model}
E=.venv/bin/ember
mkdir -p "$W"
# VAE data: 20k shapes scenes + every emoji on white and on blue, one caption each
[ -f "$W/shapes-20k/manifest.jsonl" ] || $E data shapes "$W/shapes-20k" --n 20000 --seed 0 --no-png \
  --no-mirror-captions
[ -f "$W/emoji-wb/manifest.jsonl" ] || $E data emoji "$W/emoji-wb" --backgrounds white,blue  # npm pack, pinned
[ -f "$W/vae-data/manifest.jsonl" ] || \
  $E data merge "$W/vae-data" "$W/shapes-20k" "$W/emoji-wb" --max-captions 1
# U-Net data: the same shapes with all their captions (some name no background), every emoji on
# white, and a second copy of the emoji that are not skin-tone variants (a person's layout is
# otherwise seen six times as often as any other emoji's)
[ -f "$W/emoji-w/manifest.jsonl" ] || $E data emoji "$W/emoji-w" --backgrounds white
[ -f "$W/emoji-w1/manifest.jsonl" ] || $E data merge "$W/emoji-w1" "$W/emoji-w" --max-captions 1
[ -f "$W/emoji-nt/manifest.jsonl" ] || $E data emoji "$W/emoji-nt" --backgrounds white --no-skin-tones
[ -f "$W/emoji-nt1/manifest.jsonl" ] || $E data merge "$W/emoji-nt1" "$W/emoji-nt" --max-captions 1
[ -f "$W/unet-data/manifest.jsonl" ] || \
  $E data merge "$W/unet-data" "$W/shapes-20k" "$W/emoji-w1" "$W/emoji-nt1"
[ -f "$W/emoji/manifest.jsonl" ] || $E data emoji "$W/emoji"   # the emoji eval's candidates

resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
VAE_ARGS=(--preset ember-small-z8 --batch-size 32 --lr 4e-4 --warmup-steps 60 --edge-weight 1.0
          --checkpoint-every 100 --sample-every 300 --bf16 auto)
latest() {  # the newest checkpoint's step in a run folder, 0 if none
  local c; c=$(ls "$1/checkpoints" 2>/dev/null | grep '^step_[0-9]*$' | sort | tail -1)
  echo $((10#${c#step_}0 / 10))
}
[ "$(latest "$W/vae")" -ge 600 ] || \
  $E train vae "$W/vae-data" "$W/vae" "${VAE_ARGS[@]}" --steps 600 $(resume "$W/vae")
[ "$(latest "$W/vae")" -ge 1200 ] || \
  $E train vae "$W/vae-data" "$W/vae" "${VAE_ARGS[@]}" --steps 1200 --resume
# The U-Net: MiniLM's penultimate layer is its context (preset ember-small-z8p); min-SNR
# weighting with a floor of 0.25 under the high-noise weights of the emoji items only (the files
# of merge parts 1 and 2); compiled (torch.compile), which keeps 12,500 steps within the budget.
[ -f "$W/unet/model.safetensors" ] || $E train unet "$W/unet-data" "$W/unet" --preset ember-small-z8p \
  --vae "$W/vae/vae.safetensors" --steps 12500 --batch-size 64 --lr 8e-4 --warmup-steps 200 \
  --min-snr-gamma 5 --min-snr-floor 0.25 --min-snr-floor-files '[12]-emoji-*/*' \
  --checkpoint-every 250 --sample-every 2500 --bf16 auto --compile $(resume "$W/unet")
# The decoder: 400 steps on the U-Net's data from the U-Net run's export, encoder frozen; the ship
# script swaps it into the model (and refuses to if the encoder differs).
[ -f "$W/vae-dec/vae.safetensors" ] || $E train vae "$W/unet-data" "$W/vae-dec" \
  --preset ember-small-z8p --init-from "$W/unet/model.safetensors" --freeze-encoder --steps 400 \
  --batch-size 32 --lr 2e-4 --warmup-steps 20 --edge-weight 1.0 --checkpoint-every 100 \
  --bf16 auto $(resume "$W/vae-dec")

OUT="$W/shipped"
RUNS=("$W/vae" "$W/unet" "$W/vae-dec")
.venv/bin/python scripts/ship_default_model.py "${RUNS[@]}" --out "$OUT" --unet-weights raw
M="$OUT/ember-small.safetensors"
$E eval geneval --model "$M" --split in-distribution -o "$W/eval-in"
$E eval geneval --model "$M" --split held-out -o "$W/eval-held-out"
$E eval emoji --model "$M" --data "$W/emoji" -o "$W/eval-emoji"
.venv/bin/python scripts/ship_default_model.py "${RUNS[@]}" --out "$OUT" --unet-weights raw \
  --evals "$W/eval-in" "$W/eval-held-out" "$W/eval-emoji"
echo "model: $M (card: $OUT/MODEL_CARD.md); copy $OUT/* to src/ember/assets/default-model/ to ship it"
