"""The serving errors and the one mapping from clipfast's errors and limits to OpenAI-shaped
answers: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx or 5xx status.

A limit's ``code`` is its name (``max_items``, ``max_body_bytes``, ``max_text_chars``, ...), an
overload's ``overloaded`` (with ``Retry-After``), a timeout's ``request_timeout``. ``kind`` is
the metrics label of the failure (``clipfast_errors_total{kind}``): overloaded, timeout, limit,
invalid, bad_item, unauthorized, internal.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from clipfast.errors import InputError
from clipfast.serve.inputs import LimitExceeded


class ApiError(Exception):
    """An answer other than 200: its status, message, OpenAI ``code``, metrics ``kind``, the
    offending request field (``param``) and any headers (``Retry-After``, ``Connection``)."""

    def __init__(self, status: int, message: str, *, code: str, kind: str,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind
        self.param, self.headers = param, headers

    def payload(self) -> dict[str, Any]:
        """The OpenAI error body."""
        err_type = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": err_type, "param": self.param,
                          "code": self.code}}

    def response(self):
        """The body as a starlette JSONResponse (its own rendering, kept byte for byte)."""
        from starlette.responses import JSONResponse

        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def validation_message(e: ValidationError) -> str:
    """pydantic's first five complaints, each with the field it names."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def to_api_error(exc: BaseException) -> ApiError | None:
    """The answer to a request that raised ``exc``: ApiError as is, a limit (LimitExceeded) as
    its 413/422 named by the limit, a pydantic or clipfast input error as 422, a multipart
    parser refusal as 4xx. None for anything else: an internal error (500, logged)."""
    from starlette.exceptions import HTTPException

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LimitExceeded):
        return ApiError(exc.status, str(exc), code=exc.limit, kind="limit")
    if isinstance(exc, ValidationError):
        return ApiError(422, validation_message(exc), code="invalid_request", kind="invalid")
    if isinstance(exc, InputError):
        return ApiError(422, str(exc), code="invalid_request", kind="invalid")
    if isinstance(exc, HTTPException):  # starlette's form parser (no boundary, too many parts)
        status = exc.status_code if 400 <= exc.status_code < 500 else 400
        return ApiError(status, f"multipart body refused: {exc.detail}",
                        code="invalid_multipart", kind="invalid")
    return None


def internal_error() -> ApiError:
    """What a client is told of a fault of the server's own (the log has the traceback)."""
    return ApiError(500, "internal error (see the server log)", code="internal",
                    kind="internal")


def dumps(payload: Any) -> str:
    """The compact JSON every 200 answer is written as."""
    return json.dumps(payload, separators=(",", ":"))
