"""The deployable artifact: a directory with the model, a manifest and the sha256 of every file.

    tuned/
      model.onnx          the chosen variant (standard ONNX, Q/DQ where quantized)
      recipe.json         how it was built from the source (ranges, methods, exclusions), if quantized
      manifest.json       schema_version, source sha256, recipe, backend + settings + versions, the
                          target it was measured on (CPU model and ISA flags), measured accuracy
                          and latency, {file: sha256} for every other file, and the digest of
                          its own body (``deploy.manifest``)

``save_artifact`` writes into a temporary directory and renames it into place, so an artifact is
either complete or absent; it goes where ``infertune.outputs`` allows (a new directory, or with
``force`` a previous intact artifact holding nothing else). ``verify`` checks the manifest's
digest, every hash, files the manifest does not list, and opens what it vouches for: the model
(an .onnx file, external data only inside the artifact and listed, checked by ONNX's checker) and
the settings. ``load`` refuses any problem (``ArtifactError``, naming the file), then compares the
target with this machine: a different CPU, ISA or runtime version loads with the differences
listed (``strict=True`` refuses them too), because the latency in the manifest was measured
elsewhere. Nothing is unpickled: JSON and ONNX only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from infertune import backends
from infertune._io import default_mode, write_text
from infertune.deploy.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    ArtifactError,
    owned_names,
    plain_name,
    read_manifest,
    sha256_file,
    signed,
    verify_files,
)
from infertune.errors import InfertuneError
from infertune.fingerprint import cpu, versions
from infertune.model import Model, iter_graphs
from infertune.outputs import Guard, Owned, discard_temp_dir, new_temp_dir, replace_dir

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Artifact", "ArtifactError", "load", "save_artifact", "sha256_file",
           "verify"]

MODEL_FILE = "model.onnx"
RECIPE_FILE = "recipe.json"
OWNED = Owned("an infertune artifact", owned_names)
_RUNTIME_ONLY = ("optimized_model_path", "profile_prefix", "preallocate")  # never taken from a manifest


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
                  extra_files: dict[str, str | os.PathLike[str]] | None = None, force: bool = False) -> Path:
    """Write the artifact directory atomically; returns its path. An existing artifact is replaced
    only with ``force``; any other non-empty directory is refused (``infertune.outputs``)."""
    what = "artifact directory"
    dest = Guard.of(model.path, *(extra_files or {}).values()).directory(directory, OWNED, force=force, what=what)
    tmp = new_temp_dir(dest, what)
    try:
        model.save(tmp / MODEL_FILE)
        if recipe is not None:
            write_text(tmp / RECIPE_FILE, json.dumps(recipe, indent=1))
        for name, src in (extra_files or {}).items():
            if not plain_name(name) or name in (MANIFEST, MODEL_FILE, RECIPE_FILE):
                raise ArtifactError(f"extra file name {name!r}: a plain file name other than the artifact's own")
            shutil.copyfile(src, tmp / name)
            os.chmod(tmp / name, default_mode())
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = signed({
            "schema_version": SCHEMA_VERSION, "kind": "infertune-artifact",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": MODEL_FILE, "source_sha256": source_sha256, "recipe": RECIPE_FILE if recipe is not None else None,
            "backend": backend, "settings": settings.to_dict(), "target": target_fingerprint(backend),
            "accuracy": accuracy or {}, "latency": latency or {}, "decision": decision, "files": files,
        })
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        return replace_dir(tmp, dest, OWNED, force=force, what=what)
    except BaseException:
        discard_temp_dir(tmp)
        raise


@dataclass
class Artifact:
    path: Path
    manifest: dict
    model: Model
    differences: list[str] = field(default_factory=list)  # between where it was measured and here

    @property
    def settings(self) -> backends.Settings:
        return settings_of(self.manifest, self.path)

    def runner(self) -> backends.Runner:
        """A runner with the settings the artifact was tuned with."""
        return backends.compile(self.model, self.settings, backend=self.manifest.get("backend", "ort"))


@dataclass
class Verified:
    """What ``verify`` found: the manifest, the opened model (None when it cannot be), the problems."""

    manifest: dict
    model: Model | None
    problems: list[str]


def verify(path: str | os.PathLike[str]) -> Verified:
    """Check an artifact without running it (see the module docstring); an unreadable or malformed
    manifest raises ``ArtifactError``, everything else is listed in ``problems``."""
    root = Path(path)
    manifest = read_manifest(root)
    problems = verify_files(root, manifest)
    model = None
    if not problems:
        model, more = open_model(root, manifest)
        problems += more
    try:
        settings_of(manifest, root)
    except ArtifactError as e:
        problems.append(str(e))
    backend = manifest.get("backend", "ort")
    if backend not in backends.names():
        problems.append(f"it needs backend {backend!r}, not available here (known: {', '.join(backends.names())})")
    return Verified(manifest, model, problems)


def open_model(root: Path, manifest: dict) -> tuple[Model | None, list[str]]:
    """The artifact's model, opened as a model (an .onnx file whose external data, if any, is
    listed in the manifest and lies in the artifact), or the problems that stop it."""
    name = manifest["model"]
    if not name.endswith(".onnx"):
        return None, [f"its model {name!r} is not an .onnx file"]
    try:
        proto = onnx.load(str(root / name), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        return None, [f"its model {name} is not a valid ONNX model: {str(e).splitlines()[0] if str(e) else e}"]
    bad = []
    for g in iter_graphs(proto.graph):
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = {e.key: e.value for e in t.external_data}.get("location", "")
                if not plain_name(loc):
                    bad.append(f"tensor '{t.name}' of {name} reads external data {loc!r} outside the artifact")
                elif loc not in manifest["files"]:
                    bad.append(f"tensor '{t.name}' of {name} reads {loc}, which the manifest does not cover")
    if bad:
        return None, bad[:3]
    try:
        onnx.load_external_data_for_model(proto, str(root))
        return Model.from_proto(proto, path=root / name), []
    except (InfertuneError, OSError, ValueError, onnx.checker.ValidationError) as e:
        return None, [f"its model {name} cannot be opened: {str(e).splitlines()[0] if str(e) else e}"]


def settings_of(manifest: dict, root: Path) -> backends.Settings:
    """The runtime settings the artifact was tuned with; never paths to write to."""
    s = {k: v for k, v in manifest["settings"].items()
         if k in backends.Settings.__dataclass_fields__ and k not in _RUNTIME_ONLY}
    s["options"] = s.get("options") or {}
    try:
        if not isinstance(s["options"], dict):
            raise TypeError("options must be an object")
        return backends.Settings(**s)
    except (InfertuneError, TypeError, ValueError) as e:
        raise ArtifactError(f"{root / MANIFEST}: settings are not valid: {e}") from None


def load(path: str | os.PathLike[str], *, strict: bool = False) -> Artifact:
    """Verify and open an artifact directory (see the module docstring)."""
    root = Path(path)
    found = verify(root)
    if found.problems:
        raise ArtifactError(f"artifact {root} refused: " + "; ".join(found.problems))
    assert found.model is not None
    differences = compare_target(found.manifest.get("target") or {}, target_fingerprint())
    if strict and differences:
        raise ArtifactError(f"artifact {root} was tuned for another target: " + "; ".join(differences))
    return Artifact(root, found.manifest, found.model, differences)


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
