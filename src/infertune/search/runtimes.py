"""Which runtimes tune searches, and what it tries on each beyond FP32.

- ``auto_runtimes``: what ``--runtimes auto`` means: ONNX Runtime; OpenVINO when installed; the GPU
  runtimes (``ort-cuda``, ``ort-tensorrt``, ``tensorrt``) only when the driver reports a usable
  GPU (``backends.cuda.usable_gpus``: onnxruntime-gpu lists its providers on machines without
  one) and their backend loads here;
- ``searchable``: a runtime tune can search has an INT8 placement or runs FP16;
- ``thread_counts``: CPU runtimes are timed at every thread count asked for; a GPU runtime once
  (its intra-op threads only feed the GPU);
- ``knob_options``: the runtime knobs tried on the fastest variant that met the budget on that
  runtime: CUDA graphs on GPU runtimes (``cuda_graph=1``). Engine and timing caches are not a
  knob: every trial on a GPU runtime gets the run's (``TrialRunner.settings``);
- ``bf16_options``: the options of a runtime's BF16 variant (its ``Runtime.bf16``) where its backend
  says the CPU computes bf16 in hardware, else none (OpenVINO offers bf16 only with that hardware).
"""

from __future__ import annotations

from collections.abc import Sequence

from infertune import backends
from infertune.backends import cuda
from infertune.errors import BackendUnavailable, UsageError

GPU_KNOBS: tuple[dict[str, str], ...] = ({"cuda_graph": "1"},)


def auto_runtimes(gpu: cuda.GpuState | None = None) -> list[str]:
    names = [r for r in ("ort", "openvino") if backends.available().get(r)]
    state = gpu if gpu is not None else cuda.usable_gpus()
    if not state.usable:
        return names
    for name in backends.names():
        entry = backends.runtime(name)
        if entry.gpu and (entry.placement or entry.fp16) and loads(name):
            names.append(name)
    return names


def loads(name: str) -> bool:
    """The backend imports here and says nothing stops it (``unavailable()`` when it has one)."""
    try:
        backend = backends.get_backend(name)
    except BackendUnavailable:
        return False
    reason = getattr(backend, "unavailable", None)
    return reason is None or reason() is None


def searchable(name: str) -> backends.Runtime:
    entry = backends.runtime(name)
    if not (entry.placement or entry.fp16):
        able = [n for n in backends.names() if backends.runtime(n).placement or backends.runtime(n).fp16]
        raise UsageError(f"tune cannot search {name} ({entry.display}): it has neither an INT8 placement nor FP16; "
                         f"it searches: {', '.join(able)}")
    return entry


def thread_counts(runtime: str, threads: Sequence[int]) -> list[int]:
    return list(threads[:1]) if backends.runtime(runtime).gpu else list(threads)


def bf16_options(runtime: str) -> dict[str, str]:
    entry = backends.runtime(runtime)
    if not entry.bf16 or not loads(runtime):
        return {}
    native = getattr(backends.get_backend(runtime), "native_bf16", None)
    return dict(entry.bf16) if native is not None and native() else {}


def knob_options(runtime: str) -> list[dict[str, str]]:
    return [dict(k) for k in GPU_KNOBS] if backends.runtime(runtime).gpu else []
