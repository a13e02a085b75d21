"""The SageMaker serving program as a plain process on loopback: contract, protocols, batching, failure, shutdown."""

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from support import MODELS, ROOT
from test_conformance import raw_exchange
from test_v2 import triton_request, triton_result

from slimserve.lambda_handlers import batching as batching_module
from slimserve.lambda_handlers.batching import (
    BatchingModel,
    CallCost,
    FixedBatchSizes,
    powers_of_two,
)
from slimserve.lambda_handlers.contract import (
    CUSTOM_ATTRIBUTES,
    LOADING,
    endpoint_routes,
    route_attribute,
)
from slimserve.lambda_handlers.core import InferenceCore, Request, Response, ServedModel
from slimserve.lambda_handlers.runtimes import OnnxModel
from slimserve.lambda_handlers.sagemaker_server import ServerSettings
from slimserve.local.s3 import free_port
from slimserve.registry.store import file_environment


def start(model: str, **extra) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = MODELS / model
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "SAGEMAKER_BIND_TO_PORT": str(port), "SLIMSERVE_HOST": "127.0.0.1",
                   **file_environment(path), "SLIMSERVE_MAX_QUEUE_DELAY_MS": "20", **extra}
    process = subprocess.Popen([sys.executable, "-m", "lambda_handlers.sagemaker_server"], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=1)
            break
        except urllib.error.HTTPError as error:
            if json.loads(error.read())["error"] != LOADING:
                break  # up, but not healthy: the test looks at why
            time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    return process, url


@contextlib.contextmanager
def serving(model: str, **extra) -> Iterator[tuple[subprocess.Popen, str]]:
    """The server, up; stopped with SIGTERM after, which it must answer by exiting cleanly."""
    process, url = start(model, **extra)
    try:
        yield process, url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def single_row_labels(url: str, rows: np.ndarray) -> list[int]:
    """Each row as its own V2 JSON request, all at once from 32 threads; the label of each answer."""
    def one(row: np.ndarray) -> int:
        body = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [row.tolist()]}]}).encode()
        status, _, raw = call(url, "POST", "/invocations", body, {"Content-Type": "application/json"})
        assert status == 200, raw
        return json.loads(raw)["outputs"][0]["data"][0]

    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(one, rows))


def call(url, method, path, body=None, headers=None):
    request = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def iris_server():
    with serving("iris.onnx") as (_, url):
        yield url


def test_ping_is_healthy_and_v2_json_answers_as_the_runtime(iris_server, iris, iris_test_split):
    test_x, _ = iris_test_split
    assert call(iris_server, "GET", "/ping")[:1] == (200,)
    body, _ = triton_request({"features": (test_x, "FP32")}, False, ["label", "probabilities"], False)
    status, headers, raw = call(iris_server, "POST", "/invocations", body, {"Content-Type": "application/json"})
    result = triton_result(Response(status, raw, headers))
    direct = iris.run({"features": test_x}, ["label", "probabilities"])
    np.testing.assert_array_equal(result.as_numpy("label"), direct["label"])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), direct["probabilities"])


@pytest.mark.parametrize("with_length", [True, False], ids=["header-length", "parsed-length"])
def test_v2_binary_answers_as_the_runtime_with_or_without_the_header_length(iris_server, iris, iris_test_split, with_length):
    test_x, _ = iris_test_split
    body, headers = triton_request({"features": (test_x[:7], "FP32")}, True, ["probabilities"], True)
    if not with_length:  # InvokeEndpoint carries no such header; the server finds the JSON header's end itself
        headers.pop("Inference-Header-Content-Length")
    status, response_headers, raw = call(iris_server, "POST", "/invocations", body, headers)
    assert status == 200, raw
    result = triton_result(Response(status, raw, {"Inference-Header-Content-Length": response_headers["Inference-Header-Content-Length"]}))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), iris.run({"features": test_x[:7]}, ["probabilities"])["probabilities"])


def test_a_tf_serving_body_is_known_by_its_content_type(iris_server, iris, iris_test_split):
    test_x, _ = iris_test_split
    status, _, raw = call(iris_server, "POST", "/invocations", json.dumps({"instances": test_x[:4].tolist()}).encode(),
                          {"Content-Type": "application/vnd.tfserving+json"})
    assert status == 200
    assert [row["label"] for row in json.loads(raw)["predictions"]] == iris.run({"features": test_x[:4]}, ["label"])["label"].tolist()


