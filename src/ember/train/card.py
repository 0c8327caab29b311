"""The model card of a training run: what it was trained on, under which licences, at what cost.

Written as `model_card.json` (for tools; `eval` fills `evaluation` later) and `MODEL_CARD.md`
(for people). Attributions are copied verbatim from the dataset's licence summary.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from ember.files import write_atomic


def build_card(
    *,
    task: str,
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    data: Any,
    progress: Any,
    world: int,
    device: str,
    bf16: bool,
    export: dict[str, Any],
    cache_seconds: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """The card as a JSON-able dict (`data` is a TrainData, `progress` a loop.Progress).

    `cache_seconds`: wall time spent building each cache the run trained from (None where the
    cache was built by an ember that did not record it).
    """
    steps = progress.steps or train_config["steps"]
    cache = cache_seconds or {}
    return {
        "task": task,
        "model": model_config,
        "training": train_config,
        "data": {
            "path": data.path,
            "images": len(data),
            "sources": data.sources,
            "unlicensed_images": data.unlicensed,
            "allow_unlicensed": train_config["allow_unlicensed"],
            "skipped_corrupt_images": data.skipped_corrupt,
        },
        "run": {
            "steps": steps,
            "schedule_steps": train_config["steps"],
            "images_seen": progress.images_seen,
            "skipped_nonfinite_steps": progress.skipped_steps,
            "wall_seconds": round(progress.wall_s, 3),
            # the frozen encoders' pass over the data (latent/text caches), outside the loop
            "cache_wall_seconds": {k: None if v is None else round(v, 3) for k, v in cache.items()},
            # process time of rank 0 times the ranks: CPU-seconds on CPU, host seconds on GPU
            "cpu_seconds": round(progress.cpu_s * world, 3),
            "gpu_seconds": round(progress.wall_s * world, 3) if device == "cuda" else 0.0,
            "processes": world,
            "device": device,
            "bf16_autocast": bf16,
            "estimated_flops": progress.flops_per_step * steps,
            "flops_per_step": progress.flops_per_step,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "export": export,
        "evaluation": None,  # filled by `ember eval`
    }


def render_markdown(card: dict[str, Any]) -> str:
    d, r = card["data"], card["run"]
    lines = [
        f"# Model card: {card['model'].get('name', '?')} ({card['task']})",
        "",
        "## Training data",
        f"- dataset: `{d['path']}` ({d['images']} images)",
        f"- images without a licence: {d['unlicensed_images']}"
        f" (--allow-unlicensed {'used' if d['allow_unlicensed'] else 'not used'})",
        f"- corrupt images skipped: {d['skipped_corrupt_images']}",
        "",
        "| licence | source | attribution | images |",
        "| --- | --- | --- | --- |",
    ]
    for s in d["sources"]:
        lic = s.get("spdx", s.get("license", ""))
        n = s.get("count", s.get("images", ""))
        examples = s.get("example_sources") or [s.get("source", "")]
        source = examples[0] + (f" (+{s['sources'] - 1} more)" if s.get("sources", 1) > 1 else "")
        lines.append(f"| {lic} | {source} | {s.get('attribution', '')} | {n} |")
    attributions = sorted({s["attribution"] for s in d["sources"] if s.get("attribution")})
    if attributions:
        lines += ["", "Required attributions:", *(f"- {a}" for a in attributions)]
    lines += [
        "",
        "## Training run",
        f"- steps: {r['steps']} (schedule: {r.get('schedule_steps', r['steps'])}), images seen: {r['images_seen']}, "
        f"skipped non-finite steps: {r['skipped_nonfinite_steps']}",
        f"- wall time: {r['wall_seconds']:.1f} s on {r['processes']} process(es), device "
        f"{r['device']}, bf16 autocast: {r['bf16_autocast']}",
        f"- CPU-seconds: {r['cpu_seconds']:.1f}, GPU-seconds: {r['gpu_seconds']:.1f}",
        *_cache_lines(r.get("cache_wall_seconds") or {}),
        f"- estimated training FLOPs: {r['estimated_flops']:.3g} "
        f"({r['flops_per_step']:.3g} per step, torch.utils.flop_counter)",
        "",
        "## Export",
        *(f"- {k}: {v}" for k, v in card["export"].items()),
        "",
        "## Evaluation",
        "Not yet evaluated." if card["evaluation"] is None else "See `model_card.json`.",
        "",
    ]
    return "\n".join(lines)


def _cache_lines(cache: dict[str, float | None]) -> list[str]:
    return [
        f"- building the {name} cache: " + ("not recorded" if sec is None else f"{sec:.1f} s wall")
        for name, sec in cache.items()
    ]


def write_card(run_dir: Path, card: dict[str, Any]) -> None:
    run_dir = Path(run_dir)
    write_atomic(run_dir / "model_card.json", json.dumps(card, indent=1).encode())
    write_atomic(run_dir / "MODEL_CARD.md", render_markdown(card).encode())
