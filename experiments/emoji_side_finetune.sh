#!/usr/bin/env bash
# Does a view of an emoji at a lower resolution teach the 64x64 model? Paired fine-tunes of one
# model on the emoji eval's own 100 emoji (experiments/emoji_subset.py; the test set, so a diagnostic of
# learning speed only) at several training sizes, each scored by `ember eval emoji` at the model's
# own 64x64. A 32x32 image is an 8x8 latent, which trains 2.5-3x as many images per second as a
# 16x16 one (bench/train_batch.py --sides 16,8), so the question is what such a view is worth.
#
#   bash experiments/emoji_side_finetune.sh MODEL EMOJI_DATA OUT [ARM ...]
#
# An ARM is SIZE:STEPS, or SIZE:STEPS+SIZE:STEPS for a second phase that continues the first's
# weights (default arms: 64:15 64:50 64:100 32:100 32:100+64:15). Every phase: batch 64,
# lr 2e-4 and 10 warmup steps by default, min-SNR 5 with a floor of 0.25 (the bundled recipe's on
# emoji), raw weights (no EMA), same seed. Prints each arm's training-loop seconds and its eval.
# EXTRA=N trains on the eval's 100 plus N other emoji on white (experiments/emoji_subset.py --extra; e.g.
# `EXTRA=900 ... 64:500` gives each of the 1,000 the views of 64:50 on the 100). BATCH=B LR=X
# WARMUP=W change every phase's batch, learning rate and warmup steps (e.g. `BATCH=128 LR=4e-4
# WARMUP=5 ... 64:25`: the images of 64:50 in half the optimizer steps); an arm's folder name then
# carries them. TRAIN_ONLY=GLOBS trains only the matching U-Net parameters (--train-only; e.g.
# '*.attn2.*', the cross-attention), also named in the folder. INCLUDE=CODE adds one named emoji
# (both styles, on white; e.g. 1f355, the quickstart's pizza) to the set, named in its folder. Run
# nothing else meanwhile: two processes on two cores slow each other about fourfold.
set -euo pipefail
MODEL=$1 DATA=$2 OUT=$3
shift 3
ARMS=("$@")
[ ${#ARMS[@]} -gt 0 ] || ARMS=(64:15 64:50 64:100 32:100 32:100+64:15)
E=${EMBER:-.venv/bin/ember}
PY=${PYTHON:-.venv/bin/python}
INCLUDE=${INCLUDE:-} EXTRA=${EXTRA:-0} BATCH=${BATCH:-64} LR=${LR:-2e-4} WARMUP=${WARMUP:-10}
SET=emoji-100 TAG=
[ "$EXTRA" = 0 ] || SET=emoji-100+$EXTRA TAG=+$EXTRA
[ -z "$INCLUDE" ] || SET=$SET+$INCLUDE TAG=$TAG+$INCLUDE
[ "$BATCH:$LR:$WARMUP" = 64:2e-4:10 ] || TAG=$TAG-b$BATCH-lr$LR-w$WARMUP
TRAIN_ONLY=${TRAIN_ONLY:-}
[ -z "$TRAIN_ONLY" ] || TAG=$TAG-only$(tr -c 'A-Za-z0-9\n' _ <<<"$TRAIN_ONLY")
mkdir -p "$OUT"
[ -f "$OUT/$SET/manifest.jsonl" ] ||
  $PY experiments/emoji_subset.py "$DATA" "$OUT/$SET" --extra "$EXTRA" ${INCLUDE:+--include "$INCLUDE"}

phase() {  # phase INIT SIZE STEPS RUN
  [ -f "$4/model.safetensors" ] || $E train unet "$OUT/$SET" "$4" --preset ember-small-z8p \
    --vae "$MODEL" --init-from "$1" --image-size "$2" --steps "$3" --batch-size "$BATCH" --lr "$LR" \
    --warmup-steps "$WARMUP" --min-snr-gamma 5 --min-snr-floor 0.25 --ema-decay 0 \
    --checkpoint-every "$3" --sample-every 0 --bf16 auto ${TRAIN_ONLY:+--train-only "$TRAIN_ONLY"} \
    >"$4.log" 2>&1
}

for ARM in "${ARMS[@]}"; do
  R="$OUT/arm-${ARM//[:+]/_}$TAG"
  INIT=$MODEL
  IFS=+ read -ra PHASES <<<"$ARM"
  mkdir -p "$R"
  for i in "${!PHASES[@]}"; do
    phase "$INIT" "${PHASES[$i]%%:*}" "${PHASES[$i]##*:}" "$R/phase$i"
    INIT="$R/phase$i/model.safetensors"
  done
  LOOP=$($PY -c "import json, sys; print(round(sum(json.load(open(f))['run']['wall_seconds']
    for f in sys.argv[1:]), 1))" "$R"/phase*/model_card.json)
  echo "== $ARM on $SET (batch $BATCH, lr $LR, warmup $WARMUP): training loop ${LOOP} s"
  [ -f "$R/eval/report.json" ] || $E eval emoji --model "$INIT" --data "$DATA" -o "$R/eval" >/dev/null
  $PY - "$R/eval/report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r[k] for k in r if k in ("top1", "top5", "median_rank")})
EOF
  $PY experiments/emoji_hits_by_tone.py "$R/eval/report.json" "$DATA"
done
