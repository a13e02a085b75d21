"""A local S3 on loopback (moto's server), reached through boto3 exactly as AWS is."""

import logging
import os
import shutil
import socket
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


def _load(store: LocalS3, folder: Path) -> None:
    """Every file under `folder` as an object, streamed: a large model's files never sit in memory whole."""
    client = store.client()
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.is_file():
            client.upload_file(str(path), store.bucket, path.relative_to(folder).as_posix())


def _save(store: LocalS3, folder: Path) -> None:
    """Every object into a fresh folder beside `folder`, which then replaces it: a save cut short leaves the last."""
    client = store.client()
    saving = folder.with_name(folder.name + ".saving")
    shutil.rmtree(saving, ignore_errors=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket):
        for item in page.get("Contents", []):
            target = saving / item["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(store.bucket, item["Key"], str(target))
    saving.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    saving.rename(folder)


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
    With `keep`, the bucket's objects are loaded from that folder at start and saved back to it at stop: moto keeps
    them in memory only, and registered versions and aliases must outlive a restart."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 call is noise here
    if port:
        claim_port("127.0.0.1", port, "--s3-port", "pass a free port, or leave --s3-port out to take any free one")
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    environment = {**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        store = LocalS3(environment["AWS_ENDPOINT_URL_S3"], bucket, environment)
        store.client().create_bucket(Bucket=bucket)
        if keep is not None:
            _load(store, Path(keep))
        yield store
        if keep is not None:
            _save(store, Path(keep))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
