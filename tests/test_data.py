"""Datasets: shapes-world ground truth, the common folder format, licences, emoji."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.data import shapes
from ember.data.folder import DatasetError, ImageCaptionDataset, load_dataset

# ----------------------------------------------------------------------------- shapes world


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return shapes.generate_shapes(tmp_path_factory.mktemp("shapes") / "train", 300, seed=7)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_shapes_files_and_array_agree(shapes_dir):
    rows = _rows(shapes_dir)
    array = np.load(shapes_dir / "images.npy", mmap_mode="r")
    assert array.shape == (300, 64, 64, 3) and array.dtype == np.uint8
    for i in (0, 123, 299):
        png = np.asarray(Image.open(shapes_dir / rows[i]["file"]).convert("RGB"))
        np.testing.assert_array_equal(png, array[i])
    lic = json.loads((shapes_dir / "LICENSE.json").read_text())
    assert lic["spdx"] == "CC0-1.0" and "seed 7" in lic["source"]
    assert all(r["license"] == "CC0-1.0" for r in rows)


def test_shapes_ground_truth_is_consistent(shapes_dir):
    rows = _rows(shapes_dir)
    array = np.load(shapes_dir / "images.npy")
    seen_categories = set()
    for row, image in zip(rows, array, strict=True):
        truth = row["truth"]
        seen_categories.add(truth["category"])
        bg = np.array(shapes.BACKGROUNDS[truth["background"]])
        assert 1 <= len(truth["objects"]) <= 4
        for obj in truth["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            rgb = np.array(shapes.COLOURS[obj["colour"]])
            assert np.linalg.norm(rgb - bg) >= shapes.MIN_CONTRAST
            # The object's colour is really painted at its centre.
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert np.abs(image[cy, cx].astype(int) - rgb).max() <= 2
        # Border pixels are pure background.
        assert np.abs(image[0].astype(int) - bg).max() <= 1
        spec = shapes.scene_spec_from_dict(truth["spec"])
        assert row["caption"][0] == shapes.describe(spec)
        if spec.relation:
            a, b = truth["objects"][0]["bbox"], truth["objects"][1]["bbox"]
            assert shapes.relation_between(a, b) == {spec.relation}
    assert seen_categories == set(shapes.CATEGORIES)


def test_held_out_compositions_never_in_training(shapes_dir):
    for row in _rows(shapes_dir):
        truth = row["truth"]
        for obj in truth["objects"]:
            assert (obj["colour"], obj["shape"]) not in shapes.HELD_OUT_PAIRS
        spec = shapes.scene_spec_from_dict(truth["spec"])
        assert not shapes.is_held_out(spec)
    # The held-out split is made only of held-out compositions.
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert shapes.is_held_out(shapes.sample_split_spec(rng, "held-out"))


def test_shapes_deterministic_by_seed(tmp_path):
    a = shapes.generate_shapes(tmp_path / "a", 20, seed=3, write_png=False)
    b = shapes.generate_shapes(tmp_path / "b", 20, seed=3, write_png=False)
    c = shapes.generate_shapes(tmp_path / "c", 20, seed=4, write_png=False)
    np.testing.assert_array_equal(np.load(a / "images.npy"), np.load(b / "images.npy"))
    assert (a / "manifest.jsonl").read_text() == (b / "manifest.jsonl").read_text()
    assert not np.array_equal(np.load(a / "images.npy"), np.load(c / "images.npy"))


def test_two_object_captions_include_the_mirrored_statement(shapes_dir):
    mirrored = 0
    for row in _rows(shapes_dir):
        truth = row["truth"]
        spec = shapes.scene_spec_from_dict(truth["spec"])
        if len(spec.objects) != 2:
            assert len(row["caption"]) <= 2
            continue
        mirror = shapes.describe(shapes.mirrored(spec))
        assert row["caption"][-1] == mirror != row["caption"][0]
        if spec.relation:
            # "A left of B" -> "B right of A", and the image really shows the converse relation.
            b, a = truth["objects"][1]["bbox"], truth["objects"][0]["bbox"]
            first, rest = row["caption"][0].split(f" {spec.relation} ")
            second, background = rest.split(" on a ")
            converse = shapes.CONVERSE[spec.relation]
            assert mirror == f"{second} {converse} {first} on a {background}"
            assert shapes.relation_between(b, a) == {converse}
            mirrored += 1
    assert mirrored > 0


def test_mirrored_captions_can_be_left_out(tmp_path, shapes_dir):
    """Version 1's captions (the shipped default model's data) stay reproducible."""
    plain = shapes.generate_shapes(tmp_path / "v1", 300, seed=7, write_png=False, mirror=False)
    np.testing.assert_array_equal(np.load(plain / "images.npy"), np.load(shapes_dir / "images.npy"))
    for a, b in zip(_rows(plain), _rows(shapes_dir), strict=True):
        two = len(a["truth"]["spec"]["objects"]) == 2
        assert a["caption"] == (b["caption"][:-1] if two else b["caption"])


def test_relation_twins_are_minimal_pairs(tmp_path, shapes_dir):
    """--relation-twins: each position scene is followed by the same objects in the converse
    relation; everything else in the scene is kept, and the category mix is unchanged."""
    out = shapes.generate_shapes(tmp_path / "t", 120, seed=7, write_png=False, twins=True)
    rows, images = _rows(out), np.load(out / "images.npy")
    assert len(rows) == 120 and json.loads((out / "dataset.json").read_text())["relation_twins"]
    # Rows that are not twins are exactly the plain generator's samples, in order.
    plain = [r for r in rows if "twin_of" not in r["truth"]]
    for k, row in enumerate(plain):
        sample = shapes.generate_sample(7, "train", k)[1]
        assert row["truth"] == json.loads(json.dumps(sample["truth"]))
    pairs = 0
    for k, row in enumerate(rows):
        truth = row["truth"]
        if "twin_of" not in truth:
            continue
        assert truth["twin_of"] == k - 1
        first = rows[k - 1]["truth"]
        relation, twin_relation = first["spec"]["relation"], truth["spec"]["relation"]
        assert twin_relation == shapes.CONVERSE[relation]
        assert first["spec"]["objects"] == truth["spec"]["objects"]
        assert first["background"] == truth["background"]
        a, b = truth["objects"]
        assert shapes.relation_between(a["bbox"], b["bbox"]) == {twin_relation}
        keep = ("shape", "colour", "size")
        assert [[o[f] for f in keep] for o in first["objects"]] == [
            [o[f] for f in keep] for o in truth["objects"]
        ]
        assert f" {twin_relation} " in row["caption"][0]
        if relation in ("left of", "right of"):  # every shape is mirror-symmetric left to right
            diff = np.abs(images[k].astype(int) - images[k - 1][:, ::-1].astype(int))
            assert diff.mean() < 1.0
        assert not np.array_equal(images[k], images[k - 1])
        pairs += 1
    assert pairs >= 5
    twinned = [rows[r["truth"]["twin_of"]]["truth"] for r in rows if "twin_of" in r["truth"]]
    assert all(t["category"] == "position" for t in twinned)


def test_relation_captions_state_where_two_objects_stand(tmp_path, shapes_dir):
    """--relation-captions: two-object and colour-attribution scenes also say where their objects
    stand, true of the drawn boxes both ways round; images and other captions are unchanged, and
    the train split still never names a held-out relation triple."""
    out = shapes.generate_shapes(tmp_path / "r", 300, seed=7, write_png=False, relations=True)
    assert json.loads((out / "dataset.json").read_text())["relation_captions"]
    np.testing.assert_array_equal(np.load(out / "images.npy"), np.load(shapes_dir / "images.npy"))
    stated = 0
    for row, plain in zip(_rows(out), _rows(shapes_dir), strict=True):
        truth, n = row["truth"], len(plain["caption"])
        assert row["caption"][:n] == plain["caption"] and row["truth"] == plain["truth"]
        extra = row["caption"][n:]
        if truth["category"] not in ("two_object", "color_attr"):
            assert extra == []
            continue
        a, b = truth["objects"]
        found = shapes.relation_between(a["bbox"], b["bbox"])
        objs = shapes.scene_spec_from_dict(truth["spec"]).objects
        specs = {
            r: shapes.SceneSpec(truth["category"], objs, truth["background"], r) for r in found
        }
        if not extra:  # level objects, or the drawn relation is a held-out triple
            assert not found or any(shapes.is_held_out(s) for s in specs.values())
            continue
        assert len(extra) == 2
        relation = next(r for r in shapes.RELATIONS if f" {r} " in extra[0])
        assert relation in found and not shapes.is_held_out(specs[relation])
        spec = specs[relation]
        assert extra == [shapes.describe(spec), shapes.describe(shapes.mirrored(spec))]
        stated += 1
    assert stated >= 50
    # Without mirrored captions (version 1) a scene gains the one statement, not its mirror.
    v1 = shapes.generate_shapes(
        tmp_path / "v1", 40, seed=7, write_png=False, mirror=False, relations=True
    )
    for row, full in zip(_rows(v1), _rows(out)[:40], strict=True):
        two = full["truth"]["category"] in ("two_object", "color_attr")
        if two and len(full["caption"]) > 3:  # [canonical, (alt), mirror, relation, its mirror]
            assert row["caption"][-1] == full["caption"][-2]
            assert len(row["caption"]) == len(full["caption"]) - 2


def test_category_weights(tmp_path):
    out = shapes.generate_shapes(
        tmp_path / "w", 200, seed=1, write_png=False, weights={"position": 5.0, "colors": 0}
    )
    cats = [r["truth"]["category"] for r in _rows(out)]
    assert "colors" not in cats
    assert 0.4 < cats.count("position") / len(cats) < 0.7  # expected 5/9
    info = json.loads((out / "dataset.json").read_text())
    assert info["category_probabilities"]["position"] == round(5 / 9, 4)
    with pytest.raises(ValueError, match="unknown categories"):
        shapes.category_probabilities({"postion": 2.0})
    with pytest.raises(ValueError, match=">= 0"):
        shapes.category_probabilities({"position": -1.0})


def test_position_relation_rule():
    left, right = (0, 20, 10, 30), (40, 20, 50, 30)
    assert shapes.relation_between(left, right) == {"left of"}
    assert shapes.relation_between(right, left) == {"right of"}
    assert shapes.relation_between((20, 0, 30, 10), (20, 40, 30, 50)) == {"above"}
    assert shapes.relation_between((0, 0, 10, 10), (1, 1, 11, 11)) == set()


# ----------------------------------------------------------------------------- folder format


def _write_folder(root: Path, n: int, licensed: bool = True, folder_licence: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (32, 24), (i * 20, 100, 50)).save(root / f"{i}.png")
        row = {"file": f"{i}.png", "caption": [f"caption {i}", f"other {i}"]}
        if licensed:
            row |= {"license": "CC-BY-4.0", "source": "mine", "attribution": "Me"}
        rows.append(row)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if folder_licence:
        lic = {"spdx": "CC0-1.0", "source": "folder", "attribution": ""}
        (root / "LICENSE.json").write_text(json.dumps(lic))
    return root


def test_folder_refuses_unlicensed(tmp_path):
    root = _write_folder(tmp_path / "d", 5, licensed=False)
    with pytest.raises(DatasetError, match=r"5 of 5 items have no licence.*0\.png"):
        load_dataset(root)
    ds = load_dataset(root, allow_unlicensed=True)
    assert len(ds) == 5 and ds.unlicensed_count == 5
    assert ds.licence_summary() == [
        {"spdx": "unlicensed", "attribution": "", "count": 5, "sources": 1, "example_sources": [""]}
    ]


def test_folder_licence_default_and_summary(tmp_path):
    root = _write_folder(tmp_path / "d", 4, licensed=False, folder_licence=True)
    rows = _rows(root)
    rows[0] |= {"license": "CC-BY-4.0", "source": "mine", "attribution": "Me"}
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(root)
    assert ds.unlicensed_count == 0
    summary = {s["spdx"]: s for s in ds.licence_summary()}
    assert summary["CC0-1.0"]["count"] == 3 and summary["CC-BY-4.0"]["count"] == 1
    assert summary["CC-BY-4.0"]["attribution"] == "Me"


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    root = _write_folder(tmp_path / "d", 4)
    (root / "2.png").write_bytes(b"\x89PNG not really")
    os.remove(root / "3.png")
    ds = load_dataset(root)
    assert len(ds) == 2
    assert sorted(Path(s["file"]).name for s in ds.skipped) == ["2.png", "3.png"]
    assert "skipped 2" in caplog.text


def test_image_caption_dataset(tmp_path, shapes_dir):
    ds = ImageCaptionDataset(load_dataset(_write_folder(tmp_path / "d", 3)), size=16)
    x, caption = ds[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    assert caption in ("caption 1", "other 1")
    assert ds[1][1] == caption  # deterministic per index
    captions = {ImageCaptionDataset(ds.dataset, size=16, seed=s)[1][1] for s in range(20)}
    assert captions == {"caption 1", "other 1"}
    # The shapes folder loads through its array, same pixels as the PNG.
    shapes_ds = ImageCaptionDataset(load_dataset(shapes_dir))
    x, _ = shapes_ds[5]
    png = np.asarray(Image.open(shapes_dir / "images/000005.png").convert("RGB"))
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), png / 127.5 - 1, atol=1e-6)


# ----------------------------------------------------------------------------- emoji

EMOJI_CACHE = Path(os.environ.get("EMBER_EMOJI_CACHE", Path.home() / ".cache/ember/emoji"))


@pytest.mark.skipif(not EMOJI_CACHE.exists(), reason="npm emoji cache absent")
def test_emoji_dataset_from_cache(tmp_path):
    from ember.data.emoji import build_emoji_dataset

    out = build_emoji_dataset(
        tmp_path / "emoji", cache_dir=EMOJI_CACHE, limit=8, backgrounds=("white", "blue")
    )
    rows = _rows(out)
    assert rows and all(r["license"] in ("Apache-2.0", "CC-BY-4.0") for r in rows)
    twemoji = [r for r in rows if r["license"] == "CC-BY-4.0"]
    assert twemoji and all("Twemoji" in r["attribution"] for r in twemoji)
    assert any("twemoji style" in c for r in rows for c in r["caption"])
    assert any("on a blue background" in c for r in rows for c in r["caption"])
    ds = load_dataset(out)
    assert ds.unlicensed_count == 0 and len(ds) == len(rows)
