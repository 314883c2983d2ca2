"""Labels at the boundary: integer class indices, one per prediction row, within the model's classes.

A label array of strings, of non-integer floats, of the wrong count or with indices outside the
classes of the scores it is compared with would make top-1 accuracy (and a top1_drop budget)
silently meaningless; each is one DataError naming where the labels came from.
"""

from __future__ import annotations

import numpy as np

from infertune.errors import DataError


def check_labels(labels: object, *, where: str, classes: int | None = None, rows: int | None = None,
                 output: str = "") -> np.ndarray:
    """``labels`` as int64 class indices (one per prediction row), or a DataError naming ``where``:
    strings, non-integer floats, a count that does not match the predictions, or indices outside
    the model's ``classes``."""
    lab = np.asarray(labels)
    if lab.dtype.kind == "f":
        bad = ~np.isfinite(lab) | (lab != np.round(lab))
        if bad.any():
            raise DataError(f"{where}: labels must be integer class indices, got non-integer values "
                            f"(e.g. {lab[bad].flat[0]!r})")
    elif lab.dtype.kind not in "iu":
        first = lab.flat[0] if lab.size else None
        raise DataError(f"{where}: labels must be integer class indices, got {lab.dtype} values (e.g. {first!r})")
    out = lab.astype(np.int64).reshape(-1)
    if rows is not None and out.size != rows:
        raise DataError(f"{where}: {out.size} label(s) for {rows} prediction(s): one class index per sample "
                        "(one-hot labels? give their argmax)")
    hi = classes if classes is not None else None
    bad = (out < 0) | (out >= hi) if hi is not None else out < 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        span = f"the {classes} classes [0, {classes})" + (f" of output '{output}'" if output else "")
        raise DataError(f"{where}: {int(bad.sum())} label(s) outside {span}, e.g. {out[i]} at row {i}: labels "
                        "must be class indices of the model's scores")
    return out
