"""A local API Gateway: HTTP in, the proxy event the deployed API sends, the handler's answer out
(or, for a SageMaker model, the InvokeEndpoint call the deployed API makes).

It enforces what API Gateway enforces (10 MB bodies, the 29 s integration timeout,
API keys) and answers failures with API Gateway's own bodies, so a client sees
locally what it will see deployed.
"""

import contextlib
import http.client
import json
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import NamedTuple

from jsonschema import Draft4Validator

from slimserve.contract.apigw import (
    ENDPOINT_FAILED,
    MAX_BODY_BYTES,
    MISSING_ROUTE,
    GatewayAnswer,
    as_text,
    is_binary,
    response_body,
    rest_event,
)
from slimserve.contract.openapi import openapi_document
from slimserve.contract.schema import JSON_MEDIA_TYPE, REFUSED, v2_request_schema
from slimserve.lambda_handlers import wire
from slimserve.lambda_handlers.contract import CUSTOM_ATTRIBUTES, MODEL_VERSION, route_attribute
from slimserve.lambda_handlers.core import INFERENCE_TIMING, SERVER_TIMING, InferenceCore, Request, match_route
from slimserve.lambda_handlers.errors import InferenceError, InvalidInput, PayloadTooLarge
from slimserve.lambda_handlers.prometheus import ServingMetrics
from slimserve.local.runner import FunctionPool

INTEGRATION_TIMEOUT_S = 29.0
MODEL_ROUTE = re.compile(r"/v[12]/models/(?P<name>[^/:]+)")
VERSION_IN_PATH = re.compile(r"/v[12]/models/[^/:]+/versions/(?P<version>[^/:]+)")

# API Gateway's own answers, word for word
FORBIDDEN = GatewayAnswer(403, {"message": "Forbidden"})
TOO_LARGE = GatewayAnswer(413, {"message": "Request Too Long"})
BAD_GATEWAY = GatewayAnswer(502, {"message": "Internal server error"})
TIMED_OUT = GatewayAnswer(504, {"message": "Endpoint request timed out"})
# the local stack's own
STOPPING = GatewayAnswer(503, {"message": "the local stack is stopping"})


class HttpAnswer(NamedTuple):
    """What the gateway sends back for one request."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Route:
    """One model behind the gateway: its function and whether callers need the API key."""

    pool: FunctionPool
    api_key_required: bool
    versions: object | None = None
    """Picks the function for a version (`pick(ref or None) -> (pool, number)`, LookupError if none);
    None: one version only."""
    signature: dict | None = None
    """The deployed version's signature, which the API checks V2 JSON requests against; None: no check."""

    def checked_paths(self, name: str) -> set[str]:
        """The infer route the deployed API gives a request model (stacks/api.py): the unversioned one."""
        return {f"/v2/models/{name}/infer"}


@dataclass(frozen=True)
class EndpointRoute:
    """One model on a SageMaker endpoint: its serving program, and the routes the API declares for it."""

    url: str
    routes: frozenset
    """(method, path) pairs; any other path of the model is not a route of the API."""
    api_key_required: bool
    version: str = ""
    """The version the endpoint serves (a label of the gateway's metrics)."""
    signature: dict | None = None
    """Its signature, which the API checks V2 JSON requests against; None: no check."""
    healthy: Callable[[], bool] = lambda: True
    """Whether its program is up and has loaded its model: SageMaker routes nothing to a container before that."""

    def checked_paths(self, name: str) -> set[str]:
        """Both infer routes, unversioned and the served version's."""
        return {path for method, path in self.routes if method == "POST" and path.endswith("/infer")}


@dataclass
class _Served:
    """Which model and version a request reached, as far as the gateway got: its metrics' labels."""

    model: str | None = None
    version: str = ""


