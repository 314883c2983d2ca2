"""Output-aware activation range refinement: the few activation ranges that cost the model's outputs
most, rescaled by the error they cause there, not in the tensor itself.

Per-tensor range methods (minmax, percentile, entropy, MSE) each judge a tensor on its own values. A
tensor whose tail matters little downstream but stretches the step for everything else is judged
wrong by all of them: YOLOv8n's second SiLU output reaches 259 against a 99.99th percentile of 105,
its MSE range ends at 135, and the model's outputs (and its box F1) are best with that range at about
half of it (scratch measurements in the commit adding this module).

On the first ``range_samples`` calibration feeds, with every Q/DQ of the plan in place (round-to-
nearest weights), the output error is the mean over float outputs of sum((q - f)^2) / sum((f - mean f)^2)
against the FP32 model. Positions a sequence model's attention mask marks as padding are left out (a 2-D
input named ``*mask*``, [batch, sequence], and the outputs whose first two dims are that shape): nothing
downstream reads them, and on all-MiniLM-L6-v2 their squared error was 37x the tokens', so refining for
them made the tokens' 4x worse (scratch, OpenVINO, 64 held-out sentences).

The Q/DQ model is emulated on ONNX Runtime with each activation's scale a graph input and a per-tensor
switch (``x + on * (DQ(Q(x)) - x)``), so one session serves every measurement:

1. each activation's share, in graph order until half the time budget is spent: the output error with
   that one tensor's Q/DQ switched off;
2. for the ``range_tensors`` largest shares, in order, greedily: the range scaled by each of
   ``range_fractions`` (zero point kept: a scaled scale is the range scaled about zero), then by the
   best of them x (1 -/+ ``FINER``), kept where the output error drops by at least ``MARGIN``.

The result is each refined tensor's factor; ``quantize`` records the scaled ranges in the recipe's
tensors, so ``rebuild`` needs nothing from this step (``replay`` changes nothing).
"""

from __future__ import annotations

import dataclasses
from itertools import islice

import numpy as np
import onnx
from onnx import TensorProto, helper

from infertune import backends
from infertune.data import validated
from infertune.errors import CalibrationError
from infertune.model import Model
from infertune.quant.algorithms.base import Context, Step
from infertune.quant.algorithms.range_split import is_part
from infertune.quant.qdq import write_qdq

NAME = "range_refinement"
STAGE = "ranges"
MARGIN = 0.02  # a rescaled range is kept when it lowers the output error by at least this fraction
FINER = 0.1  # after the grid, the best factor x (1 -/+ this) is tried too
QUANTIZE_SUFFIX = "_QuantizeLinear"


