"""The model files on disk: the bundled default model, the models folder, lookup by name or hash."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model" / "ember-small.safetensors"


def models_dir() -> Path:
    """The models folder: $EMBER_MODELS, else ~/.local/share/ember/models."""
    return Path(
        os.environ.get("EMBER_MODELS", Path.home() / ".local" / "share" / "ember" / "models")
    )


def cache_dir() -> Path:
    """ember's cache (model hashes, compiled U-Nets): $EMBER_CACHE, else ~/.cache/ember."""
    return Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember"))


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


@dataclass(frozen=True)
class ModelInfo:
    """A model file or folder, named as A1111 names it (`title` = "file [hash]")."""

    name: str
    path: str
    sha256: str
    short_hash: str

    @property
    def title(self) -> str:
        return f"{Path(self.path).name} [{self.short_hash}]"

    def matches(self, name: str) -> bool:
        """True when `name` is this model's title, name, file name, short hash or sha256."""
        return name in (self.title, self.name, Path(self.path).name, self.short_hash, self.sha256)


def find_models(paths: list[Path]) -> list[ModelInfo]:
    """ModelInfos for files, folders of `.safetensors`, and diffusers folders, hashed (cached)."""
    from ember.checkpoints import file_hashes

    found: list[Path] = []
    for path in paths:
        if path.is_dir() and not (path / "model_index.json").exists():
            found += sorted(path.glob("*.safetensors"))
            found += sorted(p.parent for p in path.glob("*/model_index.json"))
        elif path.exists():
            found.append(path)
    out, seen = [], set()
    for path in found:
        if str(path.resolve()) in seen:
            continue
        seen.add(str(path.resolve()))
        sha, short = file_hashes(path)
        name = path.stem if path.is_file() else path.name
        out.append(ModelInfo(name, str(path), sha, short))
    return out


def lookup(models: list[ModelInfo], name: str) -> ModelInfo:
    for m in models:
        if m.matches(name):
            return m
    raise EmberError(f"unknown model {name!r}; see GET /sdapi/v1/sd-models or `ember models`")


def lora_dir() -> Path:
    """The LoRA folder: a `Lora` folder in the models folder (A1111's name)."""
    return models_dir() / "Lora"


def embeddings_dir() -> Path:
    """The textual-inversion folder: an `embeddings` folder in the models folder."""
    return models_dir() / "embeddings"


def vae_dir() -> Path:
    """Replacement VAEs offered by name (A1111's `sd_vae`): a `VAE` folder in the models folder."""
    return models_dir() / "VAE"


def find_vaes(folder: Path) -> dict[str, Path]:
    """name -> replacement VAE: `.safetensors` files (by stem) and folders (a diffusers VAE or the
    TAESD pair, by folder name)."""
    if not folder.is_dir():
        return {}
    found = {p.stem: p for p in sorted(folder.glob("*.safetensors"))}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "config.json").exists() or any(sub.glob("taesd*_decoder.safetensors")):
            found[sub.name] = sub
    return found


def find_loras(folder: Path) -> dict[str, Path]:
    """name (file stem, as `<lora:NAME>` names it) -> `.safetensors` file, searched recursively."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*.safetensors"))}


def resolve_lora_path(name: str, folder: Path) -> Path:
    """A LoRA path, or a name in `folder`; an unknown name lists the LoRAs found."""
    path = Path(name).expanduser()
    if path.suffix and path.is_file():
        return path
    found = find_loras(folder)
    if name in found:
        return found[name]
    names = ", ".join(found) if found else "none"
    raise EmberError(
        f"LoRA not found: {name} (a .safetensors path, or a name in {folder}: {names})"
    )
