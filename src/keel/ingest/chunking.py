"""Chunking: sections become chunks of at most ``max_tokens`` (estimated at four characters a token), with
``overlap_tokens`` of overlap where a long section has to be cut.

Cuts fall between paragraphs, else between sentences, else inside a word only when nothing else fits. Short
neighbouring sections are packed together (each keeps its heading line) so that a spec sheet does not turn into
a dozen two-line chunks. MiniLM reads at most 256 word pieces; the default 200 estimated tokens keeps a chunk
inside that for English prose (numbers and model names cost more pieces, hence the margin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from keel.ingest.loaders import Document, Section

__all__ = ["CHUNKER_VERSION", "Chunk", "chunk_document"]

CHUNKER_VERSION = "1"  # part of every document's fingerprint: bump when the output of this module changes
CHARS_PER_TOKEN = 4
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    text: str
    title: str
    heading: str | None = None
    fields: dict[str, Any] | None = None

    @property
    def embed_text(self) -> str:
        """What the embedder sees: the document (or record) title gives a chunk the context its text lacks."""
        return f"{self.title}\n{self.text}"


def _split_long(text: str, limit: int, overlap: int) -> list[str]:
    """Pieces of at most ``limit`` characters, cut at the widest boundary that works."""
    if len(text) <= limit:
        return [text]
    for pattern, sep in ((r"\n\s*\n", "\n\n"), (r"\n", "\n"), (None, " ")):  # noqa: B007 - used after the loop
        units = [u.strip() for u in (re.split(pattern, text) if pattern else _SENTENCE.split(text))]
        units = [u for u in units if u]
        if len(units) > 1 and max(len(u) for u in units) <= limit:
            break
    else:
        step = max(1, limit - overlap)
        return [text[i : i + limit] for i in range(0, len(text) - overlap, step)]
    pieces: list[str] = []
    current: list[str] = []
    for unit in units:
        if current and len(sep.join([*current, unit])) > limit:
            pieces.append(sep.join(current))
            carry: list[str] = []
            for previous in reversed(current):  # overlap: the tail of the last piece, whole units only
                if len(sep.join([previous, *carry, unit])) > min(overlap + len(unit), limit):
                    break
                carry.insert(0, previous)
            current = carry
        current.append(unit)
    if current:
        pieces.append(sep.join(current))
    return pieces


def chunk_document(document: Document, max_tokens: int = 200, overlap_tokens: int = 30) -> list[Chunk]:
    limit, overlap = max_tokens * CHARS_PER_TOKEN, overlap_tokens * CHARS_PER_TOKEN
    chunks: list[Chunk] = []
    pending: list[str] = []
    pending_heading: str | None = None

    def emit(text: str, heading: str | None, section: Section | None = None) -> None:
        title = (section.title if section else None) or document.title
        chunks.append(Chunk(len(chunks), text, title, heading, section.fields if section else None))

    def flush() -> None:
        nonlocal pending_heading
        if pending:
            emit("\n\n".join(pending), pending_heading)
            pending.clear()
        pending_heading = None

    for section in document.sections:
        if section.fields is not None:
            flush()
            for piece in _split_long(section.text, limit, overlap):
                emit(piece, section.heading, section)
            continue
        label = section.heading.rsplit(" > ", 1)[-1] if section.heading else None
        block = f"## {label}\n{section.text}" if label else section.text
        if len(block) > limit:
            flush()
            for piece in _split_long(section.text, limit - len(label or "") - 4, overlap):
                emit(f"## {label}\n{piece}" if label else piece, section.heading)
            continue
        if pending and len("\n\n".join([*pending, block])) > limit:
            flush()
        if not pending:
            pending_heading = section.heading
        pending.append(block)
    flush()
    return chunks
