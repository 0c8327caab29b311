"""Provenance (issue 40): Content Credentials, XMP source type and watermark in every PNG."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ember import provenance as P
from ember.checkpoints import file_hashes
from ember.cli import main
from ember.images import png_bytes
from ember.server.app import create_app
from ember.watermark import add_watermark, detect_watermark
from pictures import dead_leaves, psnr, reencode
from server_support import FakeEngine, make_settings, wait_for

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def gen(model, out, *extra):
    return main(["generate", "a red circle", "--model", str(model), "--steps", "2",
                 "--seed", "5", "-q", "-o", str(out), *extra])  # fmt: skip


def change_one_pixel(png: bytes) -> bytes:
    """The same file with one pixel's red value changed, every other chunk kept (a re-encode
    would drop the manifest chunk)."""
    out, i = bytearray(png[:8]), 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        kind, data = png[i + 4 : i + 8], png[i + 8 : i + 8 + n]
        if kind == b"IDAT":
            raw = bytearray(zlib.decompress(data))
            raw[1] ^= 1  # row 0: filter byte, then the first pixel's red
            data = zlib.compress(bytes(raw))
        out += struct.pack(">I", len(data)) + kind + data
        out += struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        i += 12 + n
    return bytes(out)


def test_generated_png_has_valid_credentials_naming_the_model(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "a.png"
    (tiny_model_file.parent / "model_card.json").write_text(json.dumps({
        "data": {"sources": [{"spdx": "CC0-1.0", "attribution": "ember procedural"}]}
    }))  # fmt: skip
    try:
        assert gen(tiny_model_file, out) == 0
    finally:
        (tiny_model_file.parent / "model_card.json").unlink()
    report = P.read_credentials(out.read_bytes())
    assert report.state == "valid", report.failures
    created = [a for a in P._actions(report.manifest) if a["action"] == "c2pa.created"]
    assert created and created[0]["digitalSourceType"] == TRAINED
    assert created[0]["softwareAgent"]["name"] == "ember"
    sha = file_hashes(tiny_model_file)[0]
    assert report.model["sha256"] == sha
    assert report.model["licences"] == ["CC0-1.0"]
    assert report.model["attributions"] == ["ember procedural"]
    text = Image.open(out).text
    assert P.xmp_source_type(text[P.XMP_KEY]) == TRAINED
    assert json.loads(text["ember"])["credentials"] is True
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "credentials: valid" in shown and f"digital source type: {TRAINED}" in shown


def test_one_changed_pixel_reads_as_tampered(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "a.png"
    assert gen(tiny_model_file, out) == 0
    edited = change_one_pixel(out.read_bytes())
    assert (
        np.abs(
            np.asarray(Image.open(out), int) - np.asarray(Image.open(tmp_path / "a.png"), int)
        ).max()
        == 0
    )
    report = P.read_credentials(edited)
    assert report.state == "tampered"
    assert "assertion.dataHash.mismatch" in report.failures
    (tmp_path / "b.png").write_bytes(edited)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "b.png")]) == 0
    assert "credentials: tampered" in capsys.readouterr().out


def test_img2img_lists_its_input_as_an_ingredient(tmp_path, tiny_model_file):
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(init)
    out = tmp_path / "i.png"
    assert gen(tiny_model_file, out, "--init-image", str(init), "--strength", "0.5") == 0
    report = P.read_credentials(out.read_bytes())
    assert report.state == "valid"
    assert [(x["title"], x["relationship"]) for x in report.manifest["ingredients"]] == [
        ("init image", "inputTo")
    ]


def test_no_credentials(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "plain.png"
    assert gen(tiny_model_file, out, "--no-credentials") == 0
    assert P.read_credentials(out.read_bytes()).state == "absent"
    text = Image.open(out).text
    assert P.XMP_KEY not in text and json.loads(text["ember"])["credentials"] is False
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "credentials: absent" in capsys.readouterr().out
    # the same command gives the same bytes without credentials (a signature differs each time)
    again = tmp_path / "again.png"
    assert gen(tiny_model_file, again, "--no-credentials") == 0
    assert again.read_bytes() == out.read_bytes()


def test_info_provenance_walks_to_the_model_card(tmp_path, tiny_model_file, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    model = models / "tiny.safetensors"
    model.write_bytes(tiny_model_file.read_bytes())
    monkeypatch.setenv("EMBER_MODELS", str(models))
    out = tmp_path / "a.png"
    assert gen(model, out) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--provenance"]) == 0
    assert "carries no licence record" in capsys.readouterr().out
    (models / "model_card.json").write_text(json.dumps({
        "licenses": ["Apache-2.0"], "attributions": ["Noto Emoji by Google, Apache-2.0"]
    }))  # fmt: skip
    assert main(["info", str(out), "--provenance"]) == 0
    shown = capsys.readouterr().out
    assert f"model file: {model}" in shown and "licences: Apache-2.0" in shown
    assert "attribution: Noto Emoji by Google, Apache-2.0" in shown


def test_user_certificate_needs_its_key(tmp_path, tiny_model_file, capsys):
    assert gen(tiny_model_file, tmp_path / "a.png", "--c2pa-cert", "x.pem") == 2
    assert "--c2pa-key" in capsys.readouterr().err


def test_previews_carry_nothing():
    png = png_bytes(np.zeros((8, 8, 3), np.uint8))
    assert P.read_credentials(png).state == "absent"


@pytest.mark.parametrize("on", [True, False])
def test_server_images_carry_credentials(tmp_path, on):
    settings = make_settings(tmp_path)
    if not on:
        settings.provenance = P.OFF
    with TestClient(create_app(settings, FakeEngine())) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2,
                                                   "width": 64, "height": 64})  # fmt: skip
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["images"][0])
        assert P.read_credentials(png).state == ("valid" if on else "absent")
        assert detect_watermark(np.asarray(Image.open(io.BytesIO(png)))).state == (
            "present" if on else "absent"
        )
        r = client.post("/v1/jobs", json={"prompt": "a blue square", "steps": 2})
        assert r.status_code in (200, 201, 202), r.text
        job = r.json()["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "done")
        (image,) = client.get(f"/v1/jobs/{job}").json()["images"]
        png = client.get(f"/v1/images/{image}").content
        assert P.read_credentials(png).state == ("valid" if on else "absent")
        record = json.loads(Image.open(io.BytesIO(png)).text["ember"])
        assert record["credentials"] is on and record["watermark"] is on
        assert detect_watermark(np.asarray(Image.open(io.BytesIO(png)))).state == (
            "present" if on else "absent"
        )


# ---------------------------------------------------------------------------------------------
# the watermark


@pytest.mark.parametrize("side", [512, 64])
def test_watermark_outlives_jpeg_and_a_half_size_copy(side):
    picture = dead_leaves(side)
    marked = add_watermark(picture)
    assert psnr(picture, marked) > 40  # invisible: measured 42-49 dB
    for edit in ({}, {"fmt": "JPEG"}, {"scale": 0.5}):
        assert detect_watermark(reencode(marked, **edit)).state == "present", edit
        assert detect_watermark(reencode(picture, **edit)).state == "absent", edit
    assert np.array_equal(add_watermark(picture), marked)  # deterministic: --from holds


def test_watermark_too_small():
    small = dead_leaves(48)  # under 64 pixels a side: left unmarked
    assert np.array_equal(add_watermark(small), small)
    assert detect_watermark(small).state == "absent"
    assert detect_watermark(dead_leaves(24)).state == "too small"


def test_watermark_reads_any_size_and_shape():
    for h, w in ((600, 532), (32, 700), (1100, 96)):
        assert detect_watermark(np.full((h, w, 3), 128, np.uint8)).state == "absent"


def test_generated_images_carry_the_watermark_unless_turned_off(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "a.png"
    assert gen(tiny_model_file, out) == 0
    assert json.loads(Image.open(out).text["ember"])["watermark"] is True
    jpeg = tmp_path / "a.jpg"
    Image.open(out).convert("RGB").save(jpeg, quality=90)
    capsys.readouterr()
    for path in (out, jpeg):
        assert main(["info", str(path)]) == 0
        assert "watermark: present (made by ember" in capsys.readouterr().out
    half = tmp_path / "half.png"
    Image.fromarray(reencode(np.asarray(Image.open(out)), scale=0.5)).save(half)
    assert main(["info", str(half)]) == 0
    assert "watermark: present (made by ember" in capsys.readouterr().out
    plain = tmp_path / "plain.png"
    assert gen(tiny_model_file, plain, "--no-watermark") == 0
    assert json.loads(Image.open(plain).text["ember"])["watermark"] is False
    assert main(["info", str(plain)]) == 0
    assert "watermark: absent (the record says it was turned off)" in capsys.readouterr().out
    # the watermark is the model's pixels plus the mark: nothing else changes
    assert np.array_equal(add_watermark(np.asarray(Image.open(plain))), np.asarray(Image.open(out)))
    # --from an unmarked image remakes it unmarked: the same pixels
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(plain), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(plain)))
