"""API Gateway proxy events (REST payload 1.0, HTTP API payload 2.0) to and from the core."""

import base64
import binascii

from .core import Request, Response
from .errors import InvalidInput

TEXT_TYPES = ("application/json", "text/")


def is_http_api(event: dict) -> bool:
    return event.get("version") == "2.0"


def _path(event: dict) -> str:
    if not is_http_api(event):
        return event.get("path") or "/"
    path = event.get("rawPath") or "/"
    stage = (event.get("requestContext") or {}).get("stage")
    if stage and stage != "$default" and path.startswith(f"/{stage}/"):
        path = path[len(stage) + 1 :]
    return path


def _method(event: dict) -> str:
    if is_http_api(event):
        return event["requestContext"]["http"]["method"]
    return event["httpMethod"]


def to_request(event: dict) -> Request:
    """The core's view of an event; a body API Gateway mis-encoded is the client's fault, so 400."""
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        try:
            raw = binascii.a2b_base64(body, strict_mode=True)  # validates in C, unlike b64decode
        except binascii.Error as exc:
            raise InvalidInput(f"body marked base64 is not valid base64: {exc}") from None
    else:
        raw = body.encode() if isinstance(body, str) else body
    return Request(_method(event), _path(event), event.get("headers") or {}, raw)


def to_event_response(response: Response) -> dict:
    content_type = response.headers.get("Content-Type", "")
    binary = not content_type.startswith(TEXT_TYPES)
    return {
        "statusCode": response.status,
        "headers": response.headers,
        "body": base64.b64encode(response.body).decode() if binary else response.body.decode(),
        "isBase64Encoded": binary,
    }
