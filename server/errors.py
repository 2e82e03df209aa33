"""The one place tuneloop's error codes become HTTP statuses and JSON bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.errors import TuneloopError

log = logging.getLogger(__name__)

STATUS_BY_CODE = {
    "spec_invalid": 422,
    "dataset_invalid": 422,
    "model_unavailable": 422,
    "path_refused": 400,
    "url_refused": 400,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "unauthorized": 401,
    "forbidden": 403,
    "overloaded": 503,
    "internal": 500,
}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "field": field}}


def validation_field(location: tuple[object, ...]) -> str:
    # FastAPI prefixes the part of the request ("body", "query", "path"); the spec's own
    # field path is what the caller needs to fix.
    parts = [str(p) for p in location]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


def body_error(exc: StarletteHTTPException) -> str:
    if isinstance(exc.__cause__, RecursionError):
        return "body: the JSON is nested too deeply to decode"
    return f"body: {exc.detail}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneloopError)
    async def tuneloop_error(_: Request, exc: TuneloopError) -> JSONResponse:
        status = STATUS_BY_CODE.get(exc.code, 500)
        headers = {"Retry-After": "5"} if status == 503 else None
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = validation_field(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        if first.get("type") == "json_invalid":
            # The location holds the character offset, which is no field.
            field = "body"
            reason = first.get("ctx", {}).get("error", "")
            message = f"invalid JSON at character {first['loc'][-1]}: {reason}"
        return JSONResponse(error_body("request_invalid", f"{field}: {message}", field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if exc.status_code == 400:
            # FastAPI's answer to a body it could not decode at all.
            return JSONResponse(error_body("request_invalid", body_error(exc), "body"), 400)
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal", f"internal error ({type(exc).__name__}); see the server log"),
            500,
        )
