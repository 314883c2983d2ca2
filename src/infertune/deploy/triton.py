"""Export a verified artifact as a Triton Inference Server model repository.

    REPO/NAME/config.pbtxt     backend, max_batch_size, inputs and outputs, dynamic batching,
                               instance groups, the ONNX Runtime backend's thread settings
    REPO/NAME/1/model.onnx     the artifact's model (its hash checked on the way)

GPU artifacts (``ort-cuda``, ``ort-tensorrt``, ``tensorrt``) are served by Triton's ONNX Runtime
backend on ``KIND_GPU`` instances; the TensorRT ones with its TensorRT accelerator (precision INT8
for a Q/DQ model, else FP16 or FP32 as tuned; the tuned workspace), so the engine is built for the
serving GPU rather than shipped for the tuning one.

Batching: when every input and output has a symbolic leading dim, Triton owns that dim
(``max_batch_size`` > 0, dims listed without it) and may batch requests dynamically; otherwise
``max_batch_size`` is 0 and the dims are given in full. Symbolic dims are -1.

Where it writes (``infertune.outputs``): ``REPO/NAME`` is created new, or is a previous export of
infertune (recognised by ``infertune-export.json``, which lists the sha256 of the files it wrote),
replaced only with ``force``. It is never the artifact, never holds it and never lies inside it.
A NAME derived from the artifact's directory that an export of another artifact already holds
(two names that sanitise alike, or two artifacts of one name) is refused: give ``name``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from infertune._io import default_mode, read_json, write_text
from infertune.backends import GPU_BACKENDS
from infertune.backends.gpu import GpuOptions, is_quantized
from infertune.deploy.artifact import load, sha256_file
from infertune.errors import UsageError
from infertune.model import TensorInfo
from infertune.outputs import Guard, Owned, discard_temp_dir, new_temp_dir, replace_dir

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
                "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
                "bool": "TYPE_BOOL", "string": "TYPE_STRING", "object": "TYPE_STRING"}
BACKENDS = {"ort": "onnxruntime", "openvino": "openvino", "ort-cuda": "onnxruntime", "ort-tensorrt": "onnxruntime",
            "tensorrt": "onnxruntime"}


def export_triton(artifact: str | os.PathLike[str], repo: str | os.PathLike[str], *, name: str | None = None,
                  max_batch_size: int = 8, instances: int | None = None, queue_delay_us: int = 100,
                  force: bool = False) -> Path:
    """Write ``repo/name`` (see the module docstring); returns the model directory."""
    a = load(artifact)
    runtime = a.manifest.get("backend", "ort")
    backend = BACKENDS.get(runtime)
    if backend is None:
        raise UsageError(f"no Triton backend for artifacts of backend {a.manifest.get('backend')!r}")
    if max_batch_size < 0 or queue_delay_us < 0 or (instances is not None and instances < 1):
        raise UsageError("max_batch_size and queue delay must be >= 0 and instances >= 1")
    derived = name is None
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", a.path.resolve().name)
    elif not NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"--name {name!r}: a Triton model name is letters, digits, '_', '.' and '-' only")
    what = "the Triton model directory"
    previous = export_record(Path(repo) / name)
    if derived and previous is not None and previous.get("source") != str(a.path.resolve()):
        raise UsageError(f"{Path(repo) / name} holds the export of another artifact ({previous.get('source')}) whose "
                         f"name gives the same model name {name!r}: give --name for this one")
    dest = Guard.of(a.path).directory(Path(repo) / name, EXPORT, force=force, what=what)
    config = config_pbtxt(name, a.model.inputs, a.model.outputs, backend=backend, settings=a.manifest["settings"],
                          max_batch_size=max_batch_size, instances=instances or _instances(a.manifest),
                          queue_delay_us=queue_delay_us, gpu=runtime in GPU_BACKENDS,
                          tensorrt=_tensorrt_accelerator(a) if runtime in ("ort-tensorrt", "tensorrt") else None)
    tmp = new_temp_dir(dest, what)
    try:
        (tmp / "1").mkdir(mode=default_mode(directory=True))
        shutil.copyfile(a.path / a.manifest["model"], tmp / "1" / "model.onnx")
        os.chmod(tmp / "1" / "model.onnx", default_mode())
        if sha256_file(tmp / "1" / "model.onnx") != a.manifest["files"][a.manifest["model"]]:
            raise UsageError(f"{a.path}: the model changed while it was being copied")
        write_text(tmp / "config.pbtxt", config)
        files = {rel: sha256_file(tmp / rel) for rel in ("config.pbtxt", "1/model.onnx")}
        write_text(tmp / EXPORT_RECORD, json.dumps({"kind": EXPORT_KIND, "schema_version": 1,
                                                    "source": str(a.path.resolve()),
                                                    "source_digest": a.manifest["digest"], "files": files}, indent=1))
        return replace_dir(tmp, dest, EXPORT, force=force, what=what)
    except BaseException:
        discard_temp_dir(tmp)
        raise


def export_record(model_dir: Path) -> dict | None:
    """The record of a previous infertune export in ``model_dir`` (None: there is none)."""
    try:
        record = read_json(model_dir / EXPORT_RECORD, "export record", UsageError, max_bytes=2**20, expect=dict)
    except UsageError:
        return None
    files = record.get("files")
    if record.get("kind") != EXPORT_KIND or not isinstance(files, dict) or not all(
            isinstance(f, str) and f and not f.startswith("/") and ".." not in Path(f).parts for f in files):
        return None
    return record


def _export_names(model_dir: Path) -> set[str] | None:
    record = export_record(model_dir)
    if record is None:
        return None
    names = {EXPORT_RECORD, *record["files"]}
    return names | {Path(f).parent.as_posix() for f in record["files"] if Path(f).parent != Path(".")}


EXPORT_RECORD = "infertune-export.json"
EXPORT_KIND = "infertune-triton-export"
EXPORT = Owned("an infertune Triton export", _export_names)
NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _tensorrt_accelerator(a) -> dict[str, str]:
    """Parameters of Triton's ONNX Runtime TensorRT accelerator, from what the artifact was tuned with."""
    options = GpuOptions.from_settings(a.settings)
    params = {"precision_mode": "INT8" if is_quantized(a.model) else "FP16" if options.fp16 else "FP32"}
    if options.workspace_mib:
        params["max_workspace_size_bytes"] = str(options.workspace_mib * 2**20)
    return params


