"""The embedded local model end to end: a real small model from an installed package, served through Keel's
OpenAI-compatible API and streamed to the official SDK, with no key and no network."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp
import openai
import pytest

from helpers import KeelServer

LOCAL = """
  - name: local
    provider: local
    model: smollm2-135m-instruct
    local: {context_window: 1024, max_output_tokens: 64, threads: 1}
    first_token_timeout_s: 120
    timeout_s: 300
"""


async def _wait_loaded(server: KeelServer) -> None:
    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(server.url + "/ready") as r:
                body = await r.json()
            if r.status == 200:
                return
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.2)


@pytest.mark.usefixtures("fake")
async def test_local_model_streams_through_keel(keel: Callable[..., KeelServer]) -> None:
    server = keel(LOCAL)
    await _wait_loaded(server)
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "Name a smartphone brand. Answer in one sentence."}],
            stream=True,
            max_tokens=16,
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip(), "the model produced no text"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert chunks[-1].usage.model_extra and chunks[-1].usage.model_extra["cost"] == 0.0  # local costs nothing
        answer = await client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "Reply with a JSON object with a key 'brand'."}],
            # A schema bounds the string, so a 135M model cannot ramble past max_tokens and truncate the JSON.
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "brand",
                    "schema": {
                        "type": "object",
                        "properties": {"brand": {"type": "string", "maxLength": 24}},
                        "required": ["brand"],
                        "additionalProperties": False,
                    },
                },
            },
            temperature=0,
            max_tokens=64,
        )
    content = answer.choices[0].message.content or ""
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError:
        pytest.fail(f"JSON mode produced invalid JSON: {content!r}")
    assert isinstance(parsed, dict) and isinstance(parsed.get("brand"), str)
