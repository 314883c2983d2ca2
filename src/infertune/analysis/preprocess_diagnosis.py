"""Is it the model or the preprocessing? Find the single transform that explains a mismatch.

Given raw images, the preprocessing in use, and what the outputs should be (reference outputs, or
a reference spec to produce them), every single-transform variant of the spec in use is run:
channel order (the images arrive BGR / RGB), scale (missing or extra /255), normalisation
(mean/std dropped, or ImageNet's added), layout (NCHW / NHWC), resize interpolation, and dtype.
The variant whose outputs match the reference names the mismatch; a variant that merely gets
closer is reported as such. When nothing explains it, the preprocessing is not the cause.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from infertune import backends
from infertune.analysis.metrics import ErrorAccumulator, sqnr_db
from infertune.data import check_array
from infertune.errors import DataError, InfertuneError, UsageError
from infertune.model import Model
from infertune.preprocess import INTERPOLATIONS, LAYOUTS, PreprocessSpec

MATCH_DB = 50.0  # outputs this close are the same pipeline up to float rounding
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Variant:
    transform: str  # channel order | scale | normalisation | layout | interpolation | dtype
    description: str
    spec: PreprocessSpec
    flip_channels: bool = False  # the images arrive in the other channel order


@dataclass(frozen=True)
class Trial:
    variant: Variant | None  # None: the spec as given
    sqnr_db: float | None  # vs the reference outputs; None when the model rejects the input
    cosine: float | None
    error: str | None = None

    def to_dict(self) -> dict:
        v = self.variant
        return {"transform": v.transform if v else "as given", "description": v.description if v else "",
                "sqnr_db": _finite(self.sqnr_db), "cosine": self.cosine, "error": self.error}


@dataclass
class Diagnosis:
    baseline: Trial
    trials: list[Trial]  # best first
    finding: str
    explained_by: str | None  # the transform, when one variant matches
    backend: str = "ort"

    def to_dict(self) -> dict:
        return {"kind": "diagnose-preprocess", "backend": self.backend, "finding": self.finding,
                "explained_by": self.explained_by, "baseline": self.baseline.to_dict(),
                "trials": [t.to_dict() for t in self.trials]}


def variants(spec: PreprocessSpec, input_dtype: str | None = None) -> list[Variant]:
    """Every single-transform change of ``spec`` worth trying."""
    out = []
    if spec.color != "GRAY":
        other = "BGR" if spec.color == "RGB" else "RGB"
        out.append(Variant("channel order", f"the images are {other}, not {spec.color}", spec, flip_channels=True))
    else:
        out.append(Variant("channel order", "the images arrive BGR before the grey conversion", spec, True))
    out.append(Variant("scale", f"scale x255 ({spec.scale:g} -> {spec.scale * 255:g}: the /255 is extra)",
                       replace(spec, scale=spec.scale * 255)))
    out.append(Variant("scale", f"scale /255 ({spec.scale:g} -> {spec.scale / 255:g}: the /255 is missing)",
                       replace(spec, scale=spec.scale / 255)))
    normalised = spec.mean != (0.0,) or spec.std != (1.0,)
    if normalised:
        out.append(Variant("normalisation", "no mean/std normalisation", replace(spec, mean=(0.0,), std=(1.0,))))
    if spec.color != "GRAY" and (spec.mean, spec.std) != (IMAGENET_MEAN, IMAGENET_STD):
        out.append(Variant("normalisation", "ImageNet mean/std", replace(spec, mean=IMAGENET_MEAN, std=IMAGENET_STD)))
    for layout in LAYOUTS:
        if layout != spec.layout:
            out.append(Variant("layout", f"layout {layout}, not {spec.layout}", replace(spec, layout=layout)))
    if spec.resize is not None:
        for interp in INTERPOLATIONS:
            if interp != spec.interpolation:
                out.append(Variant("interpolation", f"resize with {interp}, not {spec.interpolation}",
                                   replace(spec, interpolation=interp)))
    if input_dtype and input_dtype != spec.dtype and input_dtype in ("float32", "float16", "uint8", "int8"):
        out.append(Variant("dtype", f"dtype {input_dtype}, not {spec.dtype}", replace(spec, dtype=input_dtype)))
    return out


def diagnose(
    model: Model,
    images: Sequence[np.ndarray],
    spec: PreprocessSpec,
    *,
    reference_outputs: Sequence[dict[str, np.ndarray]] | None = None,
    reference_spec: PreprocessSpec | None = None,
    input_name: str | None = None,
    settings: backends.Settings | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    backend: str = "ort",
) -> Diagnosis:
    """Which single preprocessing transform explains the gap between ``spec`` and the reference?"""
    if (reference_outputs is None) == (reference_spec is None):
        raise UsageError("give either reference outputs or a reference preprocessing spec")
    if not images:
        raise DataError("no images to diagnose with")
    name = input_name or _single_input(model)
    info = model.input(name)
    runner = backends.compile(model, settings, backend=backend)

    def run(s: PreprocessSpec, flip: bool) -> list[dict[str, np.ndarray]]:
        outs = []
        for img in images:
            x = s.apply(img[:, :, ::-1] if flip and img.ndim == 3 else img)
            check_array(info, x)
            outs.append(runner.run({name: x}))
        return outs

    reference = list(reference_outputs) if reference_outputs is not None else run(reference_spec, False)
    if len(reference) != len(images):
        raise DataError(f"{len(reference)} reference outputs for {len(images)} images")

    def trial(v: Variant | None) -> Trial:
        s, flip = (spec, False) if v is None else (v.spec, v.flip_channels)
        try:
            outs = run(s, flip)
        except InfertuneError as e:
            return Trial(v, None, None, str(e))
        acc = ErrorAccumulator(atol=0.0, rtol=0.0)
        for r, o in zip(reference, outs, strict=True):
            for k in r:
                acc.add(np.asarray(r[k], np.float32), np.asarray(o[k], np.float32), name=k)
        return Trial(v, sqnr_db(acc.sum_sq_ref, acc.sum_sq_err), acc.metrics()["cosine"])

    baseline = trial(None)
    if baseline.sqnr_db is not None and baseline.sqnr_db >= MATCH_DB:
        return Diagnosis(baseline, [], "no preprocessing mismatch: the outputs match the reference", None, backend)
    candidates = variants(spec, info.dtype)
    trials = []
    for i, v in enumerate(candidates):
        trials.append(trial(v))
        if progress:
            progress(i + 1, len(candidates))
    trials.sort(key=lambda t: -(t.sqnr_db if t.sqnr_db is not None else -math.inf))
    best = trials[0] if trials else None
    if best is not None and best.sqnr_db is not None and best.sqnr_db >= MATCH_DB:
        finding = f"preprocessing mismatch: {best.variant.transform}: {best.variant.description}"
        return Diagnosis(baseline, trials, finding, best.variant.transform, backend)
    base = baseline.sqnr_db if baseline.sqnr_db is not None else -math.inf
    if best is not None and best.sqnr_db is not None and best.sqnr_db > base + 10:
        finding = (f"closest single change: {best.variant.description} ({best.sqnr_db:.1f} dB vs {_fmt(base)} dB as "
                   f"given), but it does not match: more than one transform differs")
        return Diagnosis(baseline, trials, finding, None, backend)
    finding = ("no single preprocessing change explains the mismatch: look at the model"
               + ("" if baseline.error is None else f" (as given the model rejects the input: {baseline.error})"))
    return Diagnosis(baseline, trials, finding, None, backend)


def _single_input(model: Model) -> str:
    names = [i.name for i in model.inputs]
    if len(names) != 1:
        raise UsageError(f"the model has {len(names)} inputs ({', '.join(names)}): name the image input")
    return names[0]


def _finite(v: float | None) -> float | None:
    return None if v is None or math.isinf(v) or math.isnan(v) else round(v, 3)


def _fmt(v: float) -> str:
    return "-inf" if math.isinf(v) else f"{v:.1f}"
