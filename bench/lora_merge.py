"""What a LoRA costs: reading and merging a kohya LoRA into the SD 1.5 architecture, switching
between two LoRA sets as the server does, and a sampling step with and without one merged.

Weights are random: the SD 1.5 folder of `common.sd15_folder` (made once into --cache) and two
kohya LoRAs of --rank on every attention, feed-forward and projection layer of the U-Net and the
text encoder, in fp16 (rank 128 is about the 144 MB of a typical SD 1.5 LoRA).

    .venv/bin/python bench/lora_merge.py [--rank 128] [--threads 2] [--out bench/lora.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, sd15_folder, write_report  # noqa: E402


def kohya_lora(folder: Path, rank: int, out: Path, seed: int) -> Path:
    """A random kohya LoRA for every Linear / 1x1 Conv of the U-Net's transformers and the text
    encoder's layers, named as kohya names diffusers modules."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    if out.exists():
        return out
    gen = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(prefix: str, module) -> None:
        weight = module.weight
        cols = weight.shape[1] * (weight[0, 0].numel() if weight.dim() == 4 else 1)
        shape_down = (rank, weight.shape[1], 1, 1) if weight.dim() == 4 else (rank, cols)
        shape_up = (weight.shape[0], rank, 1, 1) if weight.dim() == 4 else (weight.shape[0], rank)
        tensors[f"{prefix}.lora_down.weight"] = (
            torch.randn(shape_down, generator=gen) * 0.01
        ).half()
        tensors[f"{prefix}.lora_up.weight"] = (torch.randn(shape_up, generator=gen) * 0.01).half()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank) / 2).half()

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for name, module in unet.named_modules():
        if "attentions" in name and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
                continue
            add("lora_unet_" + name.replace(".", "_"), module)
    for name, module in text.named_modules():
        if "encoder.layers" in name and isinstance(module, torch.nn.Linear):
            add("lora_te_" + name.replace(".", "_"), module)
    save_file(tensors, str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ember-bench")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="image side of the step timing")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from ember.device import dtype_name
    from ember.lora import merge_loras, read_lora
    from ember.service import GenerationService, Request
    from ember.settings import GenerationParams, LoraChoice

    folder = sd15_folder(a.cache)
    loras = [
        kohya_lora(folder, a.rank, a.cache / f"lora-r{a.rank}-{s}.safetensors", s) for s in (1, 2)
    ]
    mb = loras[0].stat().st_size / 2**20

    service = GenerationService(a.dtype, lora_dir=a.cache, embeddings_dir=a.cache / "no-embeddings")
    t = time.perf_counter()
    loaded = service.load(folder)
    load_model_s = time.perf_counter() - t
    t = time.perf_counter()
    read_lora(loras[0])  # the first read parses the file; later ones hit read_lora's cache
    first_read = time.perf_counter() - t
    merges, unmerges, switches = [], [], []
    for _ in range(a.rounds):
        lora = read_lora(loras[0])
        t = time.perf_counter()
        merged = merge_loras(loaded, [(lora, 1.0, 1.0)])
        merges.append(time.perf_counter() - t)
        t = time.perf_counter()
        merged.remove()
        unmerges.append(time.perf_counter() - t)
    choices = [(LoraChoice(str(p)),) for p in loras]
    service.use_loras(choices[0])
    for r in range(a.rounds * 2):
        t = time.perf_counter()
        service.use_loras(choices[(r + 1) % 2])
        switches.append(time.perf_counter() - t)
    service.use_loras(())

    def step_seconds(loras_: tuple) -> float:
        params = GenerationParams("a castle", steps=2, cfg=7.0, width=a.size, height=a.size,
                                  loras=loras_)  # fmt: skip
        t = time.perf_counter()
        service.generate([Request(params)])
        return (time.perf_counter() - t) / 2

    # Not interleaved: every switch would merge again. First without, then with the LoRA merged.
    step_seconds(())  # warm-up
    plain = [step_seconds(()) for _ in range(a.rounds)]
    service.use_loras(choices[0])
    with_lora = [step_seconds(choices[0]) for _ in range(a.rounds)]
    med = statistics.median
    report = f"""# LoRA cost on the SD 1.5 architecture (random weights)

{machine()}; {a.threads} threads; {dtype_name(loaded.dtype)} weights; kohya LoRA rank {a.rank},
{mb:.0f} MB (fp16), {a.rounds} rounds, medians.
`python bench/lora_merge.py --rank {a.rank} --threads {a.threads} --dtype {a.dtype}`

| | seconds |
| --- | ---: |
| load the SD 1.5 model (once) | {load_model_s:.2f} |
| read and parse the LoRA file (first time; then cached) | {first_read:.2f} |
| merge it into the weights | {med(merges):.2f} |
| unmerge (restore the base weights bit for bit) | {med(unmerges):.2f} |
| switch the server's LoRA set (unmerge one LoRA, merge another, file cached) | {med(switches):.2f} |
| {a.size}x{a.size} generate, per step (2 steps, cfg 7, VAE and text included), no LoRA | {med(plain):.2f} |
| the same with the LoRA merged | {med(with_lora):.2f} |
"""
    write_report(report, a.out)


if __name__ == "__main__":
    main()
