"""Train the bundled example: a small CNN on scikit-learn's digits, exported to ONNX.

    python3 -m venv .venv-train && .venv-train/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime
    .venv-train/bin/python scripts/train_digits_cnn.py

torch is a dependency of this script only (not of infertune or its tests). Deterministic: fixed seeds,
one thread. Writes examples/digits/{digits_cnn.onnx, test.npz, calib.npz} and prints the held-out
top-1 measured through ONNX Runtime.

Data: 1797 8x8 images, pixel values 0..16 scaled to [0, 1]; 360 held out (stratified,
random_state=0) as test.npz (image, label); 128 stratified samples of the training split as
calib.npz (image, label) for INT8 calibration.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "examples" / "digits"
EPOCHS = 40


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def data() -> tuple[np.ndarray, ...]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    _, x_cal, _, y_cal = train_test_split(x_train, y_train, test_size=128, stratify=y_train, random_state=0)
    return x_train, y_train, x_test, y_test, x_cal, y_cal


def train(x: np.ndarray, y: np.ndarray) -> DigitsCNN:
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        if epoch % 10 == 9:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    return model.eval()


def export(model: DigitsCNN, path: Path) -> None:
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    proto.producer_name = "infertune scripts/train_digits_cnn.py"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def main() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_test, y_test, x_cal, y_cal = data()
    start = time.perf_counter()
    model = train(x_train, y_train)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    OUT.mkdir(parents=True, exist_ok=True)
    onnx_path = OUT / "digits_cnn.onnx"
    export(model, onnx_path)
    np.savez_compressed(OUT / "test.npz", image=x_test, label=y_test)
    np.savez_compressed(OUT / "calib.npz", image=x_cal, label=y_cal)

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": x_test})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    top1 = 100.0 * float(np.mean(logits.argmax(-1) == y_test))
    params = sum(p.numel() for p in model.parameters())
    print(f"held-out top-1 (ONNX Runtime): {top1:.2f}% on {len(y_test)} images; {params} parameters; "
          f"{onnx_path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
