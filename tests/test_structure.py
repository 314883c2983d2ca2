"""The house rules that keep the code easy to change, checked on the source itself (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import infertune

SRC = Path(infertune.__file__).resolve().parent
# a layer may import its own and the layers below it, never one above
LAYERS = [
    {"errors", "_io", "outputs", "limits", "checks", "fingerprint", "model", "data", "preprocess",
     "usercode"},  # ground floor
    {"backends"},
    {"quant", "perf", "analysis", "deploy"},  # siblings: they may use each other, never the layers above
    {"report"},
    {"search"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every infertune module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("infertune"):
            if node.module != "infertune":  # `from infertune import backends` imports infertune.backends
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("infertune"))
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_only_flow_downward():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if name == "infertune":
            continue  # the public API re-exports (lazily) from every layer
        for imported in _imports(path):
            if imported not in modules:  # `from infertune.x import name` also yields infertune.x.name
                continue
            if RANK[_top(imported)] > RANK[_top(name)]:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_report_renders_only_and_cli_verbs_stay_apart():
    modules = _modules()
    report = {i for i in _imports(modules["infertune.report"]) if i in modules}
    assert report <= {"infertune._io"}, report  # no backend, no search, nothing that measures
    for name, path in modules.items():
        if name.startswith("infertune.cli.") and name != "infertune.cli.common":
            verbs = {i for i in _imports(path) if i.startswith("infertune.cli") and i in modules}
            assert verbs <= {"infertune.cli.common"}, f"{name} imports another verb's module: {verbs}"


def test_the_planted_violation_is_caught(tmp_path, monkeypatch):
    """The checker itself can fail: a quant module importing the search is reported."""
    fake = tmp_path / "infertune" / "quant"
    fake.mkdir(parents=True)
    (tmp_path / "infertune" / "search").mkdir()
    (tmp_path / "infertune" / "search" / "tuner.py").write_text("")
    (fake / "bad.py").write_text("from infertune.search.tuner import tune\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "infertune")
    with pytest.raises(AssertionError, match="infertune.quant.bad imports infertune.search.tuner"):
        test_imports_only_flow_downward()


def test_sizes():
    modules = _modules()
    long = {n: len(p.read_text().splitlines()) for n, p in modules.items() if len(p.read_text().splitlines()) > 600}
    assert not long, f"modules over 600 lines: {long}"
    root = [p for p in SRC.glob("*.py")]
    assert len(root) <= 12, sorted(p.name for p in root)


def test_the_public_api_resolves():
    for name in infertune.__all__:
        assert getattr(infertune, name) is not None
    assert callable(infertune.tune) and callable(infertune.bench)  # the functions, not their subpackages
    with pytest.raises(AttributeError):
        infertune.no_such_name  # noqa: B018
