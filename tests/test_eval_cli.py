"""`ember eval` end to end on a tiny model: a report with every category, and a contact sheet."""

import json

import pytest

from ember.cli import main
from ember.eval.geneval import CATEGORIES, PROMPT_SETS


def test_geneval_command_writes_report_and_sheet(tmp_path, tiny_model_file):
    out = tmp_path / "ev"
    code = main(["eval", "geneval", "--model", str(tiny_model_file), "--split", "held-out",
                 "--images-per-prompt", "1", "--steps", "1", "--batch", "24", "-o", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["per_category"]) == set(CATEGORIES)
    assert report["n_images"] == len(PROMPT_SETS["held-out"])
    assert 0.0 <= report["overall"] <= 1.0
    assert report["model_sha256"] and report["split"] == "held-out"
    assert (out / "sheet.png").stat().st_size > 0


def test_eval_emoji_needs_a_dataset(tmp_path, tiny_model_file, capsys):
    code = main(["eval", "emoji", "--model", str(tiny_model_file), "--data", str(tmp_path)])
    assert code == 2
    assert "emoji dataset" in capsys.readouterr().err


def _fake_emoji(root, n: int = 12):
    """`ember data emoji`'s layout: n emoji x 2 styles on white, distinct coarse colour layouts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images/noto").mkdir(parents=True)
    (root / "images/twemoji").mkdir(parents=True)
    rows = []
    for i in range(n):
        for style in ("noto", "twemoji"):
            cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = np.kron(cells, np.ones((8, 8, 1), dtype=np.uint8))
            Image.fromarray(img).save(root / f"images/{style}/{i:x}_white.png")
            rows.append({"file": f"images/{style}/{i:x}_white.png",
                         "caption": [f"emoji {i}, {style} style"], "license": "CC0-1.0",
                         "source": "test", "attribution": "",
                         "emoji": {"unified": f"{i:X}", "background": "white", "tone": None}})  # fmt: skip
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_emoji_score_is_valid_on_references_noise_and_mismatches(tmp_path):
    import numpy as np

    from ember.eval.commands import EmojiSample

    sample = EmojiSample(_fake_emoji(tmp_path / "emoji"))
    assert len(sample.prompts) == 24 and sample.prompts[0].endswith("style")
    refs = sample.ref_images[sample.chosen]
    assert sample.score(refs)["top1"] == 1.0 and sample.score(refs)["median_rank"] == 0
    noisy = np.random.default_rng(1).normal(0, 12, refs.shape) + refs
    assert sample.score(noisy.clip(0, 255).astype(np.uint8))["top1"] == 1.0
    # each image shows another emoji: never counted as the prompted one
    report = sample.score(np.roll(refs, 1, axis=0))
    assert report["top1"] == 0.0 and report["candidates"] == 24


def test_emoji_validation_split_is_disjoint_from_the_test_and_leaves_it_unchanged(tmp_path):
    from ember.errors import EmberError
    from ember.eval.commands import EmojiSample

    data = _fake_emoji(tmp_path / "emoji", n=60)  # 120 plain emoji: 100 test, 20 left
    test = EmojiSample(data)
    again = EmojiSample(data, "test")
    valid = EmojiSample(data, "validation")
    assert test.chosen == again.chosen and len(test.chosen) == 100
    assert len(valid.chosen) == 20 and not set(valid.chosen) & set(test.chosen)
    assert set(valid.prompts).isdisjoint(test.prompts)
    report = valid.score(valid.ref_images[valid.chosen])
    assert report["top1"] == 1.0 and report["split"] == "validation"
    # a dataset the test sample uses up has nothing to validate on: a clear error
    with pytest.raises(EmberError, match="outside the test sample"):
        EmojiSample(_fake_emoji(tmp_path / "small"), "validation")
