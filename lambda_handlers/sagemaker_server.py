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
"""

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

from . import telemetry, wire
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
    endpoint_routes,
)
from .core import InferenceCore, Request, Response, Runtime, ServedModel
from .digests import LISTING
from .errors import InferenceError, NotFound
from .function import ModelSource, ModelSourceError
from .prometheus import ServingMetrics
from .runtimes import ModelLoadError, OnnxModel, TfliteModel
from .v2 import HEADER_LENGTH

TFSERVING_CONTENT_TYPE = "application/vnd.tfserving+json"
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
    batching = BatchingModel(runtime, settings.max_batch_size, settings.max_queue_delay_ms, workers)
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


class SageMakerServer(wire.Server):
    daemon_threads = False  # SIGTERM waits for the requests in flight
    block_on_close = True

    def __init__(self, model: ServedModel, host: str = "0.0.0.0", port: int = 8080):
        self.metrics = ServingMetrics()
        self.serve_model(model)
        super().__init__((host, port), _Handler)

    def serve_model(self, model: ServedModel) -> None:
        """Serve `model` from now on: first the placeholder that answers `loading` while the model loads, then the
        loaded model, or the reason it did not load."""
        batching = model.runtime if isinstance(model.runtime, BatchingModel) else None
        labels = (model.name, model.version)
        if not model.ready and model.failure != LOADING:
            self.metrics.load_failures.labels(*labels).inc()
        if batching is not None:
            self.metrics.queue_depth.labels(*labels).set_function(batching.waiting)
            batching.on_runtime_call = self.metrics.batch_size.labels(*labels).observe
        self.routes = set(endpoint_routes(model.name, model.version))
        self.batching = batching
        self.arriving = batching.arriving if batching else contextlib.nullcontext
        self.core = InferenceCore([model])
        self.model = model

    def invoke(self, headers: dict[str, str], body: bytes) -> Response:
        """One InvokeEndpoint call: the route from the custom attribute when the API set one, else from Content-Type."""
        attribute = headers.get(CUSTOM_ATTRIBUTES.lower(), "")
        base = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if attribute.startswith(f"{ROUTE_ATTRIBUTE}="):
            method, _, path = attribute.removeprefix(f"{ROUTE_ATTRIBUTE}=").partition(" ")
            if (method, path) not in self.routes:
                return Response.json(
                    404,
                    {
                        "error": f"{CUSTOM_ATTRIBUTES}: no route {method} {path!r} for model "
                        f"{self.model.name!r} version {self.model.version}"
                    },
                )
            body = body if method == "POST" else b""
        elif base == TFSERVING_CONTENT_TYPE:
            method, path = "POST", f"/v1/models/{self.model.name}:predict"
        else:
            method, path = "POST", f"/v2/models/{self.model.name}/infer"
        if base == "application/octet-stream" and HEADER_LENGTH not in headers:
            headers[HEADER_LENGTH] = str(_json_header_length(body))
        response = self.core.handle(Request(method, path, headers, body))
        header_length = response.headers.get("Inference-Header-Content-Length")
        if attribute and header_length is not None:  # the one response header InvokeEndpoint returns to the API
            response.headers[CUSTOM_ATTRIBUTES] = header_length
        return response


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


class _Handler(wire.Handler):
    server: SageMakerServer

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.reply(status, body, headers or {"Content-Type": "application/json"})

    def do_GET(self):
        model = self.server.model
        if self.path == "/ping":
            if model.ready:
                return self._send(200, b'{"status":"healthy"}')
            return self._send(503, json.dumps({"status": "unhealthy", "error": model.failure}).encode())
        batching = self.server.batching
        if self.path == "/metrics":
            return self._send(200, *self.server.metrics.exposition())
        if self.path == "/stats" and batching is not None:
            stats = {"requests": batching.requests, "runtime_calls": batching.runtime_calls}
            if isinstance(batching.runtime, FixedBatchSizes):
                stats["runtime_calls_by_batch_size"] = batching.runtime.calls_by_size
            return self._send(200, json.dumps(stats).encode())
        self._send(404, json.dumps({"error": f"no route for GET {self.path}"}).encode())

    def do_POST(self):
        started = time.perf_counter()
        with self.server.arriving():
            try:
                body = self.read_body(self.server.core.max_body_bytes)
                if self.path != "/invocations":
                    raise NotFound(f"no route for POST {self.path}")
            except InferenceError as error:
                response = Response.json(error.status, {"error": error.message})
            else:
                response = self.server.invoke({key.lower(): value for key, value in self.headers.items()}, body)
        self._send(response.status, response.body, response.headers)
        model = self.server.model
        self.server.metrics.request(
            model.name,
            model.version,
            response.route,
            response.status,
            time.perf_counter() - started,
            response.inference_ms,
        )


def main() -> int:
    """Listen at once, answering /ping with 503 `loading` until the model is loaded (a large one takes minutes)."""
    port = int(os.environ.get(SAGEMAKER_PORT, "8080"))
    server = SageMakerServer(
        ServedModel(*_identity(os.environ), failure=LOADING), os.environ.get(SERVER_HOST, "0.0.0.0"), port
    )
    telemetry.log("INFO", f"listening on port {port}; the model loads")
    threading.Thread(target=lambda: server.serve_model(load(os.environ)), name="model-loader", daemon=True).start()

    def stop(signum, frame):
        threading.Thread(
            target=server.shutdown, daemon=True
        ).start()  # shutdown() from the serving thread would deadlock

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    server.server_close()  # joins the request threads: in-flight requests finish
    telemetry.log("INFO", "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