def invoke_endpoint(url, method, path, body, content_type="application/json"):
    """What InvokeEndpoint sends behind the API: a POST with Content-Type, Accept and the route attribute, nothing else."""
    return call(url, "POST", "/invocations", body if method == "POST" else b"{}", {
        "Content-Type": content_type, "Accept": "*/*", CUSTOM_ATTRIBUTES: route_attribute(method, path)})


def test_every_api_route_reaches_the_core_through_invoke_endpoint(iris_server, iris, iris_test_split):
    test_x, _ = iris_test_split
    core = InferenceCore([ServedModel("iris", "1", runtime=iris)])  # what a Lambda model answers on the same route
    bodies = {"infer": triton_request({"features": (test_x[:3], "FP32")}, False, ["label"], False)[0],
              ":predict": json.dumps({"instances": test_x[:3].tolist()}).encode()}
    routes = endpoint_routes("iris", "1")
    assert len(routes) == 12
    for method, path in routes:
        body = next((body for suffix, body in bodies.items() if path.endswith(suffix)), b"")
        status, headers, raw = invoke_endpoint(iris_server, method, path, body)
        expected = core.handle(Request(method, path, {"content-type": "application/json"}, body))
        assert (status, json.loads(raw)) == (expected.status, json.loads(expected.body)), path
        assert status == 200


def test_binary_through_invoke_endpoint_returns_the_header_length_as_the_custom_attribute(iris_server, iris, iris_test_split):
    test_x, _ = iris_test_split
    body, _ = triton_request({"features": (test_x[:5], "FP32")}, True, ["probabilities"], True)
    status, headers, raw = invoke_endpoint(iris_server, "POST", "/v2/models/iris/versions/1/infer", body, "application/octet-stream")
    assert status == 200, raw
    result = triton_result(Response(status, raw, {"Inference-Header-Content-Length": headers[CUSTOM_ATTRIBUTES]}))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), iris.run({"features": test_x[:5]}, ["probabilities"])["probabilities"])


@pytest.mark.parametrize("method, path", [("GET", "/v2/models/iris/versions/2"), ("POST", "/v2/models/other/infer"),
                                          ("DELETE", "/v2/models/iris")])
def test_a_route_the_endpoint_does_not_serve_is_a_404_naming_it(iris_server, method, path):
    status, _, raw = invoke_endpoint(iris_server, method, path, b"{}")
    assert (status, json.loads(raw)) == (404, {"error": f"X-Amzn-SageMaker-Custom-Attributes: no route {method} {path!r} "
                                                        "for model 'iris' version 1"})


def test_bad_input_is_a_4xx_and_the_server_stays_up(iris_server):
    status, _, raw = call(iris_server, "POST", "/invocations", b'{"inputs": [', {"Content-Type": "application/json"})
    assert (status, json.loads(raw)) == (400, {"error": "request body is not valid JSON: unexpected end of data: line 1 column 13 (char 12)"})
    assert call(iris_server, "GET", "/ping")[0] == 200


def test_concurrent_single_rows_are_batched_and_each_caller_gets_its_own(iris_server, iris, iris_test_split):
    test_x, _ = iris_test_split
    before = json.loads(call(iris_server, "GET", "/stats")[2])
    labels = single_row_labels(iris_server, test_x[:32])
    after = json.loads(call(iris_server, "GET", "/stats")[2])
    assert labels == iris.run({"features": test_x[:32]}, ["label"])["label"].tolist()
    assert after["requests"] - before["requests"] == 32
    assert after["runtime_calls"] - before["runtime_calls"] < 32, (before, after)


def test_ping_fails_when_the_model_cannot_be_loaded():
    with serving("iris.onnx", SLIMSERVE_MODEL_SHA256="0" * 64) as (_, url):
        status, _, raw = call(url, "GET", "/ping")
        assert status == 503 and json.loads(raw)["error"].startswith(f"sha256 of {MODELS / 'iris.onnx'} is ")
        status, _, raw = call(url, "POST", "/invocations", b"{}", {"Content-Type": "application/json"})
        assert status == 503


def test_tflite_models_serve_too(digits, digits_test_split):
    test_x, _ = digits_test_split
    with serving("digits.tflite") as (_, url):
        status, _, raw = call(url, "POST", "/invocations", json.dumps({"inputs": test_x[:3].tolist()}).encode(),
                              {"Content-Type": "application/vnd.tfserving+json"})
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(raw)["outputs"], np.float32),
                               digits.run({"pixels": test_x[:3]}, ["probabilities"])["probabilities"], rtol=1e-6)


