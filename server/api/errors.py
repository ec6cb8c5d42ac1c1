"""TGI's error body `{"error": str, "error_type": str}` and the handlers that produce it."""

from __future__ import annotations

import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.server.api.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected

# an absolute path of two or more parts (a model folder, a source file): the server's, not the client's
_SERVER_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+-]+){2,}/?")


def without_paths(message: str) -> str:
    """A server-side failure's message as clients see it: file-system paths replaced by `<path>`."""
    return _SERVER_PATH.sub("<path>", message)


class APIError(Exception):
    """An error with TGI's status code and `error_type`; raised anywhere in a handler."""

    def __init__(self, status_code: int, message: str, error_type: str):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type

    def body(self) -> dict[str, str]:
        # no server path reaches a client (a model folder named in a message, a source file)
        return {"error": without_paths(self.message), "error_type": self.error_type}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def validation_error(message: str) -> APIError:
    return APIError(422, message, "validation")


def not_supported(message: str) -> APIError:
    return APIError(422, message, "validation")


def overloaded() -> APIError:
    return APIError(429, "Model is overloaded", "overloaded")


def generation_error(message: str) -> APIError:
    return APIError(424, f"Request failed during generation: {message}", "generation")


def internal_error(e: Exception) -> APIError:
    # the exception's text and traceback go to the log (ERROR), never to the client
    return APIError(500, f"Internal error: {type(e).__name__}", "internal")


def incomplete_generation() -> APIError:
    return APIError(500, "Incomplete generation", "incomplete_generation")


def format_pydantic_errors(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return f"Failed to parse the request body as JSON: {ctx.get('error', err.get('msg'))}"
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field `{where}`")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=str))


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    return APIError(422, format_pydantic_errors(_json_safe(list(exc.errors()))), "validation").response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:
        # FastAPI's answer to a body it could not decode (e.g. invalid UTF-8)
        return APIError(422, "Failed to parse the request body: it is not valid UTF-8 JSON", "validation").response()
    error_type = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http")
    return JSONResponse(
        {"error": str(exc.detail), "error_type": error_type}, status_code=exc.status_code, headers=exc.headers
    )


async def _client_gone(_: Request, __: ClientDisconnected) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: the connection is closed


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
