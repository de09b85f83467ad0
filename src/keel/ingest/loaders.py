"""Loaders: a file becomes a :class:`Document` of :class:`Section` s, keeping the structure chunking must respect.

Markdown splits at headings (each section remembers its heading path), text at blank lines, PDF per page (pypdf,
pure Python), and tables (CSV/TSV, JSONL) per row: a row is one record, rendered as ``Field: value`` lines for the
model and kept as typed ``fields`` in the payload so queries can filter on them.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = ["LOADERS", "Document", "Section", "load_document"]


@dataclass(frozen=True, slots=True)
class Section:
    """A run of text under one heading, or one table row (``fields`` set; never merged with others or split)."""

    text: str
    heading: str | None = None
    fields: dict[str, Any] | None = None
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    title: str
    kind: str
    sections: list[Section] = field(default_factory=list)


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_TITLE_KEYS = ("title", "name", "model", "device", "product")
_MAKER_KEYS = ("brand", "maker", "manufacturer", "company", "vendor")


def _stem_title(path: Path) -> str:
    return re.sub(r"[-_]+", " ", path.stem).strip().capitalize() or path.name


def load_markdown(doc_id: str, path: Path, data: bytes) -> Document:
    text = data.decode("utf-8", errors="replace")
    if text.startswith("---\n"):  # YAML front matter is metadata, not content
        end = text.find("\n---", 4)
        if end != -1:
            text = text[end + 4 :].lstrip("\n")
    title: str | None = None
    path_stack: list[tuple[int, str]] = []
    sections: list[Section] = []
    lines: list[str] = []
    in_fence = False

    def close() -> None:
        body = "\n".join(lines).strip()
        if body:
            heading = " > ".join(h for _, h in path_stack) or None
            sections.append(Section(body, heading))
        lines.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _HEADING.match(line)
        if match is None:
            lines.append(line)
            continue
        close()
        level, heading = len(match.group(1)), match.group(2)
        if level == 1 and title is None:
            title = heading
            continue
        while path_stack and path_stack[-1][0] >= level:
            path_stack.pop()
        path_stack.append((level, heading))
    close()
    return Document(doc_id, title or _stem_title(path), "markdown", sections)


def load_text(doc_id: str, path: Path, data: bytes) -> Document:
    text = data.decode("utf-8", errors="replace").strip()
    return Document(doc_id, _stem_title(path), "text", [Section(text)] if text else [])


def load_pdf(doc_id: str, path: Path, data: bytes) -> Document:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    title = (reader.metadata.title if reader.metadata else None) or _stem_title(path)
    sections = []
    for number, page in enumerate(reader.pages, start=1):
        text = re.sub(r"[ \t]+\n", "\n", page.extract_text() or "").strip()
        if text:
            sections.append(Section(text, f"Page {number}"))
    return Document(doc_id, str(title), "pdf", sections)


def _typed(value: str) -> Any:
    """CSV cells arrive as text; numbers become numbers so that filters can match them."""
    stripped = value.strip()
    if re.fullmatch(r"-?\d{1,15}", stripped):
        return int(stripped)
    if re.fullmatch(r"-?\d+\.\d+", stripped):
        return float(stripped)
    return stripped


def _scalar(value: Any) -> Any:
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


def _row_section(row: dict[str, Any], number: int, stem: str) -> Section:
    fields = {str(k).strip(): _scalar(v) for k, v in row.items() if k is not None and v not in (None, "")}
    lower = {k.lower(): v for k, v in fields.items()}
    name = next((str(lower[k]) for k in _TITLE_KEYS if k in lower), None)
    maker = next((str(lower[k]) for k in _MAKER_KEYS if k in lower), None)
    if name and maker and not name.lower().startswith(maker.lower()):
        name = f"{maker} {name}"
    lines = [f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in fields.items()]
    return Section("\n".join(lines), None, fields, name or f"{stem} row {number}")


def load_csv(doc_id: str, path: Path, data: bytes) -> Document:
    text = data.decode("utf-8-sig", errors="replace")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    sections = [
        _row_section({k: _typed(v) if isinstance(v, str) else v for k, v in row.items()}, i, path.stem)
        for i, row in enumerate(rows, start=1)
    ]
    return Document(doc_id, _stem_title(path), "table", sections)


def load_jsonl(doc_id: str, path: Path, data: bytes) -> Document:
    sections = []
    for i, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            row = orjson.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"line {i}: expected a JSON object per line")
            sections.append(_row_section(row, i, path.stem))
    return Document(doc_id, _stem_title(path), "table", sections)


Loader = Callable[[str, Path, bytes], Document]
LOADERS: dict[str, Loader] = {
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".txt": load_text,
    ".text": load_text,
    ".pdf": load_pdf,
    ".csv": load_csv,
    ".tsv": load_csv,
    ".jsonl": load_jsonl,
    ".ndjson": load_jsonl,
}


def load_document(doc_id: str, path: Path, data: bytes | None = None) -> Document:
    """Parse ``path`` (or its already-read ``data``) with the loader for its suffix."""
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(f"{path}: no loader for {path.suffix or 'files without a suffix'}")
    return loader(doc_id, path, path.read_bytes() if data is None else data)
