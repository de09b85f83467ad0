"""Ingestion: load documents (Markdown, text, PDF, CSV/JSONL tables), chunk them, embed them and store them in a
vector collection, skipping what has not changed. ``keel ingest`` is the command line; :func:`ensure_ingested`
brings an app's knowledge base up to date at start."""

from __future__ import annotations

from keel.ingest.chunking import Chunk, chunk_document
from keel.ingest.loaders import LOADERS, Document, Section, load_document
from keel.ingest.pipeline import Ingestor, IngestReport, discover, ensure_ingested, source_paths

__all__ = [
    "LOADERS",
    "Chunk",
    "Document",
    "IngestReport",
    "Ingestor",
    "Section",
    "chunk_document",
    "discover",
    "ensure_ingested",
    "load_document",
    "source_paths",
]
