"""The `ember` command line.

Bad input ends with exit code 2 and one line on stderr (never a traceback); progress goes to stderr,
so stdout carries only results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ember.errors import EmberError
from ember.process import restart_with_tcmalloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# generate


def add_generate(sub) -> None:
    from ember.provenance import add_provenance_args
    from ember.settings import add_addon_dirs, add_generation_args

    p = sub.add_parser(
        "generate",
        help="make images from a text prompt",
        description="Generate images from a prompt. Without --model, ember's bundled default model "
        "is used. Every PNG records its settings; `ember info` shows them and "
        "`ember generate --from IMAGE.png` makes the same image again.",
        epilog='example: ember generate "a red circle left of a blue square" --seed 7 -o shapes.png',
    )
    add_generation_args(p)
    p.add_argument(
        "--model", help="a .safetensors file or diffusers folder (default: bundled model)"
    )
    p.add_argument("--config", help="architecture of a single file ember cannot detect (e.g. sd21)")
    add_addon_dirs(p)
    p.add_argument(
        "--vae", help="a replacement VAE: a full SD VAE (.safetensors or diffusers folder) or "
        "TAESD (the taesd_encoder/decoder pair or a diffusers AutoencoderTiny folder)",
    )  # fmt: skip
    p.add_argument(
        "--prediction", choices=["eps", "v"], help="what the model predicts, where detection or "
        "its files say otherwise (e.g. SD-Turbo: eps although SD 2.1-shaped)",
    )  # fmt: skip
    p.add_argument("--init-image", help="start from this image (img2img)")
    p.add_argument("--mask", help="inpaint: white = repaint, black = keep (needs --init-image)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        help="weights' precision; auto = bf16 on CPUs with native bf16 (AVX512-BF16, AMX), "
        "else fp32 (default auto; with --from, the recorded one)",
    )
    p.add_argument("--from", dest="from_image", help="regenerate the image recorded in this PNG")
    p.add_argument("-o", "--output", help="output PNG (a batch writes OUT-0.png, OUT-1.png, ...)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_provenance_args(p)
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Parse the inputs, hand one request to the generation service, write the PNGs."""
    import dataclasses

    from ember import images as I
    from ember import provenance as P
    from ember.service import GenerationService, Request
    from ember.settings import GenerationParams, params_from_args

    base, model_name, dtype = GenerationParams(), args.model, args.dtype or "auto"
    if args.from_image:
        source = I.read_record(args.from_image)
        base = source.params
        model_name = model_name or source.model_path
        if source.mode != "txt2img" and not args.init_image:
            raise EmberError(f"{args.from_image} was made by {source.mode}; pass its --init-image")
        if args.dtype is None and source.dtype in ("fp32", "bf16"):
            dtype = source.dtype  # the same image again, byte for byte, also on another CPU
    elif args.prompt is None:
        raise EmberError('give a prompt, e.g. ember generate "a red circle" (or --from IMAGE.png)')
    if args.mask and not args.init_image:
        raise EmberError("--mask needs --init-image (the picture to repaint)")
    if args.strength is not None and not args.init_image:
        raise EmberError("--strength applies to img2img; pass --init-image too")

    provenance = P.provenance_from_args(args)
    if args.from_image and not source.watermark:
        # the same pixels again: an image recorded without the watermark (turned off, or made
        # before ember had one) is remade without it
        provenance = dataclasses.replace(provenance, watermark=False)
    vae = args.vae
    if args.from_image and vae is None and source.vae_path:
        vae = source.vae_path  # the same image again: the VAE it was decoded with
    service = GenerationService(
        dtype, lora_dir=_path(args.lora_dir), embeddings_dir=_path(args.embeddings_dir)
    )
    loaded = load_with_progress(
        service, model_name, args.config, quiet=args.quiet, prediction=args.prediction, vae=vae
    )
    if args.from_image and source.model_sha256 != loaded.sha256:
        print(
            f"ember: warning: model differs from the one recorded in {args.from_image}",
            file=sys.stderr,
        )
    params = service.prepare(params_from_args(args, base))
    init = mask = None
    if args.init_image:
        size = (params.width, params.height)
        init = I.load_image(args.init_image, size=size if not args.mask else None)
        if args.mask:
            mask = I.load_image(args.mask, mode="L")
            if mask.shape[:2] != init.shape[:2]:
                raise EmberError(
                    f"mask {args.mask} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{init.shape[1]}x{init.shape[0]}; they must be the same size"
                )
            if init.shape[:2] != (params.height, params.width):
                if args.size is not None:
                    raise EmberError("with --mask, --size must equal the init image's size")
                params = service.prepare(
                    dataclasses.replace(params, width=init.shape[1], height=init.shape[0])
                )

    outputs = output_paths(args.output, params)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=params.steps, desc="sampling", unit="step", file=sys.stderr, leave=False)

    def on_step(step: int, total: int, previews) -> None:
        if bar is not None:
            bar.total = total
            bar.update(1)

    started = time.perf_counter()
    images = service.generate([Request(params, init, mask)], on_step)[0]
    if bar is not None:
        bar.close()
    if args.from_image:
        recorded = {x["name"]: x["sha256"] for x in source.loras}
        used = {x["name"]: x["sha256"] for x in images[0].record.loras}
        if recorded != used:
            print(
                f"ember: warning: LoRAs differ from those recorded in {args.from_image}",
                file=sys.stderr,
            )
    for image, path in zip(images, outputs, strict=True):
        I.write_png(path, image.pixels, image.record, provenance, image.inputs)
        print(path)
    if not args.quiet:
        print(
            f"ember: {len(outputs)} image(s) in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    return 0


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


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def load_with_progress(service, name: str | None, config: str | None, *, quiet: bool, **options):
    """`service.load` of the model `name` (see `ember.catalog`), with a progress bar on stderr."""
    from ember.catalog import resolve_model_path

    path = resolve_model_path(name)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=3, desc=f"loading {path.name}", file=sys.stderr, leave=False)

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)

    loaded = service.load(path, config, progress=progress, **options)
    if bar is not None:
        bar.close()
    return loaded


