"""Model files and folders ember cannot load end in one `EmberError` line, never a traceback.

Each case is built the way a user would meet it: tiny random models written by diffusers itself
(an SDXL folder, a folder whose tokenizer is BERT's), SDXL/SD3/Flux single files faked by a few
keys with their real names, and broken files (truncated, random tensors, pickles, missing parts).
"""

import json
import shutil

import pytest
import torch

from ember import checkpoints
from ember.errors import EmberError

SUPPORTED = "SD 1.x"  # every refusal names what ember does load


def _generate(capsys, model, *extra):
    from ember.cli import main

    code = main(["generate", "x", "--model", str(model), "-q", "-o", "/nonexistent/o.png", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_refusal(capsys, model, *words, extra=()):
    """The CLI exits 2 with one `ember: error:` line containing `words`; load_model agrees."""
    with pytest.raises(EmberError) as info:
        checkpoints.load_model(model, *extra[1:2])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    code, err = _generate(capsys, model, *extra)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ember: error:"), err
    for word in words:
        assert word in err, err
    return message


def _tiny_clip(hidden: int, vocab: int = 49408, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    conf = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=hidden,
        hidden_act=act,
    )
    return CLIPTextModel(conf), CLIPTextModelWithProjection(conf)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """A tiny SDXL base pipeline with random weights, saved by diffusers."""
    import diffusers

    from ember.config import get_preset
    from ember.models.text import build_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    text, _ = _tiny_clip(32)
    _, text_2 = _tiny_clip(32, act="gelu")
    tokenizer = build_tokenizer(get_preset("tiny").text).to_transformers()
    tokenizer_2 = build_tokenizer(get_preset("tiny-v").text).to_transformers()
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(),
    )
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bert_tokenizer_folder(tmp_path_factory, sd1_folder):
    """An SD 1.x-shaped diffusers folder whose text model and tokenizer are BERT-vocabulary ones:
    a CLIP text encoder with BERT's 30522-token vocabulary and a BertTokenizer beside it."""
    from ember.models.text import build_minilm_tokenizer

    folder = tmp_path_factory.mktemp("bert") / "bert-tokenizer"
    shutil.copytree(sd1_folder, folder)
    text, _ = _tiny_clip(32, vocab=30522)
    shutil.rmtree(folder / "text_encoder")
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    build_minilm_tokenizer().to_transformers().save_pretrained(folder / "tokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "BertTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# --- the two cases of issue 34 ------------------------------------------------------------------


def test_sdxl_diffusers_folder_is_refused_in_one_line(capsys, sdxl_folder):
    assert_one_line_refusal(capsys, sdxl_folder, "SDXL", SUPPORTED)


def test_folder_with_non_clip_tokenizer_is_refused_in_one_line(capsys, bert_tokenizer_folder):
    assert_one_line_refusal(capsys, bert_tokenizer_folder, "BertTokenizer", "CLIP")
