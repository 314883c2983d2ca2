"""A declarative image preprocessing spec, stored as JSON and applied identically everywhere.

The steps run in a fixed order, each one named in the spec:
    color (RGB/BGR/GRAY) -> resize (interpolation) -> center crop -> to float -> * scale
    -> (x - mean) / std -> layout (NCHW/NHWC, batch axis of 1 added) -> dtype
Being data rather than code, two specs can be compared field by field, which is what the
preprocessing diagnosis does.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np

from infertune.errors import BackendUnavailable, DataError, UsageError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
COLORS = ("RGB", "BGR", "GRAY")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16", "uint8", "int8")
SCHEMA_VERSION = 1
MAX_SIDE = 16384  # pixels: a resize or crop beyond this is a typo, not a model input


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise BackendUnavailable(
            "reading images needs Pillow: pip install 'infertune[images]'"
        ) from None
    return Image


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image file becomes one model input sample.

    resize: None, an int (shorter side to this size, aspect kept) or (height, width).
    center_crop: None or (height, width), applied after resize.
    """

    color: str = "RGB"
    resize: int | tuple[int, int] | None = None
    interpolation: str = "bilinear"
    center_crop: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _one_of("color", self.color, COLORS)
        _one_of("interpolation", self.interpolation, INTERPOLATIONS)
        _one_of("layout", self.layout, LAYOUTS)
        _one_of("dtype", self.dtype, DTYPES)
        object.__setattr__(self, "resize", _size("resize", self.resize, allow_int=True))
        object.__setattr__(self, "center_crop", _size("center_crop", self.center_crop, allow_int=False))
        object.__setattr__(self, "scale", _number("scale", self.scale))
        object.__setattr__(self, "mean", tuple(_number("mean", m) for m in _seq(self.mean)))
        object.__setattr__(self, "std", tuple(_number("std", s) for s in _seq(self.std)))
        if any(s == 0 for s in self.std):
            raise UsageError("preprocess spec: std must not contain 0")
        channels = 1 if self.color == "GRAY" else 3
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, channels):
                raise UsageError(
                    f"preprocess spec: {key} needs 1 or {channels} values for {self.color}, "
                    f"got {len(getattr(self, key))}"
                )

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema_version"] = SCHEMA_VERSION
        for k in ("resize", "center_crop", "mean", "std"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        if not isinstance(d, dict):
            raise UsageError(f"preprocess spec: expected a JSON object of settings, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise UsageError(f"preprocess spec schema_version {version} is not supported")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(
                f"preprocess spec: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PreprocessSpec:
        from infertune._io import read_json

        try:
            return cls.from_dict(read_json(path, "preprocess spec", DataError))
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        from infertune._io import write_json

        write_json(path, self.to_dict())

    # ---- application --------------------------------------------------------------------------
    def apply(self, image: np.ndarray) -> np.ndarray:
        """HWC (or HW) uint8 image in RGB order -> one sample with a batch axis of 1."""
        img = np.asarray(image)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise DataError(f"expected an HxWxC image with 1, 3 or 4 channels, got {img.shape}")
        img = _convert_color(img[:, :, :3] if img.shape[2] == 4 else img, self.color)
        if self.resize is not None:
            img = _resize(img, self.resize, self.interpolation)
        if self.center_crop is not None:
            img = _center_crop(img, self.center_crop)
        x = img.astype(np.float32) * np.float32(self.scale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        x = x[None]
        if self.dtype in ("uint8", "int8"):
            info = np.iinfo(self.dtype)
            return np.clip(np.rint(x), info.min, info.max).astype(self.dtype)
        return np.ascontiguousarray(x.astype(self.dtype))


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array (grayscale files are expanded to RGB)."""
    image_mod = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image_mod.DecompressionBombWarning)
            with image_mod.open(path) as im:
                return np.asarray(im.convert("RGB"))
    except (image_mod.DecompressionBombError, image_mod.DecompressionBombWarning) as e:
        raise DataError(f"image {path} refused: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _convert_color(img: np.ndarray, color: str) -> np.ndarray:
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if color == "BGR":
        return img[:, :, ::-1]
    if color == "GRAY":
        # ITU-R 601-2 luma, as Pillow's convert("L") computes it
        gray = img[:, :, 0] * 0.299 + img[:, :, 1] * 0.587 + img[:, :, 2] * 0.114
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]
    return img


def _resize(img: np.ndarray, size: int | tuple[int, int], interpolation: str) -> np.ndarray:
    image_mod = _pil()
    h, w = img.shape[:2]
    if isinstance(size, int):
        short = min(h, w)
        new_h, new_w = round(h * size / short), round(w * size / short)
    else:
        new_h, new_w = size
    resample = getattr(image_mod.Resampling, interpolation.upper())
    channels = img.shape[2]
    planes = [
        np.asarray(image_mod.fromarray(np.ascontiguousarray(img[:, :, c])).resize(
            (new_w, new_h), resample=resample))
        for c in range(channels)
    ]
    return np.stack(planes, axis=2)


def _center_crop(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = size
    if ch > h or cw > w:
        raise DataError(f"center crop {ch}x{cw} is larger than the resized image {h}x{w}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top : top + ch, left : left + cw]


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"preprocess spec: {key} must be one of {', '.join(allowed)}, got {value!r}")


def _seq(v: object) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _number(key: str, v: object) -> float:
    """A finite real number (not a bool, not a string)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UsageError(f"preprocess spec: {key}: expected a finite number, got {v!r}")
    return float(v)


def _size(key: str, v: object, *, allow_int: bool) -> int | tuple[int, int] | None:
    """None, an int side (``allow_int``) or [height, width], each from 1 to ``MAX_SIDE`` pixels."""
    def side(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_SIDE

    if v is None:
        return None
    if allow_int and side(v):
        return v  # type: ignore[return-value]
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(side(x) for x in v):
        return (v[0], v[1])
    form = "an int or [height, width]" if allow_int else "[height, width]"
    raise UsageError(f"preprocess spec: {key} must be {form}, sides from 1 to {MAX_SIDE} pixels, got {v!r}")
