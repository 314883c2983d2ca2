"""preflight: will this TensorRT engine or infertune artifact load, and run well, here? Read, not tried.

Deserializing an engine built for another TensorRT version or GPU fails with a terse error at
best; preflight reads what it was built for and compares it with this machine's probe
(``doctor.probe()``, or a recorded one) before anything is loaded:

- a TensorRT engine built by infertune has a build record beside it (``<engine>.json``, written by
  ``backends.tensorrt``): TensorRT version and the version-compatible flag, hardware-compatibility
  level, the GPU (name, compute capability, SMs) and the CUDA major of the TensorRT build. TensorRT's
  documented rules: a standard engine loads only on the exact TensorRT version that built it; a
  version-compatible one on that version or a later one of the same major (a 10.x engine never
  loads on 11.x). The driver must run the engine's CUDA major (a driver older in minor is fine:
  minor version compatibility). Without hardware compatibility it runs only on
  the GPU model it was built on; ``ampere+`` on any compute capability >= 8.0; ``same-cc`` on the
  same compute capability. Tactics are timed on the build GPU: another GPU of the same compute
  capability loads it but may run it slower. An engine without a record cannot be judged without
  deserializing it, and preflight says so;
- an artifact (``manifest.json``): every file's hash, the backend's package, the runtime
  versions, CPU architecture and ISA flags, and for GPU backends the GPU it was measured on.

Findings use doctor's ``Finding`` (error / warning / info, each with its fix).
"""

from __future__ import annotations

from pathlib import Path

from infertune._io import read_json
from infertune.backends import GPU_BACKENDS
from infertune.deploy.artifact import MANIFEST, ArtifactError, sha256_file, verify
from infertune.deploy.compat import at_least, compat_table, driver_cuda_major
from infertune.deploy.doctor import SEVERITIES, Finding, version_tuple
from infertune.errors import UsageError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
BACKEND_PACKAGES = {"ort": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"), "openvino": ("openvino",),
                    "ort-cuda": ("onnxruntime-gpu",), "ort-tensorrt": ("onnxruntime-gpu",),
                    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-bindings",
                                 "tensorrt-cu13-bindings")}
BACKEND_EXTRA = {"openvino": "openvino", "ort-cuda": "gpu-cu13", "ort-tensorrt": "gpu-cu13", "tensorrt": "tensorrt"}


def preflight(path: str | Path, probe: dict | None = None) -> list[Finding]:
    """Findings for the engine file or artifact directory at ``path``, most severe first."""
    from infertune.deploy.doctor import probe as probe_here

    p = Path(path)
    here = probe if probe is not None else probe_here()
    if p.is_dir():
        try:
            found = verify(p)
        except ArtifactError as e:
            return [Finding("error", "artifact", str(e), "point at an infertune artifact directory")]
        findings = [Finding("error", "artifact", problem, "re-export the artifact; never edit it by hand")
                    for problem in found.problems]
        return _sorted(findings + check_artifact(found.manifest, here))
    record = p.with_suffix(".json")
    if p.is_file() and (p.suffix in ENGINE_SUFFIXES or (record.is_file() and record != p)):
        return _sorted(check_engine_file(p, record, here))
    raise UsageError(f"{p} is neither an artifact directory (with {MANIFEST}) nor a TensorRT engine file")


def check_engine_file(engine: Path, record_path: Path, here: dict) -> list[Finding]:
    """An engine file against its build record: the record's shape, the engine's hash, then the rules."""
    rebuild = ("rebuild it with infertune (--backend tensorrt --option engine_cache=DIR), which writes the record "
               "beside the engine")
    if not record_path.is_file():
        return [Finding("error", "engine", f"{engine.name} has no build record ({record_path.name}): infertune "
                        "cannot tell whether it is a TensorRT engine, or what it was built for, without "
                        "deserializing it", rebuild)]
    try:
        record = read_json(record_path, "build record", ArtifactError, max_bytes=MAX_RECORD_BYTES, expect=dict)
        check_record(record, record_path)
    except ArtifactError as e:
        return [Finding("error", "engine", str(e), rebuild)]
    digest = record.get("engine_sha256")
    if digest is None:
        head = [Finding("warning", "engine", f"the build record {record_path.name} carries no engine hash (older "
                        f"infertune): whether {engine.name} is the engine it describes cannot be checked", rebuild)]
    elif sha256_file(engine) != digest:
        return [Finding("error", "engine", f"{engine.name} is not the engine its build record {record_path.name} "
                        "describes (sha256 differs): not a TensorRT engine infertune built, or altered", rebuild)]
    else:
        head = []
    return head + check_engine(record, here)


RECORD_FIELDS = {"kind": (str,), "tensorrt": (str,), "version_compatible": (bool,), "hardware_compatibility": (str,),
                 "gpu": (dict,), "cuda_runtime": (str, type(None)), "engine_sha256": (str,)}
