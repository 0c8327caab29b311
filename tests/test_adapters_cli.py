"""LoRAs and textual-inversion embeddings end to end (issue 35): `ember generate` and `ember serve`.

The merging maths is checked against diffusers in tests/test_lora.py and tests/test_embeddings.py;
here the same random add-ons go through the front-ends a user runs, on the tiny random SD 1.x
model built by diffusers (`sd1_folder`; ember's own random model is no use here: ldm zero-initialises
the U-Net's output layer, so its images ignore the prompt and any LoRA). Checked: the CLI flags and
prompt tags, the PNG's infotext and record, `--from`, the one-line errors, and the server's job and
A1111 APIs with the real `ModelEngine`, whose images must equal the CLI's at the same settings.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from ember.cli import main
from ember.files import safetensors_data_sha256
from ember.images import INFOTEXT_KEY, read_png_text, read_record
from ember.provenance import Provenance
from ember.server.app import create_app
from ember.server.engine import ModelEngine
from pngcheck import same_image
from server_support import make_settings, wait_for

PROMPT = "a red circle"
SEED, STEPS, CFG, SIZE = 5, 3, 5.0, 64
# Settings both front-ends are given explicitly, so a default that differs cannot hide.
# The model's own pixels on both sides (CLI and server): a batched image may differ from its solo
# run by a rounding step, which the watermark's lattice can turn into a few levels.
FLAGS = ["--steps", str(STEPS), "--seed", str(SEED), "--cfg", str(CFG), "--sampler", "euler",
         "--dtype", "fp32", "--no-watermark", "-q"]  # fmt: skip
RANK, WIDTH = 4, 32  # LoRA rank; the tiny preset's text width
# kohya names (diffusers layout) of tiny-preset modules: (name, out, in, conv kernel)
UNET_MODULES = [
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 64, 32, None),
    ("mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0", 64, 64, None),
    ("down_blocks_0_resnets_0_conv1", 32, 32, (3, 3)),
]
TEXT_MODULES = [
    ("text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
    ("text_model_encoder_layers_1_mlp_fc1", 37, 32),
]


def random_lora(seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A kohya LoRA over a few U-Net and text-encoder modules, alpha = rank."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    modules = [("lora_unet_" + n, o, i, k) for n, o, i, k in UNET_MODULES]
    modules += [("lora_te_" + n, o, i, None) for n, o, i in TEXT_MODULES]
    for name, out, inp, kernel in modules:
        sd[f"{name}.lora_down.weight"] = torch.randn(RANK, inp, *(kernel or ()), generator=gen)
        up = (out, RANK, 1, 1) if kernel else (out, RANK)
        sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=gen) * scale
        sd[f"{name}.alpha"] = torch.tensor(float(RANK))
    return sd


@pytest.fixture(scope="module", autouse=True)
def empty_models_dir(tmp_path_factory):
    """No LoRA or embedding of the user's models folder may reach these tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBER_MODELS", str(tmp_path_factory.mktemp("models")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Lora")
    save_file(random_lora(1), folder / "style.safetensors", metadata={"ss_note": "x"})
    (folder / "sub").mkdir()
    save_file(random_lora(2), folder / "sub" / "other.safetensors")
    return folder


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    gen = torch.Generator().manual_seed(3)
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(3, WIDTH,
             generator=gen)}, "name": "zqemb", "step": 10}  # fmt: skip
    torch.save(a1111, folder / "zqemb.pt")
    save_file({"emb_params": torch.randn(2, WIDTH, generator=gen)}, folder / "xvemb.safetensors")
    return folder


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("out")


class Cli:
    """`ember generate` on the tiny model; each distinct command runs once per module."""

    def __init__(self, model, folder) -> None:
        self.model, self.folder, self.done = model, folder, {}

    def __call__(self, *extra: str, prompt: str = PROMPT):
        key = (prompt, *extra)
        if key not in self.done:
            out = self.folder / f"img{len(self.done)}.png"
            args = ["generate", prompt, "--model", str(self.model), *FLAGS, "-o", str(out)]
            assert main([*args, *extra]) == 0, key
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def cli(sd1_folder, outdir):
    return Cli(sd1_folder, outdir)


def pixels(source) -> np.ndarray:
    data = source if isinstance(source, bytes) else source.read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def infotext_pairs(source) -> str:
    """The last line of the infotext: the `Key: value` pairs."""
    return read_png_text(source)[INFOTEXT_KEY].splitlines()[-1]


