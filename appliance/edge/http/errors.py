"""Request errors as HTTP answers: the status for each pipeline error, `Retry-After`, and the two error
shapes (OpenAI's `{"error": {"message", "type", "param", "code"}}`, Ollama's `{"error": "..."}`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec
from starlette.responses import JSONResponse

from appliance.common.errors import InvalidArgument, Overloaded, RequestError, Unavailable
from appliance.common.errors import NotFound as NotFound  # the faces' 404


class TooLarge(RequestError):
    code = "PAYLOAD_TOO_LARGE"


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its generation was cancelled)."""


STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
}
_TYPE = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_CODE = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded", 503: "unavailable"}


def status_of(e: RequestError) -> int:
    return STATUS.get(e.code, 500)


def retry_after(e: RequestError, default_ms: int) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) for an overload (429) or an unavailable server (503)."""
    if isinstance(e, Overloaded):
        ms = e.retry_after_ms
    elif isinstance(e, Unavailable):
        ms = default_ms
    else:
        return {}
    return {"Retry-After": str(max(1, math.ceil(ms / 1000)))}


def field_of(e: RequestError, rename: Mapping[str, str]) -> tuple[str | None, str]:
    """(the HTTP field the error is about or None, the message naming it). `rename` maps the
    pipeline's field names (sampling.max_tokens, prompt) to this API's (max_completion_tokens, messages)."""
    if not isinstance(e, InvalidArgument):
        return None, str(e)
    why = str(e)[len(e.field) + 2 :]
    if e.field == "body":
        return None, why
    field = rename.get(e.field)
    if field is None:
        for old, new in rename.items():  # a prefix: messages[2].content under another name
            if e.field.startswith(old + ".") or e.field.startswith(old + "["):
                field = new + e.field[len(old) :]
                break
        else:
            field = e.field.removeprefix("sampling.")
    return field, f"{field}: {why}"


def openai_error(e: RequestError, rename: Mapping[str, str], retry_after_ms: int) -> JSONResponse:
    status = status_of(e)
    param, message = field_of(e, rename)
    body = {
        "error": {
            "message": message,
            "type": _TYPE.get(status, "invalid_request_error"),
            "param": param,
            "code": _CODE.get(status, e.code.lower()),
        }
    }
    return JSONResponse(body, status, headers=retry_after(e, retry_after_ms))


def ollama_error(e: RequestError, rename: Mapping[str, str], retry_after_ms: int) -> JSONResponse:
    _, message = field_of(e, rename)
    return JSONResponse({"error": message}, status_of(e), headers=retry_after(e, retry_after_ms))


def body_error(e: msgspec.MsgspecError) -> InvalidArgument:
    """A JSON body that does not parse, or a field of the wrong type or range, as InvalidArgument naming
    the field ("Expected `int`, got `str` - at `$.max_tokens`" -> max_tokens)."""
    if isinstance(e, msgspec.ValidationError):
        why, sep, path = str(e).rpartition(" - at `")
        if sep:
            field = path.rstrip("`").removeprefix("$").removeprefix(".") or "body"
            return InvalidArgument(field, why[:1].lower() + why[1:])
        if str(e).startswith("Object missing required field"):
            name = str(e).split("`")[1] if "`" in str(e) else "body"
            return InvalidArgument(name, "is required")
        return InvalidArgument("body", str(e))
    return InvalidArgument("body", f"not valid JSON: {e}")
