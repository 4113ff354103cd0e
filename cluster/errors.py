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


class ModelNotFound(CoEError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ExpertFailed(CoEError):
    """The expert could not produce an answer (it crashed or is unavailable)."""

    status_code = 503
    error_type = "server_error"
    code = "expert_unavailable"


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
