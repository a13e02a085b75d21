"""The inference core: an HTTP-shaped request in, a response out, for every protocol.

The Lambda handler, the SageMaker container and the local gateway each translate
their own transport into `Request` and back from `Response`; routing, limits,
decoding, validation, the runtime call and error mapping live here once.
"""

import re
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from . import jsoncodec, tfserving, v2
from .contract import MAX_BODY_BYTES, ROUTES, SERVER_NAME, SERVER_VERSION
from .datatypes import Signature
from .errors import (
    InferenceError,
    InvalidInput,
    MethodNotAllowed,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    RuntimeFailure,
)

MAX_DECODED_BYTES = 4 * MAX_BODY_BYTES  # a compressed body may expand, but only so far
CONTENT_ENCODINGS = ("identity", "gzip", "deflate")


class Request:
    """An HTTP request as every transport hands it to the core; header names are lower-cased."""

    __slots__ = ("method", "path", "headers", "body")

    def __init__(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""):
        self.method = method.upper()
        self.path = path
        self.headers = {key.lower(): value for key, value in (headers or {}).items()}
        self.body = body


class Response:
    """What the core answers, plus what the transport needs for its logs and metrics."""

    __slots__ = ("status", "body", "headers", "error_kind", "inference_ms", "detail", "route")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        error_kind: str | None = None,
        detail: str | None = None,
    ):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else {"Content-Type": "application/json"}
        self.error_kind = error_kind
        self.inference_ms: float | None = None  # an inference's runtime time (InferenceCore.finish)
        self.detail = detail  # a server-side failure's traceback: logged, never sent
        self.route: str | None = None  # the action of ROUTES that answered; None for a path no route matches

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.body[:200]!r}, error_kind={self.error_kind!r})"

    @classmethod
    def json(cls, status: int, payload, **extra) -> "Response":
        return cls(status, jsoncodec.dumps(payload), **extra)


class Runtime(Protocol):
    """What the core needs of a model: OnnxModel and TfliteModel provide it, and so do BatchingModel and
    FixedBatchSizes, which wrap one."""

    platform: str
    """The V2 metadata's platform (onnxruntime_onnx, tflite)."""
    format: str
    signature: Signature

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]: ...


class ServedModel(NamedTuple):
    """A model as the core serves it: loaded (`runtime` set) or failed (`failure` says why)."""

    name: str
    version: str
    runtime: Runtime | None = None
    failure: str | None = None

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    def require_ready(self):
        if self.runtime is None:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready: {self.failure}")
        return self.runtime


_MODEL = r"(?P<name>[A-Za-z0-9_.-]+)(?:/versions/(?P<version>[A-Za-z0-9_.-]+))?"
_PATTERNS = [
    (method, re.compile(re.escape(template).replace(re.escape("{model}"), _MODEL)), action)
    for method, template, action in ROUTES
]


SERVER_TIMING, INFERENCE_TIMING = "Server-Timing", "inference"


def match_route(method: str, path: str) -> tuple[str, dict[str, str | None]]:
    """The action of ROUTES for a request and its path's arguments (model name, version); NotFound or
    MethodNotAllowed where none takes it."""
    path = path.rstrip("/") or "/"
    allowed = []
    for route_method, pattern, action in _PATTERNS:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if route_method != method.upper():
            allowed.append(route_method)
            continue
        return action, match.groupdict()
    if allowed:
        raise MethodNotAllowed(f"{method.upper()} is not allowed on {path}; use {' or '.join(allowed)}")
    raise NotFound(f"no route for {method.upper()} {path}")


