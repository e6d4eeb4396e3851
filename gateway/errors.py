"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}, for every failure we answer."""

from __future__ import annotations

from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.protocol import FinalResult

M = TypeVar("M", bound=BaseModel)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


_BODY_NOT_PARSED = "There was an error parsing the body"
"""FastAPI's detail where the body could not be decoded at all (an integer of 5,000 digits, nesting too deep)."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_FAILURE_STATUS = {"expired": 504, "cancelled": 499, "error": 500}


def first_failure(finals: list[FinalResult]) -> FinalResult | None:
    """The first of a request's choices that did not complete, if any."""
    return next((f for f in finals if not f.completed), None)


def failure(final: FinalResult) -> APIError:
    """The error of a request that ended other than completed (`final.finish_reason` not stop or length)."""
    return APIError(
        _FAILURE_STATUS.get(final.finish_reason, 500),
        f"Request {final.finish_reason}: {final.error or 'no reason given'}.",
        code=f"request_{final.finish_reason}",
    )


def invalid_body(error: ValidationError) -> APIError:
    """A body validated outside a route (a job, a batch line): a 400 naming its first error's field."""
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(400, f"{first['msg']}: '{param}'", param=param, code="invalid_value")


def validated(model: type[M], body: object) -> M:
    """A body read outside a route (a job, a batch line) as `model`, refused as the route refuses it."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise invalid_body(error) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_branch_tag(part) -> bool:
    """A union member's label in an error's location (`function-after[clean_text(), str]`, `list[TextPart]`, `int`),
    not a field or an index."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("constrained-"))


def _invalid_json() -> APIError:
    return APIError(400, "The request body is not valid JSON.", code="invalid_json")


def _is_type_mismatch(error: dict) -> bool:
    return error.get("type", "").endswith(("_type", "_parsing"))


def _from_validation(exc: RequestValidationError) -> APIError:
    """The error that says most: a union reports one error per member, and the member whose type the input has
    (a bound broken, a field of a list item) says more than the members it is not ("Input should be a valid
    string")."""
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return _invalid_json()
    if not errors:
        return APIError(400, "Invalid request.", code="invalid_value")

    def location(error: dict) -> list[str]:
        return [str(p) for p in error.get("loc", ()) if p != "body" and not _is_branch_tag(p)]

    specific = [error for error in errors if not _is_type_mismatch(error)]
    if specific:
        chosen = max(specific, key=lambda error: len(location(error)))  # the first of the deepest
        message = chosen.get("msg", "Invalid request.")
    else:  # no member's type matched: name them all
        chosen = errors[0]
        same_place = [e["msg"] for e in errors if location(e) == location(chosen)]
        kinds = dict.fromkeys(m.removeprefix("Input should be ").split(",")[0] for m in same_place)
        message = "Input should be " + " or ".join(kinds) if len(kinds) > 1 else chosen.get("msg", "Invalid request.")
    param = ".".join(location(chosen)) or None
    if param is None:  # the body itself: missing, or not an object (a list, a string, a form)
        message = "The request body must be a JSON object."
    return APIError(400, f"{message}: '{param}'" if param else message, param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # A validator of ours may have refused the request with a precise APIError.
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, APIError):
                return cause.response()
        return _from_validation(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_NOT_PARSED:  # JSON the decoder refused to finish
            return _invalid_json().response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        # Retried with backoff already (gateway.queue_client.connect): Redis is down or restarting.
        return APIError(
            503, "The queue is unavailable; retry shortly.", code="queue_unavailable", headers={"Retry-After": "2"}
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, "Internal server error.", code="internal_error").response()
