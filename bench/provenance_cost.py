"""What provenance costs per image: encoding a PNG with nothing, with the watermark only
(`ember.watermark`), and with everything (watermark, signed Content Credentials and XMP:
`ember.provenance`), at 64x64 and 512x512, interleaved, medians; and reading the watermark back.

    .venv/bin/python bench/provenance_cost.py [--rounds 20] [--out FILE.md]

Compare with a whole 512x512 20-step image (`bench/fewstep.py`'s dpm20, about 30 s on a 2-core CPU):
the issue's budget is 5% of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import machine, write_report  # noqa: E402

from pictures import dead_leaves  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import os

    from ember import provenance as P
    from ember.images import ImageRecord, png_bytes
    from ember.settings import GenerationParams
    from ember.watermark import detect_watermark

    os.environ.setdefault("EMBER_CONFIG", tempfile.mkdtemp())  # the local signing chain, once
    marked_only = P.Provenance(credentials=False, watermark=True)
    rows = []
    for side in (64, 512):
        pixels = dead_leaves(side)  # a natural-looking picture: the watermark adapts to it
        params = GenerationParams("a castle", sampler="euler", steps=20, cfg=7.0, width=side,
                                  height=side, layout_guidance=0.0)  # fmt: skip
        record = ImageRecord(params, "model", "/models/model.safetensors", "0" * 64, "0" * 10,
                             "bench", "none", "fp32", "cpu")  # fmt: skip
        png_bytes(pixels, record, P.ON)  # makes the local chain on first use
        times: dict[str, list[float]] = {"plain": [], "watermark": [], "all": [], "detect": []}
        for _ in range(a.rounds):
            for name, options in (("plain", P.OFF), ("watermark", marked_only), ("all", P.ON)):
                t = time.perf_counter()
                png_bytes(pixels, record, options)
                times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            detect_watermark(pixels)
            times["detect"].append(time.perf_counter() - t)
        ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
        rows.append(f"| {side}x{side} | {ms['plain']:.1f} | {ms['watermark'] - ms['plain']:.1f} | "
                    f"{ms['all']:.1f} | {ms['all'] - ms['plain']:.1f} | {ms['detect']:.1f} |")  # fmt: skip
    report = (
        f"""# Provenance cost per PNG

{machine()}; {a.rounds} interleaved rounds, medians. `python bench/provenance_cost.py`

| image | PNG without provenance (ms) | watermark adds (ms) | with everything (ms) | everything adds (ms) | reading the watermark (ms) |
| --- | ---: | ---: | ---: | ---: | ---: |
"""
        + "\n".join(rows)
        + "\n"
    )
    write_report(report, a.out)


if __name__ == "__main__":
    main()
