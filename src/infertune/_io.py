"""Reading and writing files safely: temp name then rename, the user's umask, bounded JSON.

Nothing half-written is ever left behind: a file is written to a temporary sibling and renamed
over its target. What the written file ends up with is what a new file gets under the user's
umask (0644 under the usual 022), not the 0600 of a temporary file. A failure to write is an
``OutputError`` naming the target, not a traceback. JSON read from the user is bounded in size
and nesting; a malformed document is one line naming the file. Arrays are read from .npz / .npy
without ever unpickling; a missing, empty, pickled or unreadable file is one DataError naming it.

Which paths may be written at all is decided by ``infertune.outputs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from infertune.errors import DataError, OutputError

MAX_JSON_BYTES = 64 * 2**20  # a JSON document from the user larger than this is refused unread
_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(*, directory: bool = False) -> int:
    """The mode a new file (or directory) gets under the user's umask."""
    return (0o777 if directory else 0o666) & ~umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. Failing to
    create, write or rename it raises ``OutputError`` naming ``path``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, target)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.filename is None or str(e.filename) in (str(tmp_path), str(target)):
            raise OutputError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def read_json(path: str | os.PathLike[str], what: str, error: type[Exception], *,
              max_bytes: int = MAX_JSON_BYTES, expect: type | None = None) -> Any:
    """The JSON document at ``path``; ``error`` names ``what`` when it is missing, unreadable,
    too large, nested too deeply, malformed, or not of type ``expect``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}" if not p.exists() else f"{what} {p} is not a regular file")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise error(f"{what} {p} is {size / 2**20:.0f} MiB, over the {max_bytes // 2**20} MiB a {what} "
                        "may take: not what infertune writes")
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {p} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply to be a {what}") from None
    if expect is not None and not isinstance(doc, expect):
        raise error(f"{what} {p}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                    f"got {type(doc).__name__}")
    return doc


def load_arrays(path: str | os.PathLike[str], what: str = "data file") -> dict[str, np.ndarray]:
    """Every array of an .npz (or the one of an .npy, under its file stem), never unpickling;
    a missing, empty, pickled or unreadable file is a DataError naming it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} {p} is not a regular file")
    if p.stat().st_size == 0:
        raise DataError(f"{what} {p} is empty (0 bytes)")
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {p.stem: loaded}
        else:
            with loaded as z:
                arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(f"cannot read {what} {p}: {_first_line(e)}") from None
    if not arrays:
        raise DataError(f"{what} {p} holds no arrays")
    return arrays


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"cannot read data file {path}: {_first_line(e)}") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"data file {path} is an .npz archive; name it .npz")
    return arr


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy values, paths, sets and result dataclasses."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)
