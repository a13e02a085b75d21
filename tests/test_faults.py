"""Failing dependencies: S3 unreachable, slow or missing the model at cold start, a runtime failing
mid-inference, a worker killed and a serving program restarted under load. Each shows the behaviour
and that every request got an answer."""

import hashlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import onnx
import pytest
from onnx import TensorProto, helper
from support import MODELS

from slimserve.contract.apigw import rest_event
from slimserve.lambda_handlers.function import ModelFunction
from slimserve.local.s3 import LOCAL_CREDENTIALS, free_port, local_s3
from slimserve.registry.store import model_key

pytestmark = pytest.mark.slow

IRIS = (MODELS / "iris.onnx").read_bytes()
SHA = hashlib.sha256(IRIS).hexdigest()
KEY = model_key("iris", SHA, "onnx")
BUCKET = "fault-store"
ROW = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def infer(function: ModelFunction, body: dict = ROW) -> tuple[int, dict]:
    answer = function(rest_event("POST", "/v2/models/iris/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}), None)
    return answer["statusCode"], json.loads(answer["body"])


def metric_lines(capsys) -> list[dict]:
    return [record for record in map(json.loads, capsys.readouterr().out.splitlines()) if "ModelLoadFailures" in record]


@pytest.fixture
def s3_at(monkeypatch):
    """An S3 endpoint on a port where nothing listens yet; `start()` brings moto's server up there."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {**LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(key, value)
    environment = {"SLIMSERVE_MODEL_NAME": "iris", "SLIMSERVE_MODEL_FORMAT": "onnx", "SLIMSERVE_MODEL_SHA256": SHA,
                   "SLIMSERVE_MODEL_BUCKET": BUCKET, "SLIMSERVE_MODEL_KEY": KEY}
    return port, endpoint, environment


def test_s3_unreachable_at_cold_start_is_a_503_and_a_metric_then_recovers(s3_at, capsys):
    port, endpoint, environment = s3_at
    function = ModelFunction(environment, retry_s=0)
    reason = f'cannot fetch s3://{BUCKET}/{KEY}: Could not connect to the endpoint URL: "{endpoint}/{BUCKET}/{KEY}"'
    assert infer(function) == (503, {"error": f"model 'iris' version 1 is not ready: {reason}"})
    failures = metric_lines(capsys)
    assert [record["ModelLoadFailures"] for record in failures] == [1, 1]  # at init, and the retry on that request
    assert failures[0]["_aws"]["CloudWatchMetrics"][0]["Metrics"] == [{"Name": "ModelLoadFailures", "Unit": "Count"}]
    with local_s3(BUCKET, port=port) as s3:  # S3 is back
        s3.client().put_object(Bucket=BUCKET, Key=KEY, Body=IRIS)
        status, answer = infer(function)
    assert status == 200 and answer["outputs"][0]["data"] == [0]


def test_retries_back_off_until_a_minute_between_loads(s3_at, capsys):
    _, _, environment = s3_at
    function = ModelFunction(environment, retry_s=0.5)
    capsys.readouterr()  # the load at init waits 0.5 s before the next
    delays = []
    for _ in range(9):
        function.next_load = 0  # as if the wait were over
        infer(function)
        delays.append(json.loads(next(line for line in capsys.readouterr().out.splitlines() if "retry_in_s" in line))["retry_in_s"])
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_slow_s3_ends_in_a_503_naming_the_timeout_not_a_hung_cold_start(s3_at):
    port, endpoint, environment = s3_at
    silent = socket.create_server(("127.0.0.1", port))  # accepts, reads, never answers
    connections = []
    threading.Thread(target=lambda: [connections.append(silent.accept()[0]) for _ in range(10)], daemon=True).start()
    try:
        function = ModelFunction(environment, retry_s=60)
    finally:
        silent.close()
    assert infer(function) == (503, {"error": f"model 'iris' version 1 is not ready: cannot fetch s3://{BUCKET}/{KEY}: "
                                              f'Read timeout on endpoint URL: "{endpoint}/{BUCKET}/{KEY}"'})


def test_a_deleted_model_object_is_a_503_naming_the_key_and_recovers_when_restored(s3_at):
    port, _, environment = s3_at
    with local_s3(BUCKET, port=port) as s3:
        s3.client().delete_object(Bucket=BUCKET, Key=KEY)  # moto's state outlives its server within one process
        function = ModelFunction(environment, retry_s=0)
        assert infer(function) == (503, {"error": f"model 'iris' version 1 is not ready: cannot fetch s3://{BUCKET}/{KEY}: "
                                                  "NoSuchKey The specified key does not exist."})
        s3.client().put_object(Bucket=BUCKET, Key=KEY, Body=IRIS)
        assert infer(function)[0] == 200


def test_a_runtime_failing_mid_inference_is_a_500_and_the_next_request_is_served(tmp_path, capsys):
    """A real model that ONNX Runtime cannot run for 3 rows: Reshape to a fixed [2, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "fixed.onnx")
    data = (tmp_path / "fixed.onnx").read_bytes()
    function = ModelFunction({"SLIMSERVE_MODEL_NAME": "fixed", "SLIMSERVE_MODEL_FORMAT": "onnx",
                              "SLIMSERVE_MODEL_SHA256": hashlib.sha256(data).hexdigest(), "SLIMSERVE_MODEL_PATH": str(tmp_path / "fixed.onnx")})

    def rows(count: int):
        body = {"inputs": [{"name": "x", "shape": [count, 4], "datatype": "FP32", "data": [1.0] * 4 * count}]}
        answer = function(rest_event("POST", "/v2/models/fixed/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}), None)
        return answer["statusCode"], json.loads(answer["body"])

    status, answer = rows(3)
    assert status == 500 and answer["error"].startswith("model 'fixed' failed on valid input: [ONNXRuntimeError]")
    assert answer["error"].endswith("Input shape:{3,4}, requested shape:{2,4}\n")
    logged = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if '"request failed"' in line)
    assert (logged["level"], logged["status"]) == ("ERROR", 500)
    status, answer = rows(2)
    assert status == 200 and answer["outputs"][0]["shape"] == [2, 4]


def under_load(stack, model: str, fault, clients: int = 8, seconds: float = 4.0) -> list[list[int]]:
    """Each client's statuses, in order, for every request `clients` threads send for `seconds`, with `fault`
    done halfway; -1 marks a wrong answer."""
    body = json.dumps(ROW).encode()
    headers = {"Content-Type": "application/json", "x-api-key": stack.gateway.api_key}
    deadline = time.monotonic() + seconds

    def client(_) -> list[int]:
        statuses = []
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{stack.gateway.url}/v2/models/{model}/infer", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                    statuses.append(200 if answer["outputs"][0]["data"] == [0] else -1)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
        return statuses

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, index) for index in range(clients)]
        time.sleep(seconds / 2)
        fault()
        return [future.result() for future in futures]


def test_a_worker_killed_under_load_costs_its_request_a_502_and_no_other(mixed_stack):
    pool = mixed_stack.versions["iris"].pools[1]
    under_load(mixed_stack, "iris", lambda: None, seconds=1)  # workers up
    victim = pool.workers[0].process.pid
    per_client = under_load(mixed_stack, "iris", lambda: os.kill(victim, signal.SIGKILL))
    statuses = sum(per_client, [])
    assert set(statuses) <= {200, 502} and statuses.count(502) <= 1, statuses  # the request it was serving, if any
    assert all(client[-1] == 200 for client in per_client)
    assert victim not in [worker.process.pid for worker in pool.workers if worker.alive]  # replaced
    if 502 in statuses:  # it was serving one: Lambda's error for an environment that died
        failed = [line for line in mixed_stack.lines if "Error: Runtime.ExitError" in line]
        assert failed and all(line.endswith("Runtime exited with error: signal: kill") for line in failed), mixed_stack.lines[-20:]


def test_a_serving_program_restarted_under_load_answers_every_request(mixed_stack):
    endpoint = mixed_stack.endpoints["iris-gpu"].endpoint  # the serving program of the version it serves
    before = endpoint.restarts
    per_client = under_load(mixed_stack, "iris-gpu", lambda: endpoint.process.send_signal(signal.SIGTERM), seconds=6)
    assert endpoint.restarts == before + 1
    assert set(sum(per_client, [])) <= {200, 502}  # answered or refused while down: none lost, none wrong
    assert all(client[0] == 200 and client[-1] == 200 for client in per_client)  # served before, and again after
    assert any("iris-gpu: the serving program exited (0); starting it again (restart 1)" in line for line in mixed_stack.lines)
