"""Keel's error tree. Catch at the level you can handle; each leaf maps to one HTTP status and one OpenAI-style
error body, in one place (:func:`KeelError.to_body`).

::

    KeelError                              500 server_error
    ├── InvalidRequest                     400 invalid_request_error
    │   ├── ModelNotFound                  404 invalid_request_error (code model_not_found)
    │   └── NotFound                       404 invalid_request_error (a key, session, prompt ... that does not exist)
    ├── AuthError                          401 authentication_error
    ├── PermissionDenied                   403 permission_error
    ├── RateLimitExceeded                  429 rate_limit_error   (Keel's own limits; carries retry_after)
    ├── BudgetExceeded                     429 budget_exceeded  (code budget_exceeded)
    ├── GuardrailBlocked                   400 guardrail_error
    ├── Overloaded                         503 overloaded_error  (a local queue is full)
    └── ProviderError                      502 upstream_error     (anything an upstream did wrong)
        ├── RateLimited                    429 from upstream       (retryable; carries retry_after)
        ├── ProviderTimeout                504 timeout             (retryable)
        ├── UpstreamError                  502 upstream_error      (5xx, connection reset, malformed body; retryable)
        ├── ContextWindowExceeded          400 context_length_exceeded (not retryable; triggers context fallbacks)
        ├── ContentFiltered                400 content_filter      (not retryable)
        └── UpstreamRejected               the upstream's own 4xx  (not retryable; status passed through)

Only :class:`ProviderError` subclasses with ``retryable = True`` are retried or trigger fallbacks (plus
``ContextWindowExceeded``, which triggers the context-window fallback chain only).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "BudgetExceeded",
    "ContentFiltered",
    "ContextWindowExceeded",
    "GuardrailBlocked",
    "InvalidRequest",
    "KeelError",
    "ModelNotFound",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "ProviderError",
    "ProviderTimeout",
    "RateLimitExceeded",
    "RateLimited",
    "UpstreamError",
    "UpstreamRejected",
]


class KeelError(Exception):
    """Base of every error Keel raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-style error object every endpoint answers with."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return headers


class InvalidRequest(KeelError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class AuthError(KeelError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(KeelError):
    status = 403
    type = "permission_error"


class RateLimitExceeded(KeelError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(KeelError):
    status = 429
    type = "budget_exceeded"
    code = "budget_exceeded"


class GuardrailBlocked(KeelError):
    """A guardrail refused the text. ``message`` is the app's polite refusal; ``reasons`` are machine-readable
    (``[{"check", "reason", "detail", "score"?}]``) and go into the error body beside the usual fields."""

    status = 400
    type = "guardrail_error"
    code = "guardrail_blocked"

    def __init__(self, message: str, *, reasons: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reasons = list(reasons or [])

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["reasons"] = self.reasons
        return body


class Overloaded(KeelError):
    status = 503
    type = "overloaded_error"
    code = "overloaded"
    retryable = True


class ProviderError(KeelError):
    """An upstream failed. ``deployment`` names which one, for logs and cooldowns."""

    status = 502
    type = "upstream_error"

    def __init__(self, message: str, *, deployment: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.deployment = deployment


class RateLimited(ProviderError):
    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"
    retryable = True


class ProviderTimeout(ProviderError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"
    retryable = True


class UpstreamError(ProviderError):
    code = "upstream_error"
    retryable = True


class ContextWindowExceeded(ProviderError):
    status = 400
    type = "invalid_request_error"
    code = "context_length_exceeded"


class ContentFiltered(ProviderError):
    status = 400
    type = "invalid_request_error"
    code = "content_filter"


class UpstreamRejected(ProviderError):
    """The upstream refused the request itself (its 4xx); the client sees the upstream's status and message."""

    status = 400
    type = "invalid_request_error"
