"""The HTTP plumbing every server here shares: the gateway, the Runtime API and the SageMaker server."""

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class Server(ThreadingHTTPServer):
    """A thread per connection, and a listen backlog for bursts: socketserver's default of 5 makes the
    kernel drop or reset connections when a few dozen clients connect at once."""

    request_queue_size = 256


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, no Nagle delay (headers and body go out as separate writes), no access log."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        send(self, status, body, headers)
