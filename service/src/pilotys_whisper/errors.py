"""Errors are data: one exception type carrying HTTP status, code and message, rendered in one place."""

from __future__ import annotations

import json
from http import HTTPStatus

# OpenAI-style error types, so the official clients raise the matching exception class.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    507: "server_error",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        error = {
            "code": self.code,
            "message": self.message,
            "type": _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
        }
        if self.param:
            error["param"] = self.param
        return {"error": error}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def http_error(status: int, message: str | None = None) -> ApiError:
    """An ApiError for a plain HTTP condition (404, 405...), with the standard phrase as code."""
    phrase = HTTPStatus(status).phrase
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    return ApiError(status, code, message or phrase)