# ---------------------------------------------------------------------------------------------
# info, models, convert


def add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="show the generation record and provenance of an image "
        "(the watermark also in a JPEG or a resized copy)",
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the full ember record as JSON")
    p.add_argument(
        "--provenance", action="store_true", help="follow the image to its model's file and "
        "model card: licences and attributions of what the model was trained on",
    )  # fmt: skip
    p.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    from ember import images as I

    text = I.read_png_text(args.image)
    if args.json:
        if I.RECORD_KEY not in text:
            raise EmberError(f"{args.image} has no ember generation record")
        print(json.dumps(json.loads(text[I.RECORD_KEY]), indent=2, sort_keys=True))
        return 0
    if I.INFOTEXT_KEY in text:
        print(text[I.INFOTEXT_KEY])
    rec = json.loads(text[I.RECORD_KEY]) if I.RECORD_KEY in text else None
    if rec is not None:
        print()
        for key in ("model_path", "model_sha256", "mode", "dtype", "device", "ember_version",
                    "torch_version"):  # fmt: skip
            print(f"{key}: {rec.get(key)}")
    print()
    report = print_provenance(Path(args.image), text, rec)
    if args.provenance:
        print()
        print_model_provenance(rec, report)
    return 0


def print_provenance(path: Path, text: dict[str, str], rec: dict | None):
    """Credentials (valid / tampered / absent), the digital source type and the watermark."""
    from ember import images as I
    from ember import provenance as P
    from ember.watermark import detect_watermark

    report = P.read_credentials(path.read_bytes())
    line = f"credentials: {report.state}"
    if report.state == "valid":
        line += " (signed by " + _signer(report.manifest) + ")"
    elif report.failures:
        line += " (" + ", ".join(report.failures) + ")"
    print(line)
    source = report.source_type or P.xmp_source_type(text.get(P.XMP_KEY))
    print(f"digital source type: {source or 'not stated'}")
    mark = detect_watermark(I.load_image(path))
    line = mark.describe()
    if mark.state == "absent" and rec is not None and rec.get("watermark") is False:
        line = "watermark: absent (the record says it was turned off)"
    print(line)
    return report


def _signer(manifest: dict) -> str:
    info = manifest.get("signature_info", {})
    return info.get("common_name") or info.get("issuer") or "unknown"


