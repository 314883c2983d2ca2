"""Accuracy algorithms x models, beside NNCF's and ONNX Runtime's equivalents, measured in one run.

    .venv/bin/python benchmarks/algorithms.py [--models rec,minilm,yolo] [--calib 64] [--eval N]
        [--sets SET,SET] [--peers nncf,nncf-plain,ort,ort-sq] [--targets ort-cpu,openvino]
        [--adaround-seconds 120] [--memory-only] [--peers-only] [--merge]

Rows per model: infertune's quantize (method auto) with each algorithm set (``none``, ``cle``,
``bias_correction``, ``smoothquant``, ``range_split``, ``range_refinement``, ``adaround``, joined with ``+``;
the default sets are those that apply to the model's family), NNCF's ``nncf.quantize`` with its defaults (fast
bias correction; SmoothQuant for MiniLM, as its TRANSFORMER model type does) and with both off
(``nncf-plain``), and ONNX Runtime's ``quantize_static`` (MinMax, Q/DQ, per-channel int8 weights, uint8
activations) without and with ``extra_options={"SmoothQuant": True}`` (``ort-sq``). That option imports Intel
Neural Compressor 2.x, whose wheel pins numpy < 2: its worker runs in a venv of its own (``.venv-inc``, made
on first use: numpy < 2, neural-compressor 2.x, the same onnxruntime as here, infertune for the inputs), on
the model with the Constant nodes that feed weights made initializers (INC's SmoothQuant looks each weight up
among the initializers, and rapidocr's recognizer feeds its convolutions' weights from Constant nodes; ONNX
Runtime's ``quant_pre_process`` does that too, but its optimisation then made INC's SmoothQuant fail on
MiniLM). Each quantizer runs in its own process, so its wall time and peak RSS are its own.

Accuracy against FP32 on held-out inputs, on the runtime each variant is placed for (ORT for the
peers): rapidocr rec: decoded text identical to FP32's (600 lines of seeds 2-4, as benchmarks/tune.py
checks); all-MiniLM-L6-v2: sentence-embedding cosine (mean / min); YOLOv8n: box F1 vs FP32 (same
class, IoU >= 0.5, 1000 mosaics of seed 1). No latency here (tune.py times variants; anything timed
goes under ``flock /work/timing.lock``).

Memory: peak RSS of rec's entropy calibration with every algorithm on, at 64 and at 512 samples
(the bound: <= 1 GB and flat). ``--memory-only`` runs just that.

Writes benchmarks/results/algorithms.{json,md}; ``--merge`` keeps the committed rows (and memory) not
measured again, when they were measured on this machine's kind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quantize as qbench  # noqa: E402

MODELS = ("rec", "minilm", "yolo")
FAMILY = {"rec": "convnet", "yolo": "convnet", "minilm": "transformer"}
SETS = {
    "convnet": ["none", "bias_correction", "cle", "cle+bias_correction", "smoothquant+bias_correction", "adaround",
                "adaround+bias_correction", "cle+adaround+bias_correction", "range_refinement+bias_correction",
                "range_refinement+adaround+bias_correction", "range_split+bias_correction",
                "range_split+adaround+bias_correction", "smoothquant+range_split+bias_correction"],
    "transformer": ["none", "smoothquant", "bias_correction", "smoothquant+bias_correction", "adaround",
                    "smoothquant+adaround+bias_correction", "smoothquant+range_refinement", "range_split",
                    "smoothquant+range_split"],
}
PEERS = ["nncf", "nncf-plain", "ort", "ort-sq"]
# YOLOv8n: 1000 mosaics (about 1400 FP32 boxes); on 200 (237 boxes) one box was 0.4 points of F1, and
# range_split + bias correction read 0.977 on the first 200 of a set where tune's 500 read 0.955
EVAL = {"rec": 600, "minilm": 128, "yolo": 1000}
EVERYTHING = "cle+smoothquant+range_split+range_refinement+adaround+bias_correction"


# ---- models and data ------------------------------------------------------------------------------
def model_path(name: str) -> Path:
    from benchmarks import realmodels

    return realmodels.yolov8n() if name == "yolo" else qbench.model_path(name)


def feeds(name: str, n: int, seed: int, lazy: bool = False):
    """n single-sample feeds (seed 0: calibration); held-out rec lines span seeds 2-4 as in tune.py."""
    from benchmarks import realmodels

    if name == "yolo":  # made at once (64 inputs: 79 MB, the same for every quantizer)
        x = realmodels.yolo_inputs(n, seed)
        return [{realmodels.YOLO_INPUT: x[i:i + 1]} for i in range(n)]
    if name == "rec" and not lazy and seed > 0:
        return [f for s in (2, 3, 4) for f in qbench.feeds(name, n // 3, seed=s)]
    return qbench.feeds(name, n, seed=seed, lazy=lazy)


# ---- workers: one quantization, one process ---------------------------------------------------------
def worker(name: str, variant: str, calib_n: int, out: Path, target: str, adaround_s: float) -> dict:
    src = model_path(name)
    calib = feeds(name, calib_n, seed=0, lazy=True)
    start = time.perf_counter()
    info: dict = {}
    if variant.startswith("infertune:"):
        info = _infertune(src, calib, variant.split(":", 1)[1], out, target, adaround_s)
    elif variant.startswith("nncf"):
        _nncf(name, src, calib, variant, out)
    elif variant.startswith("ort"):
        info = _ort(src, calib, variant, out)
    else:
        raise ValueError(variant)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": qbench.peak_rss_mb(), **info}


def _infertune(src: Path, calib, spec: str, out: Path, target: str, adaround_s: float) -> dict:
    from infertune import Dataset, quantize
    from infertune.quant.algorithms import AlgorithmOptions

    method, _, algos = spec.partition("/")
    names = () if algos == "none" else tuple(algos.split("+"))
    r = quantize(src, Dataset.from_iterable(calib), method=method, target=target, algorithms=names,
                 stability_halves=0, algorithm_options=AlgorithmOptions(adaround_seconds=adaround_s))
    r.model.save(out)
    return {"calibration_seconds": r.calibration.seconds if r.calibration else None,
            "algorithms": r.summary()["algorithms"]}


def _nncf(name: str, src: Path, calib, variant: str, out: Path) -> None:
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from onnx import version_converter

    proto = onnx.load(str(src))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        proto = version_converter.convert_version(proto, 13)
    model_type = nncf.ModelType.TRANSFORMER if FAMILY[name] == "transformer" else None
    advanced = None
    if variant == "nncf-plain":
        advanced = AdvancedQuantizationParameters(
            disable_bias_correction=True, smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
    onnx.save(nncf.quantize(proto, nncf.Dataset(calib), model_type=model_type, subset_size=len(calib),
                            advanced_parameters=advanced), str(out))


def _ort(src: Path, calib, variant: str, out: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    extra, info = {}, {}
    if variant == "ort-sq":
        from importlib.metadata import version

        extra = {"SmoothQuant": True, "SmoothQuantAlpha": 0.5}
        src = weights_as_initializers(src, out.with_name(out.stem + "-initializers.onnx"))
        calib = list(calib)  # ONNX Runtime deep-copies the data reader for INC: no generator inside
        info = {"versions": {k: version(k) for k in ("neural-compressor", "numpy", "onnxruntime")}}
    qbench.ort_quantize_static(src, calib, out, calibrate_method=CalibrationMethod.MinMax,
                               activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                               extra_options=extra)
    return info


# the ops whose parameters (inputs 1..) INC's SmoothQuant reads, or folds its scales into, as initializers
PARAMETERIZED = ("Conv", "MatMul", "Gemm", "BatchNormalization", "LayerNormalization", "InstanceNormalization")


def weights_as_initializers(src: Path, out: Path) -> Path:
    """``src`` with each Constant node that feeds a parameter of a ``PARAMETERIZED`` op made an initializer: the
    same graph, whose weights INC's SmoothQuant can read (it looks each one up among the initializers; other
    Constants stay nodes: made initializers, a scalar one broke its folding on MiniLM)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    weights = {t for n in proto.graph.node if n.op_type in PARAMETERIZED for t in n.input[1:]}
    kept = []
    for node in proto.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) \
            if node.op_type == "Constant" and node.output[0] in weights else None
        if value is None:
            kept.append(node)
        else:
            proto.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    onnx.save(proto, str(out))
    return out


