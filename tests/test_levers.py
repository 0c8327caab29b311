"""The approximate speed levers (issue 37): token merging (`--tome RATIO`) and DeepCache
(`--deepcache N`), from their maths to the CLI, the PNG record, the job API and the A1111 API.

The model is a tiny random SD-shaped model with a transformer at the latent's own resolution (the
`tiny` preset has none there; SD 1.x has, and that is where ToMe merges), whose zero-initialised
layers (ldm's residual outputs) are given random weights so that every block changes the image.
Closeness to the exact image is judged against a yardstick from the same model: the image of the
next seed, a wholly different picture. An approximation must be 20 dB (10x in RMS) closer to the
exact image than that; the levers measure 40+ dB closer here, a broken one (wrong cache, wrong
batch rows) lands near the yardstick.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ember.checkpoints import LoadedModel, load_model, save_single_file
from ember.cli import main
from ember.config import TINY_UNET, UNetConfig, get_preset
from ember.images import INFOTEXT_KEY, read_png_text, read_record
from ember.models.deepcache import DeepCacheUNet
from ember.models.layers import CrossAttention
from ember.models.ldm import LatentDiffusion
from ember.models.text import build_text_encoder
from ember.models.tokenizer import build_tokenizer
from ember.models.tome import bipartite_soft_matching_2d, token_merging
from ember.models.unet import UNetModel
from ember.pipeline import Inputs, generate
from ember.provenance import Provenance
from ember.server.app import create_app
from ember.server.engine import ModelEngine
from ember.settings import GenerationParams, batch_key
from pngcheck import same_image
from server_support import make_settings, wait_for

PROMPT, NEGATIVE = "a red circle", "blurry"
SEED, STEPS, CFG, SIZE = 3, 4, 5.0, 32
# SD 1.x's layout in miniature: transformers at the latent's resolution and at half of it.
TOP_UNET = dataclasses.replace(TINY_UNET, attention_resolutions=(1, 2))
# SDXL's in miniature: no transformer at the latent's resolution, a label_emb for the vector y.
SDXL_UNET = dataclasses.replace(TINY_UNET, adm_in_channels=16)
FLAGS = ["--steps", str(STEPS), "--seed", str(SEED), "--cfg", str(CFG), "--sampler", "euler",
         "--size", f"{SIZE}x{SIZE}", "--negative", NEGATIVE, "--dtype", "fp32", "--no-watermark",
         "-q"]  # fmt: skip
MARGIN_DB = 20.0


def randomize_zeros(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights for the layers ldm zero-initialises, so that each changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p[0].numel() ** 0.5)
    return module


def tiny_model(seed: int = 0, in_channels: int = 4) -> LoadedModel:
    base = get_preset("tiny")
    cfg = dataclasses.replace(
        base, name="tiny-top", unet=dataclasses.replace(TOP_UNET, in_channels=in_channels)
    )
    torch.manual_seed(seed)
    model = LatentDiffusion(cfg, build_text_encoder(cfg.text)).eval()
    randomize_zeros(model.model.diffusion_model, seed + 1)
    return LoadedModel(model, build_tokenizer(cfg.text), cfg, "", "tiny-top", "", "")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("levers") / "tiny-top.safetensors"
    save_single_file(tiny_model(), path)
    return path


@pytest.fixture(scope="module")
def loaded(model_file):
    return load_model(model_file)


def params(**kw) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="euler", cfg=CFG,
                seed=SEED, width=SIZE, height=SIZE)  # fmt: skip
    return GenerationParams(**(base | kw))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB between images in [0, 1]."""
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def assert_close_approximation(approx, exact, yardstick, what: str) -> None:
    assert not torch.equal(approx, exact), f"{what} did not change the image: it did nothing"
    got, scale = psnr(approx, exact), psnr(yardstick, exact)
    assert got > scale + MARGIN_DB, f"{what}: {got:.1f} dB from exact, another seed {scale:.1f} dB"


