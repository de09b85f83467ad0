"""Ingestion with the real model and the real embedded index: idempotency, replacement, pruning, tables, recall."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embed.support import CountingEmbedder
from keel.cli import app as cli_app
from keel.cli_ingest import install
from keel.config import load_config
from keel.embed import LocalEmbedder
from keel.ingest import Ingestor
from keel.vector import LocalIndex

KB = Path(__file__).resolve().parents[2] / "examples" / "phone-assistant" / "kb"


@pytest.fixture
def kb(tmp_path: Path) -> Path:
    root = tmp_path / "kb"
    (root / "phones").mkdir(parents=True)
    (root / "guides").mkdir()
    for name in ("google-pixel-8.md", "apple-iphone-15.md", "samsung-galaxy-note7.md", "sony-xperia-1-v.md"):
        shutil.copy(KB / "phones" / name, root / "phones" / name)
    for name in ("battery-care.md", "charging-standards.md"):
        shutil.copy(KB / "guides" / name, root / "guides" / name)
    (root / "NOTICE").write_text("not ingested: no loader for files without a suffix")
    (root / ".hidden.md").write_text("# Hidden\n\nnot ingested")
    return root


async def test_unchanged_files_cost_no_model_call(kb: Path, tmp_path: Path, local_embedder: LocalEmbedder) -> None:
    embedder = CountingEmbedder(local_embedder)
    ingestor = Ingestor(embedder, LocalIndex(tmp_path / "vectors"))
    first = await ingestor.ingest([kb], "kb")
    assert (first.files, first.ingested, first.unchanged) == (6, 6, 0) and first.chunks > 6
    calls = embedder.calls
    second = await ingestor.ingest([kb], "kb")
    assert (second.ingested, second.unchanged, second.chunks) == (0, 6, 0)
    assert embedder.calls == calls


async def test_a_changed_file_has_its_chunks_replaced(kb: Path, tmp_path: Path, local_embedder: LocalEmbedder) -> None:
    embedder = CountingEmbedder(local_embedder)
    index = LocalIndex(tmp_path / "vectors")
    ingestor = Ingestor(embedder, index)
    await ingestor.ingest([kb], "kb")
    before = await index.count("kb")
    guide = kb / "guides" / "battery-care.md"
    guide.write_text("# Battery care\n\nA short replacement: keep the phone cool and between 20 and 80 percent.\n")
    texts = embedder.texts
    report = await ingestor.ingest([kb], "kb")
    assert (report.ingested, report.unchanged, report.chunks) == (1, 5, 1)
    assert embedder.texts == texts + 1  # only the changed file's one chunk
    hits = await index.search("kb", (await local_embedder.embed(["battery care"]))[0], top_k=100)
    guide_hits = [h for h in hits if h.payload["document"] == "kb/guides/battery-care.md"]
    assert [h.id for h in guide_hits] == ["kb/guides/battery-care.md#0"]
    assert "short replacement" in guide_hits[0].payload["text"]
    assert await index.count("kb") < before  # the guide had several chunks: the stale ones are gone


async def test_prune_removes_deleted_files_and_a_new_embedder_rebuilds(
    kb: Path, tmp_path: Path, local_embedder: LocalEmbedder
) -> None:
    index = LocalIndex(tmp_path / "vectors")
    await Ingestor(local_embedder, index).ingest([kb], "kb")
    (kb / "guides" / "battery-care.md").unlink()
    kept = await Ingestor(local_embedder, index).ingest([kb], "kb")
    assert kept.removed == 0 and "kb/guides/battery-care.md" in await index.documents("kb")
    pruned = await Ingestor(local_embedder, index).ingest([kb], "kb", prune=True)
    assert pruned.removed == 1 and "kb/guides/battery-care.md" not in await index.documents("kb")
    other = CountingEmbedder(local_embedder, name="another-model")
    rebuilt = await Ingestor(other, index).ingest([kb], "kb")
    assert rebuilt.rebuilt and rebuilt.ingested == 5


async def test_table_rows_are_records_that_filters_select(tmp_path: Path, local_embedder: LocalEmbedder) -> None:
    table = tmp_path / "phones.csv"
    table.write_text(
        "brand,model,year,battery_mah\nSony,Xperia 1 V,2023,5000\nSony,Xperia 10 V,2023,5000\n"
        "Google,Pixel 8,2023,4575\nGoogle,Pixel 7a,2023,4385\n"
    )
    index = LocalIndex(tmp_path / "vectors")
    report = await Ingestor(local_embedder, index).ingest([table], "tables")
    assert report.chunks == 4
    query = (await local_embedder.embed(["phone with a big battery"]))[0]
    sony = await index.search("tables", query, top_k=10, filter={"fields.brand": "Sony"})
    assert {h.payload["title"] for h in sony} == {"Sony Xperia 1 V", "Sony Xperia 10 V"}
    assert sony[0].payload["fields"]["battery_mah"] == 5000
    pixel = await index.search("tables", query, top_k=10, filter={"fields.battery_mah": 4575})
    assert [h.payload["title"] for h in pixel] == ["Google Pixel 8"]
    best = await index.search("tables", (await local_embedder.embed(["Pixel 7a battery capacity"]))[0], top_k=1)
    assert best[0].id == "phones.csv#3"


@pytest.mark.parametrize(
    ("question", "document"),
    [
        ("Why was the Galaxy Note7 recalled?", "kb/phones/samsung-galaxy-note7.md"),
        ("Which phone still has a headphone jack and a microSD slot in 2023?", "kb/phones/sony-xperia-1-v.md"),
        ("What is the difference between Qi and Qi2?", "kb/guides/charging-standards.md"),
        ("Should I store my phone fully charged for months?", "kb/guides/battery-care.md"),
        ("Does the iPhone 15 charge over USB-C?", "kb/phones/apple-iphone-15.md"),
    ],
)
async def test_recall_sanity(
    question: str, document: str, kb: Path, tmp_path_factory: pytest.TempPathFactory, local_embedder: LocalEmbedder
) -> None:
    index = LocalIndex(tmp_path_factory.getbasetemp() / "recall-vectors")
    await Ingestor(local_embedder, index).ingest([kb], "kb")  # the first case embeds, the others find it unchanged
    hits = await index.search("kb", (await local_embedder.embed([question]))[0], top_k=3)
    assert document in [h.payload["document"] for h in hits]


def test_keel_ingest_uses_the_apps_sources(kb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text(
        "models: [{name: m, model: x}]\n"
        "apps:\n  - name: assistant\n    model: m\n    retrieval: {collection: phones, sources: [kb]}\n"
        f"vector_store: {{path: {tmp_path / 'vectors'}}}\n"
    )
    from keel import cli

    install(cli_app, cli._load)
    runner = CliRunner()
    first = runner.invoke(cli_app, ["ingest", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert "phones: 6 files: 6 ingested" in first.output
    second = runner.invoke(cli_app, ["ingest", "--config", str(config)])
    assert "0 ingested (0 chunks), 6 unchanged" in second.output
    found = runner.invoke(cli_app, ["search", "Note7 battery fires", "--config", str(config), "-k", "1"])
    assert found.exit_code == 0 and "kb/phones/samsung-galaxy-note7.md#" in found.output
    assert load_config(config).app("assistant") is not None
    no_collection = runner.invoke(cli_app, ["ingest", str(kb), "--config", str(config), "--app", "nope"])
    assert no_collection.exit_code == 2 and "no app 'nope'" in no_collection.output
