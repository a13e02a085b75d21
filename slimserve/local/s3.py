"""A local S3 on loopback (moto's server), reached through boto3 exactly as AWS is."""

import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from slimserve.errors import UserError

LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "slimserve-local",
    "AWS_SECRET_ACCESS_KEY": "slimserve-local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class LocalS3:
    endpoint: str
    bucket: str
    environment: dict[str, str]

    def client(self):
        return local_client(self.endpoint)


def local_client(endpoint: str):
    """boto3's S3 client for a local S3 at `endpoint`, with the local stack's credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEFAULT_BUCKET = "slimserve-models"


class WriteThrough:
    """moto's app, with every change to the bucket's objects made to `folder` too, before the client is told it
    succeeded: moto keeps objects in memory only, and a stack stopped any way (SIGKILL included) must keep what it
    was told. Each file is written beside its place and renamed into it, so it is the old object or the new, never
    part of one; the registry writes a version's manifest last, so a version is in the folder whole or not at all."""

    SUBRESOURCES = frozenset({"acl", "tagging", "legal-hold", "retention", "restore", "select", "attributes"})

    def __init__(self, app, bucket: str, folder: Path):
        self.app, self.bucket, self.folder = app, bucket, folder.resolve()
        self.client = None
        """Set once the folder's objects are loaded: only changes after that are written back."""

    def __call__(self, environ, start_response):
        change = self._change(environ) if self.client is not None else None
        if change is None:
            return self.app(environ, start_response)
        if change[1] is None:
            start_response("400 Bad Request", [("Content-Type", "application/xml")])
            return [b"<Error><Code>InvalidArgument</Code><Message>a key outside the store</Message></Error>"]
        answered: list = []
        body: list[bytes] = []

        def capture(status, headers, exc_info=None):
            answered[:] = [status, headers]
            return body.append

        result = self.app(environ, capture)
        try:
            body.extend(result)
        finally:
            getattr(result, "close", lambda: None)()
        status, headers = answered
        if status.startswith("2"):
            try:
                self._apply(*change)
            except OSError as error:  # the client is told, and retries: S3 treats a PUT again as the same PUT
                status, headers = "500 Internal Server Error", [("Content-Type", "application/xml")]
                body = [f"<Error><Code>InternalError</Code><Message>{error}</Message></Error>".encode()]
        start_response(status, headers)
        return body

    def _change(self, environ) -> tuple[str, Path | None] | None:
        """("put" | "delete" | "sync", the object's file) for a request that changes an object of the bucket; the file
        is None for a key that would leave the folder."""
        from urllib.parse import parse_qs

        method, query = environ["REQUEST_METHOD"], parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        if environ.get("HTTP_HOST", "").split(":")[0].startswith(f"{self.bucket}."):
            key = path[1:]
        else:
            bucket, _, key = path[1:].partition("/")
            if bucket != self.bucket:
                return None
        if method == "POST" and "delete" in query and not key:
            return "sync", self.folder
        if not key or key.endswith("/") or self.SUBRESOURCES & query.keys():
            return None
        if method == "PUT" and not {"partNumber", "uploadId"} & query.keys():
            kind = "put"
        elif method == "POST" and "uploadId" in query:  # a multipart upload completed
            kind = "put"
        elif method == "DELETE" and "uploadId" not in query:
            kind = "delete"
        else:
            return None
        target = (self.folder / key).resolve()
        return kind, (target if target.is_relative_to(self.folder) and target != self.folder else None)

    def _apply(self, kind: str, target: Path) -> None:
        if kind == "delete":
            target.unlink(missing_ok=True)
        elif kind == "sync":  # a multi-object delete: the folder keeps what the bucket still holds
            kept = {
                (self.folder / item["Key"]).resolve()
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
                for item in page.get("Contents", [])
            }
            for path in list(self.folder.rglob("*")):
                if path.is_file() and path.resolve() not in kept:
                    path.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.partial")
            key = target.relative_to(self.folder).as_posix()
            self.client.download_file(self.bucket, key, str(partial))
            os.replace(partial, target)

    def load(self, store: "LocalS3") -> None:
        """Every file of the folder as an object, streamed (a large model's files never sit in memory whole); then
        changes are written back. Files a killed write left half done are removed."""
        client = store.client()
        for path in sorted(self.folder.rglob("*")) if self.folder.is_dir() else []:
            if path.name.endswith(".partial") and path.name.startswith("."):
                path.unlink()
            elif path.is_file():
                client.upload_file(str(path), store.bucket, path.relative_to(self.folder).as_posix())
        self.client = client


class _MotoServer:
    """moto's S3 server as ThreadedMotoServer runs it, with its app wrapped; it binds when made, so a taken port is
    an OSError here, not a server that never starts."""

    def __init__(self, port: int, wrap):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.app = wrap(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", port, self.app, threaded=True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="local-s3", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()


def claim_port(host: str, port: int, flag: str, instead: str) -> None:
    """A port a server of ours is about to bind, refused in one line if another program holds it: moto's server
    would otherwise wait forever, and http.server raise a bare OSError naming neither the port nor the flag."""
    with socket.socket() as sock:
        # as the servers bind (http.server's allow_reuse_address): a port a stopped server left in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise UserError(
                f"{flag} {port}: cannot listen on {host}:{port} ({error.strerror}; another program, or "
                f"another `slimserve serve`, has it): {instead}"
            ) from None


@contextmanager
def local_s3(bucket: str = DEFAULT_BUCKET, port: int | None = None, keep: Path | None = None):
    """Start moto's server (on `port`, or any free one), create the bucket, and point this process's boto3 at it.
    With `keep`, the bucket holds that folder's files at start, and every change is written back to it as it is made
    (WriteThrough): registered versions and aliases outlive the stack, however it stops."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 call is noise here
    if port:
        claim_port("127.0.0.1", port, "--s3-port", "pass a free port, or leave --s3-port out to take any free one")
    port = port or free_port()
    server = _MotoServer(port, lambda app: app if keep is None else WriteThrough(app, bucket, Path(keep)))
    environment = {**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        store = LocalS3(environment["AWS_ENDPOINT_URL_S3"], bucket, environment)
        store.client().create_bucket(Bucket=bucket)
        if isinstance(server.app, WriteThrough):
            server.app.load(store)
        yield store
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
