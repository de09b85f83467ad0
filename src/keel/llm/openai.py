"""The OpenAI chat-completions wire interface: OpenAI itself and every compatible server (vLLM, Ollama,
llama.cpp server, LiteLLM proxy, Keel). Bodies pass through untouched apart from ``model``, so tools,
``response_format``, logprobs and vendor extensions reach the upstream as the client sent them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from keel.config import Deployment
from keel.errors import UpstreamError
from keel.llm.base import ProviderInfo, Timeouts
from keel.llm.client import UpstreamClient
from keel.llm.http import iter_sse, read_json, upstream_request

__all__ = ["OpenAIProvider"]


class OpenAIProvider:
    """A deployment reached over OpenAI's HTTP API."""

    def __init__(self, deployment: Deployment, client: UpstreamClient) -> None:
        self.deployment = deployment
        self.info = ProviderInfo(interface="openai", model=deployment.model, context_window=deployment.context_window)
        self._client = client
        self._base = deployment.api_base or "https://api.openai.com/v1"
        headers = {"Content-Type": "application/json", **deployment.extra_headers}
        if deployment.api_key:
            headers["Authorization"] = f"Bearer {deployment.api_key}"
        self._headers = headers

    async def complete(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        did = self.deployment.id
        async with upstream_request(
            self._client,
            "POST",
            f"{self._base}/chat/completions",
            deployment=did,
            json_body=body,
            headers=self._headers,
            connect_timeout=timeouts.connect,
        ) as resp:
            data = await read_json(resp, did)
        if not isinstance(data.get("choices"), list):
            raise UpstreamError(f"upstream {did} sent a completion without choices", deployment=did)
        return data

    async def stream(self, body: dict[str, Any], timeouts: Timeouts) -> AsyncIterator[dict[str, Any]]:
        did = self.deployment.id
        async with upstream_request(
            self._client,
            "POST",
            f"{self._base}/chat/completions",
            deployment=did,
            json_body=body,
            headers=self._headers,
            connect_timeout=timeouts.connect,
        ) as resp:
            async for event, data in iter_sse(resp, did):
                if data == b"[DONE]":
                    return
                if event == "error":
                    raise UpstreamError(f"upstream {did} sent an error event: {data[:300]!r}", deployment=did)
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    raise UpstreamError(
                        f"upstream {did} sent a malformed stream chunk: {data[:120]!r}", deployment=did
                    ) from exc
                if not isinstance(chunk, dict):
                    raise UpstreamError(f"upstream {did} sent a stream chunk that is not an object", deployment=did)
                if "error" in chunk and "choices" not in chunk:
                    raise UpstreamError(f"upstream {did} failed mid-stream: {chunk['error']}", deployment=did)
                yield chunk
        # The body ended without [DONE]: the upstream (or a proxy in between) dropped the stream.
        raise UpstreamError(f"upstream {did} ended the stream without [DONE]", deployment=did)

    async def embed(self, body: dict[str, Any], timeouts: Timeouts) -> dict[str, Any]:
        did = self.deployment.id
        async with upstream_request(
            self._client,
            "POST",
            f"{self._base}/embeddings",
            deployment=did,
            json_body=body,
            headers=self._headers,
            connect_timeout=timeouts.connect,
        ) as resp:
            return await read_json(resp, did)

    async def ready(self) -> tuple[bool, str]:
        return True, f"openai-compatible at {self._base}"

    async def aclose(self) -> None:
        """Nothing to release: the connection pool is shared and owned by the app."""
