"""Labelled example texts shipped with the guardrails (``data/*.jsonl``) and their embeddings.

Example sets are embedded with whatever embedder the app shares (so a message's vector and the examples' vectors are
always in one space), once per process, and kept on disk under ``$KEEL_HOME/guard-cache`` keyed by the embedder's
name and the texts' hash: the first start embeds a couple of thousand short texts (seconds on a laptop CPU), later
starts read a file. Call a check's ``warm`` at startup so no chat turn waits for that.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Embed", "ExemplarSet", "cache_dir", "data_rows"]

Embed = Callable[[list[str]], Awaitable[npt.NDArray[np.float32]]]


@cache
def data_rows(name: str) -> tuple[dict[str, Any], ...]:
    """The rows of ``keel/guard/data/<name>.jsonl`` (read once per process)."""
    text = files("keel.guard").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def cache_dir() -> Path:
    """``$KEEL_HOME/guard-cache``, with ``KEEL_HOME`` defaulting to ``.keel`` like the embedded database."""
    return Path(os.environ.get("KEEL_HOME") or ".keel").expanduser() / "guard-cache"


def _space(embed: Embed) -> tuple[str, bool]:
    """Which vector space ``embed`` produces, and whether that name is stable enough to cache on disk: a bound
    ``Embedder.embed`` carries the embedder's ``name``; any other callable is only known by identity."""
    owner = getattr(embed, "__self__", None)
    name = getattr(owner, "name", None)
    if isinstance(name, str) and name:
        return name, True
    return f"callable-{id(owner if owner is not None else embed)}", False


class ExemplarSet:
    """A fixed list of texts whose vectors are computed once per vector space and shared by every caller."""

    def __init__(self, label: str, texts: Sequence[str], *, persist: bool = True) -> None:
        """``persist``: keep the vectors on disk (worth it for the large shipped sets, not for an app's dozen)."""
        self.label = label
        self.texts = list(texts)
        self.persist = persist
        self._vectors: dict[str, npt.NDArray[np.float32]] = {}
        self._pending: dict[str, asyncio.Task[npt.NDArray[np.float32]]] = {}

    async def vectors(self, embed: Embed | None) -> tuple[str, npt.NDArray[np.float32]]:
        """``(space, vectors)``: one normalised row per text. The work is shielded, so a check cancelled by its
        timeout while the examples are being embedded leaves the job running for the next message."""
        if embed is None:
            raise RuntimeError("no embedder configured for guardrails")
        space, persistent = _space(embed)
        persistent = persistent and self.persist
        found = self._vectors.get(space)
        if found is not None:
            return space, found
        task = self._pending.get(space)
        if task is None:
            task = self._pending[space] = asyncio.ensure_future(self._compute(embed, space, persistent))
            task.add_done_callback(lambda t: self._done(space, t))
        return space, await asyncio.shield(task)

    def _done(self, space: str, task: asyncio.Task[npt.NDArray[np.float32]]) -> None:
        self._pending.pop(space, None)
        if not task.cancelled() and task.exception() is None:
            self._vectors[space] = task.result()

    async def _compute(self, embed: Embed, space: str, persistent: bool) -> npt.NDArray[np.float32]:
        path = None
        if persistent:
            digest = hashlib.sha256("\0".join([space, *self.texts]).encode()).hexdigest()[:16]
            path = cache_dir() / f"{self.label}-{digest}.npy"
            cached = await asyncio.to_thread(_load, path, len(self.texts))
            if cached is not None:
                return cached
        vectors = np.asarray(await embed(self.texts), dtype=np.float32) if self.texts else np.zeros((0, 1), np.float32)
        if path is not None:
            await asyncio.to_thread(_save, path, vectors)
        return vectors


def _load(path: Path, rows: int) -> npt.NDArray[np.float32] | None:
    try:
        array: npt.NDArray[np.float32] = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.ndim != 2 or array.shape[0] != rows or array.dtype != np.float32:
        return None
    return array


def _save(path: Path, vectors: npt.NDArray[np.float32]) -> None:
    """Written to a temporary file and renamed, so a crash never leaves a truncated cache; a read-only home only
    costs the next start its embedding time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
