"""The one place where errors become HTTP responses.

Every error body is ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape),
and every failed request counts once in ``slipstream_request_failures_total{reason}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from slipstream.errors import InputError
from slipstream.server.async_engine import (
    EngineStopped,
    ForwardError,
    GenerationUnavailable,
    Overloaded,
)
from slipstream.server.metrics import ServerMetrics

logger = logging.getLogger("slipstream.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
}
_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "overloaded",
    499: "client_disconnected",
    500: "internal",
    503: "unavailable",
}


class APIError(Exception):
    """An error with its HTTP status, OpenAI error fields and a metrics reason."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # noqa: A002 (the OpenAI field's name)
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def reason(self) -> str:
        return self.code or _REASONS.get(self.status, str(self.status))

    def body(self) -> bytes:
        detail = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        return json.dumps({"error": detail}).encode()


def to_api_error(exc: BaseException, request: Request | None = None) -> APIError:
    """Map any exception to an APIError (the single mapping of the server)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InputError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, Overloaded):
        return APIError(
            429, str(exc), code="too_many_inputs_in_flight", headers={"Retry-After": "1"}
        )
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), code="draining", headers={"Retry-After": "1"})
    if isinstance(exc, ForwardError):
        return APIError(500, str(exc), code="forward_failed")
    if isinstance(exc, GenerationUnavailable):
        return APIError(500, str(exc), code="generation_unavailable")
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        return _http_exception(exc, request)
    return APIError(500, "internal server error (logged on the server)", code="internal_error")


def error_response(err: APIError, metrics: ServerMetrics | None) -> Response:
    if metrics is not None:
        metrics.failures.labels(reason=err.reason).inc()
    return Response(
        err.body(), status_code=err.status, media_type="application/json", headers=err.headers
    )


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        err = to_api_error(exc, request)
        if err.code == "internal_error":  # unexpected: not raised on purpose
            logger.error(
                "unexpected error on %s %s", request.method, request.url.path, exc_info=exc
            )
        return error_response(err, metrics)

    for cls in (
        APIError,
        InputError,
        Overloaded,
        EngineStopped,
        ForwardError,
        GenerationUnavailable,
        RequestValidationError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(cls, handle)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors: list[dict[str, Any]] = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    kind = str(first.get("type", ""))
    loc = [str(x) for x in first.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if kind == "json_invalid":
        why = str((first.get("ctx") or {}).get("error", "malformed JSON"))
        where = f" at position {loc[0]}" if loc else ""
        return APIError(
            400, f"the request body is not valid JSON: {why}{where}", code="invalid_json"
        )
    if not loc:
        if kind == "missing":
            return APIError(400, "the request needs a JSON object body")
        return APIError(
            400, "the request body must be a JSON object sent with Content-Type: application/json"
        )
    param = loc[0]
    same_field = [e for e in errors if _body_loc(e)[:1] == [param]]
    if kind == "missing":
        return APIError(400, f"'{param}' is required", param=param)
    if len(same_field) > 1:
        # A union (``input``): pydantic reports one error per alternative, tagged in loc.
        tags = []
        for e in same_field:
            tag = _body_loc(e)[1:2]
            if tag and tag[0] not in tags and not tag[0].isdigit():
                tags.append(tag[0])
        if tags:
            return APIError(400, f"invalid '{param}': expected {' | '.join(tags)}", param=param)
    path = ".".join(loc)
    return APIError(400, f"invalid '{path}': {first.get('msg', 'invalid value')}", param=param)


def _body_loc(e: dict[str, Any]) -> list[str]:
    loc = [str(x) for x in e.get("loc", ())]
    return loc[1:] if loc and loc[0] == "body" else loc


def _http_exception(exc: StarletteHTTPException, request: Request | None) -> APIError:
    headers = dict(exc.headers or {})
    path = request.url.path if request is not None else "?"
    method = request.method if request is not None else "?"
    if exc.status_code == 404:
        return APIError(404, f"no route {path}", code="not_found", headers=headers)
    if exc.status_code == 405:
        return APIError(
            405,
            f"method {method} is not allowed on {path}",
            code="method_not_allowed",
            headers=headers,
        )
    if exc.status_code == 400:
        # FastAPI's own "There was an error parsing the body" (e.g. a huge JSON integer)
        return APIError(
            400,
            f"the request body could not be parsed: {exc.detail}",
            code="invalid_json",
            headers=headers,
        )
    return APIError(exc.status_code, str(exc.detail), headers=headers)
