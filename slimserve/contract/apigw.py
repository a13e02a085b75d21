"""What the deployed API does, written once for the stacks and the local gateway.

Lambda models: proxy events as the API sends them. REST APIs send payload format 1.0,
HTTP APIs 2.0. Bodies of binary media types arrive base64-encoded, as API Gateway does
for `binaryMediaTypes`.

SageMaker models: the API calls InvokeEndpoint, which answers a container's 4xx or 5xx
with a 424 ModelError carrying the original status and body; the API gives the client the
original back, so a model answers the same wherever it runs. SageMaker's own refusals
(throttling, an endpoint that is not there or not up) become the answers below.
"""

import base64
import time
import uuid
from typing import NamedTuple

from slimserve.lambda_handlers.contract import RAW_IMAGE_MEDIA_TYPES

BINARY_MEDIA_TYPES = ("application/octet-stream", "application/vnd.slimserve.binary", *RAW_IMAGE_MEDIA_TYPES)
MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway's payload limit


class GatewayAnswer(NamedTuple):
    """A JSON answer the API gives by itself, without reaching a model."""

    status: int
    payload: dict


MISSING_ROUTE = GatewayAnswer(
    403, {"message": "Missing Authentication Token"}
)  # API Gateway's, for an undeclared route
ENDPOINT_THROTTLED = GatewayAnswer(
    429, {"error": "the model's SageMaker endpoint is throttling requests; retry with backoff"}
)
ENDPOINT_FAILED = GatewayAnswer(
    502, {"error": "the model's SageMaker endpoint did not answer; see its CloudWatch logs"}
)
# InvokeEndpoint's 424 ModelError -> the container's own status and body
MODEL_ERROR_TEMPLATE = (
    "#set($error = $util.parseJson($input.body))\n"
    "#set($context.responseOverride.status = $error.OriginalStatusCode)\n"
    "$error.OriginalMessage"
)


def is_binary(headers: dict[str, str]) -> bool:
    """Whether the deployed API passes this request's body on as bytes: a binary media type, or an encoded body."""
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    encoded = any(k.lower() == "content-encoding" and v.lower() != "identity" for k, v in headers.items())
    return encoded or content_type.split(";")[0].strip() in BINARY_MEDIA_TYPES


def as_text(body: bytes) -> str:
    """A body of another type as the deployed API passes it on: UTF-8 text, bytes that are not UTF-8 replaced (so
    binary data sent without a binary media type is damaged there, and here too)."""
    return body.decode(errors="replace")


def _body(body: bytes, headers: dict[str, str]) -> tuple[str | None, bool]:
    if not body:
        return None, False
    if is_binary(headers):
        return base64.b64encode(body).decode(), True
    return as_text(body), False


def rest_event(method: str, path: str, body: bytes = b"", headers: dict | None = None, stage: str = "prod") -> dict:
    headers = dict(headers or {})
    encoded_body, is_base64 = _body(body, headers)
    request_id = str(uuid.uuid4())
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": f"/{stage}{path}",
            "stage": stage,
            "requestId": request_id,
            "requestTimeEpoch": int(time.time() * 1000),
            "protocol": "HTTP/1.1",
            "identity": {"sourceIp": "127.0.0.1", "userAgent": headers.get("User-Agent", "")},
        },
        "body": encoded_body,
        "isBase64Encoded": is_base64,
    }


def http_api_event(
    method: str, path: str, body: bytes = b"", headers: dict | None = None, stage: str = "$default"
) -> dict:
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    encoded_body, is_base64 = _body(body, headers)
    raw_path = path if stage == "$default" else f"/{stage}{path}"
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": stage,
            "timeEpoch": int(time.time() * 1000),
        },
        "body": encoded_body,
        "isBase64Encoded": is_base64,
    }


def response_body(response: dict) -> bytes:
    body = response.get("body") or ""
    return base64.b64decode(body) if response.get("isBase64Encoded") else body.encode()