def test_sigterm_lets_a_request_in_flight_finish():
    process, url = start("iris.onnx", SLIMSERVE_MAX_QUEUE_DELAY_MS="1500")  # a lone request waits 1.5 s for company
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, url, "POST", "/invocations", body, {"Content-Type": "application/json"})
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        status, _, raw = pending.result(timeout=30)
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [0]
    assert process.wait(timeout=20) == 0
    assert "stopped" in process.stdout.read()


@contextlib.contextmanager
def held(batching: BatchingModel, client: object = None):
    """A request as the server holds it: arrived at once, reaching the batcher when it runs, gone after."""
    batching.arrive(client)
    reached = []

    def run(inputs, output_names):
        batching.reach()
        reached.append(True)
        return batching.run(inputs, output_names)

    try:
        yield run
    finally:
        batching.leave(bool(reached))


def test_a_batch_waits_for_the_requests_the_server_has_in_hand(iris, iris_test_split):
    test_x, _ = iris_test_split
    batching = BatchingModel(iris, max_batch_size=32, max_delay_ms=600_000)
    second_in_hand, results = threading.Event(), {}

    def request(index: int, hold: threading.Event | None = None):
        with held(batching) as run:
            if hold is not None:
                second_in_hand.set()
                hold.wait()  # still reading its body
            results[index] = run({"features": test_x[index:index + 1]}, ["label"])["label"][0]

    body_read = threading.Event()
    threads = [threading.Thread(target=request, args=(1, body_read), daemon=True), threading.Thread(target=request, args=(0,), daemon=True)]
    threads[0].start()
    second_in_hand.wait()
    threads[1].start()
    while batching.requests < 1:  # the other is at the batcher, which must not run it alone
        time.sleep(0.001)
    body_read.set()
    for thread in threads:
        thread.join(timeout=60)
    assert [results[0], results[1]] == iris.run({"features": test_x[:2]}, ["label"])["label"].tolist()
    assert batching.runtime_calls == 1


def test_a_request_still_writing_its_answer_is_not_waited_for(iris, iris_test_split):
    test_x, _ = iris_test_split
    batching = BatchingModel(iris, max_batch_size=32, max_delay_ms=600_000)
    first_answered, writing_done, answers = threading.Event(), threading.Event(), []

    def request(index: int, linger: threading.Event | None = None):
        with held(batching) as run:
            answers.append(run({"features": test_x[index:index + 1]}, ["label"])["label"][0])
            if linger is not None:
                first_answered.set()
                linger.wait()  # still in the server's hands, writing its response

    writer = threading.Thread(target=request, args=(0, writing_done), daemon=True)
    writer.start()
    first_answered.wait(timeout=60)
    second = threading.Thread(target=request, args=(1,), daemon=True)
    second.start()
    second.join(timeout=60)
    writing_done.set()
    writer.join(timeout=60)
    assert answers == iris.run({"features": test_x[:2]}, ["label"])["label"].tolist() and batching.runtime_calls == 2


class FrozenClock:
    """Stands for `time` in the batcher: the time it says moves only when a test moves it, so a client's gap, a
    call's cost and the wait they earn are set by the test (in real time, waiting would last that long)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class WrappedRuntime:
    """The real runtime behind a test double: the batcher sees its signature, platform and format, and its run."""

    def __init__(self, runtime):
        self.runtime, self.signature, self.platform, self.format = runtime, runtime.signature, runtime.platform, runtime.format

    def run(self, inputs, output_names):
        return self.runtime.run(inputs, output_names)


class ClockedRuntime(WrappedRuntime):
    """The real runtime, each call moving the frozen clock on by `fixed` seconds plus `per_row` a row."""

    def __init__(self, runtime, clock: FrozenClock, fixed: float, per_row: float):
        super().__init__(runtime)
        self.clock, self.fixed, self.per_row = clock, fixed, per_row

    def run(self, inputs, output_names):
        self.clock.now += self.fixed + self.per_row * len(next(iter(inputs.values())))
        return super().run(inputs, output_names)


def came_back_before(batching: BatchingModel, clock: FrozenClock, client: object, gap_s: float, rows: np.ndarray) -> None:
    """`client` sent one row and was answered, sent three more `gap_s` later, and that answer is ready now: two
    calls of different sizes, so the batcher can tell a call's fixed cost from its cost per row."""
    with held(batching, client) as run:
        run({"features": rows[:1]}, ["label"])
    batching.answered(client)
    clock.now += gap_s
    with held(batching, client) as run:
        run({"features": rows[1:4]}, ["label"])
    batching.answered(client)


