"""The bad-input corpus's fixtures, made from tests/models.py and examples/digits (KB-sized).

``build(base)`` writes them under ``base/in`` (and a read-only directory beside it) and returns
their paths by name; ``snapshot`` hashes a tree so a test can tell that nothing in it changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from infertune import backends
from infertune.cli import main
from infertune.data import Dataset
from infertune.deploy import artifact
from infertune.deploy.manifest import signed
from infertune.model import Model
from models import MODELS

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def _dims(proto: onnx.ModelProto, names: tuple[str | None, str | None]) -> onnx.ModelProto:
    """conv with its H and W dims renamed (None: unnamed)."""
    for vi in [*proto.graph.input, *proto.graph.output]:
        d = vi.type.tensor_type.shape.dim
        for axis, name in zip((2, 3), names, strict=True):
            d[axis].Clear()
            if name:
                d[axis].dim_param = name
    return proto


def _ir3() -> onnx.ModelProto:
    """conv as an IR 3 / opset 7 exporter wrote it: every weight also a graph input."""
    m = MODELS["conv"]()
    m.opset_import[0].version = 7
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _png(path: Path, width: int, height: int, pixels: bytes | None = None) -> None:
    """A grey PNG; with ``pixels`` None, only its header claims the size (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + pixels[r * width:(r + 1) * width] for r in range(height)) if pixels else b"\x00"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _resign(d: Path, **changes) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(signed(m)))