def assert_changed(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a.astype(int) - b.astype(int)).max()
    assert diff > 10, f"{what} changed the image by at most {diff}/255: the test proves nothing"


# ---------------------------------------------------------------------------------------------
# 1. LoRAs through `ember generate`


def test_lora_by_path_name_and_prompt_tag_give_the_same_image(cli, lora_dir, outdir):
    path = lora_dir / "style.safetensors"
    base = pixels(cli())
    by_path = cli("--lora", f"{path}:0.8")
    by_name = cli("--lora", "style:0.8", "--lora-dir", str(lora_dir))
    by_tag = cli("--lora-dir", str(lora_dir), prompt=f"{PROMPT} <lora:style:0.8>")
    assert_changed(pixels(by_path), base, "--lora style:0.8")
    assert (pixels(by_name) == pixels(by_path)).all()
    # the tag is taken out of the prompt before the text encoder sees it
    assert (pixels(by_tag) == pixels(by_path)).all()
    assert read_record(by_tag).params.prompt == f"{PROMPT} <lora:style:0.8>"

    # U-Net only and text encoder only are different images, and different from both at 1
    unet_only = pixels(cli("--lora-dir", str(lora_dir), prompt=f"{PROMPT} <lora:style:0:1>"))
    te_only = pixels(cli("--lora-dir", str(lora_dir), prompt=f"{PROMPT} <lora:style:1:0>"))
    both = pixels(cli("--lora", f"{path}:1"))
    assert_changed(unet_only, te_only, "U-Net-only against TE-only")
    assert_changed(unet_only, base, "the LoRA's U-Net part")
    assert_changed(te_only, base, "the LoRA's text-encoder part")
    assert_changed(both, unet_only, "adding the text-encoder part")
    # `PATH:TE:UNET` on the command line is the tag's `<lora:NAME:TE:UNET>`
    assert (pixels(cli("--lora", f"{path}:0:1")) == unet_only).all()


def test_lora_hashes_in_infotext_and_record(cli, lora_dir):
    path = lora_dir / "style.safetensors"
    out = cli("--lora", "style:0.8", "--lora-dir", str(lora_dir))
    a1111 = safetensors_data_sha256(path)[:12]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert a1111 != sha[:12]  # the file has metadata: the A1111 hash skips the header
    assert f'Lora hashes: "style: {a1111}"' in infotext_pairs(out)
    (lora,) = read_record(out).loras
    assert lora == {"name": "style", "path": str(path), "sha256": sha, "a1111_hash": a1111,
                    "te_weight": 0.8, "unet_weight": 0.8}  # fmt: skip
    # two LoRAs, one from a subfolder, one by tag: both listed in order
    out = cli(
        "--lora", "style:0.8", "--lora-dir", str(lora_dir), prompt=f"{PROMPT} <lora:other:0.5>"
    )
    other = safetensors_data_sha256(lora_dir / "sub" / "other.safetensors")[:12]
    assert f'Lora hashes: "style: {a1111}, other: {other}"' in infotext_pairs(out)
    assert [x["name"] for x in read_record(out).loras] == ["style", "other"]
    assert "Lora hashes" not in infotext_pairs(cli())


@pytest.mark.parametrize("how", ["path", "name", "tag"])
def test_from_regenerates_a_lora_image_byte_for_byte(cli, lora_dir, outdir, how):
    path = lora_dir / "style.safetensors"
    first = {
        "path": lambda: cli("--lora", f"{path}:0.8"),
        "name": lambda: cli("--lora", "style:0.8", "--lora-dir", str(lora_dir)),
        "tag": lambda: cli("--lora-dir", str(lora_dir), prompt=f"{PROMPT} <lora:style:0:1>"),
    }[how]()
    again = outdir / f"again-{how}.png"
    assert main(["generate", "--from", str(first), "--lora-dir", str(lora_dir), "-q",
                 "-o", str(again)]) == 0  # fmt: skip
    assert same_image(again, first)


# ---------------------------------------------------------------------------------------------
# 2. embeddings through `ember generate`


