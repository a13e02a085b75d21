"""A local S3 on loopback (moto's server), reached through boto3 exactly as AWS is."""

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

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

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=LOCAL_CREDENTIALS["AWS_DEFAULT_REGION"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEFAULT_PORT = 4566  # where `slimserve serve` keeps its S3, and where the registry commands look by default
DEFAULT_BUCKET = "slimserve-models"


@contextmanager
def local_s3(bucket: str = DEFAULT_BUCKET, port: int | None = None):
    """Start moto's server (on `port`, or any free one), create the bucket, and point this process's boto3 at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 call is noise here
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    environment = {**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        store = LocalS3(environment["AWS_ENDPOINT_URL_S3"], bucket, environment)
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
