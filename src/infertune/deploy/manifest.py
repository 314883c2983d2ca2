"""An artifact's manifest: what it must hold, its digest, and the check of every file against it.

The manifest lists the sha256 of every other file of the artifact, and carries ``digest``: the
sha256 of its own canonical body (every key but ``digest``, JSON with sorted keys and no spaces).
So no figure in it (accuracy, latency, settings) and no byte of any file can change without the
check saying so; a file in the directory that the manifest does not list is reported too.

A manifest is read with bounds before it is trusted: at most ``MAX_MANIFEST_BYTES``, nested no
deeper than JSON allows, at most ``MAX_FILES`` entries, every field of the type it must have; a
malformed one is one ``ArtifactError`` line, not a traceback or minutes of work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from infertune._io import read_json
from infertune.errors import InfertuneError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_FILES = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")
# field -> the types it may have (None: optional)
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "model": ((str,), True), "files": ((dict,), True), "settings": ((dict,), True), "digest": ((str,), True),
    "backend": ((str,), False), "target": ((dict,), False), "accuracy": ((dict,), False),
    "latency": ((dict,), False), "recipe": ((str, type(None)), False), "source_sha256": ((str,), False),
    "decision": ((str,), False), "created": ((str,), False),
}


class ArtifactError(InfertuneError):
    """An artifact is missing, altered, or cannot run here."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical(manifest: dict) -> dict:
    """The manifest as JSON gives it back (numpy numbers and paths turned into JSON values)."""
    return json.loads(json.dumps(manifest, default=str))


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical body: every key but ``digest``, sorted, no spaces."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def signed(manifest: dict) -> dict:
    """``manifest`` in canonical form with its digest."""
    body = canonical({k: v for k, v in manifest.items() if k != "digest"})
    return {**body, "digest": manifest_digest(body)}


def read_manifest(root: Path) -> dict:
    """The manifest of the artifact at ``root``, checked for shape (not yet for content: ``verify_files``)."""
    if not root.is_dir():
        raise ArtifactError(f"artifact not found: {root} is not a directory")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"artifact {root} has no {MANIFEST}")
    manifest = read_json(path, "manifest", ArtifactError, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("kind") != "infertune-artifact":
        raise ArtifactError(f"{path} is not an infertune manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        older = ": an older infertune made it, without a manifest digest" if version == 1 else ""
        raise ArtifactError(f"{path}: schema_version {version!r} is not supported (this infertune reads "
                            f"{SCHEMA_VERSION}{older}); re-run infertune tune to make the artifact again")
    check_fields(manifest, path)
    return manifest


def check_fields(manifest: dict, path: Path) -> None:
    for key, (types, required) in FIELDS.items():
        if key not in manifest:
            if required:
                raise ArtifactError(f"{path}: missing {key!r}")
            continue
        if not isinstance(manifest[key], types):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "dict": "an object"}[t.__name__]
                               for t in types)
            raise ArtifactError(f"{path}: {key!r} must be {want}, got {type(manifest[key]).__name__}")
    files = manifest["files"]
    if len(files) > MAX_FILES:
        raise ArtifactError(f"{path}: lists {len(files)} files (an artifact holds a few; at most {MAX_FILES})")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactError(f"{path}: the hash of {name!r} is not a sha256 hex digest")


def plain_name(name: str) -> bool:
    """A file name of the artifact's own directory: no separator, not '.', '..' or hidden tricks."""
    return bool(name) and name not in (".", "..") and Path(name).name == name and "\\" not in name


def verify_files(root: Path, manifest: dict) -> list[str]:
    """What differs from what was saved: the manifest's digest, every listed file's hash, files
    missing, and files in the directory that the manifest does not list."""
    problems = []
    if manifest_digest(manifest) != manifest["digest"]:
        problems.append(f"{MANIFEST} was edited after saving (its digest differs)")
    files: dict[str, str] = manifest["files"]
    if manifest["model"] not in files:
        problems.append(f"the model {manifest['model']} is not covered by a hash")
    try:
        present = {e.name: e.is_file(follow_symlinks=False) for e in os.scandir(root)}
    except OSError as e:
        return [*problems, f"cannot list {root}: {e.strerror}"]
    for name, digest in files.items():
        if not plain_name(name):
            problems.append(f"{name}: not a plain file name")
        elif name not in present:
            problems.append(f"{name} is missing")
        elif not present[name]:
            problems.append(f"{name} is not a regular file")
        elif sha256_file(root / name) != digest:
            problems.append(f"{name} was changed after saving (sha256 differs)")
    extra = sorted(set(present) - set(files) - {MANIFEST})
    if extra:
        problems.append(f"file(s) not part of the artifact: {', '.join(extra[:5])}"
                        + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    return problems


def owned_names(root: Path) -> set[str] | None:
    """The names an intact infertune artifact at ``root`` consists of (None: not one, or altered)."""
    try:
        manifest = read_manifest(root)
    except ArtifactError:
        return None
    if manifest_digest(manifest) != manifest["digest"] or not all(plain_name(n) for n in manifest["files"]):
        return None
    return {*manifest["files"], MANIFEST}