class LocalGateway(wire.Server):
    """Request threads are daemons (a keep-alive connection's thread waits for its client's next request), so closing
    drains instead: `server_close` waits for the requests in flight, and answers any that start meanwhile with 503,
    before the stack stops what they call."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        routes: dict[str, "Route | EndpointRoute"],
        host: str = "127.0.0.1",
        port: int = 8080,
        api_key: str | None = None,
        log=print,
        integration_timeout_s: float = INTEGRATION_TIMEOUT_S,
    ):
        self.routes = routes
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.log = log
        self.integration_timeout_s = integration_timeout_s
        self.server_routes = InferenceCore([])  # live and server metadata need no function
        self.executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="integration")
        self.metrics = ServingMetrics()
        self.in_flight = 0
        self.closing = False
        self._idle = threading.Condition()
        self.request_checks: dict[str, Draft4Validator] = {}
        for name, route in routes.items():
            self._check_requests(name, route)
        super().__init__((host, port), _GatewayHandler)

    def _check_requests(self, name: str, route: "Route | EndpointRoute") -> None:
        if route.signature is not None:
            validator = Draft4Validator(v2_request_schema(name, route.signature))
            self.request_checks.update(dict.fromkeys(route.checked_paths(name), validator))

    def replace_route(self, name: str, route: "Route | EndpointRoute") -> None:
        """A model's route, replaced as a deploy replaces it: requests from now on take the new one."""
        self._check_requests(name, route)
        self.routes[name] = route

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is not our error
            super().handle_error(request, client_address)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> HttpAnswer:
        """The answer to one request; one that reached a model is counted in the gateway's metrics."""
        started = time.perf_counter()
        served = _Served()
        answer = self._answer(method, path, headers, body, served)
        if served.model is not None:
            self.metrics.request(
                served.model,
                served.version,
                _route(method, path),
                answer.status,
                time.perf_counter() - started,
                _inference_ms(answer.headers),
            )
        return answer

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes, served: _Served) -> HttpAnswer:
        match = MODEL_ROUTE.match(path)
        if match is None:
            if (method, path) == ("GET", "/openapi.json"):
                return _json(200, openapi_document(self.url, sorted(self.routes)))
            if (method, path) == ("GET", "/metrics"):
                exposition, content_type = self.metrics.exposition()
                return HttpAnswer(200, content_type, exposition)
            if path.rstrip("/") == "/v2/health/ready":
                return self._ready()
            response = self.server_routes.handle(Request(method, path, headers, body))
            return HttpAnswer(response.status, response.headers, response.body)
        route = self.routes.get(match["name"])
        if route is None:
            names = ", ".join(sorted(self.routes)) or "none"
            return _json(404, {"error": f"unknown model {match['name']!r}; served models: {names}"})
        served.model = match["name"]
        served.version = (
            route.version if isinstance(route, EndpointRoute) else route.pool.spec.environment.get(MODEL_VERSION, "")
        )
        if route.api_key_required and headers.get("x-api-key") != self.api_key:
            return _json(*FORBIDDEN)
        passed_on = as_text(body).encode() if body and not is_binary(headers) else body
        if passed_on != body:
            self.log(
                f"{method} {path}: a body that is not UTF-8 text, without Content-Type: application/octet-stream: "
                "the deployed API passes it on as text, damaged, as it is here; send that header with binary data"
            )
            body = passed_on
        refusal = self._refusal(method, path, headers, body)
        if refusal is not None:
            return refusal
        if isinstance(route, EndpointRoute):
            return self.invoke_endpoint(route, method, path, headers, body)
        pool = route.pool
        if route.versions is not None:
            versioned = VERSION_IN_PATH.match(path)
            try:
                pool, number = route.versions.pick(versioned["version"] if versioned else None)
            except LookupError as error:
                return _json(404, {"error": str(error)})
            served.version = str(number)
            if versioned:  # an alias or sha256 prefix in the path becomes the number the function knows itself by
                path = f"{path[: versioned.start('version')]}{number}{path[versioned.end('version') :]}"
        return self.integrate(pool, rest_event(method, path, body, headers))

    def _refusal(self, method: str, path: str, headers: dict[str, str], body: bytes) -> HttpAnswer | None:
        """The API's request model at work: a JSON body its model's schema refuses gets a 400 before the model is
        called. API Gateway applies the model to JSON bodies (no Content-Type counts as JSON); one that does not parse
        goes on, for the core to say why."""
        validator = self.request_checks.get(path) if method == "POST" else None
        media_type = headers.get("content-type", JSON_MEDIA_TYPE).split(";")[0].strip().lower()
        if validator is None or media_type != JSON_MEDIA_TYPE:
            return None
        try:
            request = json.loads(body)
        except ValueError:
            return None
        errors = [error.message for error in validator.iter_errors(request)]
        return _json(400, {"error": f"{REFUSED}: [{', '.join(errors)}]"}) if errors else None

    def integrate(self, pool: FunctionPool, event: dict) -> HttpAnswer:
        if pool.spec.timeout_s < self.integration_timeout_s:
            result = pool.invoke(event)  # the function's own timeout ends it first: no need to watch the clock
        else:
            future = self.executor.submit(pool.invoke, event)
            try:
                result = future.result(timeout=self.integration_timeout_s)
            except FutureTimeout:
                return _json(*TIMED_OUT)
        if result.error is not None or not isinstance(result.payload, dict) or "statusCode" not in result.payload:
            self.log(f"{pool.spec.name}: Lambda invocation failed: {result.error or 'malformed proxy response'}")
            return _json(*BAD_GATEWAY)
        return HttpAnswer(
            result.payload["statusCode"], result.payload.get("headers") or {}, response_body(result.payload)
        )

    def invoke_endpoint(
        self, route: EndpointRoute, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> HttpAnswer:
        """What the deployed API's integration does: InvokeEndpoint with the route as the custom attribute, and the
        container's own status and body back (InvokeEndpoint's 424 ModelError undone, see slimserve.contract.apigw)."""
        if (method, path) not in route.routes:
            return _json(*MISSING_ROUTE)
        if not route.healthy():  # a restarted program, not up or still loading: InvokeEndpoint fails
            return _json(*ENDPOINT_FAILED)
        content_type = headers.get("content-type", "application/json") if method == "POST" else "application/json"
        invocation = {"Content-Type": content_type, CUSTOM_ATTRIBUTES: route_attribute(method, path)}
        if "accept" in headers:
            invocation["Accept"] = headers["accept"]
        connection = http.client.HTTPConnection(route.url.removeprefix("http://"), timeout=self.integration_timeout_s)
        try:
            connection.request("POST", "/invocations", body if method == "POST" else b"{}", invocation)
            response = connection.getresponse()
            answer = response.read()
        except TimeoutError:
            return _json(*TIMED_OUT)
        except OSError as error:
            self.log(f"{route.url}: InvokeEndpoint failed: {error}")
            return _json(*ENDPOINT_FAILED)
        finally:
            connection.close()
        if response.status != 200:
            return _json_bytes(response.status, answer)
        returned = {"Content-Type": response.getheader("Content-Type", "application/json")}
        if response.getheader(CUSTOM_ATTRIBUTES):
            returned["Inference-Header-Content-Length"] = response.getheader(CUSTOM_ATTRIBUTES)
        return HttpAnswer(200, returned, answer)

    def _ready(self) -> HttpAnswer:
        reasons = []
        for name, route in sorted(self.routes.items()):
            ready = f"/v2/models/{name}/ready"
            status, _, body = (
                self.invoke_endpoint(route, "GET", ready, {}, b"")
                if isinstance(route, EndpointRoute)
                else self.integrate(route.pool, rest_event("GET", ready))
            )
            if status != 200:
                reasons.append(f"{name}: {body.decode(errors='replace')}")
        if reasons:
            return _json(503, {"ready": False, "error": "; ".join(reasons)})
        return _json(200, {"ready": True})

    def server_close(self):
        """Stop listening, then wait (up to the integration timeout) for the requests in flight to be answered."""
        super().server_close()
        with self._idle:
            self.closing = True
            self._idle.wait_for(lambda: self.in_flight == 0, timeout=self.integration_timeout_s + 1)
        self.executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def request_in_flight(self):
        """Counts the request while it is answered; False (to answer 503) once the gateway is closing."""
        with self._idle:  # decided under the lock, answered outside it: a slow client holds up no one
            admitted = not self.closing
            self.in_flight += admitted
        if not admitted:
            yield False
            return
        try:
            yield True
        finally:
            with self._idle:
                self.in_flight -= 1
                self._idle.notify_all()


def _route(method: str, path: str) -> str | None:
    try:
        return match_route(method, path)[0]
    except InferenceError:
        return None


def _inference_ms(headers: dict[str, str]) -> float | None:
    """The runtime's time, from the Server-Timing header the core sets on an inference's answer."""
    timing = headers.get(SERVER_TIMING, "")
    prefix = f"{INFERENCE_TIMING};dur="
    return float(timing.removeprefix(prefix)) if timing.startswith(prefix) else None


def _json(status: int, payload: dict) -> HttpAnswer:
    return _json_bytes(status, json.dumps(payload).encode())


def _json_bytes(status: int, body: bytes) -> HttpAnswer:
    return HttpAnswer(status, {"Content-Type": "application/json"}, body)


class _GatewayHandler(wire.Handler):
    server: LocalGateway

    def _handle(self):
        with self.server.request_in_flight() as open_:
            if not open_:
                self.close_connection = True
                return self._send(*_json(*STOPPING))
            try:
                body = self.read_body(MAX_BODY_BYTES)
            except PayloadTooLarge:
                return self._send(*_json(*TOO_LARGE))
            except InvalidInput as error:
                return self._send(*_json(400, {"error": error.message}))
            headers = {key.lower(): value for key, value in self.headers.items()}
            self._send(*self.server.answer(self.command, self.path.split("?", 1)[0], headers, body))

    def _send(self, status: int, headers: dict, body: bytes):
        self.reply(status, body, headers)

    def __getattr__(self, name: str):
        """Every method reaches the routes, which answer the ones they do not take (http.server would say 501)."""
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)
