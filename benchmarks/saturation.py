"""Whether a CPU's int8 kernels compute what a Q/DQ model says: 8-bit vs 7-bit weights, exact vs on the runtime.

    .venv/bin/python benchmarks/saturation.py [--models rec,yolo,minilm]

Without VNNI, x86 int8 kernels multiply u8 activations by s8 weights and add the products in pairs in 16 bits
(vpmaddubsw), which saturates when both products of a pair are large; with VNNI the sum is 32-bit. One
full-INT8 file (infertune's OpenVINO placement, every node quantized, 64 calibration samples) is run three ways:

- exactly: ONNX Runtime with graph optimisation off, so every DequantizeLinear -> float op -> QuantizeLinear
  runs in float (the arithmetic the file describes, which calibration and the algorithms optimise);
- on ONNX Runtime (its int8 kernels);
- on OpenVINO (its int8 kernels, compiled for the input's static shape),

with 8-bit weights and with 7-bit ones (``weight_reduce_range``), against FP32 on the held-out inputs of
the tune benchmark's evaluation seed. A runtime far below "exactly" with 8-bit weights and not with 7-bit
saturates. Accuracy only, no timing. Writes benchmarks/results/saturation.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantize import feeds, fidelity, model_path, outputs  # noqa: E402
from benchmarks.results_io import machine_line, save_results  # noqa: E402
from infertune import Dataset, Model, quantize  # noqa: E402
from infertune.fingerprint import environment  # noqa: E402

EVAL_N = {"rec": 200, "yolo": 200, "minilm": 64}
METRIC = {"rec": ("text_agree", "text identical %", 1), "yolo": ("box_f1", "box F1", 3),
          "minilm": ("embedding_cosine_mean", "embedding cosine", 4)}
WAYS = {"exact": ("ort", "disable"), "ort": ("ort", "all"), "openvino": ("openvino", "all")}  # (runtime, graph opt)


def measure(name: str, work: Path) -> dict:
    src = model_path(name)
    calib = Dataset.from_iterable(feeds(name, 64, 0))
    data = feeds(name, EVAL_N[name], 1)
    ref = outputs(src, data)
    key = METRIC[name][0]
    row = {"model": name, "inputs": len(data)}
    for bits, reduce_range in (("8-bit", False), ("7-bit", True)):
        t = time.perf_counter()
        q = quantize(Model.load(src), calib, target="openvino", weight_reduce_range=reduce_range,
                     stability_halves=0)
        path = q.model.save(work / f"{name}-{bits}.onnx")
        row[bits] = {way: fidelity(name, ref, outputs(path, data, backend, opt), data, None)[key]
                     for way, (backend, opt) in WAYS.items()}
        row[f"{bits}_seconds"] = time.perf_counter() - t
        print(name, bits, row[bits], flush=True)
    return row


def table(rows: list[dict], env: dict) -> str:
    md = ["# int8 saturation: the same Q/DQ file computed exactly and on each runtime", "",
          machine_line(env, "saturation.py") + " Full INT8 placed for OpenVINO, 64 calibration samples; "
          "fidelity vs FP32 on the held-out inputs of seed 1.", "",
          "| model | metric | inputs | 8-bit exact | 8-bit on ORT | 8-bit on OpenVINO | "
          "7-bit exact | 7-bit on ORT | 7-bit on OpenVINO |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        _, label, digits = METRIC[r["model"]]
        cells = " | ".join(f"{r[b][w]:.{digits}f}" for b in ("8-bit", "7-bit") for w in WAYS)
        md.append(f"| {r['model']} | {label} | {r['inputs']} | {cells} |")
    return "\n".join(md) + "\n"


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="rec,yolo,minilm")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="infertune-saturation-") as d:
        rows = [measure(name, Path(d)) for name in args.models.split(",")]
    env = environment()
    save_results("saturation", {"settings": vars(args), "rows": rows, "environment": env}, table(rows, env))


if __name__ == "__main__":
    main()
