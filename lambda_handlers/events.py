"""API Gateway proxy events (REST payload 1.0, HTTP API payload 2.0) to and from the core."""

import base64
import binascii

from .core import Request, Response
from .errors import InvalidInput

TEXT_TYPES = ("application/json", "text/")


def is_http_api(event: dict) -> bool:
    return event.get("version") == "2.0"


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"event {what} must be a non-empty string, got {type(value).__name__}")
    return value


def _path(event: dict) -> str:
    if not is_http_api(event):
        return _text(event.get("path") or "/", "path")
    path = _text(event.get("rawPath") or "/", "rawPath")
    stage = (event.get("requestContext") or {}).get("stage")
    if isinstance(stage, str) and stage != "$default" and path.startswith(f"/{stage}/"):
        path = path[len(stage) + 1 :]
    return path


def _method(event: dict) -> str:
    if is_http_api(event):
        context = event.get("requestContext")
        http = context.get("http") if isinstance(context, dict) else None
        return _text(http.get("method") if isinstance(http, dict) else None, "requestContext.http.method")
    return _text(event.get("httpMethod"), "httpMethod")


def _headers(event: dict) -> dict[str, str]:
    headers = event.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(value, str) for value in headers.values()):
        raise InvalidInput("event headers must map names to strings")
    return headers


def to_request(event: dict) -> Request:
    """The core's view of an event; a body API Gateway mis-encoded, or an event not from API Gateway, is a 400."""
    if not isinstance(event, dict):
        raise InvalidInput(f"expected an API Gateway proxy event (a JSON object), got {type(event).__name__}")
    body = event.get("body") or ""
    if not isinstance(body, str):
        raise InvalidInput(f"event body must be a string, got {type(body).__name__}")
    if event.get("isBase64Encoded"):
        try:
            raw = binascii.a2b_base64(body, strict_mode=True)  # validates in C, unlike b64decode
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"body marked base64 is not valid base64: {exc}") from None
    else:
        raw = body.encode(errors="surrogatepass")
    return Request(_method(event), _path(event), _headers(event), raw)


def to_event_response(response: Response) -> dict:
    content_type = response.headers.get("Content-Type", "")
    binary = not content_type.startswith(TEXT_TYPES)
    return {
        "statusCode": response.status,
        "headers": response.headers,
        "body": base64.b64encode(response.body).decode() if binary else response.body.decode(),
        "isBase64Encoded": binary,
    }