MAX_RECORD_BYTES = 2**20


def check_record(record: dict, where: Path | str = "build record") -> None:
    """Refuse a build record whose fields do not have the types infertune writes."""
    for key, types in RECORD_FIELDS.items():
        if key in record and not isinstance(record[key], types):
            raise ArtifactError(f"{where}: {key!r} has the wrong type ({type(record[key]).__name__}): not a build "
                                "record infertune wrote")
    gpu = record.get("gpu") or {}
    for key in ("name", "compute_capability"):
        if key in gpu and not isinstance(gpu[key], str):
            raise ArtifactError(f"{where}: gpu.{key} has the wrong type ({type(gpu[key]).__name__})")
    if "sm_count" in gpu and (isinstance(gpu["sm_count"], bool) or not isinstance(gpu["sm_count"], (int, type(None)))):
        raise ArtifactError(f"{where}: gpu.sm_count has the wrong type ({type(gpu['sm_count']).__name__})")


def check_engine(record: dict, here: dict) -> list[Finding]:
    if record.get("kind") != "infertune-tensorrt-engine":
        return [Finding("error", "engine", "the build record is not an infertune TensorRT engine record", "rebuild")]
    try:
        check_record(record)
    except ArtifactError as e:
        return [Finding("error", "engine", str(e), "rebuild")]
    out: list[Finding] = []
    built = str(record.get("tensorrt") or "")
    pk = here.get("packages", {})
    trt_here = next((pk[k] for k in BACKEND_PACKAGES["tensorrt"] if pk.get(k)), None)
    if not trt_here:
        out.append(Finding("error", "tensorrt", f"TensorRT is not installed; the engine was built with {built}",
                           f"pip install 'tensorrt=={built}'"))
    elif version_tuple(trt_here)[:1] != version_tuple(built)[:1]:
        out.append(Finding("error", "tensorrt", f"engine built with TensorRT {built}, {trt_here} is installed: engines "
                           "never load across major versions, version-compatible or not",
                           f"rebuild it here, or pip install 'tensorrt=={built}'"))
    elif record.get("version_compatible"):
        if version_tuple(trt_here) < version_tuple(built):
            out.append(Finding("error", "tensorrt", f"version-compatible engine built with TensorRT {built} cannot "
                               f"load on the older {trt_here}", f"pip install 'tensorrt>={built}'"))
        elif version_tuple(trt_here) != version_tuple(built):
            out.append(Finding("info", "tensorrt", f"version-compatible engine from TensorRT {built} on {trt_here}: "
                               "it loads through the lean runtime it carries, possibly slower than a native build",
                               "rebuild with this TensorRT for full speed"))
    elif version_tuple(trt_here) != version_tuple(built):
        out.append(Finding("error", "tensorrt", f"engine built with TensorRT {built}, {trt_here} is installed: a "
                           "standard engine loads only on the exact version that built it",
                           f"pip install 'tensorrt=={built}', rebuild it here, or build with version_compatible=true"))
    out += _gpu_findings(record.get("gpu") or {}, here.get("gpus", []), record.get("hardware_compatibility", "none"))
    return out + _driver_findings(str(record.get("cuda_runtime") or ""), here.get("cuda") or {})


def _driver_findings(runtime: str, cuda: dict) -> list[Finding]:
    """The engine's CUDA (major, or major.minor in old records) against the driver here."""
    need = version_tuple(runtime)
    have = driver_cuda_major(cuda)
    if not need or have is None:
        return []
    row = compat_table()["cuda"].get(str(need[0]), {})
    floor = row.get("min_driver_linux_tensorrt") or row.get("min_driver_linux")
    fix = f"update the NVIDIA driver to >= {floor or 'one for CUDA ' + str(need[0])}"
    if have < need[0]:
        return [Finding("error", "driver", f"the engine's TensorRT is a CUDA {need[0]} build; the driver here "
                        f"({cuda.get('driver_version') or 'version unknown'}) runs CUDA up to {have}.x", fix)]
    if cuda.get("driver_version") and floor and not at_least(cuda["driver_version"], floor):
        return [Finding("error", "driver", f"the driver here ({cuda['driver_version']}) is older than {floor}, "
                        f"TensorRT's minimum on CUDA {need[0]}", fix)]
    driver = version_tuple(cuda.get("driver_cuda"))
    if have == need[0] and len(need) > 1 and len(driver) > 1 and driver[:2] < need[:2]:
        return [Finding("info", "driver", f"the engine's TensorRT used CUDA {runtime}; the driver here supports "
                        f"{cuda.get('driver_cuda')}: it runs through CUDA minor version compatibility",
                        "none needed (only PTX compiled for a newer minor would need a newer driver)")]
    return []