def test_a_client_that_came_back_promptly_is_waited_for_when_a_call_costs_more_than_its_rows(iris, iris_test_split, monkeypatch):
    test_x, _ = iris_test_split
    clock = FrozenClock()
    monkeypatch.setattr(batching_module, "time", clock)
    batching = BatchingModel(ClockedRuntime(iris, clock, fixed=1000, per_row=0), max_batch_size=32, max_delay_ms=600_000)
    returning, answers = object(), {}
    came_back_before(batching, clock, returning, 100, test_x)  # expected back within 200 s, worth 1000 s of wait
    calls = batching.runtime_calls

    def request(index: int, client: object = None):
        with held(batching, client) as run:
            answers[index] = run({"features": test_x[index:index + 1]}, ["label"])["label"][0]

    lone = threading.Thread(target=request, args=(0,), daemon=True)
    lone.start()
    while batching.requests < 3:
        time.sleep(0.001)
    request(1, returning)  # the lone request waited for it: one call
    lone.join(timeout=60)
    assert [answers[0], answers[1]] == iris.run({"features": test_x[:2]}, ["label"])["label"].tolist()
    assert batching.runtime_calls - calls == 1


@pytest.mark.parametrize(
    "history", ["no other client", "never came back", "slower than the delay", "gone", "calls cost only their rows"])
def test_a_lone_request_does_not_wait_for_company_unlikely_to_come_or_not_worth_it(iris, iris_test_split, monkeypatch, history):
    test_x, _ = iris_test_split
    clock = FrozenClock()
    monkeypatch.setattr(batching_module, "time", clock)
    fixed, per_row = (0, 1000) if history == "calls cost only their rows" else (1000, 0)
    # waiting would mean ten minutes
    batching = BatchingModel(ClockedRuntime(iris, clock, fixed, per_row), max_batch_size=32, max_delay_ms=600_000)
    client = object()
    if history == "never came back":
        with held(batching, client):
            pass
        batching.answered(client)
    elif history != "no other client":
        came_back_before(batching, clock, client, 700 if history == "slower than the delay" else 100, test_x)
    if history == "gone":
        batching.gone(client)
    calls, answers = batching.runtime_calls, []

    def request():
        with held(batching) as run:
            answers.append(run({"features": test_x[:1]}, ["label"])["label"])

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert answers == [iris.run({"features": test_x[:1]}, ["label"])["label"]] and batching.runtime_calls - calls == 1


def test_a_call_s_cost_is_split_into_a_fixed_part_and_a_part_per_row():
    cost = CallCost()
    assert cost.fixed() == 0  # nothing known
    cost.add(4, 0.5)
    assert cost.fixed() == 0.5  # one size only: the whole call
    for rows, seconds in [(1, 0.2), (8, 0.9), (16, 1.7), (32, 3.3)]:
        cost.add(rows, seconds)
    assert cost.fixed() == pytest.approx(0.1)  # 0.1 s a call and 0.1 s a row
    for _ in range(400):  # old calls fade: now the rows cost nothing
        cost.add(1, 2.0)
        cost.add(32, 2.0)
    assert cost.fixed() == pytest.approx(2.0, rel=1e-3)


class HeldRuntime(WrappedRuntime):
    """The real runtime, whose first call waits until the test lets it go; it keeps each call's rows."""

    def __init__(self, runtime):
        super().__init__(runtime)
        self.release, self.calls, self.rows = threading.Event(), 0, []

    def run(self, inputs, output_names):
        self.calls += 1
        self.rows.append(len(next(iter(inputs.values()))))
        if self.calls == 1:
            self.release.wait(timeout=60)
        return super().run(inputs, output_names)


def test_a_second_worker_gathers_and_runs_while_the_first_batch_runs(iris, iris_test_split):
    test_x, _ = iris_test_split
    held = HeldRuntime(iris)
    batching = BatchingModel(held, max_batch_size=32, max_delay_ms=0, workers=2)
    answers = {}

    def request(index: int):
        answers[index] = batching.run({"features": test_x[index:index + 1]}, ["label"])["label"][0]

    first = threading.Thread(target=request, args=(0,), daemon=True)
    first.start()
    while held.calls < 1:
        time.sleep(0.001)
    second = threading.Thread(target=request, args=(1,), daemon=True)
    second.start()
    second.join(timeout=60)
    assert answers == {1: iris.run({"features": test_x[1:2]}, ["label"])["label"][0]}  # the first is still held
    held.release.set()
    first.join(timeout=60)
    assert answers[0] == iris.run({"features": test_x[:1]}, ["label"])["label"][0]


