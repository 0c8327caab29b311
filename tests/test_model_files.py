"""Model files and folders ember cannot load end in one `EmberError` line, never a traceback.

Each case is built the way a user would meet it: tiny random models written by diffusers itself
(an SDXL folder, a folder whose tokenizer is BERT's WordPiece), SDXL/SD3/Flux single files faked by a few
keys with their real names, and broken files (truncated, random tensors, pickles, missing parts).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_clip
from ember import checkpoints
from ember.errors import EmberError

SUPPORTED = "SD 1.x"  # every refusal names what ember does load


def assert_one_line_refusal(capsys, tmp_path, model, *words, config=None):
    """load_model raises a one-line EmberError containing `words`; the CLI exits 2 with that line."""
    from ember.cli import main

    with pytest.raises(EmberError) as info:
        checkpoints.load_model(model, config)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    argv = ["generate", "x", "--model", str(model), "-q", "-o", str(tmp_path / "o.png")]
    capsys.readouterr()  # drop what building the fixture printed
    code = main(argv + (["--config", config] if config else []))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ember: error:"), err
    for word in words:
        assert word in err, err
    return message


@pytest.fixture(scope="module")
def bert_tokenizer_folder(tmp_path_factory, sd1_folder):
    """An SD 1.x-shaped diffusers folder whose text model and tokenizer are BERT-vocabulary ones:
    a CLIP text encoder with BERT's 30522-token vocabulary and a BertTokenizer beside it."""
    from ember.models.tokenizer import build_minilm_tokenizer

    folder = tmp_path_factory.mktemp("bert") / "bert-tokenizer"
    shutil.copytree(sd1_folder, folder)
    text, _ = tiny_clip(32, vocab=30522)
    shutil.rmtree(folder / "text_encoder")
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    build_minilm_tokenizer().to_transformers().save_pretrained(folder / "tokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "BertTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# --- the two cases of issue 34 ------------------------------------------------------------------


def test_folder_with_a_non_bpe_tokenizer_is_refused_in_one_line(
    capsys, tmp_path, bert_tokenizer_folder
):
    assert_one_line_refusal(
        capsys, tmp_path, bert_tokenizer_folder, "BertTokenizer", "CLIP-style BPE"
    )


def test_tokenizer_json_of_another_model_is_refused_in_one_line(capsys, tmp_path, sd1_folder):
    folder = tmp_path / "wordpiece"
    shutil.copytree(sd1_folder, folder)
    file = folder / "tokenizer" / "tokenizer.json"
    data = json.loads(file.read_text())
    data["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}
    file.write_text(json.dumps(data))
    assert_one_line_refusal(capsys, tmp_path, folder, "WordPiece", "BPE")


def test_tokenizer_ids_beyond_the_encoder_table_are_refused_in_one_line(
    capsys, tmp_path, sd1_folder
):
    """Folders with their own tokenizer load (tests/test_embeddings.py) unless an id cannot work."""
    from transformers import CLIPTokenizer

    folder = tmp_path / "too-many-tokens"
    shutil.copytree(sd1_folder, folder)
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    tok.add_tokens(["<a-new-token>"])  # id 49408: one past the 49408-row table
    tok.save_pretrained(folder / "tokenizer")
    assert_one_line_refusal(capsys, tmp_path, folder, "49408", "table")


def test_sdxl_unet_config_is_refused_even_under_another_pipeline_name(
    capsys, tmp_path, sdxl_folder
):
    folder = tmp_path / "renamed"
    shutil.copytree(sdxl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    del index["text_encoder_2"], index["tokenizer_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert_one_line_refusal(capsys, tmp_path, folder, "SDXL", SUPPORTED)


# --- single files of other architectures, faked by a few tensors with their real names ----------


def _fake_file(folder, name, keys, metadata=None):
    path = folder / name
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path), metadata=metadata)
    return path


U = "model.diffusion_model."
SDXL_BASE = {  # SDXL's names, but far too few tensors to be a model
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,),
    "conditioner.embedders.1.model.ln_final.weight": (8,),
    U + "label_emb.0.0.weight": (8, 8),
    U + "input_blocks.0.0.weight": (8, 4, 3, 3),
}
OTHERS = {
    "sdxl-base": (SDXL_BASE, "SDXL"),
    "sdxl-refiner": (
        {"conditioner.embedders.0.model.ln_final.weight": (8,), U + "label_emb.0.0.weight": (8,)},
        "SDXL",
    ),
    "sd3": ({U + "joint_blocks.0.x_block.attn.qkv.weight": (8, 8)}, "SD3"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (8, 8)}, "Flux"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "LoRA"),
    "vae": ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.bias": (3,)}, "VAE"),
    "random": ({"a": (2,), "b": (3, 3)}, "without a Stable Diffusion U-Net"),
    "depth": (
        {
            U + "input_blocks.0.0.weight": (8, 5, 3, 3),
            U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
        },
        "5 input channels",
    ),
}


