import os

# Nothing may download at run time; a missing file must fail at once, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _diffusers_kwargs(cls, config: dict) -> dict:
    names = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in config.items() if k in names}


def build_diffusers_folder(folder, preset: str, *, seed: int = 0):
    """A tiny SD pipeline with random weights, built and saved by diffusers itself."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from ember import keymaps
    from ember.config import get_preset
    from ember.models.text import text_config_to_hf
    from ember.models.tokenizer import build_tokenizer

    cfg = get_preset(preset)
    torch.manual_seed(seed)
    unet_conf = keymaps.unet_config_to_diffusers(cfg.unet)
    unet_conf["sample_size"] = cfg.size // cfg.vae.downsample
    unet = diffusers.UNet2DConditionModel(
        **_diffusers_kwargs(diffusers.UNet2DConditionModel, unet_conf)
    )
    vae_conf = keymaps.vae_config_to_diffusers(cfg.vae)
    vae = diffusers.AutoencoderKL(**_diffusers_kwargs(diffusers.AutoencoderKL, vae_conf))
    text = CLIPTextModel(CLIPTextConfig(**text_config_to_hf(cfg.text)))
    tokenizer = build_tokenizer(cfg.text).to_transformers()
    scheduler = diffusers.DDIMScheduler(
        beta_start=cfg.schedule.beta_start,
        beta_end=cfg.schedule.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if cfg.schedule.prediction == "v" else "epsilon",
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_clip(
    hidden: int = 32, vocab: int = 49408, act: str = "quick_gelu", layers: int = 2, heads: int = 4
):
    """(CLIPTextModel, CLIPTextModelWithProjection) of one tiny random config."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    conf = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=hidden,
        hidden_act=act,
    )
    return CLIPTextModel(conf), CLIPTextModelWithProjection(conf)


def build_sdxl_folder(folder, *, seed: int = 0, refiner: bool = False, inpainting: bool = False):
    """A tiny SDXL base (or refiner) pipeline with random weights, built and saved by diffusers:
    the shapes of diffusers' own SDXL pipeline tests (two levels, transformer depths 1 and 2,
    8-wide size sinusoids), with 3-layer text encoders so the penultimate layer is a middle one,
    of two widths (64 and 128, as CLIP-L and bigG differ: diffusers' single-file loader tells them
    apart so), and SDXL's 64-channel heads and 32 norm groups, so its tensors tell its config.
    `inpainting`: a 9-channel U-Net (latents, mask, masked-image latents), as SDXL inpainting's."""
    import diffusers

    from ember.config import get_preset
    from ember.models.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 128),
        layers_per_block=2,
        sample_size=16,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2),  # heads: 64 channels each, as every SDXL
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=(5 if refiner else 6) * 8 + 128,
        cross_attention_dim=128 if refiner else 64 + 128,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        scaling_factor=0.13025,
    )
    text, _ = tiny_clip(64, layers=3, heads=1)
    _, text_2 = tiny_clip(128, act="gelu", layers=3, heads=2)
    tokenizer = build_tokenizer(get_preset("tiny").text).to_transformers()
    tokenizer_2 = build_tokenizer(get_preset("tiny-v").text).to_transformers()
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )  # fmt: skip
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
        )  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    return build_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def sdxl_inpaint_folder(tmp_path_factory):
    return build_sdxl_folder(
        tmp_path_factory.mktemp("sdxli") / "tiny-sdxl-inpaint", inpainting=True
    )


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    return build_diffusers_folder(tmp_path_factory.mktemp("sd1") / "tiny-sd1", "tiny")


@pytest.fixture(scope="session")
def sd1_inpaint_folder(tmp_path_factory):
    """A tiny SD 1.x inpainting pipeline: its U-Net takes 9 channels, as sd-v1-5-inpainting's."""
    return build_diffusers_folder(
        tmp_path_factory.mktemp("sd1i") / "tiny-sd1-inpaint", "tiny-inpaint"
    )


@pytest.fixture(scope="session")
def sd2v_folder(tmp_path_factory):
    return build_diffusers_folder(tmp_path_factory.mktemp("sd2v") / "tiny-sd2v", "tiny-v", seed=1)


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """A tiny random-weight ember single-file model (preset `tiny`, 64x64 native)."""
    from ember import checkpoints
    from ember.config import get_preset
    from ember.models.ldm import LatentDiffusion
    from ember.safetensors_io import save_safetensors
    from server_support import transformers_initialised_clip

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = LatentDiffusion(cfg, transformers_initialised_clip(cfg.text))
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    sd = checkpoints.internal_to_ldm(model.state_dict(), cfg, {})
    save_safetensors(sd, path, {checkpoints.CONFIG_KEY: cfg.to_json(), "format": "pt"})
    return path


@pytest.fixture(autouse=True, scope="session")
def _ember_config(tmp_path_factory):
    """Content Credentials' local signing chain goes to a test folder, never the user's."""
    os.environ["EMBER_CONFIG"] = str(tmp_path_factory.mktemp("ember-config"))


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the whole session (`pg_support.PgServer`), or a skip
    naming the missing package."""
    from pg_support import PgServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (bash scripts/install-postgres.sh installs it)")
    server = PgServer(bindir)
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres):
    """A fresh database on the session's PostgreSQL server: each test gets an empty queue."""
    return postgres.new_database()