def _instances(manifest: dict) -> int:
    """As many instances as fit the cores measured, given the threads each was tuned with."""
    threads = int(manifest["settings"].get("intra_op_threads") or 0)
    cores = int(manifest.get("target", {}).get("logical_cores") or 1)
    return max(1, cores // threads) if threads else 1


def config_pbtxt(name: str, inputs: list[TensorInfo], outputs: list[TensorInfo], *, backend: str, settings: dict,
                 max_batch_size: int, instances: int, queue_delay_us: int, gpu: bool = False,
                 tensorrt: dict[str, str] | None = None) -> str:
    batched = max_batch_size > 0 and all(_leading_symbolic(t) for t in [*inputs, *outputs])
    mbs = max_batch_size if batched else 0
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {mbs}"]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        entries = []
        for t in tensors:
            if t.dtype not in TRITON_TYPES or t.shape is None:
                raise UsageError(f"{kind} {t.name!r}: Triton needs a known dtype and rank (got {t.dtype}, "
                                 f"shape {t.shape})")
            dims = list(t.shape[1:] if batched else t.shape)
            entries.append(f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_TYPES[t.dtype]}\n'
                           f'    dims: [ {", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims)} ]'
                           "\n  }")
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if batched:
        preferred = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= mbs]
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
                     f"  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n"
                 "  }\n]")
    params = {"intra_op_thread_count": settings.get("intra_op_threads") or 0,
              "inter_op_thread_count": settings.get("inter_op_threads") or 0,
              "execution_mode": 1 if settings.get("execution_mode") == "parallel" else 0}
    if backend == "onnxruntime":
        for k, v in params.items():
            lines.append(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}')
        optimization = ["  graph { level: -1 }"] if settings.get("graph_optimization") == "disable" else []
        if tensorrt:
            params = "".join(f'\n        parameters {{ key: "{k}" value: "{v}" }}' for k, v in tensorrt.items())
            optimization.append("  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
                                f'        name: "tensorrt"{params}\n      }}\n    ]\n  }}')
        if optimization:
            lines.append("optimization {\n" + "\n".join(optimization) + "\n}")
    return "\n".join(lines) + "\n"


def _leading_symbolic(t: TensorInfo) -> bool:
    return bool(t.shape) and not (isinstance(t.shape[0], int) and t.shape[0] > 0)