def test_embeddings_in_prompt_and_negative(cli, emb_dir, outdir, capsys):
    prompt, negative = "a photo of zqemb", "blurry, xvemb"
    plain = pixels(cli("--negative", negative, prompt=prompt))  # an empty folder: plain words
    out = cli("--negative", negative, "--embeddings-dir", str(emb_dir), prompt=prompt)
    assert_changed(pixels(out), plain, "the embeddings")
    # each alone changes it too: the prompt's and the negative prompt's
    only_neg = pixels(cli("--negative", negative, "--embeddings-dir", str(emb_dir),
                          prompt="a photo of zq"))  # fmt: skip
    assert_changed(only_neg, pixels(cli("--negative", negative, prompt="a photo of zq")),
                   "the negative prompt's embedding")  # fmt: skip

    hashes = {n: hashlib.sha256((emb_dir / f).read_bytes()).hexdigest()
              for n, f in (("zqemb", "zqemb.pt"), ("xvemb", "xvemb.safetensors"))}  # fmt: skip
    assert (
        f'TI hashes: "zqemb: {hashes["zqemb"][:12]}, xvemb: {hashes["xvemb"][:12]}"'
        in infotext_pairs(out)
    )
    record = read_record(out)
    assert [(e["name"], e["sha256"]) for e in record.embeddings] == list(hashes.items())
    assert "TI hashes" not in infotext_pairs(cli("--embeddings-dir", str(emb_dir)))  # unused

    again = outdir / "again-emb.png"
    capsys.readouterr()
    assert main(["generate", "--from", str(out), "--embeddings-dir", str(emb_dir), "-q",
                 "-o", str(again)]) == 0  # fmt: skip
    assert same_image(again, out)
    assert capsys.readouterr().err == ""


def test_unreadable_embedding_not_named_is_ignored(cli, emb_dir, tmp_path):
    """A folder of downloads may hold a broken file beside good ones (A1111 goes on)."""
    folder = tmp_path / "emb"
    folder.mkdir()
    for f in emb_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    want = cli("--embeddings-dir", str(emb_dir), prompt="a photo of zqemb")
    got = tmp_path / "got.png"
    assert main(["generate", "a photo of zqemb", "--model", str(cli.model), *FLAGS,
                 "--embeddings-dir", str(folder), "-o", str(got)]) == 0  # fmt: skip
    assert (pixels(got) == pixels(want)).all()


# ---------------------------------------------------------------------------------------------
# 3. bad input: exit 2, one stderr line, no traceback, no file


def one_line_error(capsys, tmp_path, cli, *extra, prompt=PROMPT) -> str:
    out = tmp_path / "bad.png"
    capsys.readouterr()
    code = main(["generate", prompt, "--model", str(cli.model), *FLAGS, "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("ember: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.png")), "a failed run wrote an image"
    return err


def test_corrupt_lora_file(capsys, tmp_path, cli, lora_dir):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((lora_dir / "style.safetensors").read_bytes()[:-100])
    err = one_line_error(capsys, tmp_path, cli, "--lora", str(bad))
    assert "truncated" in err and "cut.safetensors" in err


def test_sdxl_lora_on_an_sd1_model(capsys, tmp_path, cli):
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for te, width in (("te1", 768), ("te2", 1280)):
        name = f"lora_{te}_text_model_encoder_layers_0_self_attn_q_proj"
        sd[f"{name}.lora_down.weight"] = torch.randn(RANK, width, generator=gen)
        sd[f"{name}.lora_up.weight"] = torch.randn(width, RANK, generator=gen)
    save_file(sd, tmp_path / "xl.safetensors")
    err = one_line_error(capsys, tmp_path, cli, "--lora", str(tmp_path / "xl.safetensors"))
    assert "SDXL" in err


def test_unknown_lora_name_lists_the_folder(capsys, tmp_path, cli, lora_dir):
    err = one_line_error(capsys, tmp_path, cli, "--lora-dir", str(lora_dir),
                         prompt=f"{PROMPT} <lora:nope:1>")  # fmt: skip
    assert "LoRA not found: nope" in err and "style" in err and "other" in err
    err = one_line_error(capsys, tmp_path, cli, "--lora-dir", str(lora_dir), "--lora", "nope:0.5")
    assert "LoRA not found: nope" in err


def test_lora_matching_no_module(capsys, tmp_path, cli):
    name = "lora_unet_down_blocks_7_attentions_0_proj_in"
    stray = {f"{name}.lora_down.weight": torch.zeros(RANK, 64),
             f"{name}.lora_up.weight": torch.zeros(64, RANK)}  # fmt: skip
    save_file(stray, tmp_path / "stray.safetensors")
    err = one_line_error(capsys, tmp_path, cli, "--lora", str(tmp_path / "stray.safetensors"))
    assert "match no module" in err and "down_blocks_7" in err


def test_embedding_of_another_width_named_in_the_prompt(capsys, tmp_path, cli):
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"emb_params": torch.ones(2, 768)}, folder / "wideemb.safetensors")
    err = one_line_error(capsys, tmp_path, cli, "--embeddings-dir", str(folder),
                         prompt="a photo of wideemb")  # fmt: skip
    assert "wideemb" in err and "768" in err


