"""Accuracy algorithms: composable steps of ``quantize`` that recover INT8 accuracy without
keeping nodes in float (one module each; their shared interface is in ``base``).

- ``cle``: cross-layer equalisation of Conv/Gemm/MatMul pairs (FP32 outputs unchanged);
- ``smoothquant``: per-channel activation outliers of MatMul/Gemm and convolution inputs
  moved into the weights, alpha chosen per layer by measured error (FP32 outputs unchanged);
- ``range_split``: the heaviest-tailed activation quantized as two int8 parts (min(x, T), relu(x - T)), its
  readers duplicated (FP32 outputs unchanged);
- ``range_refinement``: the activation ranges that cost the outputs most, rescaled by the output error;
- ``adaround``: learned weight rounding, layer by layer, on sampled activations, within a time budget;
- ``bias_correction``: each quantized layer's bias minus the mean output shift quantization causes.

Activation ranges are calibrated after ``cle`` and ``smoothquant`` have rewritten the model, so
the ranges (any method, ``auto`` / MSE included) are those of the model that gets quantized.
Every step is recorded (``Recipe.algorithms``) and replayed by ``rebuild`` without data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from infertune.model import Model
from infertune.quant.algorithms import adaround, bias_correction, cle, range_refinement, range_split, smoothquant
from infertune.quant.algorithms.base import (
    ALGORITHMS,
    DESCRIPTIONS,
    STAGES,
    Algorithm,
    AlgorithmOptions,
    Context,
    Step,
    blas_threads,
    check_algorithms,
)

MODULES = {"cle": cle, "range_split": range_split, "smoothquant": smoothquant, "range_refinement": range_refinement,
           "adaround": adaround, "bias_correction": bias_correction}
# tune's steps, cheapest first; each step's alternatives are tried in order and the best is kept.
# Bias correction comes alone first on convnets: on rapidocr's recognition model it recovered most of
# what full INT8 lost where adding equalisation lost accuracy again (benchmarks/algorithms.py).
# Split-range activations next: on YOLOv8n, whose second SiLU output has a long tail, full INT8 + bias
# correction went from box F1 0.936 to 0.965 with it on OpenVINO (benchmarks/results/algorithms.md, 1000
# held-out mosaics), at the price of the one 1x1 convolution it duplicates.
# SmoothQuant on top of the split next: on YOLOv8n (OpenVINO, + bias correction, benchmarks/results/algorithms.md,
# 1000 held-out mosaics) 0.9693 against 0.9654 for the split alone and 0.9522 for SmoothQuant alone.
# SmoothQuant alone next: convnets with SiLU / HardSwish activations (YOLO, PP-OCR) have no pair equalisation
# can scale through, while SmoothQuant's explicit Mul reaches their convolutions' inputs.
CONVNET_CHEAP: list[tuple[Algorithm, ...]] = [("bias_correction",), ("range_split", "bias_correction"),
                                              ("range_split", "smoothquant", "bias_correction"),
                                              ("smoothquant", "bias_correction"), ("cle", "bias_correction")]
TRANSFORMER_CHEAP: list[tuple[Algorithm, ...]] = [("smoothquant",), ("smoothquant", "bias_correction")]
# Output-aware range refinement is not on the ladder. On YOLOv8n (scratch: benchmarks/tune.py on the
# Xeon, stopped after OpenVINO's search, not committed) it lifted full INT8 from box F1 0.937 to 0.950
# (with SmoothQuant + bias correction), so the ladder kept it, and the bisection then needed 22
# convolutions in float where it had needed 16 without it (0.78x instead of 0.69x FP32's time): it
# recovers what keeping the sensitive convolutions float recovers too, and a better full INT8 is not a
# better start for the float fallback. It stays a step of quantize. Checked again on inputs on the 1/255
# grid (scratch, same benchmark setup): full INT8 0.944 with it, 0.943 with SmoothQuant + bias correction,
# 0.947 with learned rounding on top; its bisection kept 24 convolutions float (22 after pruning, when the
# run was stopped) against 20 (18) without it (benchmarks/results/tune.md as of 39d2ec8).
EXPENSIVE: list[tuple[Algorithm, ...]] = [("adaround",)]
# Algorithms tune keeps only when they meet the budget at full INT8, never as the start of what follows: a
# split activation's gain is gone once its readers are float, and its duplicated readers then cost twice in
# float. On YOLOv8n without BF16 (scratch, the tune benchmark's data, OpenVINO, 2 threads) the float fallback
# from range_split + bias correction (box F1 0.955 at full INT8 against 0.926 without the split) kept 22
# convolutions float at 6.25 ms against FP32's 7.93 (0.79x), where the committed run as of 39d2ec8, without it,
# had kept 18 (0.70x).
MEETS_ONLY: frozenset[Algorithm] = frozenset({"range_split"})


def run(ctx: Context, names: Sequence[str], stage: str) -> tuple[Context, list[dict]]:
    """Apply the algorithms of ``names`` that belong to ``stage``; the context carries the result."""
    records = []
    for name in check_algorithms(names):
        if STAGES[name] != stage:
            continue
        start = ctx.options.clock()
        with blas_threads(ctx.options.blas_threads):
            step = MODULES[name].apply(ctx)
        step.record["seconds"] = round(ctx.options.clock() - start, 3)
        ctx = ctx.with_model(step.model)
        ctx.weights = {**ctx.weights, **step.weights}
        records.append(step.record)
    return ctx, records


def replay(ctx: Context, records: Sequence[dict], stage: str) -> Context:
    """The recorded steps of ``stage`` applied again, in their order, without data."""
    for record in records:
        name = record.get("name")
        if name not in MODULES:
            from infertune.errors import UsageError

            raise UsageError(f"the recipe names an unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
        if STAGES[name] != stage:
            continue
        step = MODULES[name].replay(ctx, record)
        ctx = ctx.with_model(step.model)
        ctx.weights = {**ctx.weights, **step.weights}
    return ctx


def model_family(model: Model) -> str:
    """'transformer' when MatMul/Gemm layers with constant weights outnumber convolutions (or the
    graph normalises layers the transformer way), else 'convnet': read from the graph, not the name."""
    consts = set(model.constant_tensors())
    ops = model.op_histogram()
    convs = ops.get("Conv", 0) + ops.get("ConvTranspose", 0)
    dense = sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
                and n.input[1] in consts)
    if dense > convs or (dense and ops.get("LayerNormalization", 0) > convs):
        return "transformer"
    return "convnet"


def ladder(family: str) -> list[list[tuple[Algorithm, ...]]]:
    """What tune tries when full INT8 misses the budget, step by step: the cheap algorithms for the
    family (alternatives, in order), then learned rounding on top of the best so far."""
    return [CONVNET_CHEAP if family == "convnet" else TRANSFORMER_CHEAP, EXPENSIVE]


def summarize(record: dict) -> dict:
    """One algorithm's record without its bulky data: what it did, in numbers, and its time."""
    name = record.get("name", "?")
    out: dict = {"name": name, "seconds": record.get("seconds")}
    if name == "cle":
        ratios = [max(e["scales"]) / min(e["scales"]) for e in record["pairs"] if e["scales"] and min(e["scales"]) > 0]
        out.update(pairs=len(record["pairs"]), rounds=record.get("rounds"),
                   max_scale_ratio=round(max(ratios), 3) if ratios else None)
    elif name == "smoothquant":
        out.update(groups=len(record["groups"]), skipped=len(record.get("skipped", {})),
                   alphas=dict(Counter(f"{g['alpha']:g}" for g in record["groups"])),
                   folded_into=dict(Counter(g.get("fold", "?").split(" ")[0] for g in record["groups"])))
    elif name == "range_split":
        out.update(candidates=record["candidates"], split={e["tensor"]: {
            "threshold": round(e["threshold"], 4), "noise": [round(e["one"], 8), round(e["split"], 8)]}
            for e in record["splits"]})
    elif name == "range_refinement":
        out.update(refined=len(record["factors"]), ranked=record["ranked"], tensors=record["tensors"],
                   output_error=[round(record["error_before"], 8), round(record["error_after"], 8)])
    elif name == "adaround":
        layers = record["layers"].values()
        out.update(layers=len(record["layers"]), learned=sum("flips" in e for e in layers),
                   iterations=sum(e.get("iterations", 0) for e in layers),
                   flipped=sum(e.get("flipped", 0) for e in layers))
    elif name == "bias_correction":
        out.update(corrected=len(record["corrections"]), skipped=len(record.get("skipped", {})),
                   max_abs_shift=round(record.get("max_abs_shift") or 0.0, 5))
    return out


def describe(names: Sequence[str]) -> str:
    return " + ".join(DESCRIPTIONS[n] for n in check_algorithms(names)) or "none"


__all__ = ["ALGORITHMS", "MEETS_ONLY", "AlgorithmOptions", "Context", "Step", "check_algorithms", "describe",
           "ladder", "model_family", "replay", "run", "summarize"]
