"""Loaders and chunking: structure in, chunks that respect it out."""

from __future__ import annotations

from pathlib import Path

from keel.ingest import chunk_document, load_document


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with ``lines`` of text, written by hand so the test needs no PDF writer."""
    text = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text.encode()),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_markdown_sections_keep_their_heading_path(tmp_path: Path) -> None:
    path = tmp_path / "pixel.md"
    path.write_text(
        "---\nauthor: me\n---\n# Pixel 8\n\nIntro text.\n\n## Battery\n\n4,575 mAh.\n\n### Charging\n\n27 W wired.\n\n"
        "```\n# not a heading\n```\n\n## Display\n\n6.2-inch OLED.\n"
    )
    doc = load_document("kb/pixel.md", path)
    assert doc.title == "Pixel 8" and doc.kind == "markdown"
    assert [(s.heading, s.text.splitlines()[0]) for s in doc.sections] == [
        (None, "Intro text."),
        ("Battery", "4,575 mAh."),
        ("Battery > Charging", "27 W wired."),
        ("Display", "6.2-inch OLED."),
    ]
    assert "# not a heading" in doc.sections[2].text


def test_small_sections_are_packed_and_long_ones_split_with_overlap(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 60 for i in range(12)]
    path = tmp_path / "guide.md"
    path.write_text(
        "# Guide\n\n## Short\n\nOne line.\n\n## Also short\n\nTwo lines.\n\n## Long\n\n" + "\n\n".join(paragraphs)
    )
    chunks = chunk_document(load_document("guide.md", path), max_tokens=200, overlap_tokens=80)
    assert chunks[0].text == "## Short\nOne line.\n\n## Also short\nTwo lines."
    long = chunks[1:]
    assert len(long) >= 3 and all(len(c.text) <= 800 for c in chunks)
    assert all(c.text.startswith("## Long\n") and c.heading == "Long" for c in long)
    firsts = [c.text.split("\n")[1][:12] for c in long]
    assert firsts[0] == "Paragraph 0 "
    assert any(p in long[0].text and p in long[1].text for p in (f"Paragraph {i} " for i in range(12)))  # overlap
    assert chunks[0].embed_text.startswith("Guide\n")


def test_table_rows_become_records_with_typed_fields(tmp_path: Path) -> None:
    csv_path = tmp_path / "phones.csv"
    csv_path.write_text(
        "brand,model,year,battery_mah,price\nSony,Xperia 1 V,2023,5000,1399.99\nGoogle,Pixel 8,2023,4575,\n"
    )
    doc = load_document("phones.csv", csv_path)
    assert doc.kind == "table" and len(doc.sections) == 2
    sony = doc.sections[0]
    assert sony.title == "Sony Xperia 1 V"
    assert sony.fields == {"brand": "Sony", "model": "Xperia 1 V", "year": 2023, "battery_mah": 5000, "price": 1399.99}
    assert sony.text.splitlines()[3] == "Battery mah: 5000"
    assert "price" not in (doc.sections[1].fields or {})
    chunks = chunk_document(doc)
    assert [c.title for c in chunks] == ["Sony Xperia 1 V", "Google Pixel 8"] and chunks[1].fields is not None

    jsonl = tmp_path / "devices.jsonl"
    jsonl.write_text('{"maker": "SHARP", "name": "AQUOS (SH-01)", "specs": {"ram_mb": 2048}}\n\n{"x": 1}\n')
    rows = load_document("devices.jsonl", jsonl).sections
    assert rows[0].title == "SHARP AQUOS (SH-01)" and rows[0].fields == {
        "maker": "SHARP",
        "name": "AQUOS (SH-01)",
        "specs": '{"ram_mb":2048}',
    }
    assert rows[1].title == "devices row 3"


def test_pdf_pages_become_sections(tmp_path: Path) -> None:
    path = tmp_path / "manual.pdf"
    path.write_bytes(minimal_pdf(["Battery care manual", "Keep the phone below 35 degrees."]))
    doc = load_document("manual.pdf", path)
    assert doc.kind == "pdf" and doc.sections[0].heading == "Page 1"
    assert "Keep the phone below 35 degrees." in doc.sections[0].text
