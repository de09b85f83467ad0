"""Rule checks: precompiled patterns and counts, microseconds per text, no model.

- ``size``: the text is too long (characters or tokens);
- ``unsafe_content``: destructive shell commands and code-execution patterns (meant for answers, works on input);
- ``system_prompt_leak``: the answer reproduces a substantial part of the system prompt;
- ``json_schema``: the answer must be JSON valid against the prompt's schema (the chat routes re-ask once).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Final

import jsonschema  # type: ignore[import-untyped]
import orjson

from keel.guard.base import Finding, GuardInput, Span

__all__ = ["JsonSchemaCheck", "SizeCheck", "SystemPromptLeakCheck", "UnsafeContentCheck", "parse_json_answer"]


class SizeCheck:
    """Refuses texts longer than ``max_chars`` characters or ``max_tokens`` tokens, before they cost anything.

    Tokens are counted with cl100k_base (exact for OpenAI models of that family, a close estimate for others),
    only when the text could possibly exceed the limit: a token is at least one UTF-8 byte, so a text of at most
    ``max_tokens`` bytes is never counted."""

    name = "size"

    def __init__(self, max_chars: int | None = None, max_tokens: int | None = None) -> None:
        if max_chars is None and max_tokens is None:
            raise ValueError("give `max_chars`, `max_tokens` or both")
        for key, value in (("max_chars", max_chars), ("max_tokens", max_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{key}` must be a positive integer (got {value!r})")
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        if max_tokens is not None:
            from keel.history import count_text_tokens

            count_text_tokens("")  # loads the encoding now, not on the first long message

    async def check(self, inp: GuardInput) -> list[Finding]:
        text = inp.text
        if self.max_chars is not None and len(text) > self.max_chars:
            detail = f"{len(text)} characters; the limit is {self.max_chars}"
            return [Finding(self.name, "size.chars", detail)]
        if self.max_tokens is not None and len(text) > self.max_tokens // 4 and len(text.encode()) > self.max_tokens:
            from keel.history import count_text_tokens

            tokens = count_text_tokens(text)
            if tokens > self.max_tokens:
                return [Finding(self.name, "size.tokens", f"{tokens} tokens; the limit is {self.max_tokens}")]
        return []


# -- unsafe content ----------------------------------------------------------------------------------------------

_END: Final = r"(?=$|[\s;&|)`'\"])"  # where a shell word ends
_ROOTISH: Final = r"(?:/\*?|~/?\*?|\$HOME/?\*?|/(?:bin|boot|dev|etc|home|lib|opt|root|sbin|srv|usr|var)/?\*?|\*)"
# Each rule: substrings one of which any match must contain (lower case), and the pattern. The substring test is
# what most texts cost (a few microseconds); a pattern runs only on texts that could match it.
_Rules = tuple[tuple[tuple[str, ...], re.Pattern[str]], ...]


def _rules(*rules: tuple[tuple[str, ...], str]) -> _Rules:
    return tuple((gates, re.compile(pattern, re.IGNORECASE)) for gates, pattern in rules)


_DESTRUCTIVE: Final = _rules(
    # rm with a recursive flag on /, ~, $HOME, a top-level system directory, or everything here
    (
        ("rm",),
        rf"\brm\s+(?:-{{1,2}}[\w-]+\s+)*(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)\s+(?:-{{1,2}}[\w-]+\s+)*{_ROOTISH}{_END}",
    ),
    (("mkfs",), r"\bmkfs(?:\.\w+)?\s+(?:-\S+\s+)*/dev/"),
    (("of=/dev/",), r"\bdd\b[^\n]*\bof=/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|disk|mapper/)"),
    (("/dev/",), r">\s*/dev/(?:sd[a-z]|hd[a-z]|vd[a-z]|nvme\d|mmcblk\d)"),
    (("/dev/",), r"\b(?:shred|wipefs)\b[^\n]*\s/dev/"),
    (("{",), r":\s*\(\s*\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:"),  # the classic fork bomb
    (("|",), r"\b(?:curl|wget)\b[^\n|]*\|\s*(?:sudo\s+)?(?:ba|z|da|k)?sh\b"),  # a script straight from the network
    (("777",), r"\bchmod\s+(?:-\w+\s+)*(?:-R|--recursive)\s+(?:-\w+\s+)*0?777\s+/(?:\s|$)"),
    (("777",), r"\bchmod\s+0?777\s+(?:-R|--recursive)\s+/(?:\s|$)"),
    (("format",), r"\bformat\s+[a-zA-Z]:(?:\s|$)"),
    ((":\\",), r"\b(?:del|erase)\s+(?:/[a-zA-Z]\s+)*[a-zA-Z]:\\(?:\*|\s|$)"),
    ((":\\",), r"\b(?:rd|rmdir)\s+/s\s+/q\s+[a-zA-Z]:\\(?:\s|$)"),
    (("remove-item",), r"\bRemove-Item\b[^\n]*-Recurse[^\n]*\s[a-zA-Z]:\\(?:\*|\s|$)"),
)
_UNTRUSTED: Final = (
    r"(?:input\s*\(|raw_input\s*\(|request\.|req\.|sys\.argv|os\.environ|process\.env|params|query|body|data\[|"
    r"user_?input|base64\.b64decode|atob\s*\(|Buffer\.from)"
)
_CODE_EXECUTION: Final = _rules(
    (("eval", "exec"), rf"\b(?:eval|exec)\s*\(\s*(?:\w+\.)?{_UNTRUSTED}"),
    (("os.",), r"\bos\.(?:system|popen)\s*\("),
    (("shell",), r"\bsubprocess\.\w+\s*\([^)]{0,400}?\bshell\s*=\s*True"),
    (("__import__",), r"__import__\s*\(\s*['\"]os['\"]\s*\)\s*\.\s*(?:system|popen)"),
    (
        ("powershell", "pwsh"),
        r"\b(?:powershell|pwsh)(?:\.exe)?\b[^\n]*\s-(?:e|ec|enc|encodedcommand)\s+[A-Za-z0-9+/=]{8,}",
    ),
    (("base64",), r"\bbase64\s+(?:-d|--decode|-D)\b[^\n]*\|\s*(?:sudo\s+)?(?:(?:ba|z|da|k)?sh|python[\d.]*|perl)\b"),
    (
        ("downloadstring", "frombase64string", "net.webclient"),
        r"\b(?:Invoke-Expression|iex)\b[^\n]*(?:DownloadString|FromBase64String|Net\.WebClient)",
    ),
    (("child_process",), r"\bchild_process\b[^\n]*\.exec(?:Sync)?\s*\(\s*(?:req\.|request\.|process\.argv)"),
)
_UNSAFE: Final = {
    "destructive_command": ("a destructive system command", _DESTRUCTIVE),
    "code_execution": ("code that executes untrusted input", _CODE_EXECUTION),
}


class UnsafeContentCheck:
    """Destructive commands (``rm -rf /``, ``mkfs``, ``dd of=/dev/sda``, fork bombs, ``curl … | sh``,
    ``chmod -R 777 /``, Windows equivalents) and code-execution patterns (``eval``/``exec`` of untrusted input,
    ``os.system``, ``subprocess`` with ``shell=True``, ``powershell -enc``, base64-decoded execution). Reasons are
    ``unsafe.destructive_command`` and ``unsafe.code_execution``; spans (entity ``UNSAFE_CONTENT``) let ``redact``
    mask the command instead of refusing the whole answer. ``categories`` limits which of the two run."""

    name = "unsafe_content"

    def __init__(self, categories: list[str] | None = None) -> None:
        chosen = list(_UNSAFE) if categories is None else list(categories)
        unknown = [c for c in chosen if c not in _UNSAFE]
        if unknown or not chosen:
            raise ValueError(f"`categories`: choose among {', '.join(_UNSAFE)} (got {categories!r})")
        self.categories = {c: _UNSAFE[c] for c in chosen}

    async def check(self, inp: GuardInput) -> list[Finding]:
        text = inp.text
        lowered = text.lower()
        findings = []
        for category, (what, rules) in self.categories.items():
            spans = tuple(
                Span(m.start(), m.end(), "UNSAFE_CONTENT")
                for gates, pattern in rules
                if any(g in lowered for g in gates)
                for m in pattern.finditer(text)
            )
            if spans:
                detail = f"{what} ({len(spans)} match{'es' if len(spans) > 1 else ''})"
                findings.append(Finding(self.name, f"unsafe.{category}", detail, spans=spans))
        return findings


# -- system prompt leaks ---------------------------------------------------------------------------------------

_WORD: Final = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _shingles(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=256)
def _prompt_index(system_prompt: str, context: str | None, n: int) -> tuple[dict[tuple[str, ...], list[int]], int]:
    """The system prompt's own shingles (those also in the retrieved context are not its own: quoting the
    knowledge base is no leak) with where each starts, and how many of its words they cover."""
    words = _words(system_prompt)
    shared = _shingles(_words(context), n) if context else set()
    starts: dict[tuple[str, ...], list[int]] = {}
    own: set[int] = set()
    for i in range(len(words) - n + 1):
        shingle = tuple(words[i : i + n])
        if shingle not in shared:
            starts.setdefault(shingle, []).append(i)
            own.update(range(i, i + n))
    return starts, len(own)


class SystemPromptLeakCheck:
    """Flags an answer that reproduces a substantial part of the system prompt: at least ``min_ratio`` of the
    prompt's words, or ``max_words`` of them whatever the ratio, inside runs of ``shingle_words`` consecutive words
    found verbatim (case and punctuation ignored) in both.

    Eight-word runs do not happen by chance, so answers that merely share vocabulary with the prompt pass; and
    runs that also occur in ``GuardInput.context`` (the retrieved knowledge, which the system messages carry too)
    are not counted, so quoting the knowledge base is never a leak."""

    name = "system_prompt_leak"

    def __init__(self, shingle_words: int = 8, min_ratio: float = 0.3, max_words: int = 40) -> None:
        if not isinstance(shingle_words, int) or not 3 <= shingle_words <= 50:
            raise ValueError(f"`shingle_words` must be an integer from 3 to 50 (got {shingle_words!r})")
        if not isinstance(min_ratio, int | float) or not 0 < min_ratio <= 1:
            raise ValueError(f"`min_ratio` must be a number in (0, 1] (got {min_ratio!r})")
        if not isinstance(max_words, int) or max_words < shingle_words:
            raise ValueError(f"`max_words` must be an integer of at least shingle_words (got {max_words!r})")
        self.n = shingle_words
        self.min_ratio = float(min_ratio)
        self.max_words = max_words

    async def check(self, inp: GuardInput) -> list[Finding]:
        if not inp.system_prompt:
            return []
        starts, own = _prompt_index(inp.system_prompt, inp.context, self.n)
        if not starts:
            return []
        words = _words(inp.text)
        covered: set[int] = set()
        for i in range(len(words) - self.n + 1):
            for start in starts.get(tuple(words[i : i + self.n]), ()):
                covered.update(range(start, start + self.n))
        ratio = len(covered) / own
        if ratio >= self.min_ratio or len(covered) >= self.max_words:
            detail = f"the answer repeats {len(covered)} of the system prompt's {own} words verbatim"
            return [Finding(self.name, "system_prompt_leak", detail, score=min(1.0, ratio))]
        return []


# -- JSON output -------------------------------------------------------------------------------------------------

_FENCE: Final = re.compile(r"^```(?:json|JSON)?\s*\n(.*)\n```$", re.DOTALL)


@lru_cache(maxsize=64)
def _validator(schema_json: bytes) -> Any:
    schema = orjson.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def parse_json_answer(text: str) -> Any:
    """The answer as JSON, tolerating one Markdown code fence around it (small models add one)."""
    body = text.strip()
    fenced = _FENCE.match(body)
    return orjson.loads(fenced.group(1) if fenced else body)


class JsonSchemaCheck:
    """When the prompt declares an output schema (``GuardInput.schema``), the answer must be JSON that validates
    against it. Reasons: ``json.invalid`` (not JSON), ``json.schema_mismatch`` (the detail says where and why, which
    the chat routes hand back to the model for their one repair retry). It needs the whole answer, so on a stream it
    runs once, at the end."""

    name = "json_schema"
    stream_scope = "whole"

    async def check(self, inp: GuardInput) -> list[Finding]:
        if inp.schema is None:
            return []
        try:
            value = parse_json_answer(inp.text)
        except orjson.JSONDecodeError as exc:
            return [Finding(self.name, "json.invalid", f"the answer is not valid JSON ({exc})")]
        try:
            validator = _validator(orjson.dumps(dict(inp.schema), option=orjson.OPT_SORT_KEYS))
        except jsonschema.SchemaError as exc:
            raise ValueError(f"the output schema itself is invalid: {exc.message}") from None
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return []
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        detail = f"at {where}: {error.message}"
        return [Finding(self.name, "json.schema_mismatch", detail[:300])]