def hooks_left(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class CallCounter:
    """How many times `module` ran (a deep block: the U-Net's middle block ran = a full call)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.n += 1

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()


def random_unet(cfg: UNetConfig) -> UNetModel:
    torch.manual_seed(0)
    return randomize_zeros(UNetModel(cfg).eval(), 1)


def unet_inputs(cfg: UNetConfig, seed: int = 0, length: int = 7, side: int = 16):
    """(x, t, context, y) of one call on a batch of 2; y only for U-Nets with a label_emb."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, side, side, generator=gen)
    context = torch.randn(2, length, cfg.context_dim, generator=gen)
    y = torch.randn(2, cfg.adm_in_channels, generator=gen) if cfg.adm_in_channels else None
    return x, torch.full((2,), 500.0 - seed), context, y


# ---------------------------------------------------------------------------------------------
# 1. ToMe's matching


def blocky(b: int, h: int, w: int, c: int) -> torch.Tensor:
    """(b, h*w, c) tokens of an h x w map made of 2x2 windows of one random token each."""
    small = torch.randn(b, h // 2, w // 2, c, generator=torch.Generator().manual_seed(0))
    return small.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(b, h * w, c)


@pytest.mark.parametrize("r", [16, 48])
def test_merging_duplicates_loses_nothing_and_merging_distinct_tokens_does(r):
    gen = torch.Generator().manual_seed(1)
    x = blocky(2, 8, 8, 16)
    merge, unmerge = bipartite_soft_matching_2d(x, 8, 8, r, gen)
    assert merge(x).shape == (2, 64 - r, 16)
    # each source matches the copy of itself in its own window: averaging copies changes nothing
    torch.testing.assert_close(unmerge(merge(x)), x, rtol=0, atol=1e-6)
    distinct = torch.randn(2, 64, 16, generator=gen)
    merge, unmerge = bipartite_soft_matching_2d(distinct, 8, 8, r, gen)
    changed = (unmerge(merge(distinct)) != distinct).any(-1).sum(-1)  # tokens per row
    assert (changed > r).all()  # the r sources and the destinations they went into


def test_merging_matches_each_row_on_its_own_and_odd_maps_keep_their_edges():
    x = torch.randn(3, 6 * 5, 8, generator=torch.Generator().manual_seed(2))
    merge, unmerge = bipartite_soft_matching_2d(x, 6, 5, 9, torch.Generator().manual_seed(5))
    alone_merge, alone_unmerge = bipartite_soft_matching_2d(
        x[1:2], 6, 5, 9, torch.Generator().manual_seed(5)
    )
    assert merge(x).shape == (3, 30 - 9, 8)
    assert torch.equal(merge(x)[1:2], alone_merge(x[1:2]))
    assert torch.equal(unmerge(merge(x))[1:2], alone_unmerge(alone_merge(x[1:2])))
    # the last column (5 is odd) has no window: its tokens are sources, never destinations
    nothing = bipartite_soft_matching_2d(x, 6, 5, 0, torch.Generator())
    assert nothing[0](x) is x


@pytest.mark.parametrize(("cfg", "merged_level"), [(TOP_UNET, 1), (SDXL_UNET, 2)])
def test_tome_merges_self_attention_at_the_highest_level_only_and_unhooks(cfg, merged_level):
    """SD 1.x merges at the latent's own resolution (tomesd's default), SDXL-shaped U-Nets at
    their highest level with transformers; cross-attention always sees every token."""
    unet = random_unet(cfg)
    x, t, context, y = unet_inputs(cfg)
    exact = unet(x, t, context, y)
    seen: list[tuple[str, int]] = []  # (attention layer, tokens its queries came from)
    handles = [m.to_q.register_forward_pre_hook(lambda m, a, n=name: seen.append((n, a[0].shape[1])))
               for name, m in unet.named_modules() if isinstance(m, CrossAttention)]  # fmt: skip
    with token_merging(unet, 0.5, t):
        merged = unet(x, t, context, y)
    for h in handles:
        h.remove()
    assert hooks_left(unet) == 0
    assert torch.equal(unet(x, t, context, y), exact)
    assert not torch.equal(merged, exact)
    side = x.shape[-1]
    tokens = {1: side * side, 2: (side // 2) ** 2}
    attn1 = [n for name, n in seen if name.endswith("attn1")]
    attn2 = [n for name, n in seen if name.endswith("attn2")]
    top = tokens[merged_level]
    assert top - top // 2 in attn1 and top not in attn1  # every block at that level merged
    assert set(attn1) - {top - top // 2} <= set(tokens.values()) - {top}
    assert set(attn2) <= set(tokens.values()) and top in attn2


# ---------------------------------------------------------------------------------------------
# 2. DeepCache's runner


@pytest.mark.parametrize("cfg", [TOP_UNET, SDXL_UNET], ids=["sd", "sdxl"])
def test_deepcache_reuses_the_deep_feature_of_its_last_full_call(cfg):
    unet = random_unet(cfg)
    x, t, context, y = unet_inputs(cfg)
    # the next step's input: a little less noisy
    x2, t2 = x + 0.1 * unet_inputs(cfg, seed=1)[0], t - 20
    exact, exact2 = unet(x, t, context, y), unet(x2, t2, context, y)
    runner = DeepCacheUNet(unet, 3)
    with CallCounter(unet.middle_block) as full:
        assert torch.equal(runner(x, t, context, y), exact)  # call 0: full
        # call 1 runs only the outer blocks; at the same inputs its cache is exactly right
        assert torch.equal(runner(x, t, context, y), exact)
        approx = runner(x2, t2, context, y)  # call 2: the deep feature of call 0
        assert torch.equal(runner(x2, t2, context, y), exact2)  # call 3: full again
    assert full.n == 2
    assert not torch.equal(approx, exact2)
    assert (approx - exact2).abs().max() < (exact - exact2).abs().max()
    assert hooks_left(unet) == 0


def test_deepcache_keeps_one_cache_per_call_shape():
    """With prompts of different token lengths a step's cond and uncond passes are two calls;
    each must reuse its own deep feature, never the other's."""
    unet = random_unet(TOP_UNET)
    x, t, short, _ = unet_inputs(TOP_UNET, length=7)
    _, _, long, _ = unet_inputs(TOP_UNET, length=14)
    runner = DeepCacheUNet(unet, 2)
    with CallCounter(unet.middle_block) as full:
        runner(x, t, short)
        runner(x, t, long)
        assert torch.equal(runner(x, t, short), unet(x, t, short))
        assert torch.equal(runner(x, t, long), unet(x, t, long))
    assert full.n == 2 + 2  # the runner's two full calls and the two references


# ---------------------------------------------------------------------------------------------
# 3. generation


@pytest.fixture(scope="module")
def exact(loaded):
    return generate(loaded, params())


@pytest.fixture(scope="module")
def yardstick(loaded):
    return generate(loaded, params(seed=SEED + 1))


def test_tome_changes_the_image_a_little_reproducibly_and_leaves_the_model_alone(
    loaded, exact, yardstick
):
    unet = loaded.model.model.diffusion_model
    before = hooks_left(unet)
    merged = generate(loaded, params(tome=0.5))
    assert_close_approximation(merged, exact, yardstick, "tome 0.5")
    assert torch.equal(generate(loaded, params(tome=0.5)), merged)
    assert hooks_left(unet) == before
    assert torch.equal(generate(loaded, params()), exact)  # the next exact image is untouched


def test_deepcache_image_is_close_to_the_exact_one(loaded, exact, yardstick):
    cached = generate(loaded, params(deepcache=2))
    assert_close_approximation(cached, exact, yardstick, "deepcache 2")
    assert torch.equal(generate(loaded, params(deepcache=2)), cached)
    both = generate(loaded, params(deepcache=2, tome=0.5))
    assert_close_approximation(both, exact, yardstick, "deepcache 2 with tome 0.5")
    assert torch.equal(generate(loaded, params()), exact)


def unet_calls(loaded, p: GenerationParams, refiner=None) -> list[int]:
    """Full U-Net calls (middle-block runs) of one image, per model (the model, the refiner)."""
    models = [loaded] + ([refiner] if refiner is not None else [])
    with contextlib.ExitStack() as stack:
        counters = [stack.enter_context(CallCounter(m.model.model.diffusion_model.middle_block))
                    for m in models]  # fmt: skip
        generate(loaded, p, refiner=refiner)
    return [c.n for c in counters]


@pytest.mark.parametrize(("sampler", "interval"), [("euler", 2), ("euler", 3), ("euler", 4),
                                                   ("heun", 2)])  # fmt: skip
def test_deepcache_runs_the_full_unet_every_nth_call(loaded, sampler, interval):
    """Uniform 1:N over U-Net calls, the first full; heun calls the U-Net twice a step and both
    calls count (one cond+uncond call per step with cfg)."""
    (calls,) = unet_calls(loaded, params(sampler=sampler))
    assert calls == {"euler": STEPS, "heun": 2 * STEPS - 1}[sampler]
    assert unet_calls(loaded, params(sampler=sampler, deepcache=interval)) == [
        math.ceil(calls / interval)
    ]


def test_deepcache_with_a_refiner_keeps_a_cache_per_model(loaded):
    """The refiner's first call is full: it never reuses the base model's features."""
    refiner = tiny_model(seed=5)
    p = params(refiner_switch_at=0.5)
    base_calls, refiner_calls = unet_calls(loaded, p, refiner)
    assert base_calls > 0 and refiner_calls > 0
    assert unet_calls(loaded, dataclasses.replace(p, deepcache=2), refiner) == [
        math.ceil(base_calls / 2), math.ceil(refiner_calls / 2)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def init_and_mask():
    gen = torch.Generator().manual_seed(9)
    init = torch.rand(1, 3, SIZE, SIZE, generator=gen)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :, SIZE // 2 :] = 1
    return init, mask


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "inpaint-9ch", "layout"])
def test_levers_work_in_every_mode(loaded, init_and_mask, mode):
    init, mask = init_and_mask
    model, inputs, kw = loaded, Inputs(), {}
    if mode == "img2img":
        inputs = Inputs(init)
    elif mode.startswith("inpaint"):
        inputs = Inputs(init, mask)
        model = tiny_model(in_channels=9) if mode == "inpaint-9ch" else loaded
    else:  # layout guidance's gradient pass runs the whole network, outside DeepCache's count
        kw = dict(prompt="a red circle left of a blue square", layout_guidance=2.0)
        unguided = generate(model, params(**kw | {"layout_guidance": 0.0}))
        assert not torch.equal(generate(model, params(**kw)), unguided), "no layout guidance"
    exact = generate(model, params(**kw), inputs)
    yardstick = generate(model, params(**kw, seed=SEED + 1), inputs)
    both = generate(model, params(**kw, tome=0.5, deepcache=2), inputs)
    assert_close_approximation(both, exact, yardstick, f"{mode}: tome 0.5 and deepcache 2")


def test_levers_on_sdxl(sdxl_folder):
    """SDXL's vector conditioning reaches the cached calls; ToMe merges at its highest level with
    transformers (there are none at the latent's own resolution)."""
    sdxl = load_model(sdxl_folder)
    p = params(prompt="a cat", steps=2)
    exact, yardstick = generate(sdxl, p), generate(sdxl, dataclasses.replace(p, seed=SEED + 1))
    both = generate(sdxl, dataclasses.replace(p, tome=0.5, deepcache=2))
    assert_close_approximation(both, exact, yardstick, "SDXL: tome 0.5 and deepcache 2")


def test_batch_mates_do_not_change_an_image(loaded):
    """Each image of a batch is the one its seed gives alone, with both levers on."""
    on = dict(tome=0.5, deepcache=2)
    batch = generate(loaded, params(batch=2, **on))
    alone = generate(loaded, params(seed=SEED + 1, **on))
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=1e-5)


def test_levers_are_part_of_the_batch_key():
    plain = batch_key(params())
    assert batch_key(params(tome=0.3)) != plain and batch_key(params(deepcache=2)) != plain
    assert batch_key(params(tome=0.0, deepcache=1)) == plain


# ---------------------------------------------------------------------------------------------
# 4. `ember generate`


def pixels(source) -> np.ndarray:
    data = source if isinstance(source, bytes) else source.read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def infotext_pairs(source) -> str:
    return read_png_text(source)[INFOTEXT_KEY].splitlines()[-1]


@pytest.fixture(scope="module")
def cli(model_file, tmp_path_factory):
    """`ember generate` on the tiny model; each distinct command runs once per module."""
    folder, done = tmp_path_factory.mktemp("out"), {}

    def run(*extra: str):
        if extra not in done:
            out = folder / f"img{len(done)}.png"
            assert main(["generate", PROMPT, "--model", str(model_file), *FLAGS, "-o", str(out),
                         *extra]) == 0  # fmt: skip
            done[extra] = out
        return done[extra]

    return run


def test_cli_flags_go_into_the_record_and_from_makes_the_image_again(cli, tmp_path):
    plain = cli()
    assert same_image(cli("--tome", "0", "--deepcache", "1"), plain)  # off is exactly off
    out = cli("--tome", "0.5", "--deepcache", "2")
    assert not (pixels(out) == pixels(plain)).all()
    record = read_record(out).params
    assert (record.tome, record.deepcache) == (0.5, 2)
    pairs = infotext_pairs(out)
    assert "Token merging ratio: 0.5" in pairs and "DeepCache interval: 2" in pairs
    assert "Token merging" not in infotext_pairs(plain) and "DeepCache" not in infotext_pairs(plain)
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(out), "-q", "-o", str(again)]) == 0
    assert same_image(again, out)
    # --from keeps the recorded levers unless a flag changes them
    off = tmp_path / "off.png"
    assert main(["generate", "--from", str(out), "--tome", "0", "--deepcache", "1", "-q",
                 "-o", str(off)]) == 0  # fmt: skip
    assert (pixels(off) == pixels(plain)).all()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tome", "0.8"), "tome 0.8 is not allowed: use a number from 0 to 0.75"),
        (("--tome", "-0.1"), "tome -0.1 is not allowed: use a number from 0 to 0.75"),
        (("--deepcache", "0"), "deepcache 0 is not allowed: use 1 to 50"),
        (("--deepcache", "51"), "deepcache 51 is not allowed: use 1 to 50"),
    ],
)
def test_cli_refuses_out_of_range_levers_in_one_line(model_file, tmp_path, capsys, flags, message):
    out = tmp_path / "bad.png"
    capsys.readouterr()
    code = main(["generate", PROMPT, "--model", str(model_file), *FLAGS, "-o", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err == f"ember: error: {message}\n"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 5. the job API and the A1111 API


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    engine = ModelEngine([], model_file)
    settings = make_settings(tmp_path_factory.mktemp("server"),
                             provenance=Provenance(watermark=False))  # fmt: skip
    with TestClient(create_app(settings, engine)) as client:
        yield client


JOB = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": STEPS, "cfg": CFG,
       "sampler": "euler", "width": SIZE, "height": SIZE}  # fmt: skip


def final(client, job_id):
    view = client.get(f"/v1/jobs/{job_id}").json()
    return view if view["status"] in ("done", "failed", "interrupted", "cancelled") else None


def job_png(client, body) -> bytes:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    view = wait_for(lambda: final(client, r.json()["id"]), timeout=120)
    assert view["status"] == "done", view["error"]
    return client.get(f"/v1/images/{view['images'][0]}").content


def test_job_api_applies_the_levers_as_the_cli_does(server, cli):
    png = job_png(server, JOB | {"tome": 0.5, "deepcache": 2})
    assert (pixels(png) == pixels(cli("--tome", "0.5", "--deepcache", "2"))).all()
    assert "Token merging ratio: 0.5" in infotext_pairs(png)
    for bad in ({"tome": 0.8}, {"deepcache": 0}, {"tome": "lots"}):
        r = server.post("/v1/jobs", json=JOB | bad)
        assert r.status_code == 422 and next(iter(bad)) in r.text


def a1111_txt2img(client, **extra):
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": STEPS,
            "cfg_scale": CFG, "sampler_name": "Euler", "width": SIZE, "height": SIZE, **extra}  # fmt: skip
    return client.post("/sdapi/v1/txt2img", json=body)


def test_a1111_token_merging_ratio_is_tome(server, cli):
    r = a1111_txt2img(server, override_settings={"token_merging_ratio": 0.5})
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["images"][0]))
    assert (got == pixels(cli("--tome", "0.5"))).all()
    assert "Token merging ratio: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
    for bad in (0.9, "half", True):
        r = a1111_txt2img(server, override_settings={"token_merging_ratio": bad})
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert (
            detail.startswith(f"token_merging_ratio {bad!r} is not allowed") and "\n" not in detail
        )
