"""The gateway's one error shape: `{"error": {"type", "message"}}` with the HTTP status, for every 4xx and 5xx."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Our errors, FastAPI's parameter validation and Starlette's 404/405 all answer in the one shape."""

    @app.exception_handler(ApiError)
    async def _ours(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.type, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _parameters(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or str(first["loc"][0])
        return error_response(422, "InvalidRequest", f"{where}: {first['msg']}")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, "HTTPError", str(e.detail), getattr(e, "headers", None))
