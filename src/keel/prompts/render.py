"""Rendering prompt templates safely: sandboxed Jinja2, declared variables only, values that stay data.

Trust model: templates come from whoever may push prompts (administrators); variable values come from requests
(users). So:

- Templates run in Jinja2's ``ImmutableSandboxedEnvironment``: no access to Python internals, no mutation of
  values. Beyond that, a template that reads an attribute or item whose name starts with ``_``, or uses the
  ``attr`` filter, is refused when the version is compiled (at push time), with an error naming the line, instead
  of failing later on a request.
- Every variable a template reads must be declared; ``StrictUndefined`` turns anything else into an error, never an
  empty string.
- Values are substituted, never parsed: ``{{ 7*7 }}`` typed by a user is rendered as those seven characters.
  Autoescape is off because the output is a chat message, not HTML.
- A request that leaves out a required variable, or sends one the version does not declare, gets a 400 naming
  them. A template that fails at render time for any other reason is a 400 too (``prompt_render_failed``), never a
  500 with a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from keel.errors import InvalidRequest
from keel.prompts.spec import PromptContent

__all__ = ["CompiledPrompt"]

# trim_blocks/lstrip_blocks: a line holding only {% if %} or {% endif %} leaves no blank line in the message.
_ENV: Final = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
)
_VALUE_TYPES: Final = (str, int, float)


class CompiledPrompt:
    """One version's templates, checked and compiled once (versions are immutable, so this is cached per version).

    ``ref`` (``name@version``) names the version in error messages.
    """

    def __init__(self, content: PromptContent, ref: str) -> None:
        self.ref = ref
        self.variables = content.variables
        sources: list[tuple[str, str, str]] = []  # (role, where, source)
        if content.system:
            sources.append(("system", "system", content.system))
        sources += [(m.role, f"messages[{i}]", m.content) for i, m in enumerate(content.messages)]
        self._templates: list[tuple[str, Template]] = [
            (role, self._compile(where, source)) for role, where, source in sources
        ]

    def render(self, values: Mapping[str, object]) -> list[dict[str, str]]:
        """The OpenAI messages for these variable values; :class:`InvalidRequest` for missing, undeclared or
        non-scalar values, or a template that fails."""
        context = self._context(values)
        try:
            return [{"role": role, "content": template.render(context)} for role, template in self._templates]
        except Exception as exc:  # a template bug must reach the caller as a clear error, not as a crash
            raise InvalidRequest(
                f"Prompt {self.ref} failed to render: {type(exc).__name__}: {exc}",
                code="prompt_render_failed",
                param="variables",
            ) from None

    def _context(self, values: Mapping[str, object]) -> dict[str, object]:
        unknown = sorted(values.keys() - self.variables.keys())
        if unknown:
            raise InvalidRequest(
                f"Prompt {self.ref} does not declare the variable(s) {', '.join(unknown)}; {self._declared()}.",
                code="unknown_variables",
                param="variables",
            )
        missing = sorted(name for name, spec in self.variables.items() if spec.required and name not in values)
        if missing:
            raise InvalidRequest(
                f"Prompt {self.ref} needs the variable(s) {', '.join(missing)}; {self._declared()}.",
                code="missing_variables",
                param="variables",
            )
        for name, value in values.items():
            if not isinstance(value, _VALUE_TYPES) or isinstance(value, bool):
                raise InvalidRequest(
                    f"Variable {name!r} of prompt {self.ref} must be a string or a number, got {type(value).__name__}.",
                    code="invalid_variables",
                    param=f"variables.{name}",
                )
        return {name: values.get(name, spec.default) for name, spec in self.variables.items()}

    def _declared(self) -> str:
        if not self.variables:
            return "it declares none"
        names = [name if spec.required else f"{name} (optional)" for name, spec in self.variables.items()]
        return "declared: " + ", ".join(names)

    def _compile(self, where: str, source: str) -> Template:
        try:
            ast = _ENV.parse(source)
        except TemplateSyntaxError as exc:
            raise self._invalid(where, exc.lineno, f"syntax error: {exc.message}") from None
        for node, problem in _unsafe(ast):
            raise self._invalid(where, node.lineno, problem)
        undeclared = sorted(meta.find_undeclared_variables(ast) - self.variables.keys() - _ENV.globals.keys())
        if undeclared:
            raise self._invalid(
                where, None, f"uses undeclared variable(s) {', '.join(undeclared)}; declare them under `variables`"
            )
        return _ENV.from_string(source)

    def _invalid(self, where: str, line: int | None, problem: str) -> InvalidRequest:
        at = f"{where} line {line}" if line else where
        return InvalidRequest(f"Prompt {self.ref}, {at}: {problem}.", code="invalid_template", param=where)


def _unsafe(ast: nodes.Template) -> Iterator[tuple[nodes.Node, str]]:
    """Constructs refused outright: the sandbox would stop them at render time, but then on a user's request."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            yield node, f"attribute {node.attr!r} is not allowed (names starting with _ are private)"
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            if isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
                yield node, f"item {node.arg.value!r} is not allowed (names starting with _ are private)"
        elif isinstance(node, nodes.Filter) and node.name == "attr":
            yield node, "the `attr` filter is not allowed; use `.name` for attributes"