def _gpu_findings(built: dict, gpus: list[dict], level: str) -> list[Finding]:
    name, cc = built.get("name", "?"), str(built.get("compute_capability", ""))
    if not gpus:
        return [Finding("error", "gpu", f"no NVIDIA GPU here; the engine was built on {name} (compute capability "
                        f"{cc})", "run it on a machine with a GPU, or use a CPU backend")]
    g = gpus[0]
    cc_here = str(g.get("compute_capability", ""))
    if level == "ampere+":
        if version_tuple(cc_here) < (8, 0):
            return [Finding("error", "gpu", f"hardware-compatible (Ampere+) engine, but {g.get('name')} has compute "
                            f"capability {cc_here} < 8.0", "rebuild the engine on this GPU")]
        if version_tuple(cc_here) != version_tuple(cc):
            return [Finding("info", "gpu", f"Ampere+ engine built on {name} ({cc}) runs on {g.get('name')} "
                            f"({cc_here}) with the tactics that level allows, often slower than a native build",
                            "rebuild on this GPU for full speed")]
        return []
    if version_tuple(cc_here) != version_tuple(cc):
        return [Finding("error", "gpu", f"engine built for compute capability {cc} ({name}); {g.get('name')} here has "
                        f"{cc_here}", "rebuild it here, or build with hardware_compatibility=ampere+")]
    if level == "none" and (g.get("name") != name or (built.get("sm_count") and g.get("sm_count")
                                                       and built["sm_count"] != g["sm_count"])):
        return [Finding("warning", "gpu", f"engine timed on {name} ({built.get('sm_count') or '?'} SMs); this is "
                        f"{g.get('name')} ({g.get('sm_count') or '?'} SMs): it loads, but its tactics may be "
                        "slow here", "rebuild it on this GPU")]
    return []


def check_artifact(manifest: dict, here: dict) -> list[Finding]:
    out: list[Finding] = []
    backend = manifest.get("backend", "ort")
    pk = here.get("packages", {})
    target = manifest.get("target") or {}
    wanted = BACKEND_PACKAGES.get(backend)
    if wanted is None:
        out.append(Finding("error", "backend", f"the artifact runs on backend {backend!r}, unknown to this infertune",
                           "upgrade infertune"))
    elif not any(pk.get(d) for d in wanted):
        extra = BACKEND_EXTRA.get(backend)
        out.append(Finding("error", "backend", f"the artifact runs on {backend}, which needs {' or '.join(wanted)}",
                           f"pip install 'infertune[{extra}]'" if extra else f"pip install {wanted[0]}"))
    for lib, v in (target.get("versions") or {}).items():
        now = pk.get(lib) or (pk.get("onnxruntime-gpu") if lib == "onnxruntime" else None)
        if lib in ("onnxruntime", "openvino", "tensorrt") and now and now != v:
            out.append(Finding("warning", lib, f"latency was measured with {lib} {v}; {now} is installed",
                               "re-run infertune tune here, or install the same version"))
    cpu = here.get("cpu", {})
    if target.get("arch") and cpu.get("arch") and target["arch"] != cpu["arch"]:
        out.append(Finding("warning", "cpu", f"tuned on {target['arch']}, this is {cpu['arch']}: the model runs, but "
                           "every measured number belongs to the other machine", "re-run infertune tune here"))
    missing = sorted(set(target.get("isa", [])) - set(cpu.get("isa", [])))
    if missing and backend not in GPU_BACKENDS:
        vnni = [f for f in missing if "vnni" in f or "amx" in f]
        why = "INT8 kernels lose their dot-product instructions" if vnni else "kernels fall back to narrower vectors"
        out.append(Finding("warning", "cpu", f"ISA flags the artifact was tuned with are missing here: "
                           f"{', '.join(missing)} ({why}); it runs, slower than measured",
                           "re-run infertune tune here: it may pick FP32 instead"))
    if target.get("cpu") and cpu.get("model") and target["cpu"] != cpu["model"] and not missing:
        out.append(Finding("info", "cpu", f"tuned on {target['cpu']!r}, this is {cpu['model']!r}", ""))
    if backend in GPU_BACKENDS:
        built = (target.get("gpus") or [{}])[0]
        gpus = here.get("gpus", [])
        if not gpus:
            out.append(Finding("error", "gpu", f"the artifact runs on {backend} and no NVIDIA GPU is here",
                               "run it on a GPU machine, or re-run infertune tune with a CPU runtime"))
        elif built and (gpus[0].get("name"), str(gpus[0].get("compute_capability"))) != (
                built.get("name"), str(built.get("compute_capability"))):
            out.append(Finding("warning", "gpu", f"measured on {built.get('name')} (compute capability "
                               f"{built.get('compute_capability')}); this is {gpus[0].get('name')} "
                               f"({gpus[0].get('compute_capability')}): engines are rebuilt here and latency will "
                               "differ", "re-run infertune tune here"))
    return out


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