def test_no_batch_passes_the_largest_size_and_a_request_past_it_runs_alone(iris, iris_test_split):
    test_x, _ = iris_test_split
    held = HeldRuntime(iris)
    batching = BatchingModel(held, max_batch_size=4, max_delay_ms=600_000)  # only the size ends a batch
    requests = [(0, 1), (1, 4), (4, 7), (7, 9), (9, 15), (15, 16)]  # row ranges: 1, 3, 3, 2, 6 and 1 rows
    answers = {}

    def request(start: int, stop: int):
        answers[start] = batching.run({"features": test_x[start:stop]}, ["label"])["label"].tolist()

    first = threading.Thread(target=request, args=requests[0], daemon=True)
    first.start()
    while held.calls < 1:  # the first call holds the worker while the rest queue up behind it
        time.sleep(0.001)
    others = [threading.Thread(target=request, args=rows, daemon=True) for rows in requests[1:]]
    for queued, thread in enumerate(others, 1):
        thread.start()
        while batching.waiting() < queued:  # queued in this order
            time.sleep(0.001)
    held.release.set()
    for thread in [first, *others]:
        thread.join(timeout=60)
    assert answers == {start: iris.run({"features": test_x[start:stop]}, ["label"])["label"].tolist() for start, stop in requests}
    assert held.rows == [1, 3, 3, 2, 6, 1]  # 3+3 and 3+2 would pass 4; 6 is past it, alone


def test_fixed_batch_sizes_pad_each_call_to_a_size_and_answer_as_the_runtime_does(iris, iris_test_split):
    test_x, _ = iris_test_split
    fixed = FixedBatchSizes(iris, lambda: OnnxModel(MODELS / "iris.onnx"), [8, 1, 4])
    for rows in (3, 4, 19):
        np.testing.assert_array_equal(fixed.run({"features": test_x[:rows]}, ["probabilities"])["probabilities"],
                                      iris.run({"features": test_x[:rows]}, ["probabilities"])["probabilities"])
    assert fixed.sizes == [1, 4, 8] and fixed.calls_by_size == {1: 0, 4: 3, 8: 2}  # 3 -> 4; 4; 19 -> 8 + 8 + (3 -> 4)


@pytest.mark.parametrize("nodes, output", [
    ([helper.make_node("ReduceSum", ["features", "axes"], ["out"], keepdims=0)], (TensorProto.FLOAT, [4])),
    ([helper.make_node("NonZero", ["features"], ["where"]), helper.make_node("Transpose", ["where"], ["out"], perm=[1, 0])],
     (TensorProto.INT64, ["found", 2])),  # a dynamic first dimension, yet not one row per input row
], ids=["declared-over-the-batch", "found-over-the-batch"])
def test_fixed_batch_sizes_do_not_pad_a_model_whose_output_spans_the_batch(iris_test_split, nodes, output):
    test_x, _ = iris_test_split
    graph = helper.make_graph(nodes, "spans", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("out", *output)],
                              initializer=[onnx.numpy_helper.from_array(np.array([0], np.int64), "axes")] if len(nodes) == 1 else [])
    model = OnnxModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    fixed = FixedBatchSizes(model, lambda: model, [1, 4, 8])
    for rows in (3, 5):
        np.testing.assert_array_equal(fixed.run({"features": test_x[:rows]}, ["out"])["out"],
                                      model.run({"features": test_x[:rows]}, ["out"])["out"])


def test_batch_sizes_are_powers_of_two_on_a_gpu_none_or_the_ones_listed():
    assert powers_of_two(32) == [1, 2, 4, 8, 16, 32] and powers_of_two(24) == [1, 2, 4, 8, 16, 24]
    def batch_sizes(environ, max_batch_size, on_gpu):
        return ServerSettings.from_environment({**environ, "SLIMSERVE_MAX_BATCH_SIZE": str(max_batch_size)}).fixed_batch_sizes(on_gpu)

    assert batch_sizes({}, 32, on_gpu=True) == [1, 2, 4, 8, 16, 32]
    assert batch_sizes({}, 32, on_gpu=False) == [] and batch_sizes({}, 1, on_gpu=True) == []
    assert batch_sizes({"SLIMSERVE_BATCH_SIZES": "none"}, 32, on_gpu=True) == []
    assert batch_sizes({"SLIMSERVE_BATCH_SIZES": "16, 4,1,4"}, 32, on_gpu=False) == [1, 4, 16]


