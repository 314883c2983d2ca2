"""INT8 on ONNX Runtime from an earlier release of infertune vs this checkout, on the same machine.

    .venv/bin/python benchmarks/versus_release.py [--rev 14faddc] [--models rec,minilm]

Issue 16 asks that rec's INT8 on ORT be "no slower than today" once graph preparation places the Q/DQ
in the prepared graph. "Today" is the release the issue was filed against (``--rev``, default 14faddc, the
last commit before that work). Both quantize with the same command, `infertune quantize MODEL --data
calib.npz -o OUT` (defaults: method auto, the ort-cpu placement), on the same 64 calibration samples (seed
0): the release from its source exported by `git archive` and run with this venv, this checkout from
src/. Then FP32, the release's INT8 and this checkout's INT8 are timed on ONNX Runtime at 1 and 2 threads,
each in its own process, alternated, median of 15 short rounds (perf.isolated), and their fidelity measured on
the held-out inputs of benchmarks/tune.py. Writes benchmarks/results/versus_release.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quantize import feeds, fidelity, model_path, outputs  # noqa: E402
from benchmarks.results_io import machine_line, run_models  # noqa: E402
from benchmarks.tune import ROUNDS, WINDOW_S  # noqa: E402  the tune benchmark's timing protocol
from infertune import Model, backends  # noqa: E402
from infertune.perf.isolated import Variant, time_isolated  # noqa: E402


def export_release(rev: str, dest: Path) -> Path:
    """The release's src/ tree, exported from git (no checkout of this repository is touched)."""
    archive = dest / "release.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev, "src"], check=True)
    with tarfile.open(archive) as t:
        t.extractall(dest / "release", filter="data")
    return dest / "release" / "src"


def quantize_with(src_dir: Path, model: Path, calib: Path, out: Path) -> float:
    """`infertune quantize` from ``src_dir``'s package, in its own process; its wall time in seconds."""
    import time

    env = {**os.environ, "PYTHONPATH": str(src_dir)}
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "infertune", "quantize", str(model), "--data", str(calib), "-o", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=src_dir.parent)
    if p.returncode != 0:
        raise RuntimeError(f"quantize from {src_dir} failed: {p.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t


def calibration_file(name: str, path: Path) -> Path:
    data = feeds(name, 64, seed=0)
    np.savez(path, **{k: np.concatenate([f[k] for f in data]) for k in data[0]})
    return path


def run(name: str, rev: str, work: Path) -> dict:
    print(f"== {name}", flush=True)
    src = model_path(name)
    calib = calibration_file(name, work / f"{name}-calib.npz")
    release_src = work / "release" / "src"
    if not release_src.exists():
        export_release(rev, work)
    old, new = f"int8 release {rev}", "int8 this checkout"
    paths = {"fp32": src, old: work / f"{name}-release.onnx", new: work / f"{name}-head.onnx"}
    seconds = {old: quantize_with(release_src, src, calib, paths[old]),
               new: quantize_with(ROOT / "src", src, calib, paths[new])}
    data = [f for seed in (2, 3, 4) for f in feeds(name, {"rec": 600, "minilm": 128}[name] // 3, seed=seed)]
    ref = outputs(src, data)
    rows = {}
    for key, path in paths.items():
        proto = Model.load(path).proto
        ops = [n.op_type for n in proto.graph.node]
        rows[key] = {"variant": key, "quantize_seconds": seconds.get(key), "nodes": len(ops),
                     "quantize_linear": ops.count("QuantizeLinear"),
                     "batch_normalization": ops.count("BatchNormalization"),
                     **fidelity(name, ref, outputs(path, data), data, None)}
    shapes = {k: tuple(v.shape) for k, v in data[0].items()}
    for threads in (1, 2):
        settings = backends.Settings(intra_op_threads=threads, static_shapes=shapes)
        lat = time_isolated([Variant(k, Path(p), "ort", settings) for k, p in paths.items()], data[0],
                            rounds=ROUNDS, seconds=WINDOW_S)
        for key, v in lat.items():
            rows[key][f"p50_ms_{threads}t"] = v.p50_ms
            rows[key][f"spread_{threads}t"] = v.spread
    print(rows, flush=True)
    return {"model": name, "rows": list(rows.values())}


def table(results: list[dict], rev: str, env: dict) -> str:
    md = [f"# INT8 on ONNX Runtime: release {rev} vs this checkout", "",
          machine_line(env, "versus_release.py") + " Both INT8 models "
          "from `infertune quantize MODEL --data calib.npz` (64 samples); p50 of one input, each variant in its own "
          f"process, alternated, median of {ROUNDS} rounds (spread of the rounds in brackets).", ""]
    for res in results:
        fid = "text_agree" if res["model"] == "rec" else "embedding_cosine_mean"
        md += [f"## {res['model']}", "",
               "| variant | p50 ms 1 thread | p50 ms 2 threads | fidelity | nodes | QuantizeLinear "
               "| BatchNormalization | quantize s |", "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            q = "" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}"
            md.append(f"| {r['variant']} | {r['p50_ms_1t']:.2f} ({100 * r['spread_1t']:.0f}%) | {r['p50_ms_2t']:.2f} "
                      f"({100 * r['spread_2t']:.0f}%) | {fid} {r[fid]:.4g} | {r['nodes']} | {r['quantize_linear']} | "
                      f"{r['batch_normalization']} | {q} |")
        md.append("")
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="14faddc")
    ap.add_argument("--models", default="rec,minilm")
    args = ap.parse_args()
    run_models("versus_release", vars(args), args.models, lambda name, work: run(name, args.rev, work),
               lambda results, env: table(results, args.rev, env))


if __name__ == "__main__":
    main()
