"""Token estimates for when an upstream reports no usage. A stated estimate (about four characters per token for
English text), never a silent zero; responses and logs mark such usage ``estimated``."""

from __future__ import annotations

from typing import Any

__all__ = ["estimate_usage", "message_text"]


def message_text(content: Any) -> str:
    """An OpenAI message's text: the string, or its text parts joined by newlines (other parts have none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(_chars(v) for k, v in value.items() if k in ("content", "text", "arguments", "name"))
    return 0


def _tokens(chars: int) -> int:
    return max(1, (chars + 3) // 4)


def estimate_usage(messages: list[Any], completion_text: str) -> dict[str, Any]:
    prompt = sum(_tokens(_chars(m)) + 4 for m in messages)  # ~4 tokens of framing per message
    completion = _tokens(len(completion_text)) if completion_text else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