def test_cuda_comes_first_with_heuristic_convolution_algorithms_and_tensorrt_on_request():
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})

    def onnx_providers(environ, available):
        return ServerSettings.from_environment(environ).onnx_providers(available)

    assert onnx_providers({}, everything) == [cuda, "CPUExecutionProvider"]
    assert onnx_providers({"SLIMSERVE_TENSORRT": "1"}, everything) == ["TensorrtExecutionProvider", cuda, "CPUExecutionProvider"]
    assert onnx_providers({"SLIMSERVE_CUDNN_CONV_ALGO_SEARCH": "EXHAUSTIVE"}, everything)[0] == (
        "CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"})
    assert onnx_providers({}, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("setting, message", [
    ({"SLIMSERVE_BATCH_WORKERS": "two"}, "SLIMSERVE_BATCH_WORKERS is 'two'; expected a whole number of 1 or more"),
    ({"SLIMSERVE_MAX_BATCH_SIZE": "0"}, "SLIMSERVE_MAX_BATCH_SIZE is '0'; expected a whole number of 1 or more"),
    ({"SLIMSERVE_MAX_QUEUE_DELAY_MS": "soon"}, "SLIMSERVE_MAX_QUEUE_DELAY_MS is 'soon'; expected a number of milliseconds, 0 or more"),
    ({"SLIMSERVE_BATCH_SIZES": "4,x"},
     "SLIMSERVE_BATCH_SIZES is '4,x'; expected auto, none or positive whole numbers separated by commas, like 1,4,16"),
    ({"SLIMSERVE_CUDNN_CONV_ALGO_SEARCH": "FAST"},
     "SLIMSERVE_CUDNN_CONV_ALGO_SEARCH is 'FAST'; expected one of HEURISTIC, EXHAUSTIVE, DEFAULT"),
], ids=["workers", "max-batch-size", "max-queue-delay", "batch-sizes", "conv-algo-search"])
def test_a_bad_setting_fails_ping_naming_it(setting, message):
    with serving("iris.onnx", **setting) as (_, url):
        status, _, raw = call(url, "GET", "/ping")
    assert (status, json.loads(raw)["error"]) == (503, message)


def test_fixed_sizes_and_two_workers_serve_concurrent_rows_right(iris, iris_test_split):
    test_x, _ = iris_test_split
    with serving("iris.onnx", SLIMSERVE_BATCH_SIZES="1,4,16", SLIMSERVE_BATCH_WORKERS="2") as (process, url):
        labels = single_row_labels(url, test_x[:32])
        stats = json.loads(call(url, "GET", "/stats")[2])
    assert labels == iris.run({"features": test_x[:32]}, ["label"])["label"].tolist()
    assert set(stats["runtime_calls_by_batch_size"]) == {"1", "4", "16"}
    assert sum(stats["runtime_calls_by_batch_size"].values()) == stats["runtime_calls"]
    log = [json.loads(line) for line in process.stdout.read().splitlines() if line.startswith("{")]
    # batches gather no more than the largest size: more would run as several calls anyway
    assert {"sizes": [1, 4, 16], "workers": 2, "max_batch_size": 16} == {
        key: value for record in log for key, value in record.items() if key in ("sizes", "workers", "max_batch_size")}


def test_ping_says_loading_until_the_model_is_served(iris):
    import threading

    from slimserve.lambda_handlers.sagemaker_server import SageMakerServer

    server = SageMakerServer(ServedModel("iris", "1", failure=LOADING), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    try:
        status, _, raw = call(url, "GET", "/ping")
        assert (status, json.loads(raw)) == (503, {"status": "unhealthy", "error": LOADING})
        status, _, raw = call(url, "POST", "/invocations", body, {"Content-Type": "application/json"})
        assert (status, json.loads(raw)) == (503, {"error": "model 'iris' version 1 is not ready: loading"})
        server.serve_model(ServedModel("iris", "1", runtime=iris))
        assert call(url, "GET", "/ping")[0] == 200
        assert call(url, "POST", "/invocations", body, {"Content-Type": "application/json"})[0] == 200
    finally:
        server.shutdown()


def test_the_program_listens_before_it_loads_the_model():
    with serving("iris.onnx") as (process, url):
        assert call(url, "GET", "/ping")[0] == 200
    messages = [json.loads(line)["message"] for line in process.stdout.read().splitlines() if line.startswith("{")]
    assert messages.index(next(m for m in messages if m.startswith("listening on port"))) < messages.index("model loaded")


# The front end's HTTP/1.1 (llhttp, through httptools): framing, limits, order and closing, on the real program.

IRIS_ROW = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def invocation(body: bytes, *head: bytes) -> bytes:
    fields = b"".join(line + b"\r\n" for line in (b"Host: x", b"Content-Type: application/json", *head))
    return b"POST /invocations HTTP/1.1\r\n" + fields + b"\r\n" + body


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_chunked_invocation_with_extensions_and_trailers_answers_as_the_runtime(iris_server):
    body = json.dumps(IRIS_ROW).encode()
    framed = b"%x;name=value\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Checksum: 1\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    status, raw = raw_exchange(port_of(iris_server), invocation(framed, b"Transfer-Encoding: chunked"))
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [0]


@pytest.mark.parametrize("request_bytes, status, message", [
    (invocation(b"zz\r\nab\r\n0\r\n\r\n", b"Transfer-Encoding: chunked"), 400, "malformed HTTP request: Invalid character in chunk size"),
    (invocation(b"2\r\nabcdef\r\n0\r\n\r\n", b"Transfer-Encoding: chunked"), 400, "malformed HTTP request: Expected LF after chunk data"),
    (invocation(b"", b"Transfer-Encoding: gzip"), 400, "malformed HTTP request: Request has invalid `Transfer-Encoding`"),
    (invocation(b"", b"Content-Length: -3"), 400, "malformed HTTP request: Invalid character in Content-Length"),
    (b"HELLO\r\n\r\n", 400, "malformed HTTP request: Invalid method encountered"),
    (invocation(b"z" * (6 * 2**20 + 1), b"Content-Length: 6291457"), 413, "request body is 6291457 bytes; the limit is 6291456"),
    (invocation(b"%x\r\n%s\r\n0\r\n\r\n" % (6 * 2**20 + 1, b"z" * (6 * 2**20 + 1)), b"Transfer-Encoding: chunked"), 413,
     "request body is 6291457 bytes; the limit is 6291456"),
    (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n", 431, "the request's head is over 65536 bytes"),
    (b"PUT /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404, "no route for PUT /ping"),
    (invocation(b"{}", b"Content-Length: 2").replace(b"/invocations", b"/predict"), 404, "no route for POST /predict"),
])
def test_bad_framing_and_limits_are_refused_by_name_and_the_server_stays_up(iris_server, request_bytes, status, message):
    assert raw_exchange(port_of(iris_server), request_bytes) == (status, json.dumps({"error": message}, separators=(",", ":")).encode())
    assert call(iris_server, "GET", "/ping")[0] == 200


def test_pipelined_requests_are_answered_in_the_order_they_came(iris_server, iris, iris_test_split):
    """Hundreds at once, past the read-ahead, inferences (answered when their batch is) between pings (answered at once)."""
    rows = iris_test_split[0][:30]
    bodies = [json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": row.tolist()}]}).encode()
              for row in rows]
    ping = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    requests = [request for body in bodies * 5 for request in (invocation(body, b"Content-Length: %d" % len(body)), ping)]
    with socket.create_connection(("127.0.0.1", port_of(iris_server)), timeout=30) as connection:
        connection.sendall(b"".join(requests))
        reader = connection.makefile("rb")
        answers = []
        for _ in requests:
            head = b"".join(iter(reader.readline, b"\r\n")).decode()
            length = int(next(line for line in head.splitlines() if line.startswith("Content-Length:")).split(":")[1])
            answers.append(json.loads(reader.read(length)))
    expected = iris.run({"features": rows}, ["label", "probabilities"])
    assert answers[1::2] == [{"status": "healthy"}] * len(bodies) * 5
    for index, answer in enumerate(answers[::2]):  # each inference's own row, in the order sent
        label, probabilities = (output["data"] for output in answer["outputs"])
        assert label == [expected["label"][index % len(rows)]]
        np.testing.assert_allclose(probabilities, expected["probabilities"][index % len(rows)], rtol=1e-5)  # batched or not


def test_thousands_of_pipelined_requests_waiting_behind_an_inference_are_all_answered(iris_server):
    ping, body = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", json.dumps(IRIS_ROW).encode()
    with socket.create_connection(("127.0.0.1", port_of(iris_server)), timeout=30) as connection:
        # the pings wait behind an inference, then go in one go
        connection.sendall(invocation(body, b"Content-Length: %d" % len(body)) + ping * 3000
                           + b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b"".join(iter(lambda: connection.recv(1 << 16), b""))
    assert received.count(b'"outputs"') == 1 and received.count(b'{"status":"healthy"}') == 3001


def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_sent(iris_server):
    body = json.dumps(IRIS_ROW).encode()
    with socket.create_connection(("127.0.0.1", port_of(iris_server)), timeout=30) as connection:
        connection.sendall(invocation(b"", b"Expect: 100-continue", b"Content-Length: %d" % len(body)))
        assert connection.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        connection.sendall(body)
        response = http.client.HTTPResponse(connection)
        response.begin()
        assert response.status == 200 and json.loads(response.read())["outputs"][0]["data"] == [0]


def test_a_body_announced_past_the_limit_with_expect_100_continue_is_refused_before_it_is_sent(iris_server):
    with socket.create_connection(("127.0.0.1", port_of(iris_server)), timeout=30) as connection:
        connection.sendall(invocation(b"", b"Expect: 100-continue", b"Content-Length: 7000000"))
        received = b"".join(iter(lambda: connection.recv(65536), b""))  # answered and closed, nothing sent
    assert received.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert received.endswith(b'\r\n\r\n{"error":"request body is 7000000 bytes; the limit is 6291456"}')


@pytest.mark.parametrize("request_bytes", [b"GET /ping HTTP/1.0\r\n\r\n", b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
def test_a_connection_the_client_wants_closed_closes_after_its_answer(iris_server, request_bytes):
    with socket.create_connection(("127.0.0.1", port_of(iris_server)), timeout=30) as connection:
        connection.sendall(request_bytes)
        received = b""
        while chunk := connection.recv(65536):  # ends when the server closes
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in received
    assert received.endswith(b'\r\n\r\n{"status":"healthy"}')


def test_clients_gone_mid_body_or_mid_batch_are_not_waited_for(iris_test_split):
    body = json.dumps(IRIS_ROW).encode()
    with serving("iris.onnx", SLIMSERVE_MAX_QUEUE_DELAY_MS="300") as (process, url):
        port = port_of(url)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as cut_short:  # gone before its body came
            cut_short.sendall(invocation(body[:10], b"Content-Length: %d" % len(body)))
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as gone:  # gone while its batch gathers
            gone.sendall(invocation(body, b"Content-Length: %d" % len(body)))
        assert call(url, "POST", "/invocations", body, {"Content-Type": "application/json"})[0] == 200
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 10  # serving() sent SIGTERM and saw the program exit 0


class FixedCostRuntime(WrappedRuntime):
    """The real runtime, each call taking `seconds` more whatever its rows, as a call on a GPU costs much the same at
    any size."""

    def __init__(self, runtime, seconds: float):
        super().__init__(runtime)
        self.seconds = seconds

    def run(self, inputs, output_names):
        time.sleep(self.seconds)
        return super().run(inputs, output_names)


def test_a_keep_alive_client_that_came_back_promptly_is_batched_with_a_lone_request(iris):
    from slimserve.lambda_handlers.sagemaker_server import SageMakerServer

    batching = BatchingModel(FixedCostRuntime(iris, 1.0), max_batch_size=32, max_delay_ms=600_000)
    server = SageMakerServer(ServedModel("iris", "1", runtime=batching), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    body, headers = json.dumps(IRIS_ROW).encode(), {"Content-Type": "application/json"}
    returning = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)

    def ask() -> int:
        returning.request("POST", "/invocations", body, headers)
        answer = returning.getresponse()
        answer.read()
        return answer.status

    try:
        assert ask() == 200  # the first answer: nothing known of this client yet
        time.sleep(0.5)
        assert ask() == 200  # back half a second after its answer: expected within a second of this one
        lone = threading.Thread(target=call, args=(url, "POST", "/invocations", body, headers), daemon=True)
        lone.start()
        while batching.requests < 3:  # at the batcher, which waits for the client expected back: a call costs 1 s
            time.sleep(0.01)
        assert ask() == 200
        lone.join(timeout=60)
    finally:
        returning.close()
        server.shutdown()
    assert (batching.requests, batching.runtime_calls) == (4, 3)
