"""Writing one complete HTTP/1.1 response from a `BaseHTTPRequestHandler`, for every server here."""

from http.server import BaseHTTPRequestHandler

FRAMING = ("content-length", "connection", "transfer-encoding")


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """The caller's headers, except framing ones: Content-Length is always the body's own."""
    handler.send_response(status)
    for key, value in (headers or {}).items():
        if key.lower() not in FRAMING:
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
