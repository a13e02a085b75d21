"""The http.server plumbing the local gateway and the Lambda runner's Runtime API share (the SageMaker serving program
has its own front end, on llhttp)."""

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import InvalidInput, PayloadTooLarge

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

    def read_body(self, limit: int) -> bytes:
        """The request's body, framed by Content-Length or sent chunked (http.server de-chunks nothing), of at most
        `limit` bytes. Past the limit, PayloadTooLarge once the rest is read, so the client gets to read the answer;
        a malformed framing is InvalidInput, and the connection closes since its next request cannot be found."""
        if self.headers.get("Transfer-Encoding", "").strip().lower() == "chunked":
            return self._read_chunked(limit)
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise InvalidInput(f"unsupported Transfer-Encoding {self.headers['Transfer-Encoding']!r}: expected chunked")
        declared = self.headers.get("Content-Length") or "0"
        try:
            length = int(declared)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise InvalidInput(f"Content-Length must be a non-negative integer, got {declared!r}") from None
        if length > limit:
            self._discard(length)
            raise PayloadTooLarge.body(declared, limit)
        return self.rfile.read(length)

    def _discard(self, length: int) -> bool:
        """Read `length` bytes a megabyte at a time, keeping none; False if the client stopped sending first."""
        while length > 0:
            piece = len(self.rfile.read(min(length, 1 << 20)))
            if not piece:
                return False
            length -= piece
        return True

    def _read_chunked(self, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                chunk_size = int(line.split(b";", 1)[0].strip(), 16)
                if chunk_size < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise InvalidInput(f"malformed chunked body: chunk size line {line[:40]!r}") from None
            if chunk_size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                    pass
                break
            size += chunk_size
            if size <= limit:
                chunks.append(self.rfile.read(chunk_size))
                whole = len(chunks[-1]) == chunk_size
            else:  # past the limit nothing more is kept, however large a chunk claims to be
                whole = self._discard(chunk_size)
            if not whole or self.rfile.readline(1024).strip():
                self.close_connection = True
                raise InvalidInput(f"malformed chunked body: a chunk of {chunk_size} bytes is cut short or overlong")
        if size > limit:
            raise PayloadTooLarge.body(size, limit)
        return b"".join(chunks)
