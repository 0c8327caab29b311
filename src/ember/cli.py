"""The `ember` command line.

Bad input ends with exit code 2 and one line on stderr (never a traceback); progress goes to stderr,
so stdout carries only results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from ember.errors import EmberError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model" / "ember-small.safetensors"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def models_dir() -> Path:
    return Path(
        os.environ.get("EMBER_MODELS", Path.home() / ".local" / "share" / "ember" / "models")
    )


def resolve_model_path(name: str | None) -> Path:
    """A path, a name in the models folder, or (none given) the bundled default model."""
    if name is None:
        if not DEFAULT_MODEL.exists():
            raise EmberError(
                f"the bundled default model is missing ({DEFAULT_MODEL}); pass --model"
            )
        return DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        return path
    for candidate in (models_dir() / name, models_dir() / f"{name}.safetensors"):
        if candidate.exists():
            return candidate
    raise EmberError(
        f"model not found: {name} (a file, a diffusers folder, or a name in {models_dir()})"
    )


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r} must look like WIDTHxHEIGHT, e.g. 512x512"
        ) from None
    return w, h


# ---------------------------------------------------------------------------------------------
# generate


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="make images from a text prompt",
        description="Generate images from a prompt. Without --model, ember's bundled default model "
        "is used. Every PNG records its settings; `ember info` shows them and "
        "`ember generate --from IMAGE.png` makes the same image again.",
        epilog='example: ember generate "a red circle left of a blue square" --seed 7 -o shapes.png',
    )
    p.add_argument("prompt", nargs="?", help="what to draw; A1111 syntax (word:1.3), [word], BREAK")
    p.add_argument(
        "--model", help="a .safetensors file or diffusers folder (default: bundled model)"
    )
    p.add_argument("--config", help="architecture of a single file ember cannot detect (e.g. sd21)")
    p.add_argument("--negative", help="what to steer away from")
    p.add_argument("--sampler", help="euler, euler_a, heun, dpm2, dpmpp_2m, dpmpp_2m_sde, dpmpp_sde, "
                   "ddim, lcm, unipc, or an A1111 name like 'DPM++ 2M Karras' (default dpmpp_2m)")  # fmt: skip
    p.add_argument("--schedule", help="sigma schedule: default, karras, exponential")
    p.add_argument("--steps", type=int, help="sampling steps, 1..1000 (default 20)")
    p.add_argument(
        "--cfg",
        type=float,
        help="classifier-free guidance scale (default: the model's; 5 for ember's own models, "
        "7 for Stable Diffusion)",
    )
    p.add_argument(
        "--layout-guidance",
        type=float,
        metavar="S",
        help="steer 'A left of / right of / above / below B' prompts to that layout, and "
        "'three Xs ...' prompts to one X a quadrant, 0..10; 0 = off (default: the model's; 2 for "
        "ember's own models, off for Stable Diffusion)",
    )
    p.add_argument(
        "--seed", type=int, help="seed of image 0; image i uses seed+i (default 0; -1 = random)"
    )
    p.add_argument(
        "--size", type=parse_size, help="WIDTHxHEIGHT, multiples of 8 (default: model's)"
    )
    p.add_argument("--batch", type=int, help="images to make (default 1)")
    p.add_argument("--init-image", help="start from this image (img2img)")
    p.add_argument(
        "--strength", type=float, help="img2img: how much to change, 0..1 (default 0.75)"
    )
    p.add_argument("--mask", help="inpaint: white = repaint, black = keep (needs --init-image)")
    p.add_argument(
        "--clip-skip", type=int, help="use the text encoder's N-th last layer (default 1)"
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        help="weights' precision; auto = bf16 on CPUs with native bf16 (AVX512-BF16, AMX), "
        "else fp32 (default auto; with --from, the recorded one)",
    )
    p.add_argument("--from", dest="from_image", help="regenerate the image recorded in this PNG")
    p.add_argument("-o", "--output", help="output PNG (a batch writes OUT-0.png, OUT-1.png, ...)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ember import images as I
    from ember.settings import GenerationParams

    init_path, mask_path, model_name = args.init_image, args.mask, args.model
    base = GenerationParams(prompt="", sampler="dpmpp_2m")
    if args.from_image:
        source = I.read_record(args.from_image)
        base = source.params
        model_name = model_name or source.model_path
        if source.mode != "txt2img" and not init_path:
            raise EmberError(f"{args.from_image} was made by {source.mode}; pass its --init-image")
    elif args.prompt is None:
        raise EmberError('give a prompt, e.g. ember generate "a red circle" (or --from IMAGE.png)')
    if args.mask and not args.init_image:
        raise EmberError("--mask needs --init-image (the picture to repaint)")
    if args.strength is not None and not args.init_image:
        raise EmberError("--strength applies to img2img; pass --init-image too")

    overrides = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "steps": args.steps,
        "cfg": args.cfg,
        "seed": args.seed,
        "batch": args.batch,
        "strength": args.strength,
        "clip_skip": args.clip_skip,
        "layout_guidance": args.layout_guidance,
    }
    if args.size:
        overrides["width"], overrides["height"] = args.size
    params = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if params.seed == -1:
        params = dataclasses.replace(params, seed=random.randrange(2**32))

    dtype = args.dtype or "auto"
    if args.from_image and args.dtype is None and source.dtype in ("fp32", "bf16"):
        dtype = source.dtype  # the same image again, byte for byte, also on another CPU
    loaded = load_for_cli(model_name, args.config, dtype, quiet=args.quiet)
    if args.from_image and source.model_sha256 != loaded.sha256:
        print(
            f"ember: warning: model differs from the one recorded in {args.from_image}",
            file=sys.stderr,
        )
    if args.size is None and not args.from_image:
        params = dataclasses.replace(params, width=loaded.config.size, height=loaded.config.size)
    if args.cfg is None and not args.from_image:
        params = dataclasses.replace(params, cfg=loaded.config.default_cfg)
    if args.layout_guidance is None and not args.from_image:
        params = dataclasses.replace(params, layout_guidance=loaded.config.default_layout_guidance)

    from ember.pipeline import Inputs, dtype_name, generate, validate

    params = validate(params)
    inputs = Inputs()
    if init_path:
        size = (params.width, params.height)
        init = _image_tensor(I.load_image(init_path, size=size if not mask_path else None))
        mask = None
        if mask_path:
            mask = _image_tensor(I.load_image(mask_path, mode="L"))
            if mask.shape[-2:] != init.shape[-2:]:
                raise EmberError(
                    f"mask {mask_path} is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                    f"{init.shape[-1]}x{init.shape[-2]}; they must be the same size"
                )
            if init.shape[-2:] != (params.height, params.width):
                if args.size is not None:
                    raise EmberError("with --mask, --size must equal the init image's size")
                params = validate(
                    dataclasses.replace(params, width=init.shape[-1], height=init.shape[-2])
                )
        inputs = Inputs(init_image=init, mask=mask)

    outputs = output_paths(args.output, params)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=params.steps, desc="sampling", unit="step", file=sys.stderr, leave=False)

    def callback(i, total, x, denoised):
        if bar is not None:
            bar.total = total
            bar.update(1)

    started = time.perf_counter()
    pixels = I.tensor_to_uint8(generate(loaded, params, inputs, callback=callback))
    if bar is not None:
        bar.close()
    for i, path in enumerate(outputs):
        record = I.ImageRecord(
            params=dataclasses.replace(params, seed=params.seed + i, batch=1),
            model_name=loaded.name,
            model_path=str(loaded.path),
            model_sha256=loaded.sha256,
            model_hash=loaded.short_hash,
            ember_version=_version(),
            torch_version=torch.__version__,
            dtype=dtype_name(loaded.dtype),
            device="cpu",
            mode=inputs.mode,
            init_image_sha256=_sha(init_path),
            mask_sha256=_sha(mask_path),
        )
        I.write_png(path, pixels[i], record)
        print(path)
    if not args.quiet:
        print(
            f"ember: {len(outputs)} image(s) in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    return 0


def _image_tensor(img):
    import numpy as np
    import torch

    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def _sha(path: str | None) -> str | None:
    if not path:
        return None
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _version() -> str:
    from ember import __version__

    return __version__


def output_paths(output: str | None, params) -> list[Path]:
    """OUT.png, or OUT-0.png, OUT-1.png, ... for a batch. Without -o, never overwrite a file."""
    if output is None:
        stem = f"ember-{params.seed}"
        n = 0
        while True:
            suffix = "" if n == 0 else f"-{n}"
            paths = _batch_paths(Path(f"{stem}{suffix}.png"), params.batch)
            if not any(p.exists() for p in paths):
                return paths
            n += 1
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise EmberError(f"output {output} must end in .png")
    if not path.parent.exists():
        raise EmberError(f"output folder {path.parent} does not exist")
    return _batch_paths(path, params.batch)


def _batch_paths(path: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(batch)]


def load_for_cli(name: str | None, config: str | None, dtype: str, *, quiet: bool):
    from ember.checkpoints import load_model
    from ember.pipeline import resolve_dtype

    path = resolve_model_path(name)
    torch_dtype = resolve_dtype(dtype)
    stages = ["reading checkpoint", "building model", "ready"]
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(stages), desc=f"loading {path.name}", file=sys.stderr, leave=False)

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)

    loaded = load_model(path, config, dtype=torch_dtype, progress=progress)
    if bar is not None:
        bar.close()
    return loaded


# ---------------------------------------------------------------------------------------------
# info, models, convert


def add_info(sub) -> None:
    p = sub.add_parser("info", help="show the generation record of a PNG")
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the full ember record as JSON")
    p.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    from ember import images as I

    text = I.read_png_text(args.image)
    if I.RECORD_KEY not in text and I.INFOTEXT_KEY not in text:
        raise EmberError(f"{args.image} has no generation record")
    if args.json:
        print(json.dumps(json.loads(text[I.RECORD_KEY]), indent=2, sort_keys=True))
        return 0
    if I.INFOTEXT_KEY in text:
        print(text[I.INFOTEXT_KEY])
    if I.RECORD_KEY in text:
        rec = json.loads(text[I.RECORD_KEY])
        print()
        for key in ("model_path", "model_sha256", "mode", "dtype", "device", "ember_version",
                    "torch_version"):  # fmt: skip
            print(f"{key}: {rec.get(key)}")
    return 0


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list models with their sha256 and A1111 short hash")
    p.add_argument(
        "paths", nargs="*", help=f"files or folders (default: bundled and {models_dir()})"
    )
    p.set_defaults(run=run_models)


def run_models(args: argparse.Namespace) -> int:
    from ember.checkpoints import file_hashes

    paths = [Path(p) for p in args.paths]
    if not paths:
        paths = [DEFAULT_MODEL] if DEFAULT_MODEL.exists() else []
        if models_dir().exists():
            paths += sorted(models_dir().glob("*.safetensors"))
            paths += sorted(p.parent for p in models_dir().glob("*/model_index.json"))
    for path in paths:
        if not path.exists():
            raise EmberError(f"not found: {path}")
        sha, short = file_hashes(path)
        print(f"{short}  {sha}  {path}")
    if not paths:
        print(f"no models found; put .safetensors files in {models_dir()}", file=sys.stderr)
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between single-file .safetensors and diffusers folders",
        description="Convert a model losslessly. A pickled .ckpt is read with torch.load("
        "weights_only=True), which refuses anything but tensors, and written as safetensors.",
    )
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", choices=["single-file", "diffusers"], default="single-file")
    p.add_argument("--config", help="architecture preset when it cannot be detected")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from ember import checkpoints as K

    src, out = Path(args.src), Path(args.out)
    if Path(out).exists() and args.format == "diffusers" and any(Path(out).iterdir()):
        raise EmberError(f"{out} exists and is not empty; choose a new folder")
    if src.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        if args.format != "single-file":
            raise EmberError("convert a pickled checkpoint to single-file first")
        K.convert_pickled(src, out)
        print(out)
        return 0
    loaded = K.load_model(src, args.config)
    if args.format == "single-file":
        if out.suffix != ".safetensors":
            raise EmberError(f"output {out} must end in .safetensors")
        K.save_single_file(loaded, out)
    else:
        K.save_diffusers(loaded, out)
    print(out)
    return 0


def add_train(sub) -> None:
    from ember.train.config import add_train_args

    p = sub.add_parser("train", help="train a VAE or U-Net on a licensed dataset folder")
    tsub = p.add_subparsers(dest="train_task", metavar="PART", required=True, parser_class=Parser)
    for task, text in (("vae", "the autoencoder (first stage)"), ("unet", "the denoising U-Net")):
        t = tsub.add_parser(
            task,
            help=f"train {text}",
            description=f"Train {text}. Resumable (--resume), checkpointed atomically, runs the "
            "same under torchrun. See docs/training.md.",
        )
        add_train_args(t, task)
        t.set_defaults(run=run_train)
    e = tsub.add_parser(
        "export",
        help="write a U-Net run's checkpoint as a model file",
        description="Write a U-Net run's checkpoint (EMA weights, with the run's VAE) as a single-"
        "file model, as the final export would be: try a model at step N while training goes on.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a `ember train unet` run folder")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.add_argument("-o", "--out", required=True, help="the .safetensors file to write")
    e.set_defaults(run=run_train_export)


def run_train_export(args: argparse.Namespace) -> int:
    from ember.train.unet import export_checkpoint

    if not args.out.endswith(".safetensors"):
        raise EmberError(f"--out {args.out}: the model file must end in .safetensors")
    path, step = export_checkpoint(Path(args.run_dir), Path(args.out), args.step)
    print(f"{path} (step {step})")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ember.train.config import config_from_args
    from ember.train.run import run_train_unet, run_train_vae

    cfg = config_from_args(args)
    return run_train_vae(cfg) if args.train_task == "vae" else run_train_unet(cfg)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ember", description="ember: open text-to-image on the hardware you have.")
    parser.add_argument("--version", action="version", version=f"ember {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    from ember.data.commands import add_data
    from ember.eval.commands import add_eval
    from ember.server.commands import add_keys, add_serve

    for add in (add_generate, add_info, add_models, add_convert, add_data, add_train, add_eval,
                add_serve, add_keys):  # fmt: skip
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the code instead of exiting
        return int(exc.code or 0)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except EmberError as exc:
        print(f"ember: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