class InferenceCore:
    def __init__(self, models: list[ServedModel], max_body_bytes: int = MAX_BODY_BYTES):
        self.models: dict[str, dict[str, ServedModel]] = {}
        for model in models:
            self.models.setdefault(model.name, {})[model.version] = model
        self.max_body_bytes = max_body_bytes

    def handle(self, request: Request) -> Response:
        """The answer, with the route that gave it and, for an inference, its time as a Server-Timing header."""
        step = self.begin(request)
        if isinstance(step, Response):
            return step
        started = time.perf_counter()
        try:
            results, error = step.runtime.run(step.inputs, step.output_names), None
        except Exception as exc:  # each runtime raises its own types; finish says what it means
            results, error = None, exc
        return self.finish(step, results, error, (time.perf_counter() - started) * 1000)

    def begin(self, request: Request) -> "Response | Inference":
        """The answer, or for an inference what the runtime must run: a server that batches runs it where it likes,
        then has `finish` make the answer. `handle` is both in one call."""
        route = None
        try:
            route, arguments = match_route(request.method, request.path)
            step = ACTIONS[route](self, request, **arguments)
        except Exception as error:
            step = error_response(error)
        step.route = route
        return step

    def finish(
        self, inference: "Inference", results: dict[str, np.ndarray] | None, error: Exception | None, elapsed_ms: float
    ) -> Response:
        """The answer to an inference whose runtime call returned `results` or raised `error`, `elapsed_ms` after
        it was asked for."""
        try:
            if results is None:
                if isinstance(error, InferenceError):
                    raise error
                raise RuntimeFailure(f"model {inference.model.name!r} failed on valid input: {error}") from error
            response = inference.answer(results)
            response.inference_ms = elapsed_ms
            response.headers[SERVER_TIMING] = f"{INFERENCE_TIMING};dur={elapsed_ms:.3f}"
        except Exception as exc:
            response = error_response(exc)
        response.route = inference.route
        return response

    def _model(self, name: str, version: str | None) -> ServedModel:
        versions = self.models.get(name)
        if versions is None:
            raise NotFound(f"unknown model {name!r}; served models: {', '.join(sorted(self.models)) or 'none'}")
        if version is None:
            return versions[max(versions, key=_version_order)]
        if version not in versions:
            raise NotFound(
                f"model {name!r} has no version {version!r}; "
                f"served versions: {', '.join(sorted(versions, key=_version_order))}"
            )
        return versions[version]

    def _body(self, request: Request) -> bytes:
        body = request.body
        if len(body) > self.max_body_bytes:
            raise PayloadTooLarge.body(len(body), self.max_body_bytes)
        encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
        if encoding not in CONTENT_ENCODINGS:
            raise InvalidInput(
                f"unsupported Content-Encoding {encoding!r}: expected one of {', '.join(CONTENT_ENCODINGS)}"
            )
        if encoding == "identity":
            return body
        import zlib  # compressed bodies are rare; keep it off the cold-start path

        decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            decoded = decoder.decompress(body, MAX_DECODED_BYTES)
        except zlib.error as exc:
            raise InvalidInput(f"body is not valid {encoding} data: {exc}") from None
        if decoder.unconsumed_tail:
            raise PayloadTooLarge(f"{encoding} body expands past {MAX_DECODED_BYTES} bytes")
        if not decoder.eof:
            raise InvalidInput(f"{encoding} body is truncated")
        return decoded

    # V2 routes

    def _live(self, request):
        return Response.json(200, {"live": True})

    def _server_ready(self, request):
        not_ready = [m for versions in self.models.values() for m in versions.values() if not m.ready]
        if not_ready:
            reasons = "; ".join(f"{m.name} {m.version}: {m.failure}" for m in not_ready)
            return Response.json(503, {"ready": False, "error": reasons}, error_kind=ModelNotReady.kind)
        return Response.json(200, {"ready": True})

    def _server_metadata(self, request):
        return Response.json(
            200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}
        )

    def _v2_metadata(self, request, name, version):
        model = self._model(name, version)
        runtime = model.require_ready()
        versions = sorted(self.models[name], key=_version_order)
        return Response.json(200, v2.model_metadata(name, versions, runtime.platform, runtime.signature))

    def _v2_ready(self, request, name, version):
        model = self._model(name, version)
        if not model.ready:
            return Response.json(503, {"ready": False, "error": model.failure}, error_kind=ModelNotReady.kind)
        return Response.json(200, {"ready": True})

    def _v2_infer(self, request, name, version):
        model = self._model(name, version)
        runtime = model.require_ready()
        body = self._body(request)
        parsed = v2.parse_infer(
            body, request.headers.get(v2.HEADER_LENGTH), runtime.signature, request.headers.get("content-type")
        )

        def answer(results):
            return Response(200, *v2.encode_infer(name, model.version, parsed, results, runtime.signature))

        return Inference(model, runtime, parsed.inputs, [output.name for output in parsed.outputs], answer)

    # TF Serving routes

    def _tfs_status(self, request, name, version):
        model = self._model(name, version)
        return Response.json(200, tfserving.model_status(model.version, model.ready, model.failure))

    def _tfs_metadata(self, request, name, version):
        model = self._model(name, version)
        runtime = model.require_ready()
        return Response.json(200, tfserving.model_metadata(name, model.version, runtime.signature))

    def _tfs_predict(self, request, name, version):
        model = self._model(name, version)
        runtime = model.require_ready()
        parsed = tfserving.parse_predict(self._body(request), runtime.signature)
        output_names = [spec.name for spec in runtime.signature.outputs]

        def answer(results):
            return Response(200, tfserving.encode_predict(parsed, results))

        return Inference(model, runtime, parsed.inputs, output_names, answer)


class Inference:
    """An inference request, parsed and checked: what its model's runtime must run, and how the answer is made of
    what it returns (`answer(results)`, called by InferenceCore.finish, which adds the time)."""

    __slots__ = ("model", "runtime", "inputs", "output_names", "answer", "route")

    def __init__(
        self,
        model: ServedModel,
        runtime: Runtime,
        inputs: dict[str, np.ndarray],
        output_names: list[str],
        answer: Callable[[dict[str, np.ndarray]], Response],
    ):
        self.model, self.runtime, self.answer = model, runtime, answer
        self.inputs, self.output_names = inputs, output_names
        self.route: str | None = None


def error_response(error: Exception) -> Response:
    """An InferenceError as its status and message; anything else as a 500 whose traceback stays in the log."""
    if isinstance(error, InferenceError):
        return Response.json(error.status, {"error": error.message}, error_kind=error.kind)
    import traceback

    detail = "".join(traceback.format_exception(error))
    return Response.json(500, {"error": "internal error; see the server log"}, error_kind="internal", detail=detail)


def _version_order(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


# Each route's action, by name: checked here, at import, so a renamed method cannot become a 500 at request time.
ACTIONS: dict[str, Callable[..., Response]] = {
    "live": InferenceCore._live,
    "server_ready": InferenceCore._server_ready,
    "server_metadata": InferenceCore._server_metadata,
    "v2_metadata": InferenceCore._v2_metadata,
    "v2_ready": InferenceCore._v2_ready,
    "v2_infer": InferenceCore._v2_infer,
    "tfs_status": InferenceCore._tfs_status,
    "tfs_metadata": InferenceCore._tfs_metadata,
    "tfs_predict": InferenceCore._tfs_predict,
}
if set(ACTIONS) != {action for _, _, action in ROUTES}:
    raise ImportError(f"ROUTES and ACTIONS name different actions: {sorted(set(ACTIONS) ^ {a for _, _, a in ROUTES})}")
