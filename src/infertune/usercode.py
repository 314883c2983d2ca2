"""The user's own Python, named on the command line as ``FILE.py:FUNC``: a metric
(``--metric``) or a source of feeds (``--data``).

The file is imported by its path (never pickled: a ``UserFunction`` travels to other processes as
its path, function name and the file's sha256, and is imported again there, refusing a file that
changed). An exception raised inside the user's code becomes a ``UserCodeError`` whose message is
the user's own traceback, only the frames of the user's file, marked as theirs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any

from infertune.errors import UsageError, UserCodeError

_MODULES: dict[tuple[str, str], object] = {}  # (path, sha256) -> the imported module, once per process


class UserFunction:
    """``FILE.py:FUNC``, imported from its path on first call in each process."""

    def __init__(self, path: str | Path, func: str) -> None:
        self.path = Path(path).resolve()
        self.func = func
        if not self.path.is_file():
            raise UsageError(f"{self.path} not found (expected FILE.py:FUNC)")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self._fn: Any = None

    @classmethod
    def parse(cls, text: str, what: str = "--metric") -> UserFunction:
        path, sep, func = str(text).rpartition(":")
        if not sep or not path.endswith(".py") or not func.isidentifier():
            raise UsageError(f"{what} {text!r}: expected FILE.py:FUNC, e.g. metrics.py:word_accuracy")
        return cls(path, func)

    @property
    def name(self) -> str:
        return self.func

    def __str__(self) -> str:
        return f"{self.path}:{self.func}"

    def __getstate__(self) -> dict:  # the code itself never travels: only where to import it from
        return {"path": str(self.path), "func": self.func, "sha256": self.sha256}

    def __setstate__(self, state: dict) -> None:
        self.path, self.func, self.sha256, self._fn = Path(state["path"]), state["func"], state["sha256"], None

    def load(self) -> Any:
        if self._fn is None:
            module = _import(self.path, self.sha256)
            fn = getattr(module, self.func, None)
            if not callable(fn):
                raise UsageError(f"{self.path} has no function {self.func!r}")
            self._fn = fn
        return self._fn

    @property
    def __signature__(self) -> inspect.Signature:  # what the user's function takes (a metric may take the feeds)
        return inspect.signature(self.load())

    def __call__(self, *args: Any) -> Any:
        fn = self.load()
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever the user's code raises is reported as theirs
            raise user_error(e, self.path, f"{self.func} in {self.path.name}") from None


def _import(path: Path, sha256: str) -> object:
    key = (str(path), sha256)
    if key in _MODULES:
        return _MODULES[key]
    if not path.is_file():
        raise UserCodeError(f"{path} not found on this machine: a metric or data file must be on a path every "
                            "Ray node shares")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise UserCodeError(f"{path} changed since the run started (sha256 differs): keep it unchanged, or on a "
                            "shared path with the same content on every node")
    name = f"infertune_user_{sha256[:12]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise user_error(e, path, f"importing {path.name}") from None
    _MODULES[key] = module
    return module


def user_error(e: BaseException, path: Path, where: str) -> UserCodeError:
    """``e`` as the user's error: their traceback, only the frames of ``path``."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path]
    lines = "".join(traceback.format_list(frames)) if frames else ""
    exc = "".join(traceback.format_exception_only(type(e), e)).strip()
    return UserCodeError(f"your code raised an error ({where}):\nTraceback (your code only):\n{lines}{exc}")
