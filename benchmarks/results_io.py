"""Where every benchmark writes: benchmarks/results/NAME.json (the numbers) and NAME.md (the table)."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save_results(name: str, doc: dict, markdown: str) -> None:
    """Both files written atomically, the table printed, and synced before the process ends."""
    from infertune._io import write_json, write_text  # workers of quantize.py import infertune late

    write_json(RESULTS / f"{name}.json", doc)
    write_text(RESULTS / f"{name}.md", markdown)
    print(markdown)
    os.sync()
