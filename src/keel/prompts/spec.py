"""What a prompt version holds, as written in a prompt file or an admin API body, and its canonical form.

A prompt file (``prompts/*.yaml``)::

    name: phone-assistant
    model: assistant                      # optional: the public model this version asks for
    params: {temperature: 0.2}            # optional: request defaults (temperature, max_tokens, ...)
    variables:                            # every variable the templates use, declared
      today: {description: "YYYY-MM-DD"}  # no default: required
      context: {default: ""}              # a default: optional
    system: |
      You are ... Today is {{ today }}.
    messages: []                          # optional further message templates: [{role, content}]
    output_schema: null                   # optional JSON schema the answer must follow

Everything but ``name`` is the version's content: its canonical JSON hashes to ``content_hash``, so pushing an
unchanged file creates no version.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keel.api.schemas import validate
from keel.errors import InvalidRequest

__all__ = ["NAME_PATTERN", "MessageTemplate", "PromptContent", "PromptFile", "VariableSpec", "load_prompt_dir"]

NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# The request itself, never a "parameter" a prompt may set.
_RESERVED_PARAMS: Final = frozenset({"model", "messages", "stream", "stream_options"})
_IDENTIFIER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariableSpec(_Strict):
    """A declared variable: required unless it has a default."""

    default: str | None = None
    description: str | None = None

    @property
    def required(self) -> bool:
        return self.default is None


class MessageTemplate(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class PromptContent(_Strict):
    """One version's content. Templates are checked (syntax, declared variables, no private attributes) when a
    version is compiled by :class:`keel.prompts.render.CompiledPrompt`, before anything is stored."""

    system: str | None = None
    messages: list[MessageTemplate] = Field(default_factory=list)
    variables: dict[str, VariableSpec] = Field(default_factory=dict)
    model: str | None = Field(default=None, min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    output_schema: dict[str, Any] | None = None

    @field_validator("variables", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        """``today:`` with nothing after it declares a required variable."""
        if isinstance(value, dict):
            return {k: {} if v is None else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> PromptContent:
        if not self.system and not self.messages:
            raise ValueError("a prompt needs a `system` template or `messages` templates")
        bad = [name for name in self.variables if not _IDENTIFIER.match(name)]
        if bad:
            raise ValueError(f"variable names must be identifiers (letters, digits, _): {', '.join(bad)}")
        reserved = sorted(_RESERVED_PARAMS & self.params.keys())
        if reserved:
            raise ValueError(f"params cannot set {', '.join(reserved)}: they belong to the request")
        return self

    def canonical(self) -> dict[str, Any]:
        """The content as stored and hashed (defaults included, so two spellings of one prompt hash alike)."""
        return self.model_dump(mode="json")

    def content_hash(self) -> str:
        return hashlib.sha256(orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS)).hexdigest()

    def to_yaml(self) -> str:
        """Readable YAML (multi-line templates as ``|`` blocks): what ``show`` prints and ``diff`` compares."""
        return yaml.dump(self.canonical(), Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=120)


class PromptFile(PromptContent):
    """A prompt file: its name plus the content of the version it describes."""

    name: str = Field(pattern=NAME_PATTERN)

    def content(self) -> PromptContent:
        return PromptContent.model_validate(self.model_dump(exclude={"name"}))


def load_prompt_dir(directory: Path) -> list[PromptFile]:
    """Every ``*.yaml`` / ``*.yml`` file in ``directory``, validated; raises :class:`InvalidRequest` naming the file
    and the problem. Two files may not define the same name."""
    files: dict[str, Path] = {}
    out = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        prompt = _load_file(path)
        if prompt.name in files:
            raise InvalidRequest(f"{path}: prompt {prompt.name!r} is already defined in {files[prompt.name]}")
        files[prompt.name] = path
        out.append(prompt)
    return out


def _load_file(path: Path) -> PromptFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"{path}: cannot read prompt file: {exc}") from None
    try:
        return validate(PromptFile, data)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{path}: {exc.message}", param=exc.param) from None


class _BlockDumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_presenter)
