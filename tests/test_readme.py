"""The README's Python example runs as written (on the bundled digits model and data)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    digits = ROOT / "examples" / "digits"
    shutil.copy(digits / "digits_cnn.onnx", tmp_path / "model.onnx")
    shutil.copy(digits / "calib.npz", tmp_path / "calib.npz")
    shutil.copy(digits / "test.npz", tmp_path / "test.npz")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert (tmp_path / "model.int8.onnx").is_file() and (tmp_path / "out" / "manifest.json").is_file()
    assert scope["artifact"].manifest["accuracy"]["budget"] == "cosine>=0.999"
    assert scope["mixed"].chosen is not None and len(scope["ranking"]) == len(scope["space"].groups)
