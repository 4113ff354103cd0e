"""Typed request errors and their one translation into OpenAI-style responses."""

from __future__ import annotations

from typing import Any


class CoEError(Exception):
    """Base of every error a client may see; carries its HTTP status and OpenAI type."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """HTTP headers the response must carry besides the body."""
        return {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(CoEError):
    status_code = 400
    error_type = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    """A known field with a value this server does not offer (n > 1, logprobs, ...)."""

    code = "unsupported_value"


class PayloadTooLarge(InvalidRequest):
    """The raw request body is larger than any request within the limits could be."""

    status_code = 413
    code = "request_too_large"


class RequestTooLarge(InvalidRequest):
    """A decoded request (gRPC, a handle call) larger than any request within the limits
    could be; a 400, since it never was an HTTP body."""

    code = "request_too_large"


class ModelNotFound(CoEError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ExpertFailed(CoEError):
    """The expert could not produce an answer (it crashed or is unavailable)."""

    status_code = 503
    error_type = "server_error"
    code = "expert_unavailable"


class Unauthorized(CoEError):
    """No valid API key; the message never says which part was wrong."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class RetryLater(CoEError):
    """A refusal for now: the client may retry after `retry_after_s` seconds (Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(RetryLater):
    """The expert's queue is full: refuse now rather than queue without bound."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class RouterUnavailable(RetryLater):
    """The router replica died with the request inside it; Serve is starting another."""

    status_code = 503
    error_type = "server_error"
    code = "router_unavailable"


class RequestTimedOut(CoEError):
    """The request outlived `serve.request_timeout_s`; its expert call was cancelled."""

    status_code = 504
    error_type = "server_error"
    code = "timeout"


class InternalError(CoEError):
    """An unexpected failure; the message says nothing about the cause."""


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One readable line per pydantic/FastAPI error, and the first bad field as `param`."""
    lines: list[str] = []
    first_param: str | None = None
    for item in errors:
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        path = ".".join(location)
        if item.get("type") == "json_invalid":
            lines.append(f"request body is not valid JSON: {item.get('ctx', {}).get('error', '')}")
            continue
        if item.get("type") == "extra_forbidden":
            lines.append(f"unknown field {path!r} is not allowed")
        else:
            shown = repr(item.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            lines.append(f"{path or 'body'}: {item.get('msg')} (got {shown})")
        first_param = first_param or path or None
    return "; ".join(lines) or "invalid request", first_param
