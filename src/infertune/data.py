"""Datasets: iterables of feeds ``{input_name: ndarray}``, from files, images, synthetic or Python.

A *sample* is one feed whose batch axis (axis 0) has size 1; files hold samples stacked
along axis 0, or one complete feed each (any shapes, scalars allowed: ``stacked`` tells them
apart). ``batched(ds, n)`` joins consecutive samples along the (dynamic) batch axis.
Arrays in a file that are not model inputs (labels, for instance) are kept apart as
*extras* and never fed to the model.

Feeds are checked against the model once (names, dtype, rank, fixed dims) by
``FeedValidator``; every feed is scanned for NaN/Inf, which are counted and skipped.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infertune._io import load_arrays, load_npy
from infertune.errors import DataError, InfertuneWarning, UsageError
from infertune.limits import check_feed_bytes
from infertune.model import Model, TensorInfo, dim_key

Feed = dict[str, np.ndarray]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class Dataset:
    """A re-iterable source of feeds, with optional per-sample extras (labels, ...).

    ``source`` is a callable returning a fresh iterator each time, so calibration can make
    two passes; ``len()`` is never assumed (``size`` is None when unknown).
    """

    def __init__(
        self,
        source: Callable[[], Iterator[Feed]],
        *,
        name: str,
        size: int | None = None,
        extras: dict[str, np.ndarray] | None = None,
        layout: str = "",
    ) -> None:
        self._source = source
        self.name = name
        self.size = size
        self.extras = extras or {}
        self.layout = layout  # how the source was read, in words (printed by the CLI)

    def __iter__(self) -> Iterator[Feed]:
        return iter(self._source())

    def __repr__(self) -> str:
        n = "?" if self.size is None else self.size
        return f"Dataset({self.name!r}, samples={n})"

    def take(self, n: int) -> Dataset:
        """The first n samples."""

        def gen() -> Iterator[Feed]:
            for i, feed in enumerate(self):
                if i >= n:
                    return
                yield feed

        size = n if self.size is None else min(n, self.size)
        extras = {k: v[:n] for k, v in self.extras.items()}
        return Dataset(gen, name=f"{self.name}[:{n}]", size=size, extras=extras, layout=self.layout)

    def materialize(self) -> list[Feed]:
        return list(self)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, name: str = "arrays",
                    inputs: Iterable[str] | None = None) -> Dataset:
        """Samples stacked along axis 0 of every array (all arrays share that length).

        With ``inputs`` (the model's input names), the sample count is theirs: other arrays of
        that length travel with each sample (labels), those of another length or rank 0 (say,
        ``class_names``) are ignored with a note.
        """
        if not arrays:
            raise DataError(f"dataset {name} is empty: it holds no arrays")
        arrays = _per_sample(arrays, name, None if inputs is None else list(inputs))
        n = next(iter(arrays.values())).shape[0]
        if n == 0:
            raise DataError(f"dataset {name} is empty: its arrays have 0 samples")

        def gen() -> Iterator[Feed]:
            for i in range(n):
                yield {k: v[i : i + 1] for k, v in arrays.items()}

        return cls(gen, name=name, size=n, layout=f"{n} {STACKED}")

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str], *, inputs: Iterable[str] | None = None,
                 model: Model | None = None) -> Dataset:
        """Samples stacked along axis 0, or (when its arrays cannot be a stack: ``stacked``) one feed."""
        p = _existing(path)
        arrays = load_arrays(p, "data file")
        if not arrays or stacked(arrays, model, inputs):
            return cls.from_arrays(arrays, name=str(p), inputs=inputs)
        return cls(lambda: iter([dict(arrays)]), name=str(p), size=1, layout="one feed")

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str], *, inputs: Iterable[str] | None = None,
                       model: Model | None = None) -> Dataset:
        """A directory of ``.npz`` files or ``<input>.npy`` files per sample dir.

        Layout accepted: ``dir/*.npz`` (each one complete feed, any shapes, scalars allowed; or samples
        stacked along axis 0, told apart per file by ``stacked``) or ``dir/<sample>/<input_name>.npy``.
        Files are read lazily, in sorted order.
        """
        p = _existing(path)
        npz = sorted(p.glob("*.npz"))
        subdirs = sorted(d for d in p.iterdir() if d.is_dir() and any(d.glob("*.npy")))
        npy = sorted(p.glob("*.npy"))
        inputs = None if inputs is None else list(inputs)
        if npz:
            def gen() -> Iterator[Feed]:
                for f in npz:
                    yield from Dataset.from_npz(f, inputs=inputs, model=model)

            first = load_arrays(npz[0], "data file")
            how = STACKED + " in each" if first and stacked(first, model, inputs) else ONE_FEED
            return cls(gen, name=str(p), size=None, layout=f"a directory of {len(npz)} .npz files, {how}")
        if subdirs:
            def gen_dirs() -> Iterator[Feed]:
                for d in subdirs:
                    yield {f.stem: load_npy(f) for f in sorted(d.glob("*.npy"))}

            return cls(gen_dirs, name=str(p), size=len(subdirs),
                       layout=f"{len(subdirs)} sample folders of .npy files, one feed per folder")
        if npy:
            ds = cls.from_arrays({f.stem: load_npy(f) for f in npy}, name=str(p), inputs=inputs)
            ds.layout = f"one .npy per input, {ds.layout}"
            return ds
        raise DataError(f"data directory {p} holds no .npz, .npy or sample folders")

    @classmethod
    def from_images(
        cls, path: str | os.PathLike[str], spec: object, *, input_name: str
    ) -> Dataset:
        """Images in a directory, each turned into one sample by a ``PreprocessSpec``."""
        from infertune.preprocess import PreprocessSpec, load_image

        if not isinstance(spec, PreprocessSpec):
            raise UsageError("from_images needs a PreprocessSpec")
        p = _existing(path)
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"image directory {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")

        def gen() -> Iterator[Feed]:
            for f in files:
                yield {input_name: spec.apply(load_image(f))}

        return cls(gen, name=str(p), size=len(files), layout=f"{len(files)} images, one feed each (preprocessed)")

    @classmethod
    def from_iterable(cls, items: Iterable[Feed], *, name: str = "iterable") -> Dataset:
        """Any Python iterable of feeds (each one complete feed, any shapes). A one-shot iterator is
        cached so it can be re-read."""
        layout = "a Python iterable of feeds"
        if isinstance(items, Iterator):
            cache = list(items)
            return cls(lambda: iter(cache), name=name, size=len(cache), layout=layout)
        return cls(lambda: iter(items), name=name, size=_len_or_none(items), layout=layout)

    @classmethod
    def synthetic(
        cls, model: Model, *, samples: int = 8, seed: int = 0, dims: dict[str, int] | None = None
    ) -> Dataset:
        """Seeded random feeds with the model's shapes and dtypes (see ``synthetic_feed``)."""
        if samples < 1:
            raise UsageError(f"synthetic data needs at least 1 sample, got {samples}")

        def gen() -> Iterator[Feed]:
            rng = np.random.default_rng(seed)
            for _ in range(samples):
                yield synthetic_feed(model, dims=dims, rng=rng)

        return cls(gen, name=f"synthetic(seed={seed})", size=samples, layout=f"{samples} synthetic feeds")


def synthetic_feed(
    model: Model, *, dims: dict[str, int] | None = None, rng: np.random.Generator | None = None
) -> Feed:
    """One random feed. Symbolic dims come from ``dims``; a leading unnamed/symbolic batch
    dim defaults to 1; any other unresolved dim is an error naming it.

    Values: floats standard normal; integers uniform in [0, 100) (ids); inputs whose name
    contains 'mask' get ones; bool uniform.
    """
    rng = rng or np.random.default_rng(0)
    dims = dims or {}
    shapes = {info.name: concrete_shape(info, dims) for info in model.inputs}
    dtypes = {info.name: np.dtype(info.dtype or "float32") for info in model.inputs}
    check_feed_bytes(shapes, {k: d.itemsize for k, d in dtypes.items()}, f"synthetic data for {model.name}")
    feed: Feed = {}
    for info in model.inputs:
        shape, dtype = shapes[info.name], dtypes[info.name]
        if "mask" in info.name.lower():
            feed[info.name] = np.ones(shape, dtype=dtype)
        elif dtype.kind == "f":
            feed[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feed[info.name] = rng.integers(0, 100, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feed[info.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise DataError(f"cannot make synthetic data for input '{info.name}' of dtype {dtype}")
    return feed


def concrete_shape(info: TensorInfo, dims: dict[str, int]) -> tuple[int, ...]:
    if info.shape is None:
        raise DataError(f"input '{info.name}' has unknown rank: give data instead of synthetic")
    out = []
    for axis, d in enumerate(info.shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d in dims:
            out.append(int(dims[d]))
        elif f"{info.name}:{axis}" in dims:
            out.append(int(dims[f"{info.name}:{axis}"]))
        elif axis == 0:
            out.append(int(dims.get("batch", 1)))
        else:
            label = f"'{d}'" if d else f"axis {axis}"
            raise DataError(
                f"input '{info.name}' dim {label} is symbolic: give its size, e.g. "
                f"--dims {dim_key(info.name, axis, d)}=N"
            )
    return tuple(out)


MAX_DIM = 2**31 - 1


def parse_dims(text: str | Iterable[str] | None) -> dict[str, int]:
    """'batch=1,sequence=128' (or a list of 'k=v') -> {'batch': 1, 'sequence': 128}.

    A dim without a symbolic name is given as ``INPUT:AXIS=SIZE`` (e.g. ``x:2=224``)."""
    if not text:
        return {}
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    out: dict[str, int] = {}
    for part in parts:
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+)\s*", part)
        if not m:
            raise UsageError(f"bad dim '{part}': expected name=size (or input:axis=size), e.g. batch=1")
        size = int(m.group(2))
        if not 1 <= size <= MAX_DIM:
            raise UsageError(f"bad dim '{part.strip()}': a size must be from 1 to {MAX_DIM}")
        out[m.group(1)] = size
    return out


def batched(dataset: Dataset, batch_size: int) -> Dataset:
    """Join consecutive samples along axis 0; the last batch may be smaller."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if batch_size == 1:
        return dataset

    def gen() -> Iterator[Feed]:
        buf: list[Feed] = []
        for feed in dataset:
            buf.append(feed)
            if len(buf) == batch_size:
                yield _concat(buf)
                buf = []
        if buf:
            yield _concat(buf)

    size = None if dataset.size is None else math.ceil(dataset.size / batch_size)
    return Dataset(gen, name=f"{dataset.name} (batch {batch_size})", size=size,
                   layout=f"{dataset.layout}, joined in batches of {batch_size}")


def _concat(feeds: list[Feed]) -> Feed:
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


@dataclass
class FeedValidator:
    """Checks feeds against the model: once in full, then only the cheap per-feed scan.

    Non-finite values are counted per input; with ``nonfinite='skip'`` such feeds are
    dropped (and counted), with 'keep' they are passed on, with 'error' they raise. Feeds whose
    index is in ``skip_feeds`` are dropped (and counted) whatever they hold. The range of every
    input over the feeds passed on is kept, so that data in which every input is constant (all
    zeros, say) can be told apart (``constant_inputs``).
    """

    model: Model
    nonfinite: str = "skip"
    checked: bool = False
    feeds_seen: int = 0
    feeds_skipped: int = 0
    nonfinite_counts: dict[str, int] = field(default_factory=dict)
    first_nonfinite: dict[str, int] = field(default_factory=dict)
    extras_ignored: set[str] = field(default_factory=set)
    ranges: dict[str, list[float]] = field(default_factory=dict)  # input -> [min, max] of finite values
    skip_feeds: frozenset[int] = frozenset()
    nonfinite_feeds: dict[str, set[int]] = field(default_factory=dict)  # input -> feeds holding NaN/Inf
    nan_feeds: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.nonfinite not in ("skip", "keep", "error"):
            raise UsageError(f"nonfinite must be skip, keep or error, got {self.nonfinite!r}")
        self._inputs = {i.name: i for i in self.model.inputs}

    def __call__(self, feed: Feed) -> Feed | None:
        """The feed restricted to model inputs, or None when it is skipped."""
        index = self.feeds_seen
        self.feeds_seen += 1
        if not self.checked:
            self._check_full(feed, index)
            self.checked = True
        out = {k: feed[k] for k in self._inputs}
        bad = False
        for name, arr in out.items():
            if arr.dtype.kind in "fc":
                n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
                if n:
                    bad = True
                    self.nonfinite_counts[name] = self.nonfinite_counts.get(name, 0) + n
                    self.first_nonfinite.setdefault(name, index)
                    self.nonfinite_feeds.setdefault(name, set()).add(index)
                    if np.isnan(arr).any():
                        self.nan_feeds.add(index)
                    if self.nonfinite == "error":
                        raise DataError(
                            f"input '{name}' of sample {index} holds {n} NaN/Inf values"
                        )
        if (bad and self.nonfinite == "skip") or index in self.skip_feeds:
            self.feeds_skipped += 1
            return None
        self._track(out)
        return out

    def _track(self, feed: Feed) -> None:
        for name, arr in feed.items():
            if arr.dtype.kind not in "iufb" or not arr.size:
                continue
            x = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
            if not x.size:
                continue
            lo, hi = float(x.min()), float(x.max())
            r = self.ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)

    def stray_feeds(self) -> frozenset[int]:
        """Feeds whose non-finite inputs are bad data rather than a mask: every feed holding NaN, and
        those holding +-inf in an input that is finite in other feeds (a mask is -inf in every one)."""
        stray = set(self.nan_feeds)
        for feeds in self.nonfinite_feeds.values():
            if len(feeds) < self.feeds_seen:
                stray |= feeds
        return frozenset(stray)

    def constant_inputs(self) -> dict[str, float]:
        """Inputs that held one value in every feed passed on: {name: value}."""
        return {k: r[0] for k, r in self.ranges.items() if r[0] == r[1]}

    def all_constant(self) -> bool:
        """Every input held a single value over all the feeds passed on."""
        return bool(self.ranges) and len(self.constant_inputs()) == len(self._inputs)

    def constant_text(self) -> str:
        return ", ".join(f"'{k}' is {v:g} in every sample" for k, v in self.constant_inputs().items())

    def _check_full(self, feed: Feed, index: int) -> None:
        if not isinstance(feed, dict):
            raise DataError(
                f"sample {index} is a {type(feed).__name__}; a feed must be a dict "
                f"{{input_name: ndarray}}"
            )
        missing = [n for n in self._inputs if n not in feed]
        if missing:
            have = ", ".join(sorted(feed)) or "nothing"
            raise DataError(
                f"input '{missing[0]}' is missing from the data (the data has: {have}; the "
                f"model expects: {', '.join(self._inputs)})"
            )
        self.extras_ignored = {k for k in feed if k not in self._inputs}
        for name, info in self._inputs.items():
            check_array(info, feed[name])

    def warnings(self) -> list[str]:
        action = {
            "skip": f"{self.feeds_skipped} sample(s) skipped",
            "keep": "kept as they are",
            "error": "rejected",
        }[self.nonfinite]
        return [
            f"input '{name}': {n} NaN/Inf values (first in sample "
            f"{self.first_nonfinite[name]}); {action}"
            for name, n in self.nonfinite_counts.items()
        ]

    def finish(self, dataset_name: str = "data") -> None:
        """Raise when nothing usable came through."""
        if self.feeds_seen == 0:
            raise DataError(f"dataset {dataset_name} is empty: it yielded no samples")
        if self.feeds_seen == self.feeds_skipped:
            raise DataError(
                f"dataset {dataset_name}: all {self.feeds_seen} samples hold NaN/Inf values "
                f"({', '.join(self.nonfinite_counts)}); nothing left to run"
            )


def check_array(info: TensorInfo, arr: object) -> None:
    """Raise DataError naming the input, the expected and the actual type, rank or dims."""
    if not isinstance(arr, np.ndarray):
        raise DataError(
            f"input '{info.name}': expected a numpy array, got {type(arr).__name__}"
        )
    if info.dtype and arr.dtype.name != info.dtype:
        raise DataError(
            f"input '{info.name}': expected dtype {info.dtype}, got {arr.dtype.name} "
            f"(convert with .astype(np.{info.dtype}))"
        )
    if info.shape is None:
        return
    if arr.ndim != len(info.shape):
        raise DataError(
            f"input '{info.name}': expected rank {len(info.shape)} {info.shape_str()}, got rank "
            f"{arr.ndim} {list(arr.shape)}"
        )
    for axis, (want, got) in enumerate(zip(info.shape, arr.shape, strict=True)):
        if isinstance(want, int) and want > 0 and want != got:
            raise DataError(
                f"input '{info.name}': expected shape {info.shape_str()}, got {list(arr.shape)} "
                f"(axis {axis}: {want} != {got})"
            )


def refuse_constant(model: Model, dataset: Dataset, what: str) -> FeedValidator:
    """Read ``dataset`` through a validator (no model run) and refuse it when every input is one
    constant value throughout (all-zero calibration data, say); returns the validator."""
    v = FeedValidator(model, nonfinite="keep")
    for feed in dataset:
        v(feed)
    v.finish(dataset.name)
    if v.all_constant():
        raise DataError(f"{what} {dataset.name}: every input is constant ({v.constant_text()}): nothing calibrated "
                        "or measured on it means anything; give representative samples")
    return v


def validated(model: Model, dataset: Dataset, validator: FeedValidator | None = None
              ) -> Iterator[Feed]:
    """Feeds of ``dataset`` checked against ``model``; empty or all-bad data raises."""
    v = validator or FeedValidator(model)
    for feed in dataset:
        out = v(feed)
        if out is not None:
            yield out
    v.finish(dataset.name)


def load_dataset(
    spec: str | os.PathLike[str] | None,
    model: Model,
    *,
    dims: dict[str, int] | None = None,
    samples: int = 8,
    seed: int = 0,
    preprocess: str | os.PathLike[str] | None = None,
    input_name: str | None = None,
) -> Dataset:
    """The dataset a CLI argument names: a .npz, a directory, images + spec, FILE.py:FUNC (a function of
    yours returning an iterable of feeds), or 'synthetic'."""
    if spec is None or str(spec) == "synthetic":
        return Dataset.synthetic(model, samples=samples, seed=seed, dims=dims)
    if re.fullmatch(r".+\.py:[A-Za-z_]\w*", str(spec)):
        from infertune.usercode import UserFunction

        fn = UserFunction.parse(str(spec), "--data")
        ds = Dataset.from_iterable(fn(), name=str(spec))
        ds.layout = f"a Python iterable of feeds from {fn.func}()"
        return ds
    p = Path(spec)
    if preprocess is not None:
        from infertune.preprocess import PreprocessSpec

        name = input_name or _single_input(model)
        return Dataset.from_images(p, PreprocessSpec.load(preprocess), input_name=name)
    names = [i.name for i in model.inputs]
    if p.is_dir():
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()):
            raise UsageError(
                f"{p} holds images: give a preprocessing spec with --preprocess SPEC.json"
            )
        return Dataset.from_directory(p, inputs=names, model=model)
    if p.suffix == ".npy":
        return Dataset.from_arrays({_single_input(model): load_npy(_existing(p))}, name=str(p))
    return Dataset.from_npz(p, inputs=names, model=model)


def as_dataset(data: Dataset | Iterable[Feed], name: str = "iterable") -> Dataset:
    """``data`` as a Dataset: any Python iterable of feeds is taken where a Dataset is."""
    return data if isinstance(data, Dataset) else Dataset.from_iterable(data, name=name)


STACKED = "samples stacked along axis 0"
ONE_FEED = "one feed per file"


def stacked(arrays: dict[str, np.ndarray], model: Model | None = None, inputs: Iterable[str] | None = None) -> bool:
    """Whether a file's arrays hold samples stacked along axis 0 (False: one complete feed, any shapes).
    Not a stack: an input array that is a scalar, input arrays whose axis-0 lengths differ, or a model
    input whose axis 0 is fixed at more than 1 (part of the feed, not a batch axis)."""
    names = [k for k in (inputs if inputs is not None else arrays) if k in arrays] or list(arrays)
    lengths = {arrays[k].shape[0] if arrays[k].ndim else None for k in names}
    if None in lengths or len(lengths) != 1:
        return False
    for info in model.inputs if model is not None else ():
        arr = arrays.get(info.name)
        if arr is not None and info.shape is not None and len(info.shape) == arr.ndim:
            if isinstance(info.shape[0], int) and info.shape[0] > 1:
                return False
    return True


def _single_input(model: Model) -> str:
    names = [i.name for i in model.inputs]
    if len(names) != 1:
        raise UsageError(f"the model has {len(names)} inputs ({', '.join(names)}): name one")
    return names[0]


def _per_sample(arrays: dict[str, np.ndarray], name: str, inputs: list[str] | None) -> dict[str, np.ndarray]:
    """The arrays that hold one row per sample; with ``inputs``, the others are dropped with a note."""
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if inputs is not None and any(k in arrays for k in inputs):
        counts = {lengths[k] for k in inputs if k in arrays}
        if len(counts) == 1 and None not in counts:
            n = counts.pop()
            ignored = sorted(k for k, length in lengths.items() if length != n)
            if ignored:
                warnings.warn(f"{name}: ignored array(s) {', '.join(ignored)} (not one row per sample: the inputs "
                              f"have {n} samples)", InfertuneWarning, stacklevel=3)
            return {k: v for k, v in arrays.items() if k not in ignored}
    if any(n is None for n in lengths.values()) or len(set(lengths.values())) != 1:
        desc = ", ".join(f"{k}: {v.shape}" for k, v in arrays.items())
        raise DataError(
            f"dataset {name}: arrays must hold samples stacked along axis 0 with the same "
            f"count; got {desc}"
        )
    return dict(arrays)


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    return p


def _len_or_none(items: object) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
