"""The serving program for SageMaker's container contract, on the same inference core as Lambda.

    GET  /ping          200 when the model is loaded, 503 with the reason otherwise
    POST /invocations   the protocol is chosen by Content-Type:
                          application/json                V2 inference request
                          application/octet-stream        V2 with the binary tensor extension
                          application/vnd.tfserving+json  TF Serving :predict body
    GET  /stats         requests served and runtime calls made (dynamic batching at work),
                        by batch size where batches run at fixed sizes
    GET  /metrics       Prometheus metrics (lambda_handlers.prometheus): requests, latencies,
                        batch sizes, queue depth, model load failures

Behind the inference API, InvokeEndpoint passes the container only Content-Type, Accept and
one custom-attributes header, always as a POST. The API puts the client's route there
(`slimserve-route=GET /v2/models/big/ready`), so every route of the protocol reaches the
core as the client sent it; the binary tensor header's length comes back the same way. The
request's own Inference-Header-Content-Length does not come: a binary body that starts with no
JSON object is a raw binary request (Inference-Header-Content-Length: 0).

The model is read from /opt/ml/model (or SLIMSERVE_MODEL_PATH) and checked against
SLIMSERVE_MODEL_SHA256 when set, with every file its listing names when it has one.
ONNX models run on CUDA when a GPU is present (TensorRT when SLIMSERVE_TENSORRT=1), on
the CPU otherwise, and say which; on a GPU, batches run padded to a few fixed sizes
(FixedBatchSizes says why). SIGTERM finishes the requests in flight, then exits.

One asyncio event loop serves every connection (HTTP/1.1 parsed by llhttp, through httptools): it reads, parses,
decodes and encodes, while the batch workers run the model. With a thread per connection (http.server) the
threads' handoffs and header parsing cost more than the model on small requests (bench/profile_serving.py).
"""

import asyncio
import collections
import email.utils
import functools
import http
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import httptools

from . import telemetry
from .batching import BatchingModel, FixedBatchSizes, batch_first, powers_of_two
from .contract import (
    CUSTOM_ATTRIBUTES,
    FORMATS,
    LOADING,
    MODEL_DIR,
    MODEL_FORMAT,
    MODEL_NAME,
    MODEL_PATH,
    MODEL_SHA256,
    MODEL_VERSION,
    ROUTE_ATTRIBUTE,
    SAGEMAKER_MODEL_DIR,
    SAGEMAKER_PORT,
    SERVER_HOST,
    SERVER_NAME,
    endpoint_routes,
)
from .core import Inference, InferenceCore, Request, Response, Runtime, ServedModel, error_response
from .digests import LISTING
from .errors import PayloadTooLarge
from .function import ModelSource, ModelSourceError
from .prometheus import ServingMetrics
from .runtimes import ModelLoadError, OnnxModel, TfliteModel
from .v2 import HEADER_LENGTH
from .wire import FRAMING

TFSERVING_CONTENT_TYPE = "application/vnd.tfserving+json"
CUSTOM_ATTRIBUTES_KEY, HEADER_LENGTH_KEY = CUSTOM_ATTRIBUTES.lower(), HEADER_LENGTH.lower()  # as headers arrive
CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


