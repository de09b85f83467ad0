"""Ingestion: files in, chunks embedded and stored in a named collection.

A document's identity is its source path (relative to the folder given, prefixed with that folder's name, e.g.
``kb/phones/pixel-8.md``) and its fingerprint: the sha256 of its bytes plus the chunker settings and the embedder's
name. An unchanged file is skipped after hashing it, before any parsing or embedding; a changed one has its old
chunks deleted, then its new ones written (a crash in between leaves the document absent, so the next run adds
it again); with ``prune`` a file gone from a folder loses its chunks. When the collection was built with another
embedder or chunker, it is rebuilt: vectors from different models must never be compared.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.config import KeelConfig, default_config_path
from keel.embed import Embedder, build_embedder
from keel.ingest.chunking import CHUNKER_VERSION, Chunk, chunk_document
from keel.ingest.loaders import LOADERS, load_document
from keel.vector import VectorIndex, build_index, check_collection

__all__ = ["IngestReport", "Ingestor", "discover", "ensure_ingested", "source_paths"]

log = logging.getLogger("keel.ingest")

Progress = Callable[[str, int, int], None]  # (document id, files done, files total)
_EMBED_GROUP = 64  # chunks embedded per call: whole documents are grouped up to about this many


@dataclass(slots=True)
class IngestReport:
    collection: str
    files: int = 0
    unchanged: int = 0
    ingested: int = 0
    chunks: int = 0
    removed: int = 0
    rebuilt: bool = False
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [
            f"{self.files} files: {self.ingested} ingested ({self.chunks} chunks), {self.unchanged} unchanged",
            f"{self.removed} removed" if self.removed else "",
            "collection rebuilt (embedder or chunking changed)" if self.rebuilt else "",
            f"{len(self.failed)} failed" if self.failed else "",
        ]
        return f"{self.collection}: " + ", ".join(p for p in parts if p) + f" in {self.seconds:.1f} s"


def discover(paths: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[str]]:
    """``(document id, file)`` for every loadable file under ``paths``, and the folder prefixes they cover (for
    pruning). Hidden files and files no loader reads (``LICENSE``, ``NOTICE``) are skipped."""
    found: dict[str, Path] = {}
    roots: list[str] = []
    for path in paths:
        path = path.resolve()
        if path.is_dir():
            roots.append(path.name + "/")
            for file in sorted(path.rglob("*")):
                rel = file.relative_to(path)
                if file.is_file() and file.suffix.lower() in LOADERS and not any(p.startswith(".") for p in rel.parts):
                    found[f"{path.name}/{rel.as_posix()}"] = file
        elif path.is_file():
            found[path.name] = path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(found.items()), roots


class Ingestor:
    """Ingests into one index with one embedder; ``max_tokens``/``overlap_tokens`` size the chunks."""

    def __init__(
        self, embedder: Embedder, index: VectorIndex, *, max_tokens: int = 200, overlap_tokens: int = 30
    ) -> None:
        self.embedder = embedder
        self.index = index
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        settings = f"chunker {CHUNKER_VERSION} {max_tokens}/{overlap_tokens} embedder {embedder.name}"
        self.settings = hashlib.sha256(settings.encode()).hexdigest()[:16]

    async def ingest(
        self,
        paths: Sequence[Path],
        collection: str,
        *,
        prune: bool = False,
        rebuild: bool = False,
        progress: Progress | None = None,
    ) -> IngestReport:
        started = time.perf_counter()
        check_collection(collection)
        report = IngestReport(collection)
        files, roots = discover(paths)
        report.files = len(files)
        existing = await self.index.documents(collection)
        foreign = any(not (h or "").endswith(":" + self.settings) for h in existing.values())
        if rebuild or foreign:
            await self.index.drop(collection)
            report.rebuilt, existing = bool(existing), {}
        group: list[tuple[str, str, list[Chunk]]] = []
        for done, (doc_id, path) in enumerate(files, start=1):
            try:
                data = path.read_bytes()
                fingerprint = hashlib.sha256(data).hexdigest() + ":" + self.settings
                if existing.get(doc_id) == fingerprint:
                    report.unchanged += 1
                else:
                    chunks = chunk_document(load_document(doc_id, path, data), self.max_tokens, self.overlap_tokens)
                    group.append((doc_id, fingerprint, chunks))
                    if sum(len(c) for _, _, c in group) >= _EMBED_GROUP:
                        await self._write(collection, group, existing, report)
                        group = []
            except Exception as exc:  # one bad file must not stop the others
                log.warning("cannot ingest %s: %s", doc_id, exc)
                report.failed[doc_id] = str(exc)
            if progress:
                progress(doc_id, done, len(files))
        await self._write(collection, group, existing, report)
        if prune:
            seen = {doc_id for doc_id, _ in files}
            for doc_id in existing:
                if doc_id not in seen and any(doc_id.startswith(root) for root in roots):
                    await self.index.delete_document(collection, doc_id)
                    report.removed += 1
        report.seconds = time.perf_counter() - started
        return report

    async def _write(
        self,
        collection: str,
        group: list[tuple[str, str, list[Chunk]]],
        existing: dict[str, str | None],
        report: IngestReport,
    ) -> None:
        texts = [chunk.embed_text for _, _, chunks in group for chunk in chunks]
        if not group:
            return
        vectors = await self.embedder.embed(texts) if texts else None
        offset = 0
        for doc_id, fingerprint, chunks in group:
            if doc_id in existing:
                await self.index.delete_document(collection, doc_id)
            if chunks and vectors is not None:
                payloads = [self._payload(doc_id, fingerprint, chunk) for chunk in chunks]
                ids = [f"{doc_id}#{chunk.index}" for chunk in chunks]
                await self.index.upsert(collection, ids, vectors[offset : offset + len(chunks)], payloads)
            offset += len(chunks)
            report.ingested += 1
            report.chunks += len(chunks)

    @staticmethod
    def _payload(doc_id: str, fingerprint: str, chunk: Chunk) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "document": doc_id,
            "doc_hash": fingerprint,
            "chunk": chunk.index,
            "title": chunk.title,
            "text": chunk.text,
        }
        if chunk.heading:
            payload["heading"] = chunk.heading
        if chunk.fields is not None:
            payload["fields"] = chunk.fields
        return payload


def source_paths(sources: Sequence[str], base_dir: Path | None = None) -> list[Path]:
    """An app's ``retrieval.sources``, relative to ``base_dir`` (default: the config file's folder)."""
    base = base_dir or default_config_path().resolve().parent
    return [(base / source).resolve() for source in sources]


async def ensure_ingested(
    config: KeelConfig,
    base_dir: Path | None = None,
    *,
    embedder: Embedder | None = None,
    index: VectorIndex | None = None,
) -> list[IngestReport]:
    """Ingest every app's ``retrieval.sources`` into its collection: idempotent, and fast when nothing changed
    (hashing the files, no model call). Pass the app's shared ``embedder`` and ``index`` to reuse them; those
    built here are closed here. ``base_dir``: where relative sources are (default: the config file's folder)."""
    own_embedder, own_index = embedder is None, index is None
    embedder = embedder or build_embedder(config.embeddings)
    index = index or build_index(config.vector_store)
    reports = []
    try:
        ingestor = Ingestor(embedder, index)
        for app in config.apps:
            if app.retrieval is not None and app.retrieval.sources:
                paths = source_paths(app.retrieval.sources, base_dir)
                report = await ingestor.ingest(paths, app.retrieval.collection, prune=True)
                log.info("knowledge base for app %s: %s", app.name, report.summary())
                reports.append(report)
    finally:
        if own_embedder:
            await embedder.aclose()
        if own_index:
            await index.aclose()
    return reports
