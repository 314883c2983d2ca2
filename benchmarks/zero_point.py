"""What a zero point costs on OpenVINO: the same full-INT8 model with four rules for activation zero points.

    .venv/bin/python benchmarks/zero_point.py [--models minilm,yolo,rec]

quantize (method auto, target openvino; SmoothQuant for MiniLM, bias correction for YOLOv8n and rapidocr's
recognizer, as tune picks for them) builds each model four times, changing only how a signed activation range
becomes scale and zero point:
- ``uint8, zero points``: every activation uint8 asymmetric (infertune before 80630f6);
- ``int8 where balanced``: int8 with zero point 0 where that step is at most 1.25x the uint8 one (the rule
  ``TARGETS["openvino"].symmetric_within``), uint8 asymmetric elsewhere;
- ``... or a padded conv reads it``: that, and int8 with zero point 0 for every signed range a zero-padded
  convolution reads (``TargetRules.symmetric_padded``: oneDNN pads with the zero point and compensates each
  output position the padding touches), whatever it costs in step;
- ``int8 everywhere``: every signed range int8 with zero point 0, whatever it costs in step.
Non-negative ranges are uint8 with zero point 0 in all four. Accuracy on held-out inputs against FP32 on
ONNX Runtime (MiniLM: sentence-embedding cosine, 300 sentences of seed 2; YOLOv8n: box F1, 600 mosaics of
seed 2; rec: text identical, 600 lines of seeds 2-4), run on OpenVINO; latency p50 at 1 and 2 threads, each
file in its own process, alternated, median of 15 rounds (``benchmarks/tune.py``'s timing). Run under
``flock /work/timing.lock``.

Writes benchmarks/results/zero_point.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.algorithms import accuracy, feeds, model_path, outputs  # noqa: E402
from benchmarks.results_io import machine_line, run_models  # noqa: E402
from benchmarks.tune import ROUNDS, isolated_latencies  # noqa: E402
from infertune import Dataset, quantize  # noqa: E402
from infertune.quant.placement import TARGETS  # noqa: E402

# the changes to OpenVINO's TargetRules each rule makes (the second: none, the default)
RULES = {"uint8, zero points": {"symmetric_within": 0.0}, "int8 where balanced": {},
         "int8 where balanced or a padded conv reads it": {"symmetric_padded": True},
         "int8 everywhere": {"symmetric_within": math.inf}}
ALGORITHMS = {"minilm": ("smoothquant",), "yolo": ("bias_correction",), "rec": ("bias_correction",)}
HELD_OUT = {"minilm": 300, "yolo": 600, "rec": 600}


@contextmanager
def openvino_rules(changes: dict):
    """OpenVINO's placement with another zero-point rule, for the duration of one quantize."""
    saved = TARGETS["openvino"]
    TARGETS["openvino"] = dataclasses.replace(saved, **changes)
    try:
        yield
    finally:
        TARGETS["openvino"] = saved


def measure(name: str, work: Path) -> dict:
    src = model_path(name)
    calib = feeds(name, 64, seed=0)
    held = feeds(name, HELD_OUT[name], seed=2)
    ref = outputs(src, held, "ort")
    rows, paths = {}, {}
    for label, changes in RULES.items():
        with openvino_rules(changes):
            r = quantize(src, Dataset.from_iterable(calib), method="auto", target="openvino",
                         algorithms=ALGORITHMS[name], stability_halves=0)
        path = work / f"{name}-{len(paths)}.onnx"
        r.model.save(path)
        paths[label] = path
        used = [e for e in r.recipe.tensors.values() if e.get("used")]
        rows[label] = {"rule": label, "ranges": len(used),
                       "int8_zero_point_0": sum(e["dtype"] == "int8" for e in used),
                       "uint8_with_zero_point": sum(e["dtype"] == "uint8" and e["zero_point"] != 0 for e in used),
                       **accuracy(name, ref, outputs(path, held, "openvino"), held)}
    for label, lat in isolated_latencies(paths, held[0], {k: "openvino" for k in paths}, rounds=ROUNDS).items():
        rows[label].update(lat)
    return {"model": name, "algorithms": list(ALGORITHMS[name]), "rows": list(rows.values())}


def table(results: list[dict], env: dict) -> str:
    lines = ["# What a zero point costs on OpenVINO", "", machine_line(env, "zero_point.py") + " Full INT8 placed "
             "for OpenVINO, the same calibration, four rules for a signed activation range; latency p50 of one "
             f"input, each file in its own process, alternated, median of {ROUNDS} rounds.", ""]
    for res in results:
        lines += [f"## {res['model']} ({'+'.join(res['algorithms'])})", "",
                  "| rule | int8, zero point 0 | uint8 with a zero point | accuracy | p50 ms 1 thread | "
                  "p50 ms 2 threads |", "|---|---|---|---|---|---|"]
        for row in res["rows"]:
            acc = (f"box F1 {row['box_f1']:.4f}" if "box_f1" in row else
                   f"text identical {row['text_identical_pct']:.1f}%" if "text_identical_pct" in row else
                   f"cosine {row['embedding_cosine_mean']:.5f} / min {row['embedding_cosine_min']:.5f}")
            lines.append(f"| {row['rule']} | {row['int8_zero_point_0']} of {row['ranges']} | "
                         f"{row['uint8_with_zero_point']} | {acc} | {row['p50_ms_1t']:.3f} | {row['p50_ms_2t']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,yolo,rec")
    args = ap.parse_args()
    run_models("zero_point", vars(args), args.models, measure, table)


if __name__ == "__main__":
    main()
