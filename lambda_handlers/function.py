"""One Lambda function serving one model: loaded once per container, then reused.

The model comes from S3 (bucket, key and sha256 in the environment) or, for local
runs and benchmarks, from a file. Bytes whose sha256 differs from the expected one
are never handed to a runtime: the function stays up, reports not ready, and
answers every inference with 503 and the reason.

A load that failed (S3 unreachable or slow, the object missing or changed) is tried
again on a later request, after a backoff that doubles from `retry_s` up to a minute,
so the function recovers by itself once S3 does; each failed load is logged and
counted as the `ModelLoadFailures` metric.
"""

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from typing import NamedTuple

from . import events, telemetry
from .contract import (
    COLD_START,
    ERRORS,
    FORMATS,
    INFERENCE_LATENCY,
    METRICS_NAMESPACE,
    METRICS_NAMESPACE_VARIABLE,
    MODEL_BUCKET,
    MODEL_FORMAT,
    MODEL_KEY,
    MODEL_LISTING,
    MODEL_LOAD_FAILURES,
    MODEL_LOAD_TIME,
    MODEL_NAME,
    MODEL_PATH,
    MODEL_SHA256,
    MODEL_VERSION,
    REQUEST_LATENCY,
    REQUESTS,
)
from .core import InferenceCore, Response, ServedModel
from .digests import CHUNK_BYTES, LISTING, ListingError, file_sha256, read_listing, sha256_of_chunks
from .errors import InferenceError
from .runtimes import ModelLoadError, load_model

RETRY_MAX_S = 60.0
# S3 failures end within seconds: Lambda's init phase has 10 s, and a hung fetch helps nobody
S3_CONFIG = {"retries": {"mode": "standard", "max_attempts": 3}, "connect_timeout": 1, "read_timeout": 3}


class ModelSourceError(Exception):
    """The model's bytes could not be fetched or did not verify."""