@dataclass(frozen=True)
class ServerSettings:
    """How the serving program batches and which ONNX Runtime providers it asks for, read from its environment
    once (`from_environment`); a bad setting is a ModelLoadError naming the variable, which /ping reports."""

    max_batch_size: int = 32
    """SLIMSERVE_MAX_BATCH_SIZE: the most rows one runtime call takes."""
    batch_sizes: tuple[int, ...] | None = None
    """SLIMSERVE_BATCH_SIZES: `auto` (None: powers of two up to the largest batch, on a GPU only), `none` (()), or
    the sizes, comma-separated. See FixedBatchSizes for why."""
    workers: int | None = None
    """SLIMSERVE_BATCH_WORKERS; None: 2 on a GPU (one gathers while another's batch runs: the copies around a run
    take longer than the run), else 1."""
    max_queue_delay_ms: float = 2.0
    """SLIMSERVE_MAX_QUEUE_DELAY_MS: how long a request waits for others to batch with."""
    conv_algo_search: str = "HEURISTIC"
    """SLIMSERVE_CUDNN_CONV_ALGO_SEARCH: how cuDNN picks convolution algorithms."""
    tensorrt: bool = False
    """SLIMSERVE_TENSORRT=1: TensorRT before CUDA."""

    @classmethod
    def from_environment(cls, environ) -> "ServerSettings":
        search_key = "SLIMSERVE_CUDNN_CONV_ALGO_SEARCH"
        search = environ.get(search_key, cls.conv_algo_search)
        if search not in CONV_ALGO_SEARCHES:
            raise ModelLoadError(f"{search_key} is {search!r}; expected one of {', '.join(CONV_ALGO_SEARCHES)}")
        return cls(
            max_batch_size=_whole_number(environ, "SLIMSERVE_MAX_BATCH_SIZE") or cls.max_batch_size,
            batch_sizes=_batch_sizes(environ.get("SLIMSERVE_BATCH_SIZES", "auto").strip()),
            workers=_whole_number(environ, "SLIMSERVE_BATCH_WORKERS"),
            max_queue_delay_ms=_milliseconds(environ, "SLIMSERVE_MAX_QUEUE_DELAY_MS", cls.max_queue_delay_ms),
            conv_algo_search=search,
            tensorrt=environ.get("SLIMSERVE_TENSORRT") == "1",
        )

    def fixed_batch_sizes(self, on_gpu: bool) -> list[int]:
        if self.batch_sizes is None:
            return powers_of_two(self.max_batch_size) if on_gpu and self.max_batch_size > 1 else []
        return list(self.batch_sizes)

    def batch_workers(self, on_gpu: bool) -> int:
        return self.workers if self.workers is not None else 2 if on_gpu else 1

    def onnx_providers(self, available: list[str]) -> list[str | tuple[str, dict[str, str]]]:
        """CUDA first where present, cuDNN choosing convolution algorithms by heuristic unless told:
        ONNX Runtime's default, an exhaustive search, runs again for every new input shape (measured
        on an H100, ResNet-18 over 32 batch sizes: 7.2 s exhaustive, 2.2 s heuristic; 1.7 ms a call
        either way once the shape stays)."""
        wanted: list[str | tuple[str, dict[str, str]]] = [
            ("CUDAExecutionProvider", {"cudnn_conv_algo_search": self.conv_algo_search}),
            "CPUExecutionProvider",
        ]
        if self.tensorrt:
            wanted.insert(0, "TensorrtExecutionProvider")
        return [provider for provider in wanted if _provider_name(provider) in available]


