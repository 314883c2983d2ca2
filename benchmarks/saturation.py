"""Whether a CPU's int8 kernels compute what a Q/DQ model says: 8-bit vs 7-bit weights, exact vs on the runtime.

    .venv/bin/python benchmarks/saturation.py [--models rec,yolo,minilm]

Without VNNI, x86 int8 kernels multiply u8 activations by s8 weights and add the products in pairs in 16 bits
(vpmaddubsw), which saturates when both products of a pair are large; with VNNI the sum is 32-bit. One
full-INT8 file (infertune's OpenVINO placement, every node quantized, 64 calibration samples) is run three ways:

- exactly: ONNX Runtime with graph optimisation off, so every DequantizeLinear -> float op -> QuantizeLinear
  runs in float (the arithmetic the file describes, which calibration and the algorithms optimise);
- on ONNX Runtime (its int8 kernels);
- on OpenVINO (its int8 kernels, compiled for the input's static shape),

with 8-bit weights, with 7-bit ones (``weight_reduce_range``) and with quantize's per-layer choice, against
FP32 on the held-out inputs of the tune benchmark's evaluation seed. A runtime far below "exactly" with 8-bit
weights and not with 7-bit saturates; the per-layer choice should bring it to the 8-bit exact figure.
Accuracy only, no timing. Writes benchmarks/results/saturation.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantize import feeds, fidelity, model_path, outputs  # noqa: E402
from benchmarks.results_io import machine_line, run_models  # noqa: E402
from infertune import Dataset, Model, quantize  # noqa: E402

EVAL_N = {"rec": 200, "yolo": 200, "minilm": 64}
METRIC = {"rec": ("text_agree", "text identical %", 1), "yolo": ("box_f1", "box F1", 3),
          "minilm": ("embedding_cosine_mean", "embedding cosine", 4)}
WAYS = {"exact": ("ort", "disable"), "ort": ("ort", "all"), "openvino": ("openvino", "all")}  # (runtime, graph opt)


WEIGHTS = (("8-bit", False), ("7-bit", True), ("per layer", None))  # None: quantize's default without VNNI


def measure(name: str, work: Path) -> dict:
    src = model_path(name)
    calib = Dataset.from_iterable(feeds(name, 64, 0))
    data = feeds(name, EVAL_N[name], 1)
    ref = outputs(src, data)
    key = METRIC[name][0]
    row = {"model": name, "inputs": len(data)}
    for bits, reduce_range in WEIGHTS:
        t = time.perf_counter()
        q = quantize(Model.load(src), calib, target="openvino", weight_reduce_range=reduce_range,
                     stability_halves=0)
        quantize_s = time.perf_counter() - t
        path = q.model.save(work / f"{name}-{bits.replace(' ', '-')}.onnx")
        row[bits] = {way: fidelity(name, ref, outputs(path, data, backend, opt), data, None)[key]
                     for way, (backend, opt) in WAYS.items()}
        seven = q.recipe.weight_reduce_range
        row[bits]["seven_bit_weights"] = (len(q.plan.weights) if seven is True else 0 if seven is False
                                          else len(seven & {w.tensor for w in q.plan.weights}))
        row[bits]["weights"] = len(q.plan.weights)
        row[bits]["quantize_seconds"] = quantize_s
        print(name, bits, row[bits], flush=True)
    return row


def table(rows: list[dict], env: dict) -> str:
    md = ["# int8 saturation: the same Q/DQ file computed exactly and on each runtime", "",
          machine_line(env, "saturation.py") + " Full INT8 placed for OpenVINO, 64 calibration samples; "
          "fidelity vs FP32 on the held-out inputs of seed 1. Weights: 8-bit everywhere, 7-bit everywhere, or "
          "per layer (quantize's default on a CPU without VNNI: 7-bit where the int16 pair sums overflow on the "
          "calibration data by more than 7-bit rounding would cost, `infertune.quant.pair_overflow`).", "",
          "| model | metric | inputs | weights | 7-bit layers | exact | on ORT | on OpenVINO | quantize s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        _, label, digits = METRIC[r["model"]]
        for bits, _ in WEIGHTS:
            c = r[bits]
            cells = " | ".join(f"{c[w]:.{digits}f}" for w in WAYS)
            md.append(f"| {r['model']} | {label} | {r['inputs']} | {bits} | {c['seven_bit_weights']} of "
                      f"{c['weights']} | {cells} | {c['quantize_seconds']:.1f} |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="rec,yolo,minilm")
    args = ap.parse_args()
    run_models("saturation", vars(args), args.models, measure, table, key="rows")


if __name__ == "__main__":
    main()
