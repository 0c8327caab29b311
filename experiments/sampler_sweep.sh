#!/usr/bin/env bash
# Which sampler and step count the default model's quality is best at: the same model, prompts and
# seeds through `ember eval geneval` and `ember eval emoji` once per sampler setting, then one table.
#
#   bash experiments/sampler_sweep.sh MODEL EMOJI_DATA OUT [SETTING ...]
#
# A SETTING is SAMPLER:STEPS with any name `ember generate --sampler` takes ("dpmpp_2m:20",
# "euler_a:20", "DPM++ 2M Karras:20"). Default: the shipped dpmpp_2m:20 against the other one-call-
# per-step samplers at 20 steps and dpmpp_2m at 40. In-distribution at 8 images per prompt (576
# images, standard error about 0.02) and the 100-emoji eval. Each setting takes about 5 minutes on
# 2 cores; run nothing else meanwhile. Finished settings are reused from OUT.
set -euo pipefail
MODEL=$1 DATA=$2 OUT=$3
shift 3
SETTINGS=("$@")
[ ${#SETTINGS[@]} -gt 0 ] || SETTINGS=(dpmpp_2m:20 euler:20 euler_a:20 dpmpp_2m_sde:20 unipc:20
  ddim:20 "DPM++ 2M Karras:20" dpmpp_2m:40)
E=${EMBER:-.venv/bin/ember}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
ROWS=()  # (setting, its folder) pairs for the table
for S in "${SETTINGS[@]}"; do
  SAMPLER=${S%:*} STEPS=${S##*:}
  D="$OUT/$(echo "$SAMPLER-$STEPS" | tr ' +A-Z' '_pa-z')"
  [ -f "$D/in/report.json" ] || $E eval geneval --model "$MODEL" --split in-distribution \
    --images-per-prompt 8 --sampler "$SAMPLER" --steps "$STEPS" -o "$D/in" >/dev/null
  [ -f "$D/emoji/report.json" ] || $E eval emoji --model "$MODEL" --data "$DATA" \
    --sampler "$SAMPLER" --steps "$STEPS" -o "$D/emoji" >/dev/null
  ROWS+=("$S" "$D")
done
.venv/bin/python - "${ROWS[@]}" <<'EOF'
import json, sys
from pathlib import Path

rows = sys.argv[1:]
cats = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
print("| sampler:steps | in-distribution | " + " | ".join(cats) + " | emoji top-1 / top-5 / median rank |")
print("| --- | ---: |" + " ---: |" * len(cats) + " --- |")
for s, d in zip(rows[::2], map(Path, rows[1::2])):
    g = json.loads((d / "in" / "report.json").read_text())
    e = json.loads((d / "emoji" / "report.json").read_text())
    per = " | ".join(f"{g['per_category'][c]:.2f}" for c in cats)
    print(f"| {s} | {g['overall']:.3f} | {per} | {e['top1']:.2f} / {e['top5']:.2f} / {e['median_rank']:g} |")
EOF
