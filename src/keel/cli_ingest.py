"""``keel ingest`` and ``keel search``: build and inspect an app's knowledge base, straight against the configured
embedder and vector index (Keel need not be running; a running Keel sees the changes on its next query). The
model, index and progress-bar modules are imported inside the commands, so other ``keel`` commands start fast."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from keel.config import KeelConfig, RetrievalConfig

if TYPE_CHECKING:
    from keel.ingest import IngestReport

__all__ = ["install"]

Loader = Callable[[Path | None], tuple[Path, KeelConfig]]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Config file.")]
AppOpt = Annotated[
    str | None, typer.Option("--app", help="App whose retrieval settings apply (default: the only one).")
]
CollectionOpt = Annotated[str | None, typer.Option("--collection", help="Collection (default: the app's).")]
_load: Loader | None = None


def install(app: typer.Typer, loader: Loader) -> None:
    global _load
    _load = loader
    app.command("ingest")(ingest)
    app.command("search")(search)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _settings(config: Path | None, app_name: str | None) -> tuple[Path, KeelConfig, RetrievalConfig | None]:
    assert _load is not None
    path, cfg = _load(config)
    app = cfg.app(app_name)
    if app_name is not None and app is None:
        raise _fail(f"no app {app_name!r} in {path}; apps: {', '.join(a.name for a in cfg.apps) or 'none'}")
    return path, cfg, app.retrieval if app else None


def ingest(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or folders (default: the app's sources).")] = None,
    collection: CollectionOpt = None,
    app: AppOpt = None,
    prune: Annotated[bool, typer.Option(help="Remove documents whose files are gone from the folders given.")] = False,
    rebuild: Annotated[bool, typer.Option(help="Drop the collection first and embed everything again.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Chunk, embed and store documents (Markdown, text, PDF, CSV/TSV, JSONL); unchanged files cost nothing."""
    from keel.ingest import source_paths

    path, cfg, retrieval = _settings(config, app)
    name = collection or (retrieval.collection if retrieval else None)
    if name is None:
        raise _fail("no collection: pass --collection NAME, or give the app a `retrieval.collection` in the config")
    if not paths:
        if retrieval is None or not retrieval.sources:
            raise _fail("nothing to ingest: give files or folders, or list them in the app's `retrieval.sources`")
        paths, prune = source_paths(retrieval.sources, path.parent), True
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise _fail(f"no such file or folder: {', '.join(missing)}")
    report = asyncio.run(_ingest(cfg, paths, name, prune, rebuild))
    for doc_id, error in report.failed.items():
        typer.secho(f"  failed: {doc_id}: {error}", fg=typer.colors.YELLOW, err=True)
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(1)


async def _ingest(cfg: KeelConfig, paths: list[Path], collection: str, prune: bool, rebuild: bool) -> IngestReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from keel.embed import EmbeddingError, build_embedder
    from keel.ingest import Ingestor
    from keel.vector import VectorIndexError, build_index

    embedder, index = build_embedder(cfg.embeddings), build_index(cfg.vector_store)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(f"ingesting into {collection}", total=None)

            def progress(doc_id: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description=doc_id[-48:])

            return await Ingestor(embedder, index).ingest(
                paths, collection, prune=prune, rebuild=rebuild, progress=progress
            )
    except (EmbeddingError, VectorIndexError) as exc:
        raise _fail(f"error: {exc.message}", 1) from None
    finally:
        await embedder.aclose()
        await index.aclose()


def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="How many chunks.")] = 5,
    collection: CollectionOpt = None,
    app: AppOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show the chunks retrieval would find for a question, with their scores."""
    from keel.embed import EmbeddingError, build_embedder
    from keel.vector import VectorIndexError, build_index

    _, cfg, retrieval = _settings(config, app)
    name = collection or (retrieval.collection if retrieval else None)
    if name is None:
        raise _fail("no collection: pass --collection NAME")

    async def run() -> None:
        embedder, index = build_embedder(cfg.embeddings), build_index(cfg.vector_store)
        try:
            vector = (await embedder.embed([query]))[0]
            hits = await index.search(name, vector, top_k=top_k)
        except (EmbeddingError, VectorIndexError) as exc:
            raise _fail(f"error: {exc.message}", 1) from None
        finally:
            await embedder.aclose()
            await index.aclose()
        if not hits:
            typer.echo(f"no chunks in collection {name!r}; run `keel ingest` first")
        for hit in hits:
            typer.secho(f"{hit.score:.3f}  {hit.id}  {hit.payload.get('title', '')}", bold=True)
            text = str(hit.payload.get("text", "")).replace("\n", " ")
            typer.echo(f"       {text[:160]}{'…' if len(text) > 160 else ''}")

    asyncio.run(run())