def _batch_sizes(setting: str) -> tuple[int, ...] | None:
    if setting == "auto":
        return None
    if setting == "none":
        return ()
    try:
        sizes = [int(size) for size in setting.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ModelLoadError(
            f"SLIMSERVE_BATCH_SIZES is {setting!r}; expected auto, none or positive whole numbers "
            "separated by commas, like 1,4,16"
        )
    return tuple(sorted(set(sizes)))


def _whole_number(environ, key: str) -> int | None:
    """The setting, None where it is not set."""
    setting = environ.get(key)
    if setting is None:
        return None
    if not setting.isdigit() or int(setting) < 1:
        raise ModelLoadError(f"{key} is {setting!r}; expected a whole number of 1 or more")
    return int(setting)


def _milliseconds(environ, key: str, default: float) -> float:
    setting = environ.get(key, str(default))
    try:
        value = float(setting)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise ModelLoadError(f"{key} is {setting!r}; expected a number of milliseconds, 0 or more")
    return value


def _provider_name(provider: str | tuple[str, dict[str, str]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _model_path(environ) -> str:
    if environ.get(MODEL_PATH):
        return environ[MODEL_PATH]
    folder = environ.get(SAGEMAKER_MODEL_DIR, MODEL_DIR)
    found = [path for path in (os.path.join(folder, f"model.{suffix}") for suffix in FORMATS) if os.path.isfile(path)]
    return found[0] if found else os.path.join(folder, "model.onnx")


def _listing(model_path: str) -> str | None:
    """The version's listing beside the model file, where the version has several files (digests.py)."""
    listing = os.path.join(os.path.dirname(model_path), LISTING)
    return listing if os.path.isfile(listing) else None


def _identity(environ) -> tuple[str, str]:
    return environ.get(MODEL_NAME, "model"), environ.get(MODEL_VERSION, "1")


def load(environ) -> ServedModel:
    """The model as the core serves it; a failure is kept as the reason /ping and every request give."""
    path = _model_path(environ)
    name, version = _identity(environ)
    model_format = environ.get(MODEL_FORMAT) or os.path.splitext(path)[1].lstrip(".")
    on_gpu = False
    try:
        settings = ServerSettings.from_environment(environ)
        # checked where it lies: every session below loads it from its path (external data from disk), never bytes
        sha256 = environ.get(MODEL_SHA256, "").lower()
        ModelSource(name, version, model_format, sha256, path=path, listing=_listing(path)).checked_path()
        if model_format == "onnx":
            import onnxruntime

            providers = settings.onnx_providers(onnxruntime.get_available_providers())
            onnx_model = OnnxModel(path, providers=providers, spin=False)  # the HTTP threads need the cores
            runtime: Runtime = onnx_model
            used = onnx_model.session.get_providers()[0]
            on_gpu = used != "CPUExecutionProvider"
            telemetry.log(
                "INFO" if on_gpu else "WARNING",
                f"ONNX Runtime runs on {used}",
                available=[_provider_name(p) for p in providers],
                model=name,
            )
            sizes = settings.fixed_batch_sizes(on_gpu)
            if sizes and batch_first(runtime.signature.inputs):
                runtime = FixedBatchSizes(runtime, lambda: OnnxModel(path, providers=providers, spin=False), sizes)
                telemetry.log("INFO", "batches run at fixed sizes", model=name, sizes=runtime.sizes)
        elif model_format == "tflite":
            runtime = TfliteModel(path)
        else:
            raise ModelLoadError(f"{path}: unknown model format {model_format!r}; expected onnx or tflite")
    except (ModelSourceError, ModelLoadError) as error:
        telemetry.log("ERROR", "model not loaded", model=name, reason=str(error))
        return ServedModel(name, version, failure=str(error))
    workers = settings.batch_workers(on_gpu)
    # a batch past the largest fixed size would run as several calls anyway: gathering more only adds waiting
    largest = runtime.sizes[-1] if isinstance(runtime, FixedBatchSizes) else settings.max_batch_size
    batching = BatchingModel(runtime, min(settings.max_batch_size, largest), settings.max_queue_delay_ms, workers)
    telemetry.log(
        "INFO",
        "model loaded",
        model=name,
        source=path,
        batching=batching.batchable,
        max_batch_size=batching.max_batch_size,
        max_delay_ms=settings.max_queue_delay_ms,
        workers=workers,
    )
    return ServedModel(name, version, runtime=batching)


class _Serving(NamedTuple):
    """What the server serves now; replaced whole, so a request never sees half of a new model."""

    model: ServedModel
    core: InferenceCore
    batching: BatchingModel | None
    routes: frozenset[tuple[str, str]]


class SageMakerServer:
    """SageMaker's container contract on one asyncio event loop: HTTP/1.1 parsed by llhttp (httptools), no thread
    per connection. The loop parses, decodes and encodes; the batch workers run the model and hand each batch's
    answers back to the loop (measured in bench/serving.py; the README's profile says why)."""

    def __init__(self, model: ServedModel, host: str = "0.0.0.0", port: int = 8080):
        self.metrics = ServingMetrics()
        self.serve_model(model)
        # bound now, so a port in use fails before anything loads; a backlog for bursts of new connections
        self.socket = socket.create_server((host, port), backlog=256)
        self.server_address = self.socket.getsockname()
        self.in_flight = 0  # requests read but not yet answered: SIGTERM waits for them
        self.connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started, self._stopped = threading.Event(), threading.Event()
        self._finished: collections.deque[Callable[[], None]] = collections.deque()  # see hand_back
        self._drain_scheduled = False

    def serve_model(self, model: ServedModel) -> None:
        """Serve `model` from now on: first the placeholder that answers `loading` while the model loads, then the
        loaded model, or the reason it did not load. Any thread may call it."""
        if model.ready and not isinstance(model.runtime, BatchingModel):  # runs off the event loop all the same
            model = model._replace(runtime=BatchingModel(model.runtime, max_batch_size=1))
        batching = model.runtime if isinstance(model.runtime, BatchingModel) else None
        labels = (model.name, model.version)
        if not model.ready and model.failure != LOADING:
            self.metrics.load_failures.labels(*labels).inc()
        if batching is not None:
            self.metrics.queue_depth.labels(*labels).set_function(batching.waiting)
            batching.on_runtime_call = self.metrics.batch_size.labels(*labels).observe
        routes = frozenset(endpoint_routes(model.name, model.version))
        self.serving = _Serving(model, InferenceCore([model]), batching, routes)

    def serve_forever(self) -> None:
        """Serve on this thread until `shutdown`, then finish the requests in flight."""
        try:
            asyncio.run(self._serve())
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop taking connections and return once the requests in flight are answered. Any thread but the loop's."""
        self._started.wait()
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._stopped.wait()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        listener = await self._loop.create_server(lambda: _Connection(self), sock=self.socket)
        self._started.set()
        await self._stop.wait()
        listener.close()
        while self.in_flight:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.transport.close()
        await asyncio.sleep(0)  # the transports close, their last answers written

    def hand_back(self, finish: Callable[[], None]) -> None:
        """From a batch worker: `finish` runs on the loop. One wake-up takes a whole batch's answers (a wake-up
        each cost the worker a system call per request)."""
        self._finished.append(finish)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False  # first: an answer handed back from now on schedules another drain
        while self._finished:
            self._finished.popleft()()

    def begin(self, headers: dict[str, str], body: bytes) -> "Response | Inference":
        """One InvokeEndpoint call: the route from the custom attribute when the API set one, else from Content-Type."""
        serving = self.serving
        attribute = headers.get(CUSTOM_ATTRIBUTES_KEY, "")
        base = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if attribute.startswith(f"{ROUTE_ATTRIBUTE}="):
            method, _, path = attribute.removeprefix(f"{ROUTE_ATTRIBUTE}=").partition(" ")
            if (method, path) not in serving.routes:
                return Response.json(
                    404,
                    {
                        "error": f"{CUSTOM_ATTRIBUTES}: no route {method} {path!r} for model "
                        f"{serving.model.name!r} version {serving.model.version}"
                    },
                )
            body = body if method == "POST" else b""
        elif base == TFSERVING_CONTENT_TYPE:
            method, path = "POST", f"/v1/models/{serving.model.name}:predict"
        else:
            method, path = "POST", f"/v2/models/{serving.model.name}/infer"
        if base == "application/octet-stream" and HEADER_LENGTH_KEY not in headers:
            headers[HEADER_LENGTH_KEY] = str(_json_header_length(body))
        return serving.core.begin(Request(method, path, headers, body))


_STARTS_AN_OBJECT = re.compile(rb'\s*\{\s*"')


def _json_header_length(body: bytes) -> int:
    """Where the V2 JSON header ends when no header says so (InvokeEndpoint passes none on): the end of the JSON
    object the body starts with, or 0, a raw binary request, for a body that starts with no object's first key."""
    if not _STARTS_AN_OBJECT.match(body):
        return 0
    depth, in_string, escaped = 0, False, False
    for index, byte in enumerate(body):
        if in_string:
            escaped = byte == 0x5C and not escaped
            if byte == 0x22 and not escaped:
                in_string = False
            continue
        if byte == 0x22:
            in_string = True
        elif byte in b"{[":
            depth += 1
        elif byte in b"}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return len(body)


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed as they come, answered one at a time and in order (a pipelined
    request waits for the one before it)."""

    def __init__(self, server: SageMakerServer):
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport
        self.queued: collections.deque[_Incoming] = collections.deque()
        self.busy = False  # a request is being answered
        self.incoming: _Incoming | None = None  # the request being read
        self.ended = False  # the client half-closed: close once its requests are answered
        self.answering = False  # _next is running: it takes the next request itself
        self.reading_paused = self.writing_paused = False

    # asyncio's side

    def connection_made(self, transport) -> None:
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP transports
        self.server.connections.add(self)

    def connection_lost(self, exc) -> None:
        if self.server.serving.batching is not None:
            self.server.serving.batching.gone(self)
        self.server.connections.discard(self)
        if self.incoming is not None:  # cut off before its request was whole: it will not come
            self._leave(self.incoming)
            self.incoming = None
        while self.queued:
            self._leave(self.queued.popleft())

    def eof_received(self) -> bool:
        """The client sent all it will (a half-close): answer what it asked, then close."""
        self.ended = True
        return self.busy or bool(self.queued)  # True keeps the transport open to write those answers

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not served")
        except httptools.HttpParserError as error:
            reason = self.incoming.refusal if self.incoming and self.incoming.refusal else None
            self._refuse(*(reason or (400, f"malformed HTTP request: {error}")))

    # llhttp's side

    def on_message_begin(self) -> None:
        self.incoming = _Incoming()
        self.server.in_flight += 1

    def on_url(self, url: bytes) -> None:
        assert self.incoming is not None
        self.incoming.add_head(len(url))
        self.incoming.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.incoming is not None
        self.incoming.add_head(len(name) + len(value))
        key = name.decode("latin-1").lower()
        if key not in self.incoming.headers:  # the first of repeated headers, as http.server took it
            self.incoming.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        incoming = self.incoming
        assert incoming is not None
        incoming.method = self.parser.get_method().decode("latin-1")
        incoming.limit = self.server.serving.core.max_body_bytes
        if incoming.method == "POST":
            incoming.hold(self.server.serving.batching, self)
        if incoming.headers.get("expect", "").lower() == "100-continue":
            declared = incoming.headers.get("content-length", "0")
            if declared.isdigit() and int(declared) > incoming.limit:  # refused before the client sends it
                too_large = PayloadTooLarge.body(declared, incoming.limit)
                incoming.refusal = (too_large.status, too_large.message)
                raise too_large  # llhttp stops: data_received answers with the refusal
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        assert self.incoming is not None
        self.incoming.add_body(body)

    def on_message_complete(self) -> None:
        incoming = self.incoming
        assert incoming is not None
        incoming.keep_alive = self.parser.should_keep_alive()
        self.incoming = None
        self.queued.append(incoming)
        if len(self.queued) >= MAX_QUEUED and not self.reading_paused:  # a client that pipelines and never reads
            self.reading_paused = True
            self.transport.pause_reading()
        self._next()

    # flow control: asyncio says when the client stops reading what is written

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._next()

    # answering

    def _next(self) -> None:
        """Answer the queued requests in order, one at a time; those answered at once in this loop, the others when
        their batch comes back (`_finish`)."""
        if self.answering:
            return  # the loop below, further up the stack, goes on
        self.answering = True
        try:
            while self.queued and not self.busy and not self.writing_paused:
                incoming = self.queued.popleft()
                if self.reading_paused and len(self.queued) < MAX_QUEUED // 2:
                    self.reading_paused = False
                    self.transport.resume_reading()
                self.busy = True
                try:
                    self._answer(incoming)
                except Exception as error:  # a fault of the server's own, never the client's: logged, and a 500
                    self._reply(incoming, error_response(error))
        finally:
            self.answering = False
        if self.ended and not self.busy and not self.queued:
            self.transport.close()

    def _answer(self, incoming: "_Incoming") -> None:
        path = incoming.url.decode("latin-1").partition("?")[0]
        if incoming.method == "GET":
            return self._reply(incoming, self._get(path))
        if incoming.method != "POST":
            return self._reply(incoming, _error(404, f"no route for {incoming.method} {path}"))
        if incoming.size > incoming.limit:
            return self._reply(incoming, error_response(PayloadTooLarge.body(incoming.size, incoming.limit)))
        if path != "/invocations":
            return self._reply(incoming, _error(404, f"no route for POST {path}"))
        step = self.server.begin(incoming.headers, b"".join(incoming.body))
        if isinstance(step, Response):
            return self._reply(incoming, step)
        batching = step.runtime
        assert isinstance(batching, BatchingModel)
        if incoming.batching is batching:
            batching.reach()
            incoming.reached = True
        server = self.server

        def done(results, error) -> None:  # on a batch worker's thread
            if incoming.keep_alive and not self.queued:  # the client's next request comes once this is answered
                batching.answered(self)
            elapsed_ms = (time.perf_counter() - incoming.started) * 1000
            server.hand_back(functools.partial(self._finish, incoming, step, results, error, elapsed_ms))

        batching.submit(step.inputs, step.output_names, done)

    def _finish(self, incoming: "_Incoming", step: Inference, results, error, elapsed_ms: float) -> None:
        try:
            response = self.server.serving.core.finish(step, results, error, elapsed_ms)
            header_length = response.headers.get("Inference-Header-Content-Length")
            if CUSTOM_ATTRIBUTES_KEY in incoming.headers and header_length is not None:
                response.headers[CUSTOM_ATTRIBUTES] = header_length  # the one response header InvokeEndpoint returns
        except Exception as failure:
            response = error_response(failure)
        self._reply(incoming, response)

    def _get(self, path: str) -> Response:
        serving = self.server.serving
        if path == "/ping":
            if serving.model.ready:
                return Response(200, b'{"status":"healthy"}')
            return Response.json(503, {"status": "unhealthy", "error": serving.model.failure})
        if path == "/metrics":
            return Response(200, *self.server.metrics.exposition())
        if path == "/stats" and serving.batching is not None:
            batching = serving.batching
            stats: dict = {"requests": batching.requests, "runtime_calls": batching.runtime_calls}
            if isinstance(batching.runtime, FixedBatchSizes):
                calls = batching.runtime.calls_by_size
                stats["runtime_calls_by_batch_size"] = {str(size): count for size, count in calls.items()}
            return Response.json(200, stats)
        return _error(404, f"no route for GET {path}")

    def _reply(self, incoming: "_Incoming", response: Response) -> None:
        if response.detail:
            telemetry.log("ERROR", "internal error", detail=response.detail)
        if not self.transport.is_closing():
            self.transport.write(_head(response, incoming.keep_alive) + response.body)
            if not incoming.keep_alive:
                self.transport.close()
        if incoming.method == "POST":
            serving = self.server.serving
            model = serving.model
            self.server.metrics.request(
                model.name,
                model.version,
                response.route,
                response.status,
                time.perf_counter() - incoming.started,
                response.inference_ms,
            )
        self._leave(incoming)
        self.busy = False
        self._next()

    def _leave(self, incoming: "_Incoming") -> None:
        self.server.in_flight -= 1
        if incoming.batching is not None:
            incoming.batching.leave(incoming.reached)

    def _refuse(self, status: int, message: str) -> None:
        """A request that cannot be read to its end: answered, and the connection closes (its next request cannot
        be found). Requests before it on the connection are dropped with it."""
        if self.incoming is not None:
            self._leave(self.incoming)
            self.incoming = None
        response = _error(status, message)
        self.transport.write(_head(response, keep_alive=False) + response.body)
        self.transport.close()


class _Incoming:
    """A request as it is read: head, body (kept only up to the limit), and the batcher told of it."""

    __slots__ = (
        "url", "headers", "method", "body", "size", "limit", "head", "keep_alive", "started", "batching", "reached",
        "refusal",
    )  # fmt: skip

    def __init__(self):
        self.url, self.method = b"", ""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size, self.limit, self.head = 0, 0, 0
        self.keep_alive = True
        self.started = time.perf_counter()
        self.batching: BatchingModel | None = None  # told of the request: it may come to a batch
        self.reached = False
        self.refusal: tuple[int, str] | None = None

    def hold(self, batching: BatchingModel | None, connection: "_Connection") -> None:
        """A POST, whose body is still to come: worth a batch's wait."""
        if batching is not None:
            batching.arrive(connection)
            self.batching = batching

    def add_head(self, size: int) -> None:
        self.head += size
        if self.head > MAX_HEAD_BYTES:
            self.refusal = (431, f"the request's head is over {MAX_HEAD_BYTES} bytes")
            raise ValueError(self.refusal[1])  # llhttp stops: data_received answers with the refusal

    def add_body(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size <= self.limit:  # past the limit nothing more is kept; the answer is 413
            self.body.append(piece)


MAX_HEAD_BYTES = 65536
MAX_QUEUED = 32  # pipelined requests read ahead on one connection before reading pauses
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_date = (0, "")


def _head(response: Response, keep_alive: bool) -> bytes:
    """The status line and headers: the caller's, except framing ones (Content-Length is always the body's own)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}",
        f"Server: {SERVER_NAME}",
        f"Date: {_date[1]}",
    ]
    lines += [f"{key}: {value}" for key, value in response.headers.items() if key.lower() not in FRAMING]
    lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error(status: int, message: str) -> Response:
    return Response.json(status, {"error": message})


def main() -> int:
    """Listen at once, answering /ping with 503 `loading` until the model is loaded (a large one takes minutes)."""
    port = int(os.environ.get(SAGEMAKER_PORT, "8080"))
    server = SageMakerServer(
        ServedModel(*_identity(os.environ), failure=LOADING), os.environ.get(SERVER_HOST, "0.0.0.0"), port
    )
    telemetry.log("INFO", f"listening on port {port}; the model loads")
    threading.Thread(target=lambda: server.serve_model(load(os.environ)), name="model-loader", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown, daemon=True).start())
    server.serve_forever()  # returns once the requests in flight are answered
    telemetry.log("INFO", "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