@pytest.mark.parametrize("kind", list(OTHERS))
def test_single_file_of_another_architecture_is_refused(capsys, tmp_path, kind):
    keys, named = OTHERS[kind]
    path = _fake_file(tmp_path, f"{kind}.safetensors", keys)
    assert_one_line_refusal(capsys, tmp_path, path, named, SUPPORTED)


def test_sdxl_file_is_refused_even_with_a_config(capsys, tmp_path):
    path = _fake_file(tmp_path, "sdxl.safetensors", SDXL_BASE)
    assert_one_line_refusal(capsys, tmp_path, path, "SDXL", config="sd15")


# --- broken files and folders -------------------------------------------------------------------


def test_truncated_file(capsys, tmp_path, tiny_model_file):
    path = tmp_path / "cut.safetensors"
    data = tiny_model_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_refusal(capsys, tmp_path, path, "truncated")


def test_file_that_is_not_safetensors(capsys, tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    assert_one_line_refusal(capsys, tmp_path, path, "not a safetensors file")


def test_pickled_checkpoint_is_refused_with_the_convert_command(capsys, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    assert_one_line_refusal(capsys, tmp_path, path, "pickled", "ember convert")


def test_bad_ember_metadata(capsys, tmp_path):
    path = _fake_file(tmp_path, "m.safetensors", {"w": (2,)}, {checkpoints.CONFIG_KEY: "{oops"})
    assert_one_line_refusal(capsys, tmp_path, path, "ember config")


def test_ember_config_whose_tokenizer_cannot_work(capsys, tmp_path):
    from ember.config import get_preset

    cfg = json.loads(get_preset("tiny").to_json())
    cfg["text"]["pad_token_id"] = 99999
    meta = {checkpoints.CONFIG_KEY: json.dumps(cfg)}
    path = _fake_file(tmp_path, "m.safetensors", {"w": (2,)}, meta)
    assert_one_line_refusal(capsys, tmp_path, path, "pad_token_id 99999")


def test_unknown_config_name(capsys, tmp_path, tiny_model_file):
    assert_one_line_refusal(capsys, tmp_path, tiny_model_file, "sd99", "sd15", config="sd99")


def test_folder_that_is_not_a_diffusers_folder(capsys, tmp_path, tiny_model_file):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_model_file, folder / "tiny.safetensors")
    message = assert_one_line_refusal(capsys, tmp_path, folder, "not a diffusers folder")
    assert "tiny.safetensors" in message  # the file inside is suggested


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda f: shutil.rmtree(f / "vae"), "missing vae/"),
        (lambda f: (f / "unet" / "config.json").unlink(), "missing unet/config.json"),
        (lambda f: (f / "unet" / "config.json").write_text("{"), "unreadable JSON"),
        (lambda f: (f / "model_index.json").write_text("[]"), "JSON object"),
        (
            lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").rename(
                f / "vae" / "diffusion_pytorch_model.fp16.safetensors"
            ),
            "found diffusion_pytorch_model.fp16.safetensors",
        ),
    ],
    ids=["no-vae", "no-unet-config", "bad-json", "index-not-object", "variant-only"],
)
def test_damaged_diffusers_folder(capsys, tmp_path, sd1_folder, damage, named):
    folder = tmp_path / "damaged"
    shutil.copytree(sd1_folder, folder)
    damage(folder)
    assert_one_line_refusal(capsys, tmp_path, folder, named)


def test_text_encoder_width_must_match_the_unet(capsys, tmp_path, sd1_folder):
    folder = tmp_path / "wide-text"
    shutil.copytree(sd1_folder, folder)
    shutil.rmtree(folder / "text_encoder")
    tiny_clip(64)[0].save_pretrained(folder / "text_encoder", safe_serialization=True)
    assert_one_line_refusal(capsys, tmp_path, folder, "64 wide", SUPPORTED)


def test_supported_folders_still_load(sd1_folder, sd2v_folder):
    assert checkpoints.load_model(sd1_folder).config.unet.context_dim == 32
    assert checkpoints.load_model(sd2v_folder).config.schedule.prediction == "v"
