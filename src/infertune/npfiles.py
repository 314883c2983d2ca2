"""Reading arrays from the user's .npz / .npy files: never unpickling, every failure one DataError
naming the file (missing, empty, pickled object arrays, not an archive, truncated)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from infertune.errors import DataError


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