def print_model_provenance(rec: dict | None, report) -> None:
    """image -> model hash -> model file in the models folder -> its model card."""
    from ember import provenance as P
    from ember.catalog import find_models, models_dir

    sha = (rec or {}).get("model_sha256") or report.model.get("sha256")
    if not sha:
        print("model: the image names no model")
        return
    print(f"model sha256: {sha}")
    folder = models_dir()
    paths = [folder] if folder.exists() else []
    recorded = Path((rec or {}).get("model_path") or "")
    if recorded.exists():
        paths.append(recorded)
    match = next((m for m in find_models(paths) if m.sha256 == sha), None)
    if match is None:
        print(f"model file: not found in {folder} (or at the recorded path)")
        signed = report.model
        if signed.get("licences"):
            print("licences (from the credentials): " + ", ".join(signed["licences"]))
        return
    print(f"model file: {match.path}")
    card = P.read_model_card(match.path)
    if card is None:
        print(f"model card: none: {match.path} carries no licence record ({P.MODEL_CARD})")
        return
    summary = P.card_licences(card)
    print(f"model card: {P.find_model_card(match.path)}")
    if summary.get("card_sha256") and summary["card_sha256"] != sha:
        print("  warning: the card describes another file (sha256 differs)")
    print("  licences: " + (", ".join(summary["licences"]) or "none recorded"))
    for a in summary["attributions"]:
        print(f"  attribution: {a}")
    if summary.get("text_encoder"):
        print(f"  text encoder: {summary['text_encoder']}")


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list models with their sha256 and A1111 short hash")
    p.add_argument(
        "paths",
        nargs="*",
        help="files or folders (default: the bundled model and the models folder)",
    )
    p.set_defaults(run=run_models)


def run_models(args: argparse.Namespace) -> int:
    from ember.catalog import DEFAULT_MODEL, models_dir
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
        from ember.diffusers_folder import save_diffusers

        save_diffusers(loaded, out)
    print(out)
    return 0


def add_compile(sub) -> None:
    from ember.settings import add_addon_dirs, add_generation_args

    p = sub.add_parser(
        "compile",
        help="compile a model's U-Net for one image size, where that makes it faster",
        description="Compile the U-Net ahead of time (torch AOTInductor; needs a C++ compiler) "
        "for one image size, with any --lora merged as generate would merge it. The package is "
        "cached (keyed by model, LoRAs, dtype, size, torch and CPU) and kept only if it measured "
        "faster than eager here; `ember generate` and `ember serve` then use it for that size, "
        "any batch. EMBER_COMPILED=0 turns its use off.",
    )
    p.add_argument("--model", help="a .safetensors file or diffusers folder (default: bundled)")
    p.add_argument("--config", help="architecture of a single file ember cannot detect")
    add_generation_args(p, names=("width", "loras"))
    add_addon_dirs(p)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--keep-slower", action="store_true", help="keep the package even if slower")
    p.add_argument("--force", action="store_true", help="rebuild an existing package")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(run=run_compile)


def run_compile(args: argparse.Namespace) -> int:
    from ember.compiled import compile_unet, cxx_compiler
    from ember.service import GenerationService
    from ember.settings import GenerationParams

    cxx_compiler()  # no compiler: one line before minutes of loading
    service = GenerationService(args.dtype, lora_dir=_path(args.lora_dir))
    loaded = load_with_progress(service, args.model, args.config, quiet=args.quiet)
    params = service.prepare(
        GenerationParams(
            width=args.size[0] if args.size else None, height=args.size[1] if args.size else None
        )
    )
    service.use_loras(tuple(args.loras or ()))
    ds = loaded.config.vae.downsample
    say = (lambda _m: None) if args.quiet else (lambda m: print(f"ember: {m}", file=sys.stderr))
    report = compile_unet(
        loaded, (params.height // ds, params.width // ds), keep_slower=args.keep_slower,
        force=args.force, progress=say,
    )  # fmt: skip
    size = f"{params.width}x{params.height}"
    timing = (
        f"U-Net pass (batch 2) eager {report.eager_ms:.1f} ms, compiled {report.compiled_ms:.1f} ms"
    )
    if report.cached:
        print(f"{report.path}: already compiled for {size} ({timing})")
    elif report.kept:
        print(f"{report.path}: compiled for {size} in {report.compile_seconds:.0f} s ({timing})")
    else:
        print(
            f"ember: compiled is not faster here ({timing}); not kept, ember runs eagerly "
            "(--keep-slower keeps it)"
        )
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
    from ember.server.commands import add_db, add_keys, add_serve

    for add in (add_generate, add_info, add_models, add_convert, add_compile, add_data, add_train,
                add_eval, add_serve, add_keys, add_db):  # fmt: skip
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `ember` command itself, not a call from Python
        restart_with_tcmalloc()
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
    except BrokenPipeError:  # the reader of stdout went away (`ember info X | head`): not an error
        sys.stdout = open(os.devnull, "w")  # keeps interpreter shutdown quiet
        return 0
    except OSError as exc:  # a file the user named cannot be read or written (permissions, disk)
        print(
            f"ember: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