class ModelSource(NamedTuple):
    """Where one function's model lives, read from its environment."""

    name: str
    version: str
    model_format: str
    sha256: str
    bucket: str | None = None
    key: str | None = None
    path: str | None = None
    listing: str | None = None
    """The S3 key or path of the version's listing (digests.py) where it has several files; `sha256` is then the
    listing's, and the listing names every file's."""

    @classmethod
    def from_environment(cls, environ) -> "ModelSource":
        missing = [key for key in (MODEL_NAME, MODEL_FORMAT, MODEL_SHA256) if not environ.get(key)]
        located = environ.get(MODEL_PATH) or (environ.get(MODEL_BUCKET) and environ.get(MODEL_KEY))
        if not located:
            missing.append(f"{MODEL_BUCKET} and {MODEL_KEY} (or {MODEL_PATH})")
        if missing:
            raise ModelSourceError(f"environment lacks {', '.join(missing)}")
        model_format = environ[MODEL_FORMAT]
        if model_format not in FORMATS:
            raise ModelSourceError(f"{MODEL_FORMAT} is {model_format!r}; expected one of {', '.join(FORMATS)}")
        return cls(
            name=environ[MODEL_NAME],
            version=environ.get(MODEL_VERSION, "1"),
            model_format=model_format,
            sha256=environ[MODEL_SHA256].lower(),
            bucket=environ.get(MODEL_BUCKET),
            key=environ.get(MODEL_KEY),
            path=environ.get(MODEL_PATH),
            listing=environ.get(MODEL_LISTING),
        )

    @property
    def location(self) -> str:
        return self.path if self.path else f"s3://{self.bucket}/{self.key}"

    @contextlib.contextmanager
    def verified_file(self, folder: str | None = None) -> Iterator[str]:
        """The model's file, every file of the version checked against its sha256, for the runtime to load from its
        path (external data from beside it). Local files are checked where they lie. S3 objects are streamed into a
        folder of their own under `folder` (ephemeral storage: /tmp on Lambda), so memory never holds the model
        beside the runtime's own copy; the folder goes once the block ends (the runtime has read or mapped them)."""
        if self.path:
            yield self.checked_path()
            return
        import shutil  # with tempfile, 5 ms of imports a model from a file does without
        import tempfile

        try:
            copy = tempfile.mkdtemp(prefix=f"{self.name}-", dir=folder)
        except OSError as exc:
            raise self._unwritable(folder or tempfile.gettempdir(), exc) from None
        try:
            yield self.download(copy)
        finally:  # verified or not, loaded or not: nothing stays in ephemeral storage
            shutil.rmtree(copy, ignore_errors=True)

    def download(self, folder: str, client=None) -> str:
        """Stream the version's S3 objects into `folder` (its listing too, where it has one), each hashed as it
        arrives and refused unless it has the sha256 expected of it; the model file's path. `client`: an S3 client,
        by default one with the short timeouts a function's init phase needs."""
        if not (self.bucket and self.key):
            raise ModelSourceError("no file and no S3 bucket and key to read the model from")
        client = client or _s3_client()
        folder_key, _, model_file = self.key.rpartition("/")
        files = {model_file: self.sha256}
        if self.listing:
            listing = _s3_read(client, self.bucket, self.listing)
            files = self._listed(listing, model_file)
            self._write(os.path.join(folder, LISTING), lambda out: out.write(listing))
        for name, sha256 in files.items():
            key = f"{folder_key}/{name}"
            digest = self._write(
                os.path.join(folder, name), lambda out, key=key: _s3_stream(client, self.bucket, key, out)
            )
            self._check(digest, sha256, f"s3://{self.bucket}/{key}")
        return os.path.join(folder, model_file)

    def _write(self, path: str, write):
        """`write(file)`'s result, for a new file at `path`; a full disk is a ModelSourceError naming the file."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                return write(out)
        except OSError as exc:  # the ephemeral storage is full (a buffered write fails at close too)
            raise self._unwritable(path, exc) from None

    def _unwritable(self, where: str, exc: OSError) -> ModelSourceError:
        return ModelSourceError(
            f"cannot write {self.location} to {where}: {exc.strerror}; the function's ephemeral storage must hold "
            "the model"
        )

    def checked_path(self) -> str:
        """The model's local file, checked where it lies a chunk at a time, and so is every other file its listing
        names."""
        if not self.path:
            raise ModelSourceError(f"{self.location} is not a local file")
        if not self.listing:
            self._check(self._local_sha256(self.path), self.sha256, self.path)
            return self.path
        try:
            with open(self.listing, "rb") as file:
                listing = file.read()
        except OSError as exc:
            raise ModelSourceError(f"cannot read {self.listing}: {exc.strerror}") from None
        folder = os.path.dirname(self.listing)
        files = self._listed(listing, os.path.relpath(self.path, folder))
        for name, sha256 in files.items():
            path = os.path.join(folder, name)
            self._check(self._local_sha256(path), sha256, path)
        return self.path

    @staticmethod
    def _local_sha256(path: str) -> str:
        try:
            return file_sha256(path)
        except OSError as exc:
            raise ModelSourceError(f"cannot read {path}: {exc.strerror}") from None

    def _listed(self, listing: bytes, model_file: str) -> dict[str, str]:
        """The files a listing names, once it hashes to the version's sha256 and names the model file."""
        where = f"{self.listing}" if self.path else f"s3://{self.bucket}/{self.listing}"
        self._check(hashlib.sha256(listing).hexdigest(), self.sha256, where)
        try:
            files = read_listing(listing)
        except ListingError as error:
            raise ModelSourceError(f"{where}: {error}") from None
        if model_file not in files:
            raise ModelSourceError(f"{where} does not list the model file {model_file}")
        return files

    def _check(self, digest: str, expected: str, where: str) -> None:
        if expected and digest != expected:
            raise ModelSourceError(f"sha256 of {where} is {digest}, expected {expected}; refusing to serve it")


def _s3_client():
    import boto3  # part of the Lambda Python runtime; only needed when the model is in S3
    from botocore.config import Config

    return boto3.client("s3", config=Config(**S3_CONFIG))


