"""How reproducible is a side-by-side latency, by how it is timed? Two ways, each repeated.

    .venv/bin/python benchmarks/timing_method.py [--repeats 8]

tune decides on latencies of variants timed side by side, and the tune benchmark re-measures them
minutes later; on a shared 2-vCPU machine the two disagreed by up to 28% for one file. Two ways of
timing the same variants, each variant always in a process of its own that loads only its runtime:

- ``fresh``: a fresh process per variant and round, 3 rounds of 1 s, order alternated (infertune's
  way until this benchmark; emulated here with one ``time_isolated`` call of one round per round);
- ``windows``: one process per variant kept over 12 rounds of 0.25 s (the same 3 s of timing),
  the others waiting asleep, order alternated (``perf.isolated`` now).

Both are repeated ``--repeats`` times, interleaved (fresh, windows, fresh, ...), on FP32 models at
2 threads: rapidocr rec on ONNX Runtime and on OpenVINO, and the digits CNN on ONNX Runtime (a
0.04 ms model). Per way: the spread of each variant's reported p50 over the repeats, the spread of
the OpenVINO/ORT ratio, and the wall time of one measurement. Then a trace: rec on ONNX Runtime alone,
one process, ``TRACE_WINDOWS`` windows of 0.25 s in a row (does its speed change within a process, and
how fast?). Writes benchmarks/results/
timing_method.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantize import feeds, model_path  # noqa: E402
from benchmarks.results_io import machine_line, save_results  # noqa: E402
from infertune import backends  # noqa: E402
from infertune.fingerprint import environment  # noqa: E402
from infertune.perf.isolated import Variant, time_isolated  # noqa: E402

TRACE_WINDOWS = 40
WAYS = {"fresh": (3, 1.0), "windows": (12, 0.25)}  # rounds, seconds per round: 3 s per variant either way


def measure(way: str, variants: dict[str, list[Variant]], feed: dict[str, dict]) -> dict[str, float]:
    """One measurement of every variant (models apart: each has its own feed); p50 per variant key."""
    rounds, seconds = WAYS[way]
    out = {}
    for name, vs in variants.items():
        if way == "windows":
            got = time_isolated(vs, feed[name], rounds=rounds, seconds=seconds)
            out.update({k: v.p50_ms for k, v in got.items()})
            continue
        per_round: dict[str, list[float]] = {v.key: [] for v in vs}
        for r in range(rounds):
            for v in (vs if r % 2 == 0 else vs[::-1]):  # the order alternates, as time_isolated's did
                per_round[v.key].append(time_isolated([v], feed[name], rounds=1, seconds=seconds)[v.key].p50_ms)
        out.update({k: float(np.median(p)) for k, p in per_round.items()})
    return out


def spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"median": float(np.median(a)), "cv": float(a.std() / a.mean()),
            "max_over_min": float(a.max() / a.min())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    two = backends.Settings(intra_op_threads=2)
    variants = {"rec": [Variant("rec-ort", model_path("rec"), "ort", two),
                        Variant("rec-openvino", model_path("rec"), "openvino", two)],
                "digits": [Variant("digits-ort", model_path("digits"), "ort", two)]}
    feed = {name: feeds(name, 1, 1)[0] for name in variants}
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    for i in range(args.repeats):
        for way in (WAYS if i % 2 == 0 else list(WAYS)[::-1]):
            t = time.perf_counter()
            p50 = measure(way, variants, feed)
            runs[way].append({"p50_ms": p50, "wall_s": time.perf_counter() - t})
            print(way, {k: round(v, 4) for k, v in p50.items()}, flush=True)
    keys = [v.key for vs in variants.values() for v in vs]
    summary = {}
    for way, rs in runs.items():
        summary[way] = {k: spread([r["p50_ms"][k] for r in rs]) for k in keys}
        summary[way]["ratio openvino/ort"] = spread([r["p50_ms"]["rec-openvino"] / r["p50_ms"]["rec-ort"] for r in rs])
        summary[way]["wall_s"] = float(np.mean([r["wall_s"] for r in rs]))
    alone = variants["rec"][0]
    trace = time_isolated([alone], feed["rec"], rounds=TRACE_WINDOWS, seconds=0.25)[alone.key].rounds_ms
    env = environment()
    doc = {"environment": env, "ways": {w: {"rounds": r, "seconds_per_round": s} for w, (r, s) in WAYS.items()},
           "repeats": args.repeats, "runs": runs, "summary": summary, "trace_rec_ort_ms": trace}
    md = ["# How reproducible a side-by-side latency is, by how it is timed", "",
          machine_line(env, "timing_method.py") + f" {args.repeats} repeats of each way, interleaved; FP32 at 2 "
          "threads. `fresh`: a fresh process per variant and round, 3 rounds of 1 s. `windows`: one process per "
          "variant kept over 12 rounds of 0.25 s, the others asleep. Both alternate the order and report the "
          "median of rounds. Spread over the repeats: coefficient of variation and max / min.", "",
          "| way | " + " | ".join(f"{k} p50 ms (cv, max/min)" for k in [*keys, "ratio openvino/ort"])
          + " | wall s per measurement |", "|---" * (len(keys) + 3) + "|"]
    for way in WAYS:
        s = summary[way]
        cells = [f"{s[k]['median']:.4g} ({s[k]['cv']:.1%}, {s[k]['max_over_min']:.2f})"
                 for k in [*keys, "ratio openvino/ort"]]
        md.append(f"| {way} | " + " | ".join(cells) + f" | {s['wall_s']:.1f} |")
    md += ["", f"rec on ONNX Runtime at 2 threads alone, one process, {TRACE_WINDOWS} windows of 0.25 s in a row "
           f"(p50 ms of each, in order; min {min(trace):.1f}, median {np.median(trace):.1f}, max {max(trace):.1f}):",
           "", " ".join(f"{v:.1f}" for v in trace)]
    save_results("timing_method", doc, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
