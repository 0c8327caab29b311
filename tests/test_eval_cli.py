"""`ember eval` end to end on a tiny model: a report with every category, and a contact sheet."""

import json

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
