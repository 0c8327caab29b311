"""Acceptance 1: the `webuiapi` client library, unmodified, against `ember serve` with a real model."""

from __future__ import annotations

import pytest
from PIL import Image

from server_support import make_tiny_model, start_server

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111")
    model = make_tiny_model(root / "tiny.safetensors")
    proc, url = start_server(root / "data", model=model)
    yield url
    proc.terminate()
    proc.wait(10)


def test_webuiapi_client(live):
    port = int(live.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    models = api.util_get_model_names()
    assert models == ["tiny.safetensors [" + api.get_sd_models()[0]["hash"] + "]"]
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()
    assert api.util_get_current_model() == models[0]

    result = api.txt2img(prompt="a red circle", seed=42, width=64, height=64, batch_size=2)
    assert len(result.images) == 2 and result.image.size == (64, 64)
    assert result.info["all_seeds"] == [42, 43] and result.info["seed"] == 42
    assert "Seed: 43" in result.info["infotexts"][1]
    assert result.parameters["prompt"] == "a red circle"
    # same seed, same picture (batching never changes an image)
    again = api.txt2img(prompt="a red circle", seed=43, width=64, height=64)
    assert again.image.tobytes() == result.images[1].tobytes()

    init = Image.new("RGB", (64, 64), (200, 30, 30))
    out = api.img2img(images=[init], prompt="a square", seed=1, width=64, height=64,
                      denoising_strength=0.5)  # fmt: skip
    assert out.image.size == (64, 64) and out.info["denoising_strength"] == 0.5
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = api.img2img(images=[init], mask_image=mask, prompt="x", seed=2, width=64,
                            height=64, inpainting_fill=1)  # fmt: skip
    corner = inpainted.image.convert("RGB").getpixel((0, 0))
    assert inpainted.image.size == (64, 64) and corner is not None
    info = api.png_info(result.image)
    assert info.info.startswith("a red circle")
    assert api.get_progress()["state"]["job_count"] == 0
