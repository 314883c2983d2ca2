from __future__ import annotations

import numpy as np
import pytest

from infertune.data import (
    Dataset,
    FeedValidator,
    batched,
    load_dataset,
    parse_dims,
    synthetic_feed,
    validated,
)
from infertune.errors import DataError, UsageError
from infertune.model import Model
from infertune.preprocess import PreprocessSpec
from models import MODELS


@pytest.fixture
def conv():
    return Model.from_proto(MODELS["conv"]())


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_npz_yields_samples_with_batch_axis_and_keeps_labels(tmp_path, conv):
    x, labels = _x(5), np.arange(5)
    np.savez(tmp_path / "d.npz", x=x, label=labels)
    ds = Dataset.from_npz(tmp_path / "d.npz")
    feeds = list(ds)
    assert ds.size == 5 and len(feeds) == 5
    np.testing.assert_array_equal(feeds[3]["x"], x[3:4])
    assert feeds[3]["label"].tolist() == [3]
    v = FeedValidator(conv)
    clean = [v(f) for f in feeds]
    assert set(clean[0]) == {"x"} and v.extras_ignored == {"label"}
    assert list(ds) and len(list(ds)) == 5  # re-iterable


def test_directory_sources(tmp_path):
    x = _x(4)
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "a.npz", x=x[:3])
    np.savez(tmp_path / "npz" / "b.npz", x=x[3:])
    assert [f["x"].shape[0] for f in Dataset.from_directory(tmp_path / "npz")] == [1, 1, 1, 1]
    for i in range(2):
        d = tmp_path / "samples" / f"s{i}"
        d.mkdir(parents=True)
        np.save(d / "x.npy", x[i : i + 1])
    feeds = list(Dataset.from_directory(tmp_path / "samples"))
    np.testing.assert_array_equal(feeds[1]["x"], x[1:2])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        Dataset.from_directory(tmp_path / "empty")


def test_images_through_a_preprocess_spec(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    spec = PreprocessSpec(resize=(16, 16), interpolation="nearest", mean=(0.5,), std=(0.25,))
    spec.save(tmp_path / "spec.json")
    model = Model.from_proto(MODELS["conv"]())
    ds = load_dataset(tmp_path, model, preprocess=tmp_path / "spec.json")
    feeds = list(validated(model, ds))
    assert len(feeds) == 3 and feeds[0]["x"].shape == (1, 3, 16, 16)
    img = np.asarray(Image.open(tmp_path / "0.png").convert("RGB").resize(
        (16, 16), Image.Resampling.NEAREST), np.float32)
    want = ((img / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(feeds[0]["x"], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(UsageError, match="--preprocess"):
        load_dataset(tmp_path, model)


def test_synthetic_is_seeded_and_follows_model_types():
    m = Model.from_proto(MODELS["two_inputs"]())
    a = list(Dataset.synthetic(m, samples=3, seed=7, dims={"S": 5}))
    b = list(Dataset.synthetic(m, samples=3, seed=7, dims={"S": 5}))
    c = list(Dataset.synthetic(m, samples=3, seed=8, dims={"S": 5}))
    assert a[0]["input_ids"].dtype == np.int64 and a[0]["input_ids"].shape == (1, 5)
    assert (a[0]["attention_mask"] == 1).all()
    np.testing.assert_array_equal(a[2]["input_ids"], b[2]["input_ids"])
    assert not np.array_equal(a[2]["input_ids"], c[2]["input_ids"])
    with pytest.raises(DataError, match="'S' is symbolic"):
        synthetic_feed(m)


def test_iterable_and_batching(conv):
    x = _x(5)
    gen = ({"x": x[i : i + 1]} for i in range(5))
    ds = Dataset.from_iterable(gen)
    assert len(list(ds)) == 5 and len(list(ds)) == 5  # one-shot iterator cached
    b = list(batched(ds, 2))
    assert [f["x"].shape[0] for f in b] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in b]), x)
    assert list(validated(conv, batched(ds, 2)))


def test_parse_dims():
    assert parse_dims("batch=2,sequence=128") == {"batch": 2, "sequence": 128}
    assert parse_dims(["a=1", "b=2"]) == {"a": 1, "b": 2}
    with pytest.raises(UsageError, match="bad dim"):
        parse_dims("batch:2")


@pytest.mark.parametrize("feed, fragment", [
    ({"y": np.zeros((1, 3, 16, 16), np.float32)}, "input 'x' is missing from the data (the data has: y"),
    ({"x": np.zeros((1, 3, 16, 16), np.float64)}, "input 'x': expected dtype float32, got float64"),
    ({"x": np.zeros((3, 16, 16), np.float32)}, "input 'x': expected rank 4 [N, 3, 16, 16], got rank 3"),
    ({"x": np.zeros((1, 4, 16, 16), np.float32)}, "axis 1: 3 != 4"),
    ({"x": [[1.0]]}, "expected a numpy array, got list"),
])
def test_validation_names_input_expected_and_got(conv, feed, fragment):
    with pytest.raises(DataError) as info:
        FeedValidator(conv)(feed)
    assert fragment in str(info.value)


def test_nonfinite_are_counted_and_skipped(conv):
    x = _x(4)
    x[1, 0, 0, 0] = np.nan
    x[3, 0, 0, :2] = np.inf
    v = FeedValidator(conv)
    kept = list(validated(conv, Dataset.from_arrays({"x": x}), v))
    assert len(kept) == 2 and v.feeds_skipped == 2
    assert v.nonfinite_counts == {"x": 3} and v.first_nonfinite == {"x": 1}
    assert "3 NaN/Inf values (first in sample 1); 2 sample(s) skipped" in v.warnings()[0]
    with pytest.raises(DataError, match="NaN/Inf"):
        list(validated(conv, Dataset.from_arrays({"x": x}), FeedValidator(conv, nonfinite="error")))
    all_bad = np.full((2, 3, 16, 16), np.nan, np.float32)
    with pytest.raises(DataError, match="all 2 samples hold NaN/Inf"):
        list(validated(conv, Dataset.from_arrays({"x": all_bad})))


def test_empty_datasets(tmp_path, conv):
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match="empty"):
        Dataset.from_npz(tmp_path / "e.npz")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(DataError, match="empty"):
        Dataset.from_npz(tmp_path / "none.npz")
    with pytest.raises(DataError, match="empty"):
        list(validated(conv, Dataset.from_iterable([])))


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        Dataset.from_npz(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="not found"):
        Dataset.from_npz(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="same count"):
        Dataset.from_arrays({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})