@contextlib.contextmanager
def _s3_errors(bucket: str, key: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise ModelSourceError(
            f"cannot fetch s3://{bucket}/{key}: {error.get('Code')} {error.get('Message', '')}".rstrip()
        ) from None
    except BotoCoreError as exc:
        raise ModelSourceError(f"cannot fetch s3://{bucket}/{key}: {exc}") from None


def _s3_read(client, bucket: str, key: str) -> bytes:
    with _s3_errors(bucket, key):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _s3_stream(client, bucket: str, key: str, out) -> str:
    """Write the object to `out` a chunk at a time; its sha256."""

    def written(chunks):
        for chunk in chunks:
            out.write(chunk)
            yield chunk

    with _s3_errors(bucket, key):
        return sha256_of_chunks(written(client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(CHUNK_BYTES)))


class ModelFunction:
    """The Lambda entry point's state; calling it handles one API Gateway event."""

    def __init__(self, environ, retry_s: float = 1.0):
        self.environ = environ
        self.namespace = environ.get(METRICS_NAMESPACE_VARIABLE, METRICS_NAMESPACE)
        self.function_name = environ.get("AWS_LAMBDA_FUNCTION_NAME", "local")
        self.log_context = {"function": self.function_name}
        self.retry_s, self.next_load, self.failed_loads = retry_s, 0.0, 0
        started = time.perf_counter()
        self._load()
        self.load_ms = (time.perf_counter() - started) * 1000
        self.cold = True

    def _load(self) -> None:
        environ = self.environ
        name = environ.get(MODEL_NAME, "unnamed")
        version = environ.get(MODEL_VERSION, "1")
        try:
            source = ModelSource.from_environment(environ)
        except ModelSourceError as exc:  # a deployment mistake: trying again cannot help
            self._failed(name, version, str(exc), retry=False)
            return
        try:
            with source.verified_file() as path:
                runtime = load_model(path, source.model_format)
        except (ModelSourceError, ModelLoadError) as exc:
            self._failed(name, version, str(exc), retry=True)
            return
        telemetry.log(
            "INFO",
            "model loaded",
            model=name,
            version=version,
            source=source.location,
            sha256=source.sha256,
            failed_loads_before=self.failed_loads,
            **self.log_context,
        )
        self.model = ServedModel(name, version, runtime=runtime)
        self.core = InferenceCore([self.model])

    def _failed(self, name: str, version: str, reason: str, retry: bool) -> None:
        delay = min(self.retry_s * 2**self.failed_loads, RETRY_MAX_S) if retry else float("inf")
        self.failed_loads += 1
        self.next_load = time.monotonic() + delay
        telemetry.log(
            "ERROR",
            "model not loaded",
            model=name,
            version=version,
            reason=reason,
            retry_in_s=delay if retry else None,
            **self.log_context,
        )
        telemetry.emit_metrics(
            self.namespace, name, {MODEL_LOAD_FAILURES: 1}, function=self.function_name, version=version
        )
        self.model = ServedModel(name, version, failure=reason)
        self.core = InferenceCore([self.model])

    def __call__(self, event: dict, context) -> dict:
        started = time.perf_counter()
        request_id = getattr(context, "aws_request_id", None) or "local"
        self.log_context["request_id"] = request_id
        if not self.model.ready and time.monotonic() >= self.next_load:
            self._load()
        try:
            response = self.core.handle(events.to_request(event))
        except InferenceError as error:
            response = Response.json(error.status, {"error": error.message}, error_kind=error.kind)
        elapsed = (time.perf_counter() - started) * 1000
        self._record(response, elapsed, request_id)
        return events.to_event_response(response)

    def _record(self, response: Response, elapsed_ms: float, request_id: str) -> None:
        values = {REQUESTS: 1, ERRORS: int(response.status >= 400), REQUEST_LATENCY: round(elapsed_ms, 3)}
        if response.inference_ms is not None:
            values[INFERENCE_LATENCY] = round(response.inference_ms, 3)
        values[COLD_START] = int(self.cold)
        if self.cold:
            values[MODEL_LOAD_TIME] = round(self.load_ms, 3)
            self.cold = False
        telemetry.emit_metrics(
            self.namespace,
            self.model.name,
            values,
            response.error_kind,
            request_id=request_id,
            status=response.status,
            version=self.model.version,
        )
        if response.status >= 400:
            details = {"exception": response.detail} if response.detail else {}
            telemetry.log(
                "WARNING" if response.status < 500 else "ERROR",
                "request failed",
                status=response.status,
                error=response.body[:500].decode(errors="replace"),
                model=self.model.name,
                **details,
                **self.log_context,
            )
