"""Emoji datasets: Noto Emoji (Apache-2.0) and Twemoji (CC-BY-4.0) from emoji-datasource packages.

``fetch_emoji_packages`` is the only function that touches the network: it runs ``npm pack`` for the
pinned versions in ``PACKAGES`` into a cache folder and checks each tarball's SHA-256. Building the
dataset then reads the 64x64 PNGs (``img/<set>/64/*.png``) and ``emoji.json`` straight from the
tarballs, composites each image onto named background colours and writes ember's dataset format
(``docs/datasets.md``) with a licence and attribution on every item.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ember.data.shapes import BACKGROUNDS
from ember.files import sha256_file


@dataclass(frozen=True)
class EmojiPackage:
    name: str
    version: str
    sha256: str
    image_set: str  # folder under img/ and the ``has_img_<set>`` key in emoji.json
    style: str  # used in captions: "<style> style"
    spdx: str
    attribution: str

    @property
    def tarball(self) -> str:
        return f"{self.name}-{self.version}.tgz"


PACKAGES: tuple[EmojiPackage, ...] = (
    EmojiPackage(
        "emoji-datasource-google",
        "16.0.0",
        "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
        "google",
        "noto",
        "Apache-2.0",
        "Noto Emoji by Google, Apache-2.0",
    ),
    EmojiPackage(
        "emoji-datasource-twitter",
        "16.0.0",
        "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
        "twitter",
        "twemoji",
        "CC-BY-4.0",
        "Twemoji by Twitter, Inc and other contributors, CC-BY 4.0",
    ),
)
DEFAULT_BACKGROUNDS = ("white", "blue", "yellow", "pink")
SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
SKIPPED_CATEGORIES = ("Component",)  # bare skin-tone swatches and hair pieces


def default_cache_dir() -> Path:
    env = os.environ.get("EMBER_EMOJI_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ember" / "emoji"


def fetch_emoji_packages(cache_dir: str | Path | None = None) -> Path:
    """Download the pinned packages with ``npm pack`` into ``cache_dir`` (skipping ones present)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        path = cache / pkg.tarball
        if not path.is_file():
            if shutil.which("npm") is None:
                raise RuntimeError(f"npm is needed to fetch {pkg.name}@{pkg.version}; install it")
            subprocess.run(
                ["npm", "pack", f"{pkg.name}@{pkg.version}", "--silent"],
                cwd=cache,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        digest = sha256_file(path)
        if digest != pkg.sha256:
            raise RuntimeError(f"{path}: sha256 {digest} differs from the pinned {pkg.sha256}")
    return cache


def read_package(tarball: Path, image_set: str) -> tuple[list[dict], dict[str, bytes]]:
    """``emoji.json`` and the 64 px PNGs (file name -> bytes) of one emoji-datasource tarball."""
    prefix = f"package/img/{image_set}/64/"
    meta, images = None, {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                meta = json.load(tar.extractfile(member))
            elif member.name.startswith(prefix) and member.name.endswith(".png"):
                images[member.name[len(prefix) :]] = tar.extractfile(member).read()
    if meta is None:
        raise RuntimeError(f"{tarball} has no package/emoji.json")
    return meta, images


def _tone_words(key: str) -> str:
    tones = [SKIN_TONES[k] for k in key.upper().split("-") if k in SKIN_TONES]
    if len(set(tones)) == 1:
        return f"{tones[0]} skin tone"
    return f"{' and '.join(tones)} skin tones"


def emoji_captions(entry: dict, style: str, tone: str | None, background: str) -> list[str]:
    """Captions from the name, short names and category, e.g. "a slice of pizza, twemoji style"."""
    name = entry["name"].lower()
    article = "an" if name[0] in "aeiou" else "a"
    extra = f", {tone}" if tone else ""
    bg = "" if background == "white" else f", on a {background} background"
    shorts = [s.replace("_", " ") for s in entry.get("short_names") or [entry["short_name"]]]
    category = entry["category"].lower()
    captions = [
        f"{article} {name}, {style} style{extra}{bg}",
        f"{shorts[0]} emoji, {style} style{extra}{bg}",
        f"{name}, {category} emoji in {style} style{extra}{bg}",
    ]
    captions += [f"{s} emoji, {style} style{extra}{bg}" for s in shorts[1:2]]
    return captions


def _variants(entry: dict, image_set: str, skin_tones: bool) -> list[tuple[str, str | None]]:
    out = [(entry["image"], None)] if entry.get(f"has_img_{image_set}") else []
    if skin_tones:
        for key, var in sorted((entry.get("skin_variations") or {}).items()):
            if var.get(f"has_img_{image_set}"):
                out.append((var["image"], _tone_words(key)))
    return out


def composite(png: bytes, background: str) -> np.ndarray:
    """A transparent 64x64 PNG over a plain named background: (64, 64, 3) uint8."""
    with Image.open(io.BytesIO(png)) as img:
        rgba = img.convert("RGBA")
    if rgba.size != (64, 64):
        rgba = rgba.resize((64, 64), Image.Resampling.LANCZOS)
    base = Image.new("RGBA", rgba.size, BACKGROUNDS[background] + (255,))
    return np.array(Image.alpha_composite(base, rgba).convert("RGB"))


def build_emoji_dataset(
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS,
    limit: int | None = None,
    skin_tones: bool = True,
    fetch: bool = True,
) -> Path:
    """Write the Noto and Twemoji 64x64 emoji as an ember dataset folder.

    ``limit`` keeps the first N emoji of each set (by Unicode sort order) for quick runs;
    ``skin_tones=False`` drops the skin-tone variants. Packages are fetched into ``cache_dir`` with
    npm when missing and ``fetch`` is true; otherwise a missing cache is an error.
    """
    unknown = [b for b in backgrounds if b not in BACKGROUNDS]
    if unknown or not backgrounds:
        raise ValueError(f"unknown backgrounds {unknown}; choose from {sorted(BACKGROUNDS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if fetch:
        fetch_emoji_packages(cache)
    out = Path(out_dir)
    rows, arrays, counts = [], [], {}
    for pkg in PACKAGES:
        tarball = cache / pkg.tarball
        if not tarball.is_file():
            raise FileNotFoundError(
                f"{tarball} missing; run `ember data emoji` with network access"
            )
        meta, images = read_package(tarball, pkg.image_set)
        entries = sorted(
            (e for e in meta if e["category"] not in SKIPPED_CATEGORIES),
            key=lambda e: e["sort_order"],
        )
        entries = [e for e in entries if e["image"] in images][:limit]
        (out / "images" / pkg.style).mkdir(parents=True, exist_ok=True)
        n_images = 0
        for entry in entries:
            for file, tone in _variants(entry, pkg.image_set, skin_tones):
                if file not in images:
                    continue
                n_images += 1
                for bg in backgrounds:
                    pixels = composite(images[file], bg)
                    name = f"images/{pkg.style}/{Path(file).stem}_{bg.replace(' ', '-')}.png"
                    Image.fromarray(pixels).save(out / name, compress_level=1)
                    arrays.append(pixels)
                    rows.append(
                        {
                            "file": name,
                            "caption": emoji_captions(entry, pkg.style, tone, bg),
                            "license": pkg.spdx,
                            "source": f"npm {pkg.name}@{pkg.version} img/{pkg.image_set}/64/{file}",
                            "attribution": pkg.attribution,
                            "emoji": {"unified": entry["unified"], "background": bg, "tone": tone},
                        }
                    )
        counts[pkg.style] = {"emoji": len(entries), "images": n_images}
    with open(out / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    np.save(out / "images.npy", np.stack(arrays))  # (N, 64, 64, 3) uint8, row i = line i
    info = {
        "name": "ember-emoji",
        "packages": [f"{p.name}@{p.version}" for p in PACKAGES],
        "backgrounds": list(backgrounds),
        "skin_tones": skin_tones,
        "limit": limit,
        "counts": counts,
        "items": len(rows),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