INC_VENV = ROOT / ".venv-inc"


def inc_python() -> Path:
    """The python of the venv ``ort-sq`` runs in (see the module docstring), made on first use."""
    from importlib.metadata import version

    py = INC_VENV / "bin" / "python"
    done = INC_VENV / ".installed"
    if not done.exists():
        subprocess.run([sys.executable, "-m", "venv", str(INC_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy<2", "neural-compressor>=2.6,<3",
                        "six",  # imported by neural-compressor 2.6, not declared by it
                        f"onnxruntime=={version('onnxruntime')}", "pillow", "scikit-image", "scikit-learn",
                        "-e", str(ROOT)], check=True)
        done.touch()
    return py


def run_worker(name: str, variant: str, calib_n: int, out: Path, target: str, adaround_s: float,
               timeout: int = 3600) -> dict:
    python = inc_python() if variant == "ort-sq" else Path(sys.executable)
    cmd = [str(python), __file__, "--worker", name, variant, str(calib_n), str(out), target, str(adaround_s)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if p.returncode != 0:
        lines = [line for line in (p.stderr or "").strip().splitlines() if line.strip()]
        killed = p.returncode in (-9, 137)
        last = lines[-1][:300] if lines else f"exit {p.returncode}"
        return {"error": "killed (out of memory?)" if killed else last}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- accuracy ---------------------------------------------------------------------------------------
def outputs(path: Path, data: list[dict], backend: str) -> list[dict]:
    from infertune import Model, backends

    runner = backends.compile(Model.load(path), backends.Settings(intra_op_threads=2), backend=backend)
    return [runner.run(f) for f in data]


def accuracy(name: str, ref: list[dict], got: list[dict], data: list[dict]) -> dict:
    from benchmarks import realmodels

    key = next(iter(ref[0]))
    if name == "rec":
        same = [realmodels.ctc_decode(r[key])[0].strip() == realmodels.ctc_decode(g[key])[0].strip()
                for r, g in zip(ref, got, strict=True)]
        return {"text_identical_pct": 100.0 * float(np.mean(same))}
    if name == "minilm":
        cos = []
        for r, g, f in zip(ref, got, data, strict=True):
            a = realmodels.mean_pool(r[key], f["attention_mask"])[0]
            b = realmodels.mean_pool(g[key], f["attention_mask"])[0]
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        return {"embedding_cosine_mean": float(np.mean(cos)), "embedding_cosine_min": float(np.min(cos))}
    return {"box_f1": float(realmodels.BoxF1()(ref, got)), "fp32_boxes": realmodels.yolo_box_count(ref)}


def bench_model(name: str, args, work: Path) -> dict:
    print(f"== {name}", flush=True)
    data = feeds(name, args.eval or EVAL[name], seed=1)
    src = model_path(name)
    ref = outputs(src, data, "ort")
    rows = []
    variants = [] if args.peers_only else [(f"infertune:{args.method}/{s}", t) for t in args.targets.split(",")
                                           for s in (args.sets.split(",") if args.sets else SETS[FAMILY[name]])]
    variants += [(p, "ort-cpu") for p in args.peers.split(",") if p]
    for variant, target in variants:
        out = work / f"{name}-{len(rows)}.onnx"
        res = run_worker(name, variant, args.calib, out, target, args.adaround_seconds)
        backend = "openvino" if target == "openvino" else "ort"
        row = {"variant": variant, "target": target, "runtime": backend, **res}
        if "error" not in res:
            try:
                row.update(accuracy(name, ref, outputs(out, data, backend), data))
            except Exception as e:  # noqa: BLE001 - a model the runtime cannot run is a result too
                row["error"] = f"does not run: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(f"   {variant} ({target}): {({k: v for k, v in row.items() if k != 'algorithms'})}", flush=True)
    return {"model": name, "source": src.name, "calibration_samples": args.calib, "eval_samples": len(data),
            "rows": rows}


def memory(args, work: Path) -> dict:
    """Peak RSS of rec's entropy calibration with every algorithm on, at 64 and 512 samples."""
    out = {}
    for n in (64, 512):
        res = run_worker("rec", f"infertune:entropy/{EVERYTHING}", n, work / f"rec-mem-{n}.onnx", "ort-cpu",
                         args.adaround_seconds)
        out[str(n)] = {k: res.get(k) for k in ("peak_rss_mb", "seconds", "error") if k in res}
        print(f"   memory, {n} samples: {out[str(n)]}", flush=True)
    return out


# ---- report -----------------------------------------------------------------------------------------
def markdown(results: list[dict], mem: dict | None, env: dict) -> str:
    cpu = env["machine"]["cpu"]
    lines = ["# Accuracy algorithms x models", "",
             f"{cpu['model']}, {cpu['logical_cores']} cores ({' '.join(cpu['isa'])}); "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             "Generated by `benchmarks/algorithms.py`: each quantizer in its own process (wall time and peak RSS "
             "its own), accuracy vs FP32 on held-out inputs, on the runtime the variant is placed for.", ""]
    for r in results:
        metric = {"rec": "text identical %", "minilm": "embedding cosine mean / min", "yolo": "box F1"}[r["model"]]
        lines += [f"## {r['model']} ({r['source']}; {r['calibration_samples']} calibration samples, "
                  f"{r['eval_samples']} held-out)", "",
                  f"| variant | runtime | {metric} | seconds | peak RSS MB | what the algorithms did |",
                  "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {row['variant']} | {row['runtime']} | failed: {short_error(row['error'])} | | | |")
                continue
            lines.append(f"| {row['variant']} | {row['runtime']} | {_metric(r['model'], row)} | "
                         f"{row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {_did(row.get('algorithms', []))}"
                         f"{_ran_with(row.get('versions', {}))} |")
        lines.append("")
    if mem:
        a, b = (mem[k].get("peak_rss_mb") for k in ("64", "512"))
        ok = a is not None and b is not None and max(a, b) <= 1024 and abs(b - a) / a <= 0.10
        lines += ["## Calibration memory with every algorithm on", "",
                  f"rec, entropy, {EVERYTHING}: peak RSS {_f(a, 0)} MB with 64 samples, {_f(b, 0)} MB with 512 "
                  f"(target <= 1024 MB and flat within 10%: {'met' if ok else 'NOT met'}).", ""]
    return "\n".join(lines) + "\n"


def _metric(model: str, row: dict) -> str:
    if model == "rec":
        return f"{row['text_identical_pct']:.1f}"
    if model == "minilm":
        return f"{row['embedding_cosine_mean']:.4f} / {row['embedding_cosine_min']:.4f}"
    return f"{row['box_f1']:.4f}"  # 1000 mosaics, ~1300 boxes: a box is ~0.0008 of F1


def _did(algorithms: list[dict]) -> str:
    return "; ".join(f"{a['name']} " + ", ".join(f"{k} {v}" for k, v in a.items() if k not in ("name",)
                                                  and v not in (None, {})) for a in algorithms)


def short_error(error: str) -> str:
    """An error for a table cell: the exception's class without its module path, the message's end kept."""
    kind, sep, message = error.partition(": ")
    kind = kind.rsplit(".", 1)[-1] if " " not in kind else kind
    message = message if len(message) <= 200 else "..." + message[-200:]
    return f"{kind}{sep}{message}"


def _ran_with(versions: dict) -> str:
    """The packages of a worker that ran in a venv of its own (ort-sq)."""
    return f"ran with {', '.join(f'{k} {v}' for k, v in versions.items())}" if versions else ""


def _f(v, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sets", default="", help="algorithm sets (default: those of each model's family)")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--targets", default="ort-cpu")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=0, help="held-out inputs (default: per model)")
    ap.add_argument("--adaround-seconds", type=float, default=120.0)
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--peers-only", action="store_true", help="no infertune rows (with --merge: the peers again)")
    ap.add_argument("--merge", action="store_true", help="keep the committed rows not measured now")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, variant, n, out, target, adaround_s = args.worker
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the result alone (INC prints progress)
                result = worker(name, variant, int(n), Path(out), target, float(adaround_s))
            print(json.dumps(result, default=str))
        except Exception:  # noqa: BLE001 - reported to the parent as this variant's failure
            traceback.print_exc()
            sys.exit(1)
        return
    from benchmarks.results_io import committed_here, save_results
    from infertune.fingerprint import environment

    env = environment()
    with tempfile.TemporaryDirectory(prefix="infertune-algorithms-") as d:
        results = [] if args.memory_only else [bench_model(n, args, Path(d)) for n in args.models.split(",") if n]
        mem = None if args.no_memory else memory(args, Path(d))
    if args.merge:
        results, mem = merged(committed_here("algorithms", env), results, mem)
    save_results("algorithms", {"environment": env, "results": results, "memory": mem}, markdown(results, mem, env))


def merged(old: dict, new: list[dict], mem: dict | None) -> tuple[list[dict], dict | None]:
    """The committed results with the rows measured now in place of theirs (same model, variant and target),
    new rows after them (the committed rows of a model measured now on other inputs dropped), and the committed
    memory result unless it was measured now."""
    fresh = {r["model"]: r for r in new}
    out = []
    for res in old["results"]:
        now = fresh.pop(res["model"], None)
        if now is None:
            out.append(res)
            continue
        redone = {(row["variant"], row["target"]) for row in now["rows"]}
        same_set = all(res[k] == now[k] for k in ("eval_samples", "calibration_samples"))
        kept = [row for row in res["rows"] if (row["variant"], row["target"]) not in redone] if same_set else []
        out.append({**now, "rows": kept + now["rows"]})
    return out + list(fresh.values()), mem if mem is not None else old.get("memory")


if __name__ == "__main__":
    main()