def _artifacts(inp: Path, digits: Model) -> dict[str, Path]:
    good = artifact.save_artifact(inp / "art", digits, source_sha256="0" * 64,
                                  settings=backends.Settings(intra_op_threads=1))
    out = {"ART": good}

    def broken(name: str) -> Path:
        d = inp / "broken" / name
        shutil.copytree(good, d)
        out[name.upper()] = d
        return d

    d = broken("edited")  # a latency figure improved by hand
    m = json.loads((d / "manifest.json").read_text())
    m["latency"] = {"p50_ms": 0.001}
    (d / "manifest.json").write_text(json.dumps(m))
    (broken("extra") / "notes.txt").write_text("a file the artifact never had")
    d = broken("report_model")  # the model entry points at the HTML report, hashes and digest consistent
    (d / "report.html").write_text("<html>not a model</html>")
    files = {**json.loads((d / "manifest.json").read_text())["files"],
             "report.html": artifact.sha256_file(d / "report.html")}
    _resign(d, model="report.html", files=files)
    d = broken("extdata")  # the model reads its weights from outside the artifact
    proto = onnx.load(str(d / "model.onnx"))
    t = proto.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../secret.bin")
    onnx.save(proto, str(d / "model.onnx"))
    _resign(d, files={"model.onnx": artifact.sha256_file(d / "model.onnx")})
    _resign(broken("badsettings"), settings={"intra_op_threads": "eight"})
    d = broken("files_list")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "files": []}))
    d = broken("files_str")
    (d / "manifest.json").write_text(json.dumps({**m, "files": "model.onnx"}))
    (broken("deep") / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    _resign(broken("many"), files={f"f{i}.bin": "0" * 64 for i in range(20_000)})
    with open(broken("huge") / "manifest.json", "wb") as f:  # sparse: 17 MiB on paper, nothing on disk
        f.truncate(17 * 2**20)
    _resign(broken("schema1"), schema_version=1)
    for twin in ("my model", "my_model"):  # two artifacts whose names sanitise alike
        shutil.copytree(good, inp / "twins" / twin)
    return out


def _data(inp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    with np.load(DIGITS / "calib.npz") as z:
        calib = z["image"][:16]
    with np.load(DIGITS / "test.npz") as z:
        test, label = z["image"][:40], z["label"][:40]
    p = {name: inp / f"{name.lower()}.npz" for name in
         ("C", "T", "BADLABEL", "STRLABEL", "FLOATLABEL", "ZEROS", "NAN", "CLASS_NAMES", "PICKLED")}
    np.savez(p["C"], image=calib)
    np.savez(p["T"], image=test, label=label)
    np.savez(p["BADLABEL"], image=test, label=label + 100)
    np.savez(p["STRLABEL"], image=test, label=label.astype(str))
    np.savez(p["FLOATLABEL"], image=test, label=label + 0.5)
    np.savez(p["ZEROS"], image=np.zeros_like(calib))
    nan = calib.copy()
    nan[1, 0, 0, 0], nan[3, 0, 1, 1], nan[5, 0, 2, 2] = np.nan, np.inf, np.nan
    np.savez(p["NAN"], image=nan)
    np.savez(p["CLASS_NAMES"], image=test, label=label, class_names=np.array([str(i) for i in range(10)]))
    np.savez(p["PICKLED"], logits=np.array([{"a": 1}] * 4, dtype=object))  # opening it would unpickle
    p["EMPTY"] = inp / "empty.npz"
    p["EMPTY"].write_bytes(b"")
    p["DDIR"] = inp / "datadir"
    p["DDIR"].mkdir()
    np.savez(p["DDIR"] / "a.npz", image=calib[:4])
    p["IMAGES"] = inp / "images"
    p["IMAGES"].mkdir()
    for i in range(4):
        _png(p["IMAGES"] / f"{i}.png", 8, 8, rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
    p["BOMB"] = inp / "bomb"
    p["BOMB"].mkdir()
    _png(p["BOMB"] / "bomb.png", 50_000, 50_000)
    specs = {"GOOD": {"color": "GRAY"}, "SPEC_LIST": [], "SPEC_NULL": None, "RESIZE0": {"color": "GRAY", "resize": 0},
             "RESIZE_NEG": {"color": "GRAY", "resize": -8}, "RESIZE_BIG": {"color": "GRAY", "resize": 100_000},
             "MEAN_STR": {"color": "GRAY", "mean": "grey"}, "SCALE_NAN": {"color": "GRAY", "scale": float("nan")}}
    (inp / "specs").mkdir()
    for name, spec in specs.items():
        p[name] = inp / "specs" / f"{name.lower()}.json"
        p[name].write_text(json.dumps(spec))  # NaN is written as the bare NaN Python's json reads back
    return p


def build(base: Path) -> dict[str, Path]:
    """Every fixture of the corpus under ``base``, by name (see the module docstring)."""
    inp = base / "in"
    inp.mkdir()
    p: dict[str, Path] = {"BASE": base, "IN": inp, "M": inp / "digits.onnx"}
    shutil.copyfile(DIGITS / "digits_cnn.onnx", p["M"])
    os.link(p["M"], inp / "hard.onnx")
    os.symlink("digits.onnx", inp / "sym.onnx")
    p.update(HARD=inp / "hard.onnx", SYM=inp / "sym.onnx", TRUNC=inp / "trunc.onnx",
             HW=_save(_dims(MODELS["conv"](), ("H", "W")), inp / "hw.onnx"),
             UNNAMED=_save(_dims(MODELS["conv"](), (None, None)), inp / "unnamed.onnx"),
             IR3=_save(_ir3(), inp / "ir3.onnx"), FILE=inp / "afile.txt")
    p["TRUNC"].write_bytes(p["M"].read_bytes()[:5000])
    p["FILE"].write_text("a regular file")
    p.update(_data(inp))
    p["FOREIGN"] = inp / "foreign"  # a user's directory: must never be written into
    p["FOREIGN"].mkdir()
    (p["FOREIGN"] / "notes.txt").write_text("my notes")
    shutil.copyfile(p["M"], p["FOREIGN"] / "model.onnx")
    from infertune.quant.quantize import quantize
    from infertune.quant.recipe import recipe_path

    digits = Model.load(p["M"])
    q = quantize(digits, Dataset.from_npz(p["C"]), stability_halves=0)
    p["Q"] = inp / "q.onnx"
    q.model.save(p["Q"])
    p["RECIPE"] = recipe_path(p["Q"])
    p["RECIPE"].write_text(json.dumps(q.recipe.to_dict()))
    p.update(_artifacts(inp, digits))
    engines = inp / "engines"
    engines.mkdir()
    p["RANDOM_ENGINE"] = engines / "random.engine"
    p["RANDOM_ENGINE"].write_bytes(np.random.default_rng(1).bytes(4096))
    p["TYPED_ENGINE"] = engines / "typed.engine"
    p["TYPED_ENGINE"].write_bytes(b"\0" * 64)
    (engines / "typed.json").write_text(json.dumps({"kind": "infertune-tensorrt-engine", "tensorrt": "10.4.0",
                                                    "gpu": "A100", "files": "x"}))
    p["DEEP_ENGINE"] = engines / "deep.engine"
    p["DEEP_ENGINE"].write_bytes(b"\0" * 64)
    (engines / "deep.json").write_text("{\"a\":" * 100_000 + "1" + "}" * 100_000)
    p["RO"] = base / "readonly"
    p["RO"].mkdir()
    p["RO"].chmod(0o555)
    return p


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by sha256, symbolic links by target, directories by name."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "<dir>"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def fill(argv: list[str], paths: dict[str, Path], out: Path) -> list[str]:
    subs = {**{k: str(v) for k, v in paths.items()}, "OUT": str(out)}
    return [a.format(**subs) if "{" in a else a for a in argv]