def test_unreadable_embedding_named_in_the_prompt(capsys, tmp_path, cli):
    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "brokenemb.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    err = one_line_error(capsys, tmp_path, cli, "--embeddings-dir", str(folder),
                         prompt="a photo of brokenemb")  # fmt: skip
    assert "brokenemb" in err


# ---------------------------------------------------------------------------------------------
# 4. the server with the real engine


class GatedEngine(ModelEngine):
    """The real engine; batches wait for `gate` and are recorded as lists of LoRA sets."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate, self.batches = threading.Event(), []
        self.gate.set()

    def run(self, items, on_step):
        self.gate.wait(timeout=60)
        self.batches.append([i.params.loras for i in items])
        return super().run(items, on_step)


@pytest.fixture(scope="module")
def server(sd1_folder, lora_dir, emb_dir, tmp_path_factory):
    engine = GatedEngine([], sd1_folder, lora_dir=lora_dir, embeddings_dir=emb_dir)
    settings = make_settings(tmp_path_factory.mktemp("server"), max_batch_images=8,
                             provenance=Provenance(watermark=False))  # fmt: skip
    with TestClient(create_app(settings, engine)) as client:
        client.engine = engine
        yield client


JOB = {"prompt": PROMPT, "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler": "euler",
       "width": SIZE, "height": SIZE}  # fmt: skip


def final(client, job_id):
    view = client.get(f"/v1/jobs/{job_id}").json()
    return view if view["status"] in ("done", "failed", "interrupted", "cancelled") else None


def job_png(client, body) -> tuple[dict, bytes | None]:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    view = wait_for(lambda: final(client, r.json()["id"]), timeout=120)
    if view["status"] != "done":
        return view, None
    return view, client.get(f"/v1/images/{view['images'][0]}").content


def test_server_lists_loras_and_refreshes(server, lora_dir):
    listed = {x["name"]: x["path"] for x in server.get("/sdapi/v1/loras").json()}
    assert listed == {"style": str(lora_dir / "style.safetensors"),
                      "other": str(lora_dir / "sub" / "other.safetensors")}  # fmt: skip
    extra = lora_dir / "late.safetensors"
    save_file(random_lora(9), extra)
    try:
        assert "late" not in {x["name"] for x in server.get("/sdapi/v1/loras").json()}
        assert server.post("/sdapi/v1/refresh-loras").status_code == 200
        assert "late" in {x["name"] for x in server.get("/sdapi/v1/loras").json()}
    finally:
        extra.unlink()
        server.post("/sdapi/v1/refresh-loras")


def test_job_with_loras_equals_the_cli(server, cli, lora_dir):
    view, png = job_png(server, JOB | {"loras": [{"name": "style", "weight": 0.8}]})
    assert png is not None, view["error"]
    want = cli("--lora", "style:0.8", "--lora-dir", str(lora_dir))
    assert (pixels(png) == pixels(want)).all()
    assert_changed(pixels(png), pixels(cli()), "the job's LoRA")
    a1111 = safetensors_data_sha256(lora_dir / "style.safetensors")[:12]
    assert f'Lora hashes: "style: {a1111}"' in infotext_pairs(png)
    # per-model weights: te_weight / unet_weight
    view, png = job_png(server, JOB | {"loras": [{"name": "style", "te_weight": 0,
                                                  "unet_weight": 1}]})  # fmt: skip
    assert png is not None, view["error"]
    want = cli("--lora-dir", str(lora_dir), prompt=f"{PROMPT} <lora:style:0:1>")
    assert (pixels(png) == pixels(want)).all()


def test_a1111_prompt_tag_equals_the_cli(server, cli, lora_dir):
    body = {"prompt": f"{PROMPT} <lora:style:0.8>", "seed": SEED, "steps": STEPS,
            "cfg_scale": CFG, "sampler_name": "Euler", "width": SIZE, "height": SIZE}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["images"][0]))
    want = cli("--lora-dir", str(lora_dir), prompt=f"{PROMPT} <lora:style:0.8>")
    assert (got == pixels(want)).all()
    info = json.loads(r.json()["info"])
    assert "Lora hashes" in info["infotexts"][0]


def test_a1111_embedding_in_prompt_equals_the_cli(server, cli, emb_dir):
    body = {"prompt": "a photo of zqemb", "negative_prompt": "xvemb", "seed": SEED,
            "steps": STEPS, "cfg_scale": CFG, "sampler_name": "Euler", "width": SIZE,
            "height": SIZE}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["images"][0]))
    want = cli("--negative", "xvemb", "--embeddings-dir", str(emb_dir), prompt="a photo of zqemb")
    assert (got == pixels(want)).all()
    assert "TI hashes" in json.loads(r.json()["info"])["infotexts"][0]


def test_unknown_lora_is_422(server):
    r = server.post("/v1/jobs", json=JOB | {"loras": [{"name": "nope", "weight": 0.5}]})
    assert r.status_code == 422
    assert "LoRA not found: nope" in r.json()["detail"] and "style" in r.json()["detail"]
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:nope:1>", "steps": 1})
    assert r.status_code == 422 and "nope" in r.json()["detail"]


def test_corrupt_lora_is_one_message(server, lora_dir):
    bad = lora_dir / "cut.safetensors"
    bad.write_bytes((lora_dir / "style.safetensors").read_bytes()[:-100])
    try:
        body = {"prompt": f"{PROMPT} <lora:cut:1>", "seed": SEED, "steps": STEPS,
                "width": SIZE, "height": SIZE}  # fmt: skip
        r = server.post("/sdapi/v1/txt2img", json=body)
        assert 400 <= r.status_code < 500, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
        assert "truncated" in detail and "cut.safetensors" in detail
        view, png = job_png(server, JOB | {"loras": [{"name": "cut"}]})
        assert png is None and view["status"] == "failed"
        assert "truncated" in view["error"] and "\n" not in view["error"]
        # the engine is still good afterwards, and back to its base weights
        view, png = job_png(server, JOB)
        assert png is not None, view["error"]
    finally:
        bad.unlink()


def test_jobs_with_different_loras_queued_together(server, cli, lora_dir):
    """Jobs queued together batch only with jobs of the same LoRAs (the fifth shares the first's),
    and each image is the one the CLI makes alone."""
    engine = server.engine
    engine.gate.clear()
    engine.batches.clear()
    style, other = {"name": "style", "weight": 0.8}, {"name": "other", "weight": 1.0}
    jobs = [
        (JOB | {"loras": [style]}, ("--lora", "style:0.8")),
        (JOB | {"loras": [other]}, ("--lora", "other:1")),
        (JOB, ()),
        (JOB | {"loras": [style, other]}, ("--lora", "style:0.8", "--lora", "other:1")),
        (JOB | {"loras": [style], "seed": SEED + 1}, ("--lora", "style:0.8", "--seed", "6")),
    ]
    try:
        blocker = server.post("/v1/jobs", json=JOB | {"seed": 99, "steps": 1}).json()["id"]
        wait_for(lambda: server.get(f"/v1/jobs/{blocker}").json()["status"] == "running")
        ids = [server.post("/v1/jobs", json=body).json()["id"] for body, _ in jobs]
    finally:
        engine.gate.set()
    views = [wait_for(lambda j=j: final(server, j), timeout=120) for j in ids]
    assert [v["status"] for v in views] == ["done"] * 5, [v["error"] for v in views]
    batches = [[tuple(s) for s in b] for b in engine.batches[1:]]  # after the blocker's
    assert all(len(set(b)) == 1 for b in batches), batches  # one LoRA set per batch
    assert sorted(map(len, batches)) == [1, 1, 1, 2], batches  # and same sets still share
    got = [pixels(server.get(f"/v1/images/{v['images'][0]}").content) for v in views]
    for n, (image, (_, flags)) in enumerate(zip(got, jobs, strict=True)):
        want = pixels(cli(*flags, "--lora-dir", str(lora_dir)))
        # A batch of two sums in another order than a batch of one: a pixel may round the
        # other way (as in tests/test_server.py).
        diff = np.abs(image.astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).sum() <= 8, f"job {n} is not its solo CLI image"
    for n in range(4):
        for m in range(n):
            assert_changed(got[n], got[m], f"jobs {m} and {n}'s LoRA sets")
