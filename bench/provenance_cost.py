"""What provenance costs per image: encoding a PNG with and without signed Content Credentials and
XMP (`ember.provenance`), at 64x64 and 512x512, interleaved, medians.

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

from common import machine, write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import os

    import numpy as np

    from ember import provenance as P
    from ember.images import ImageRecord, png_bytes
    from ember.settings import GenerationParams

    os.environ.setdefault("EMBER_CONFIG", tempfile.mkdtemp())  # the local signing chain, once
    rows = []
    for side in (64, 512):
        pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        params = GenerationParams("a castle", sampler="euler", steps=20, cfg=7.0, width=side,
                                  height=side, layout_guidance=0.0)  # fmt: skip
        record = ImageRecord(params, "model", "/models/model.safetensors", "0" * 64, "0" * 10,
                             "bench", "none", "fp32", "cpu")  # fmt: skip
        png_bytes(pixels, record, P.ON)  # makes the local chain on first use
        plain, signed = [], []
        for _ in range(a.rounds):
            t = time.perf_counter()
            png_bytes(pixels, record, P.OFF)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            png_bytes(pixels, record, P.ON)
            signed.append(time.perf_counter() - t)
        med_plain, med_signed = statistics.median(plain), statistics.median(signed)
        rows.append(f"| {side}x{side} | {med_plain * 1000:.1f} | {med_signed * 1000:.1f} | "
                    f"{(med_signed - med_plain) * 1000:.1f} |")  # fmt: skip
    report = (
        f"""# Provenance cost per PNG

{machine()}; {a.rounds} interleaved rounds, medians. `python bench/provenance_cost.py`

| image | PNG without credentials (ms) | with credentials and XMP (ms) | added (ms) |
| --- | ---: | ---: | ---: |
"""
        + "\n".join(rows)
        + "\n"
    )
    write_report(report, a.out)


if __name__ == "__main__":
    main()
