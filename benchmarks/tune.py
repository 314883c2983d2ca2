"""infertune tune against the peers, each model under its own budget, measured in one run.

    .venv/bin/python benchmarks/tune.py [--models digits,rec,minilm,yolo] [--peers ort-minmax,ort-minmax-u8,nncf]

tune searches ONNX Runtime and OpenVINO. Rows: FP32 on each runtime, tune's choice on its runtime,
each peer quantizer's output on ONNX Runtime (NNCF's also on OpenVINO, the runtime it targets), and on a CPU
that computes bf16 in hardware the FP32 file on OpenVINO in bf16 (``openvino-bf16``: what OpenVINO runs an FP32
file in by default there; tune's BF16 variant is the same thing when it chooses it).

Budgets (against FP32, on held-out inputs):
- digits CNN: top-1 drop <= 0.5 points on the labelled test split;
- rapidocr rec: decoded text identical to FP32's on >= 97% of held-out rendered lines;
- all-MiniLM-L6-v2: sentence-embedding cosine >= 0.995 (mean over held-out sentences);
- YOLOv8n (nudenet's 320n.onnx) at 320x320: box F1 >= 0.97 against FP32's boxes (same class, IoU >= 0.5;
  nudenet's score threshold and NMS) on mosaics of the bundled photos (500 evaluation inputs, 600
  held-out ones).

tune searches with 64 calibration samples (seed 0) and decides on the evaluation set (seed 1);
then every variant (FP32, tune's choice, each peer quantizer's output) is measured side by side
on fresh held-out inputs (seeds 2, 3, 4; rec: 600 lines): fidelity, and p50 latency at 1 and 2 threads (each
variant in its own process, alternated, median of 15 short rounds, compiled for the input's shape as a deployment
feeding one size is). tune's wall time per model is recorded. Writes benchmarks/results/tune.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantize import feeds, fidelity, model_path, outputs, run_worker  # noqa: E402
from benchmarks.results_io import committed_here, machine_line, save_results  # noqa: E402
from infertune import (  # noqa: E402
    Budget,
    Dataset,
    Evaluator,
    Model,
    backends,  # noqa: E402, I001
    tune,
)
from infertune.fingerprint import environment  # noqa: E402
from infertune.perf.isolated import Variant, time_isolated  # noqa: E402
from infertune.search.runtimes import bf16_options  # noqa: E402

PEERS = ["ort-minmax", "ort-minmax-u8", "nncf"]
# rec: 100 lines let a 99% pass become 96%. yolo: box F1 counts boxes near nudenet's score threshold
# (benchmarks/metric_floor.py: input noise of sigma 0.002 alone costs 0.015), and on 200 mosaics (238 boxes)
# its standard error (~0.01) was the margin between what passed there (0.979) and held out (0.965)
EVAL_N = {"digits": 360, "rec": 200, "minilm": 64, "yolo": 500}
CHECK_N = {"digits": 360, "rec": 600, "minilm": 128, "yolo": 600}
CHECK_SEEDS = (2, 3, 4)
BUDGET_TEXT = {"digits": "top-1 drop <= 0.5", "rec": "text identical on >= 97% of lines",
               "minilm": "embedding cosine >= 0.995", "yolo": "box F1 >= 0.97 vs FP32"}


def text_agreement(ref: list[dict], got: list[dict]) -> list[float]:
    """Per line: 1.0 when the candidate's decoded text is FP32's (the metric is their mean)."""
    from benchmarks import realmodels

    key = next(iter(ref[0]))
    return [float(realmodels.ctc_decode(r[key])[0].strip() == realmodels.ctc_decode(g[key])[0].strip())
            for r, g in zip(ref, got, strict=True)]


def embedding_cosine(ref: list[dict], got: list[dict], data: list[dict]) -> list[float]:
    """Per sentence, the cosine between FP32's and the candidate's mean-pooled embeddings (the attention
    mask from each sentence's own feed: tune passes the feeds, resampled with the outputs)."""
    from benchmarks import realmodels

    key = next(iter(ref[0]))
    cos = []
    for r, g, f in zip(ref, got, data, strict=True):
        a = realmodels.mean_pool(r[key], f["attention_mask"])[0]
        b = realmodels.mean_pool(g[key], f["attention_mask"])[0]
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return cos


def budget_for(name: str) -> Budget:
    if name == "digits":
        return Budget.parse("top1_drop<=0.5")
    if name == "rec":
        return Budget(fn=text_agreement, fn_min=0.97)
    if name == "yolo":
        from benchmarks import realmodels

        return Budget(fn=realmodels.BoxF1(), fn_min=0.97)
    return Budget(fn=embedding_cosine, fn_min=0.995)


def meets(name: str, row: dict) -> bool:
    if name == "digits":
        return row.get("top1_drop", 99) <= 0.5
    if name == "rec":
        return row.get("text_agree", 0) >= 97.0
    if name == "yolo":
        return row.get("box_f1", 0) >= 0.97
    return row.get("embedding_cosine_mean", 0) >= 0.995


ROUNDS = 15
WINDOW_S = 1 / 3  # per variant and round: 5 s of timing each, in short alternated windows
NOISE = 0.05  # two p50s closer than this (or than their rounds' spread) are a tie, not a ranking


def prepared_rows(m: Model, name: str, work: Path, paths: dict, runtimes: dict, rows: dict) -> None:
    """FP32 of the prepared graph (what tune's "FP32, prepared" candidate runs) on both runtimes."""
    from infertune.quant.prepare import prepare

    prep = prepare(m, feeds(name, 4, seed=0))
    if prep.prepared:
        path = work / f"{name}-prepared.onnx"
        prep.model.save(path)
        for key, runtime in (("fp32-prepared", "ort"), ("fp32-prepared-openvino", "openvino")):
            paths[key], runtimes[key], rows[key] = path, runtime, {"variant": key}


def recorded_fp32(r) -> dict | None:
    """The FP32 finalist tune's runoff timed beside its choice (the quickest there, if more than one): its row
    here, threads and p50. Not ``r.fp32``: once the runoff re-measured its FP32 finalist slower, the quickest
    FP32 is another trial, timed only once."""
    finalists = [t for t in r.trials if t.spec.precision == "fp32" and t.spec.key in r.runoff]
    if not finalists:
        return None
    fp = min(finalists, key=r.p50)
    row = "fp32" + ("-prepared" if fp.spec.prepared else "") + ("-openvino" if fp.spec.backend == "openvino" else "")
    return {"variant": row, "threads": fp.spec.threads, "p50_ms": r.p50(fp)}


def run(name: str, peers: list[str], work: Path) -> dict:
    print(f"== {name}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    src = model_path(name)
    m = Model.load(src)
    settings = backends.Settings()  # as the CLI evaluates and calibrates: every core (timing has its own processes)
    ev_feeds = feeds(name, EVAL_N[name], seed=1)
    labels = None
    if name == "digits":
        with np.load(ROOT / "examples" / "digits" / "test.npz") as z:
            ev_feeds = [{"image": z["image"][i:i + 1]} for i in range(180)]
            labels = z["label"][:180]
    evaluator = Evaluator(m, ev_feeds, labels=labels, settings=settings)
    budget = budget_for(name)
    t0 = time.perf_counter()

    def shown(t, reused):
        value = t.metrics.get("user", t.metrics.get("sqnr_db"))
        print(f"   trial {t.index:>2} {t.spec.label():<42} p50 {t.p50_ms:8.3f} ms  user/sqnr "
              f"{'—' if value is None else f'{value:.4f}'}  {'meets' if t.met else 'misses'} {t.note}", flush=True)

    r = tune(m, Dataset.from_iterable(feeds(name, 64, seed=0, lazy=True)), evaluator, budget,
             run_dir=work / f"{name}.run", threads=(1, 2), methods=("auto",), runtimes=("ort", "openvino"),
             on_trial=shown,
             output=work / f"{name}.tuned", latency_s=1.0)
    tune_s = time.perf_counter() - t0
    print(f"   chose {r.chosen.spec.label()} in {tune_s:.0f} s, {len(r.trials)} trials", flush=True)
    paths = {"fp32": src, "fp32-openvino": src, "infertune-tune": work / f"{name}.tuned" / "model.onnx"}
    runtimes = {"fp32-openvino": "openvino", "infertune-tune": r.chosen.spec.backend}
    options = {"infertune-tune": dict(r.chosen.spec.options)}  # compiled as tune chose (e.g. bf16 on OpenVINO)
    rows: dict[str, dict] = {"fp32": {"variant": "fp32"}, "fp32-openvino": {"variant": "fp32-openvino"},
                             "infertune-tune": {
        "variant": "infertune-tune", "chosen": r.chosen.spec.label(), "runtime": r.chosen.spec.backend,
        "trials": len(r.trials), "tune_seconds": tune_s, "excluded": list(r.chosen.spec.exclude),
        "recorded_p50_ms": r.p50(r.chosen), "recorded_threads": r.chosen.spec.threads}}
    rows["infertune-tune"]["recorded_fp32"] = recorded_fp32(r)
    prepared_rows(m, name, work, paths, runtimes, rows)
    bf16 = bf16_options("openvino")
    if bf16:  # what OpenVINO runs an FP32 file in by default on a CPU with bf16 hardware
        paths["openvino-bf16"], runtimes["openvino-bf16"] = src, "openvino"
        options["openvino-bf16"], rows["openvino-bf16"] = bf16, {"variant": "openvino-bf16"}
    for q in peers:
        out = work / f"{name}-{q}.onnx"
        res = run_worker(name, q, 64, out)
        rows[q] = {"variant": q, **res}
        if "error" not in res:
            paths[q] = out
            if q == "nncf":  # NNCF's Q/DQ model is made for OpenVINO: measure it there too
                paths["nncf-openvino"], runtimes["nncf-openvino"] = out, "openvino"
                rows["nncf-openvino"] = {"variant": "nncf-openvino", **res}
        print(f"   {q}: {res}", flush=True)
    if name == "digits":
        with np.load(ROOT / "examples" / "digits" / "test.npz") as z:
            data = [{"image": z["image"][i:i + 1]} for i in range(180, 360)]
            check_labels = z["label"][180:360]
    else:
        # held-out lines from several seeds: rec's difficulty differs by seed (k=2 OpenVINO variant: 96.7% of
        # 600 seed-2 lines, 99.5% of 600 seed-4 lines), so one seed's 200 lines say little at a 97% budget
        data = [f for seed in CHECK_SEEDS for f in feeds(name, CHECK_N[name] // len(CHECK_SEEDS), seed=seed)]
        check_labels = None
    ref = outputs(src, data)
    for k, p in list(paths.items()):
        try:
            rows[k].update(fidelity(name, ref, outputs(p, data, runtimes.get(k, "ort"), options=options.get(k)), data,
                                    check_labels))
        except Exception as e:  # noqa: BLE001 - a model ORT cannot run is a result too
            rows[k]["error"] = f"does not run: {str(e).splitlines()[0][:200]}"
            paths.pop(k)
    if name == "digits":
        base = rows["fp32"]["top1"]
        for row in rows.values():
            if "top1" in row:
                row["top1_drop"] = base - row["top1"]
    for k, lat in isolated_latencies(paths, data[0], runtimes, rounds=ROUNDS, options=options).items():
        rows[k].update(lat)
    for row in rows.values():
        row["meets_budget"] = meets(name, row) and "error" not in row
    return {"model": name, "budget": BUDGET_TEXT[name], "measured_utc": started, "tune": r.to_dict(),
            "rows": list(rows.values())}


def isolated_latencies(paths: dict[str, Path], feed: dict, runtimes: dict[str, str], rounds: int,
                       options: dict[str, dict] | None = None) -> dict[str, dict]:
    """p50 per variant at 1 and 2 threads, each variant in its own process, alternated, median of rounds;
    ``options``: a variant's runtime options."""
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    out: dict[str, dict] = {k: {} for k in paths}
    for threads in (1, 2):
        settings = backends.Settings(intra_op_threads=threads, static_shapes=shapes)
        variants = [Variant(k, Path(p), runtimes.get(k, "ort"), replace(settings, options=(options or {}).get(k, {})))
                    for k, p in paths.items()]
        for k, lat in time_isolated(variants, feed, rounds=rounds, seconds=WINDOW_S).items():
            out[k][f"p50_ms_{threads}t"] = lat.p50_ms
            out[k][f"spread_{threads}t"] = lat.spread
    return out


def markdown(results: list[dict], env: dict) -> str:
    lines = ["# tune vs peers, each under its budget", "",
             machine_line(env, "tune.py") + " Fidelity on held-out inputs "
             "tune never saw; latency p50 of one input, each variant in its own process, alternated, median of "
             f"{ROUNDS} rounds of {WINDOW_S:.2g} s (spread: interquartile range of the rounds / median).", "",
             "| model | tune wall time s | trials | chosen | measured (UTC) |", "|---|---|---|---|---|"]
    for res in results:
        tr = next(r for r in res["rows"] if r["variant"] == "infertune-tune")
        lines.append(f"| {res['model']} | {tr['tune_seconds']:.0f} | {tr['trials']} | {tr['chosen']} | "
                     f"{res.get('measured_utc', '')} |")
    lines.append("")
    for res in results:
        lines += [f"## {res['model']} (budget: {res['budget']})", "",
                  "| variant | p50 ms 1 thread | p50 ms 2 threads | fidelity | meets budget |", "|---|---|---|---|---|"]
        for row in res["rows"]:
            if "error" in row:
                lines.append(f"| {row['variant']} | — | — | {row['error'][:80]} | no |")
                continue
            fid = (f"top-1 {row['top1']:.2f}% (drop {row['top1_drop']:.2f})" if "top1" in row else
                   f"text identical {row['text_agree']:.1f}%, cosine {row['cosine']:.4f}" if "text_agree" in row else
                   f"box F1 {row['box_f1']:.4f} ({row['fp32_boxes']} FP32 boxes)" if "box_f1" in row else
                   f"embedding cosine {row['embedding_cosine_mean']:.4f} / min {row['embedding_cosine_min']:.4f}")
            lines.append(f"| {row['variant']} | {row['p50_ms_1t']:.3f} | {row['p50_ms_2t']:.3f} | {fid} | "
                         f"{'yes' if row['meets_budget'] else 'no'} |")
        t = res["tune"]
        tr = next(r for r in res["rows"] if r["variant"] == "infertune-tune")
        lines += ["", f"tune chose **{t['chosen']['label']}** after {len(t['trials'])} trials "
                      f"({tr['tune_seconds']:.0f} s); stopped: {t['stopped']}.", ""]
        lines += [f"- {d}" for d in t["decisions"]]
        lines += ["", verdict(res), ""]
    return "\n".join(lines) + "\n"


def tie_margin(a: dict, b: dict, th: str) -> float:
    """How far apart two p50s must be to rank them: the larger rounds' spread, at least NOISE."""
    return max(a.get(f"spread_{th}", 0), b.get(f"spread_{th}", 0), NOISE)


def drift(ours: dict, rows: dict, measured: float) -> str:
    """Recorded vs re-measured once the machine's drift is taken out: the recorded speed-up over the FP32
    finalist timed beside the choice in tune's runoff, against the same ratio re-measured here. Between the two
    measurements the machine itself changes speed (that FP32 file, unchanged, moves too), which no timing
    method removes; a bias of tune's own timing would show here. '' without an FP32 finalist."""
    fp = ours.get("recorded_fp32")
    fp_now = rows.get(fp["variant"], {}).get(f"p50_ms_{fp['threads']}t") if fp else None
    if not fp_now:
        return ""
    then, now = fp["p50_ms"] / ours["recorded_p50_ms"], fp_now / measured
    gap = now / then - 1  # recorded latency scaled by the FP32 file's drift, vs re-measured
    return (f"taking out the machine's drift ({fp['variant']}, timed beside it in the runoff, read "
            f"{fp['p50_ms']:.3f} ms then and {fp_now:.3f} ms now, {fp['p50_ms'] / fp_now - 1:+.0%}): speed-up over it "
            f"recorded {then:.2f}x vs re-measured {now:.2f}x, recorded latency {gap:+.0%} of re-measured"
            f"{', within 10%' if abs(gap) <= 0.10 else ', NOT within 10%'}")


def verdict(res: dict) -> str:
    rows = {r["variant"]: r for r in res["rows"]}
    ours = rows["infertune-tune"]
    if "error" in ours or not ours["meets_budget"]:
        return "**Target NOT met**: tune's choice does not meet the budget on the held-out check."
    peers = [r for k, r in rows.items() if k != "infertune-tune" and r.get("meets_budget")]
    out = []
    if ours.get("chosen", "").startswith("FP32"):
        out.append(f"tune returned the FP32 model itself, run on {ours.get('runtime', 'ort')} (rows of the same "
                   "model and runtime differ only by measurement noise)")
    threads = ours.get("recorded_threads")
    measured = ours.get(f"p50_ms_{threads}t")
    if measured and ours.get("recorded_p50_ms"):
        gap = ours["recorded_p50_ms"] / measured - 1
        corrected = drift(ours, rows, measured)
        out.append(f"recorded {ours['recorded_p50_ms']:.3f} ms vs re-measured {measured:.3f} ms at {threads} "
                   f"thread(s) ({gap:+.0%}{', within 10%' if abs(gap) <= 0.10 else ', NOT within 10%'})"
                   + (f"; {corrected}" if corrected else ""))
    for th in ("1t", "2t"):
        key = f"p50_ms_{th}"
        best = min((r for k, r in rows.items() if k.startswith("fp32") and key in r), key=lambda r: r[key])
        ahead = [(r["variant"], r[key]) for r in peers if not r["variant"].startswith("fp32") and r[key] < ours[key]]
        faster = [v for v, p in ahead if p < ours[key] * (1 - tie_margin(ours, rows[v], th))]
        tied = [v for v, p in ahead if v not in faster]
        fp32_note = ("" if ours[key] <= best[key] else " (within the rounds' spread)"
                     if ours[key] * (1 - tie_margin(ours, best, th)) <= best[key] else " (SLOWER than the best FP32)")
        out.append(f"{th}: {ours[key]:.3f} ms vs the best FP32 ({best['variant']}) {best[key]:.3f} ms "
                   f"({best[key] / ours[key]:.2f}x){fp32_note}; "
                   + (f"slower than {', '.join(faster)}" if faster else "faster than every peer that meets the budget"
                      + (f" (ties within the rounds' spread: {', '.join(tied)})" if tied else "")))
    return "**Result**: " + "; ".join(out) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,rec,minilm,yolo")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: a quarter of the evaluation and held-out inputs, 4 timing rounds")
    ap.add_argument("--merge", action="store_true",
                    help="keep the committed results of the models not run now (same machine kind only)")
    args = ap.parse_args()
    if args.quick:
        global ROUNDS
        ROUNDS = 4
        for n in (EVAL_N, CHECK_N):
            n.update({k: max(12, v // 4) for k, v in n.items()})
    env = environment()
    kept = merged_results(env, args.models.split(",")) if args.merge else []
    results = []
    with tempfile.TemporaryDirectory(prefix="infertune-tune-bench-") as d:
        for name in args.models.split(","):
            results.append(run(name, [p for p in args.peers.split(",") if p], Path(d)))
            # saved after every model: a run cut short still leaves each finished model's numbers
            everything = sorted(kept + results, key=lambda res: ORDER.index(res["model"]))
            save_results("tune", {"environment": env, "results": everything}, markdown(everything, env))


ORDER = ["digits", "rec", "minilm", "yolo"]


def merged_results(env: dict, rerun: list[str]) -> list[dict]:
    """The committed results of models not re-run, refused unless measured on this machine's kind."""
    return [res for res in committed_here("tune", env)["results"] if res["model"] not in rerun]


if __name__ == "__main__":
    main()