class Emulation:
    """The Q/DQ model of ``ctx.plan`` on ONNX Runtime, each activation's scale and on/off switch fed."""

    def __init__(self, ctx: Context) -> None:
        qmodel = write_qdq(ctx.model, ctx.plan, ctx.qparams, weight_reduce_range=ctx.reduce_range,
                           weight_values=ctx.weights)
        proto = qmodel.proto
        g = proto.graph
        inits = {i.name: i for i in g.initializer}
        self.scale_inputs: dict[str, str] = {}  # activation tensor -> its scale's input name
        self.switches: dict[str, str] = {}  # activation tensor -> its on/off input name
        self.scales: dict[str, np.ndarray] = {}
        blends: dict[str, list[onnx.NodeProto]] = {}
        dq_of = {n.input[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
        for q in [n for n in g.node if n.op_type == "QuantizeLinear" and n.name.endswith(QUANTIZE_SUFFIX)]:
            t = ctx.plan.shared.get(q.name[: -len(QUANTIZE_SUFFIX)], q.name[: -len(QUANTIZE_SUFFIX)])
            scale = q.input[1]
            if t not in self.scale_inputs and scale in inits:
                self.scales[t] = onnx.numpy_helper.to_array(inits[scale]).astype(np.float32)
                g.initializer.remove(inits.pop(scale))
                g.input.append(helper.make_tensor_value_info(scale, TensorProto.FLOAT, []))
                switch = f"{scale}_on"
                g.input.append(helper.make_tensor_value_info(switch, TensorProto.FLOAT, []))
                self.scale_inputs[t], self.switches[t] = scale, switch
            if t not in self.switches:
                continue
            dq = dq_of[q.output[0]]
            out, raw = dq.output[0], f"{dq.output[0]}_emulated"
            dq.output[0] = raw
            x, sw = q.input[0], self.switches[t]
            blends[dq.name] = [helper.make_node("Sub", [raw, x], [f"{raw}_error"]),
                               helper.make_node("Mul", [f"{raw}_error", sw], [f"{raw}_switched"]),
                               helper.make_node("Add", [x, f"{raw}_switched"], [out])]
        ordered = []
        for n in g.node:
            ordered.append(n)
            ordered.extend(blends.get(n.name, []))
        del g.node[:]
        g.node.extend(ordered)
        # basic: constant folding only. From 'extended' on, ONNX Runtime 1.32 fuses a weight DQ + MatMul into
        # MatMulNBits, which quantizes the activations its own way: 1% off the written Q/DQ model in a test
        settings = dataclasses.replace(ctx.settings or backends.Settings(), graph_optimization="basic")
        self.runner = backends.compile(Model.from_proto(proto), settings)

    def outputs(self, feed: dict, factors: dict[str, float], off: str | None = None) -> list[np.ndarray]:
        params = {}
        for t, scale in self.scales.items():
            params[self.scale_inputs[t]] = np.asarray(scale * np.float32(factors.get(t, 1.0)), np.float32)
            params[self.switches[t]] = np.asarray(0.0 if t == off else 1.0, np.float32)
        return _floats(self.runner.run({**feed, **params}))


def apply(ctx: Context) -> Step:
    if ctx.data is None or ctx.plan is None:
        raise CalibrationError("range refinement needs calibration data and a placement plan")
    opts = ctx.options
    start = opts.clock()
    feeds = list(islice(validated(ctx.model, ctx.data), opts.range_samples))  # NaN/Inf feeds skipped
    if not feeds:
        raise CalibrationError("range refinement: no calibration feed without NaN/Inf to measure outputs on")
    masks = [_padding_mask(f) for f in feeds]
    reference = backends.compile(ctx.model, ctx.settings)
    refs = [_kept(_floats(reference.run(f)), m) for f, m in zip(feeds, masks, strict=True)]
    norms = _norms(refs)
    emulation = Emulation(ctx)

    def error(factors: dict[str, float], off: str | None = None) -> float:
        return _error(refs, [_kept(emulation.outputs(f, factors, off), m) for f, m in zip(feeds, masks, strict=True)],
                      norms)

    factors: dict[str, float] = {}
    before = error(factors)
    shares: dict[str, float] = {}
    # in graph order: when the time budget stops the ranking, what is left unranked is the end of the model,
    # whose ranges feed fewer layers (not an alphabetical accident)
    tensors = [t for t in emulation.scales if not is_part(t)]  # a split's parts meet at its threshold
    for i, t in enumerate(tensors):
        if opts.clock() - start > opts.range_seconds / 2:
            break
        shares[t] = (before - error(factors, off=t)) / before if before > 0 else 0.0
        ctx.progress(NAME, i + 1, len(tensors) + opts.range_tensors)
    chosen = [t for t in sorted(shares, key=shares.get, reverse=True) if shares[t] > 0][: opts.range_tensors]
    entries: dict[str, dict] = {}
    current = before
    for i, t in enumerate(chosen):
        if opts.clock() - start > opts.range_seconds:
            entries[t] = {"share": round(shares[t], 4), "kept": "the time budget was spent"}
            continue
        tried = {f: error({**factors, t: f}) for f in opts.range_fractions}
        f = min(tried, key=tried.get)
        for g in (f * (1 - FINER), f * (1 + FINER)):  # between the grid's steps around the best
            tried[round(g, 4)] = error({**factors, t: round(g, 4)})
        f = min(tried, key=tried.get)
        kept = tried[f] <= current * (1 - MARGIN)
        if kept:
            factors[t], current = f, tried[f]
        entries[t] = {"share": round(shares[t], 4), "factor": f if kept else 1.0,
                      "errors": {f"{k:g}": round(v, 8) for k, v in tried.items()}}
        ctx.progress(NAME, len(tensors) + i + 1, len(tensors) + opts.range_tensors)
    record = {"name": NAME, "samples": len(feeds), "padding_masked": masks[0] is not None,
              "ranked": len(shares), "tensors": len(tensors),
              "error_before": before, "error_after": current, "refined": entries,
              "factors": dict(factors)}
    return replay(ctx, record)


def replay(ctx: Context, record: dict) -> Step:
    """Nothing to redo: ``quantize`` wrote the refined ranges into the recipe's tensors, which ``rebuild`` reads."""
    return Step(ctx.model, record)


def _padding_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """The positions a sequence model reads ([batch, sequence], True where the attention mask is non-zero),
    or None when no 2-D input is named like a mask."""
    masks = [v for k, v in feed.items() if "mask" in k.lower() and np.ndim(v) == 2]
    return np.asarray(masks[0]) != 0 if len(masks) == 1 else None


def _kept(outputs: list[np.ndarray], mask: np.ndarray | None) -> list[np.ndarray]:
    """Each output without the padding positions (outputs shaped [batch, sequence, ...] like the mask)."""
    if mask is None:
        return outputs
    return [o[mask] if o.shape[:2] == mask.shape else o for o in outputs]


def _floats(outputs) -> list[np.ndarray]:
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return [np.asarray(v, np.float64) for v in values if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _norms(refs: list[list[np.ndarray]]) -> list[float]:
    """Per float output: the sum of squared deviations from its mean over every sample (1 where constant)."""
    norms = []
    for k in range(len(refs[0])):
        values = np.concatenate([r[k].ravel() for r in refs])
        total = float(np.sum((values - values.mean()) ** 2))
        norms.append(total if total > 0 else 1.0)
    return norms


def _error(refs: list[list[np.ndarray]], outs: list[list[np.ndarray]], norms: list[float]) -> float:
    if not norms:
        return 0.0
    sums = [sum(float(np.sum((o[k] - r[k]) ** 2)) for r, o in zip(refs, outs, strict=True))
            for k in range(len(norms))]
    return float(np.mean([s / n for s, n in zip(sums, norms, strict=True)]))
