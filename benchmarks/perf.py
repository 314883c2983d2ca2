"""Where the time goes, on the digits CNN, rapidocr's text recognizer and all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/perf.py [--models digits,rec,minilm] [--seconds 1.0]

1. profile: per-op times (ORT's profiler, its per-kernel cost subtracted) summed against the
   end-to-end latency measured without the profiler; target within 10 %. 3 repetitions, 1 and 2
   threads; digits at batch 1 and 32.
2. roofline: the machine's GEMM ceilings (cached) and each model's achieved GFLOP/s.
3. sweep: throughput over batch x threads, with the knee.
4. explain: ONNX Runtime quantize_static's default output (QDQ, int8 activations, MinMax, 16
   calibration samples) of the rec model against FP32; then its suggestions applied through
   quantize_static's own options (activation_type=QUInt8, nodes_to_exclude=...), latency before
   and after (variants interleaved, best of 3 p50s) and output fidelity vs FP32.
5. preallocated vs plain runner: latency and what one call allocates.

Writes benchmarks/results/perf.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantize import feeds, fidelity, latencies, model_path, outputs  # noqa: E402
from benchmarks.results_io import RESULTS, machine_line, save_results  # noqa: E402
from infertune import (  # noqa: E402
    Dataset,
    Model,
    backends,  # noqa: E402
    explain,
    profile,
)
from infertune.fingerprint import environment  # noqa: E402
from infertune.perf.latency import allocation_per_call, side_by_side  # noqa: E402
from infertune.perf.roofline import ceilings, roofline  # noqa: E402
from infertune.perf.sweep import sweep  # noqa: E402

REPEATS = 3
PREALLOC_SECONDS = 20  # x --seconds of alternating calls
SWEEP_BATCH = {"digits": [1, 8, 32, 128], "rec": [1, 2, 4, 8], "minilm": [1, 2, 4, 8]}


def stacked(name: str, n: int, seed: int = 1) -> Dataset:
    return Dataset.from_iterable(feeds(name, n, seed=seed))


def coverage(name: str) -> list[dict]:
    m = Model.load(model_path(name))
    rows = []
    for batch in ([1, 32] if name == "digits" else [1]):
        ds = stacked(name, batch)
        for threads in (1, 2):
            runs = []
            for _ in range(REPEATS):
                p = profile(m, ds, settings=backends.Settings(intra_op_threads=threads), batch_size=batch,
                            runs=300 if name == "digits" else 50)
                runs.append(p)
            # the run of median coverage (REPEATS is odd): every number of the row comes from it
            median = sorted(runs, key=lambda p: p.coverage)[len(runs) // 2]
            covs = sorted(p.coverage for p in runs)
            rows.append({"model": name, "batch": batch, "threads": threads, "nodes": len(median.nodes),
                         "plain_us": median.plain_us, "profiled_run_us": median.run_us,
                         "raw_node_sum_us": sum(n.raw_us for n in median.nodes), "node_sum_us": median.node_sum_us,
                         "overhead_us_per_kernel": median.overhead_us, "coverage": median.coverage,
                         "coverage_runs": covs, "op_types": [o.to_dict() for o in median.op_types[:8]]})
            print(f"   profile b{batch} t{threads}: coverage {covs}", flush=True)
    return rows


def roof(name: str) -> dict:
    m = Model.load(model_path(name))
    p = profile(m, stacked(name, 1), settings=backends.Settings(intra_op_threads=1), runs=30)
    return {"model": name, **roofline(m, p, ceilings(1)).to_dict()}


def sweeps(name: str, seconds: float) -> dict:
    m = Model.load(model_path(name))
    batches = SWEEP_BATCH[name]
    r = sweep(m, stacked(name, max(batches)), {"batch": batches, "threads": [1, 2]}, seconds=seconds)
    return r.to_dict()


def prealloc(name: str, seconds: float) -> dict:
    """Allocation per call of each runner, then their latency side by side, call by call in alternation.

    (Best-of-rounds p50s of separately timed sessions differed by up to 10 % either way on this machine.)
    """
    m = Model.load(model_path(name))
    feed = feeds(name, 1, seed=1)[0]
    runners = {label: backends.compile(m, backends.Settings(intra_op_threads=1, preallocate=pre))
               for label, pre in (("plain", False), ("preallocated", True))}
    out: dict = {"model": name}
    for label, runner in runners.items():
        out[label] = allocation_per_call(runner, feed).to_dict()
    timing = side_by_side(runners, feed, time_budget_s=PREALLOC_SECONDS * seconds)
    for label in runners:
        out[label]["p50_ms"] = timing.latency_ms[label].p50
    out["rounds"] = timing.rounds
    out["ratio_p50"] = timing.ratio_p50["preallocated"]
    return out


def ort_quantize(src: Path, dst: Path, calib: list[dict], **options) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    calibrate_method=CalibrationMethod.MinMax, **options)


def explain_and_apply(work: Path) -> dict:
    from onnxruntime.quantization import QuantType

    src = model_path("rec")
    calib = feeds("rec", 16, seed=0)
    before = work / "rec.ort-default.onnx"
    ort_quantize(src, before, calib)
    one = Dataset.from_iterable(feeds("rec", 1, seed=1))
    r = explain(src, before, one, settings=backends.Settings(intra_op_threads=1), runs=30)
    act = next((s for s in r.suggestions if s.action == "activation_type"), None)
    exclude = sorted({n for s in r.suggestions for n in s.exclude})
    variants = {"fp32": src, "ort_default": before}
    if act is not None:
        variants["uint8_activations"] = work / "rec.uint8.onnx"
        ort_quantize(src, variants["uint8_activations"], calib, activation_type=QuantType.QUInt8)
    if exclude:
        variants["uint8_and_exclusions" if act else "exclusions"] = work / "rec.applied.onnx"
        ort_quantize(src, variants["uint8_and_exclusions" if act else "exclusions"], calib,
                     activation_type=QuantType.QUInt8 if act else QuantType.QInt8, nodes_to_exclude=exclude)
    lat = latencies(variants, feeds("rec", 1, seed=1)[0])
    data = feeds("rec", 64, seed=1)
    ref = outputs(src, data)
    fid = {k: fidelity("rec", ref, outputs(p, data), data, None) for k, p in variants.items() if k != "fp32"}
    applied = explain(before, variants[list(variants)[-1]], one, settings=backends.Settings(intra_op_threads=1),
                      runs=30)
    return {"explain": r.to_dict(), "applied_explain": {"a": applied.a.to_dict(), "b": applied.b.to_dict()},
            "activation_type": act.value if act else None, "excluded": exclude, "latency": lat, "fidelity": fid}


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = ["# Where the time goes: profile, roofline, sweeps, explain, preallocation", "",
             machine_line(env, "perf.py"), "",
             "## Per-op times vs end-to-end latency (target: within 10 %)", "",
             "Per-op time = ORT profiler kernel time minus the profiler's own cost per kernel (calibrated on this "
             f"machine); end-to-end = median latency without the profiler. Each row is the repetition of median "
             f"sum / e2e among {REPEATS}.", "",
             "| model | batch | threads | nodes | e2e µs | profiled run µs | raw kernel sum µs | corrected sum µs "
             "| overhead µs/kernel | sum / e2e | within 10 % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["coverage"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['nodes']} | {r['plain_us']:.1f} | "
                     f"{r['profiled_run_us']:.1f} | {r['raw_node_sum_us']:.1f} | {r['node_sum_us']:.1f} | "
                     f"{r['overhead_us_per_kernel']:.2f} | {r['coverage']:.3f} | "
                     f"{'yes' if abs(r['coverage'] - 1) <= 0.10 else 'no'} |")
    c = doc["ceilings"]
    lines += ["", "## Roofline (1 thread)", "",
              f"Ceilings, measured by ONNX Runtime on a 1024³ GEMM: FP32 {c['fp32_gflops']:.1f} GFLOP/s, INT8 "
              f"(MatMulInteger u8×s8) {c['int8_gops']:.1f} GOP/s; memory copy {c['bandwidth_gbs']:.1f} GB/s.", "",
              "| model | FLOPs / run | achieved GFLOP/s | of peak | conv GFLOP/s (of peak) "
              "| matmul GFLOP/s (of peak) |",
              "|---|---|---|---|---|---|"]
    for r in doc["roofline"]:
        cls = {o["op_class"]: o for o in r["op_classes"]}

        def cell(k: str, cls=cls) -> str:
            o = cls.get(k)
            return f"{o['gflops']:.2f} ({o['fraction_of_peak']:.1%})" if o else "—"

        lines.append(f"| {r['model']} | {r['model_flops'] / 1e9:.3f} G | {r['model_gflops']:.2f} | "
                     f"{r['fraction_of_peak']:.1%} | {cell('conv')} | {cell('matmul')} |")
    lines += ["", "## Sweeps: throughput (samples/s) over batch × threads", ""]
    for s in doc["sweeps"]:
        lines += [f"### {s['model']}", "", "| batch | threads | p50 ms | throughput/s | peak RSS MB |",
                  "|---|---|---|---|---|"]
        for p in s["points"]:
            lines.append(f"| {p['batch']} | {p['threads']} | {p['latency_ms']['p50']:.3f} | "
                         f"{p['throughput_per_s']:.1f} | {p['peak_rss_mb'] or 0:.0f} |")
        lines.append("")
        for k in s["knees"]:
            fixed = ", ".join(f"{a}={v}" for a, v in k["fixed"].items() if a in ("batch", "threads"))
            lines.append(f"- knee along {k['axis']} ({fixed}): **{k['at']}**")
        lines.append("")
    e = doc.get("explain")
    if e:
        a, b = e["explain"]["a"], e["explain"]["b"]
        lines += ["## explain: ONNX Runtime quantize_static default (int8 activations) on rec", "",
                  f"FP32 {a['run_us'] / 1000:.2f} ms vs ORT default INT8 {b['run_us'] / 1000:.2f} ms under the "
                  f"profiler: {b['unfused_quantize']} QuantizeLinear and {b['unfused_dequantize']} DequantizeLinear "
                  f"left unfused ({b['weight_dequantize']} of them on weights), costing {b['qdq_us'] / 1000:.2f} ms "
                  f"per run; {len(b['sandwiches'])} float ops sandwiched between DQ and Q; activation types "
                  f"{b['activation_types']}.", "", "Suggestions (first 5):", ""]
        lines += [f"- {s['text']}" for s in e["explain"]["suggestions"][:5]]
        lines += ["", f"Applied through quantize_static: activation_type={e['activation_type']}, "
                      f"nodes_to_exclude = {len(e['excluded'])} nodes.", "",
                  "| variant | p50 ms 1 thread | p50 ms 2 threads | output cosine vs FP32 | text identical % |",
                  "|---|---|---|---|---|"]
        for k, v in e["latency"].items():
            f = e["fidelity"].get(k, {})
            lines.append(f"| {k} | {v['p50_ms_1t']:.3f} | {v['p50_ms_2t']:.3f} | "
                         f"{f.get('cosine', 1.0):.4f} | {f.get('text_agree', 100.0):.1f} |")
        ap = e["applied_explain"]["b"]
        lines += ["", f"After applying: {ap['unfused_quantize']} Q / {ap['unfused_dequantize']} DQ unfused "
                      f"({ap['qdq_us'] / 1000:.2f} ms), {ap['int8_kernels']} int8 kernels.", ""]
    lines += ["## Preallocated runner (I/O binding) vs plain run, 1 thread, call by call in alternation",
              "",
              "p50 of each runner over the same rounds; ratio: median over rounds of preallocated / plain call time.",
              "",
              "| model | rounds | plain p50 ms | preallocated p50 ms | ratio | plain: fresh output bytes / call | "
              "preallocated | plain: Python heap bytes / call | preallocated |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["prealloc"]:
        p, q = r["plain"], r["preallocated"]
        lines.append(f"| {r['model']} | {r['rounds']} | {p['p50_ms']:.3f} | {q['p50_ms']:.3f} | {r['ratio_p50']:.3f} | "
                     f"{p['output_bytes']:.0f} | {q['output_bytes']:.0f} | {p['python_bytes']:.0f} | "
                     f"{q['python_bytes']:.0f} |")
    return "\n".join(lines) + "\n"


SECTIONS = ("coverage", "roofline", "sweeps", "prealloc", "explain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,rec,minilm")
    ap.add_argument("--seconds", type=float, default=1.0, help="Seconds per sweep point.")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="Measure only these; the others are kept from the committed perf.json.")
    args = ap.parse_args()
    names = args.models.split(",")
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    previous = RESULTS / "perf.json"
    doc: dict = json.loads(previous.read_text()) if set(sections) != set(SECTIONS) else {}
    env = environment()
    doc["environment"] = env
    doc.setdefault("measured", {})
    doc["ceilings"], doc["ceilings_2_threads"] = ceilings(1).to_dict(), ceilings(2).to_dict()
    steps = {"coverage": coverage, "roofline": lambda n: [roof(n)], "sweeps": lambda n: [sweeps(n, args.seconds)],
             "prealloc": lambda n: [prealloc(n, args.seconds)]}
    for section in steps:
        if section in sections:
            doc[section] = []
            doc["measured"][section] = env["machine"]
    for name in names:
        print(f"== {name}", flush=True)
        for section, step in steps.items():
            if section in sections:
                doc[section] += step(name)
    if "rec" in names and "explain" in sections:
        print("== explain", flush=True)
        doc["measured"]["explain"] = env["machine"]
        with tempfile.TemporaryDirectory(prefix="infertune-perf-") as d:
            doc["explain"] = explain_and_apply(Path(d))
    save_results("perf", doc, markdown(doc))


if __name__ == "__main__":
    main()
