"""Shared fixtures; the `slow` and `gpu` markers are skipped here, in one place."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.realmodels for slow tests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/models.py

from models import MODELS  # noqa: E402

DIGITS = ROOT / "examples" / "digits"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-slow", action="store_true",
                     help="skip end-to-end tests on real models (they run by default)")


def _gpu_present() -> bool:
    if os.environ.get("INFERTUNE_FORCE_GPU_TESTS"):
        return True
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="no NVIDIA GPU on this machine (/dev/nvidia0 absent)")
    skip_slow = pytest.mark.skip(reason="--skip-slow given")
    for item in items:
        if "gpu" in item.keywords and not _gpu_present():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and config.getoption("--skip-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _no_native_bf16(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """tune searches a BF16 variant on OpenVINO where the CPU computes bf16 in hardware: every test sees the
    same search on every machine (no bf16) unless marked ``native_bf16`` (or it patches the answer itself)."""
    if request.node.get_closest_marker("native_bf16") or importlib.util.find_spec("openvino") is None:
        return
    import infertune.backends.openvino as ov

    monkeypatch.setattr(ov, "native_bf16", lambda: False)


@pytest.fixture
def model_file(tmp_path: Path):
    """Save a registered tiny model to a file: model_file('conv') -> Path."""

    def make(name: str) -> Path:
        path = tmp_path / f"{name}.onnx"
        onnx.save(MODELS[name](), str(path))
        return path

    return make
