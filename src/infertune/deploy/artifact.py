"""The deployable artifact: a directory with the model, a manifest and the sha256 of every file.

    tuned/
      model.onnx          the chosen variant (standard ONNX, Q/DQ where quantized)
      recipe.json         how it was built from the source (ranges, methods, exclusions), if quantized
      manifest.json       schema_version, source sha256, recipe, backend + settings + versions, the
                          target it was measured on (CPU model and ISA flags), measured accuracy
                          and latency, and {file: sha256} for every other file

``save_artifact`` writes into a temporary directory and renames it into place, so an artifact is
either complete or absent. ``load`` verifies every hash, then compares the target with this
machine: a changed or missing file refuses to load (``ArtifactError``, naming the file); a
different CPU, ISA or runtime version loads with the differences listed (``strict=True`` refuses
them too), because the latency in the manifest was measured elsewhere. Nothing is unpickled:
JSON and ONNX only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from infertune import backends
from infertune.errors import InfertuneError
from infertune.fingerprint import cpu, versions
from infertune.model import Model

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
RECIPE_FILE = "recipe.json"


class ArtifactError(InfertuneError):
    """An artifact is missing, altered, or cannot run here."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def target_fingerprint(backend: str = "ort") -> dict:
    """What a measured latency depends on: CPU, ISA flags, cores, runtime versions (and GPUs)."""
    c = cpu()
    out = {"cpu": c["model"], "arch": c["arch"], "isa": c["isa"], "logical_cores": c["logical_cores"],
           "versions": versions(("openvino", "onnxruntime-gpu", "tensorrt"))}
    if backend in backends.GPU_BACKENDS:
        from infertune.deploy.doctor import probe

        out["gpus"] = probe()["gpus"]
    return out


def save_artifact(directory: str | os.PathLike[str], model: Model, *, source_sha256: str,
                  settings: backends.Settings, backend: str = "ort", recipe: dict | None = None,
                  accuracy: dict | None = None, latency: dict | None = None, decision: str = "",
                  extra_files: dict[str, str | os.PathLike[str]] | None = None) -> Path:
    """Write the artifact directory atomically; returns its path. An existing directory is replaced."""
    dest = Path(directory)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save(tmp / MODEL_FILE)
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "schema_version": SCHEMA_VERSION, "kind": "infertune-artifact",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": MODEL_FILE, "source_sha256": source_sha256, "recipe": RECIPE_FILE if recipe is not None else None,
            "backend": backend, "settings": settings.to_dict(), "target": target_fingerprint(backend),
            "accuracy": accuracy or {}, "latency": latency or {}, "decision": decision, "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@dataclass
class Artifact:
    path: Path
    manifest: dict
    model: Model
    differences: list[str] = field(default_factory=list)  # between where it was measured and here

    @property
    def settings(self) -> backends.Settings:
        s = dict(self.manifest["settings"])
        s["options"] = s.get("options") or {}
        s = {k: v for k, v in s.items() if k in backends.Settings.__dataclass_fields__}
        return backends.Settings(**s)

    def runner(self) -> backends.Runner:
        """A runner with the settings the artifact was tuned with."""
        return backends.compile(self.model, self.settings, backend=self.manifest.get("backend", "ort"))


def load(path: str | os.PathLike[str], *, strict: bool = False) -> Artifact:
    """Verify and open an artifact directory (see the module docstring)."""
    root = Path(path)
    manifest = read_manifest(root)
    problems = verify_files(root, manifest)
    if problems:
        raise ArtifactError(f"artifact {root} refused: " + "; ".join(problems))
    differences = compare_target(manifest.get("target") or {}, target_fingerprint())
    if strict and differences:
        raise ArtifactError(f"artifact {root} was tuned for another target: " + "; ".join(differences))
    backend = manifest.get("backend", "ort")
    if backend not in backends.names():
        raise ArtifactError(f"artifact {root} needs backend {backend!r}, not available here "
                            f"(known: {', '.join(backends.names())})")
    return Artifact(root, manifest, Model.load(root / manifest["model"]), differences)


def read_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise ArtifactError(f"artifact not found: {root} is not a directory")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"artifact {root} has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "infertune-artifact":
        raise ArtifactError(f"{path} is not an infertune manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {version!r} is not supported (this infertune reads "
                            f"{SCHEMA_VERSION}); re-export the artifact")
    for key in ("model", "files", "settings"):
        if key not in manifest:
            raise ArtifactError(f"{path}: missing {key!r}")
    return manifest


def verify_files(root: Path, manifest: dict) -> list[str]:
    """Every file listed with the hash it had when saved; the model must be among them."""
    problems = []
    files: dict[str, str] = manifest["files"]
    if manifest["model"] not in files:
        problems.append(f"the model {manifest['model']} is not covered by a hash")
    for name, digest in files.items():
        p = root / name
        if Path(name).name != name:
            problems.append(f"{name}: not a plain file name")
        elif not p.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{name} was changed after saving (sha256 differs)")
    return problems


def compare_target(saved: dict, here: dict) -> list[str]:
    """What differs between the machine an artifact was measured on and this one."""
    out = []
    if saved.get("arch") and saved["arch"] != here["arch"]:
        out.append(f"CPU architecture {saved['arch']} there, {here['arch']} here")
    if saved.get("cpu") and saved["cpu"] != here["cpu"]:
        out.append(f"CPU {saved['cpu']!r} there, {here['cpu']!r} here: latency was measured on the other")
    missing = sorted(set(saved.get("isa", [])) - set(here["isa"]))
    if missing:
        out.append(f"ISA flags missing here: {', '.join(missing)} (INT8/FP16 kernels may be slower)")
    if saved.get("logical_cores") and saved["logical_cores"] != here["logical_cores"]:
        out.append(f"{saved['logical_cores']} cores there, {here['logical_cores']} here")
    for lib, v in (saved.get("versions") or {}).items():
        if lib in ("onnxruntime", "onnx") and here["versions"].get(lib) != v:
            out.append(f"{lib} {v} there, {here['versions'].get(lib, 'not installed')} here")
    return out
