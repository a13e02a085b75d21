"""The Lambda handler: model from S3 (moto's server) with its sha256 checked, API Gateway
events of both payload formats, structured logs and EMF metrics."""

import base64
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from support import FIXTURES, MODELS, ROOT

from slimserve.contract.apigw import http_api_event, response_body, rest_event
from slimserve.lambda_handlers.core import ACTIONS
from slimserve.lambda_handlers.function import ModelFunction
from slimserve.registry.versions import Registry


@dataclass
class Context:
    aws_request_id: str
    function_name: str = "slimserve-demo-iris"


def fixture_event(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def stored_iris(s3_store):
    return Registry(s3_store.client(), s3_store.bucket).register(MODELS / "iris.onnx", "iris")[0].stored(s3_store.bucket)


@pytest.fixture(scope="module")
def stored_digits(s3_store):
    return Registry(s3_store.client(), s3_store.bucket).register(MODELS / "digits.tflite", "digits")[0].stored(s3_store.bucket)


@pytest.fixture
def iris_function(stored_iris):
    return ModelFunction({**stored_iris.environment(), "AWS_LAMBDA_FUNCTION_NAME": "slimserve-demo-iris"})


def body_of(response) -> dict:
    return json.loads(response_body(response))


def test_store_layout_is_content_addressed_with_a_manifest(s3_store, stored_iris):
    import hashlib

    data = (MODELS / "iris.onnx").read_bytes()
    assert stored_iris.sha256 == hashlib.sha256(data).hexdigest()
    assert stored_iris.key == f"models/iris/{stored_iris.sha256}/model.onnx"
    manifest = json.loads(s3_store.client().get_object(Bucket=s3_store.bucket, Key=f"models/iris/{stored_iris.sha256}/manifest.json")["Body"].read())
    assert {k: manifest[k] for k in ("name", "format", "sha256", "size", "source")} == {
        "name": "iris", "format": "onnx", "sha256": stored_iris.sha256, "size": len(data), "source": "iris.onnx"}
    assert manifest["signature"]["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]


def test_a_rest_api_event_answers_as_the_runtime(iris_function, iris):
    response = iris_function(fixture_event("apigw_rest_v1.json"), Context("req-rest"))
    assert response["statusCode"] == 200 and response["isBase64Encoded"] is False
    timing = response["headers"].pop("Server-Timing")
    assert response["headers"] == {"Content-Type": "application/json"}
    assert re.fullmatch(r"inference;dur=\d+\.\d{3}", timing), timing
    body = body_of(response)
    direct = iris.run({"features": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)}, ["label", "probabilities"])
    assert body["id"] == "fixture-1"
    assert body["outputs"][0] == {"name": "label", "datatype": "INT64", "shape": [1], "data": direct["label"].tolist()}
    np.testing.assert_array_equal(np.array(body["outputs"][1]["data"], np.float32), direct["probabilities"].reshape(-1))


def test_http_api_payload_2_fixture_with_stage_and_base64_body(iris_function, iris):
    response = iris_function(fixture_event("http_api_v2.json"), Context("req-http"))
    assert response["statusCode"] == 200
    direct = iris.run({"features": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)}, ["label"])
    assert [row["label"] for row in body_of(response)["predictions"]] == direct["label"].tolist()


def test_binary_extension_travels_base64_both_ways(stored_digits, digits, digits_test_split):
    import tritonclient.http as triton
    from test_v2 import triton_request

    function = ModelFunction(stored_digits.environment())
    test_x, _ = digits_test_split
    body, headers = triton_request({"pixels": (test_x[:9], "FP32")}, True, ["probabilities"], True)
    event = http_api_event("POST", "/v2/models/digits/infer", body, headers)
    assert event["isBase64Encoded"] is True
    response = function(event, Context("req-bin"))
    assert response["statusCode"] == 200 and response["isBase64Encoded"] is True
    assert response["headers"]["Content-Type"] == "application/octet-stream"
    result = triton.InferResult.from_response_body(base64.b64decode(response["body"]), header_length=int(response["headers"]["Inference-Header-Content-Length"]))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), digits.run({"pixels": test_x[:9]}, ["probabilities"])["probabilities"])


def test_session_is_loaded_once_and_reused(iris_function):
    runtime = iris_function.model.runtime
    for request_id in ("a", "b", "c"):
        assert iris_function(fixture_event("apigw_rest_v1.json"), Context(request_id))["statusCode"] == 200
    assert iris_function.model.runtime is runtime


def test_checksum_mismatch_is_never_served(stored_iris, capsys):
    function = ModelFunction({**stored_iris.environment(), "SLIMSERVE_MODEL_SHA256": "0" * 64})
    assert function.model.runtime is None
    reason = f"sha256 of s3://{stored_iris.bucket}/{stored_iris.key} is {stored_iris.sha256}, expected {'0' * 64}; refusing to serve it"
    ready = function(rest_event("GET", "/v2/models/iris/ready"), Context("r1"))
    assert (ready["statusCode"], body_of(ready)) == (503, {"ready": False, "error": reason})
    infer = function(fixture_event("apigw_rest_v1.json"), Context("r2"))
    assert (infer["statusCode"], body_of(infer)) == (503, {"error": f"model 'iris' version 1 is not ready: {reason}"})
    predict = function(fixture_event("http_api_v2.json"), Context("r3"))
    assert predict["statusCode"] == 503
    assert function(rest_event("GET", "/v2/health/live"), Context("r4"))["statusCode"] == 200
    server_ready = function(rest_event("GET", "/v2/health/ready"), Context("r5"))
    assert (server_ready["statusCode"], body_of(server_ready)) == (503, {"ready": False, "error": f"iris 1: {reason}"})
    log = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert log[0]["level"] == "ERROR" and log[0]["message"] == "model not loaded" and log[0]["reason"] == reason


def test_missing_object_is_reported_not_raised(stored_iris):
    function = ModelFunction({**stored_iris.environment(), "SLIMSERVE_MODEL_KEY": "models/iris/gone/model.onnx"})
    response = function(rest_event("GET", "/v2/models/iris/ready"), Context("r1"))
    assert (response["statusCode"], body_of(response)["error"]) == (
        503, f"cannot fetch s3://{stored_iris.bucket}/models/iris/gone/model.onnx: NoSuchKey The specified key does not exist.")


def test_incomplete_environment_is_reported():
    function = ModelFunction({"SLIMSERVE_MODEL_NAME": "iris", "SLIMSERVE_MODEL_FORMAT": "pickle", "SLIMSERVE_MODEL_SHA256": "ab", "SLIMSERVE_MODEL_PATH": "x"})
    assert function.model.failure == "SLIMSERVE_MODEL_FORMAT is 'pickle'; expected one of onnx, tflite"
    function = ModelFunction({"SLIMSERVE_MODEL_NAME": "iris"})
    assert function.model.failure == ("environment lacks SLIMSERVE_MODEL_FORMAT, SLIMSERVE_MODEL_SHA256, "
                                      "SLIMSERVE_MODEL_BUCKET and SLIMSERVE_MODEL_KEY (or SLIMSERVE_MODEL_PATH)")


def test_body_marked_base64_that_is_not(iris_function):
    event = {**fixture_event("apigw_rest_v1.json"), "body": "not base64!", "isBase64Encoded": True}
    response = iris_function(event, Context("r"))
    assert (response["statusCode"], body_of(response)) == (400, {"error": "body marked base64 is not valid base64: Only base64 data is allowed"})


def test_each_request_writes_one_emf_record_and_a_failure_adds_a_log_line(iris_function, capsys):
    capsys.readouterr()
    iris_function(fixture_event("apigw_rest_v1.json"), Context("req-1"))
    iris_function(rest_event("POST", "/v2/models/iris/infer", b"{", {"Content-Type": "application/json"}), Context("req-2"))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first, second, failure_log = lines
    assert first["_aws"]["CloudWatchMetrics"] == [{
        "Namespace": "Slimserve",
        "Dimensions": [["Model"]],
        "Metrics": [{"Name": "Requests", "Unit": "Count"}, {"Name": "Errors", "Unit": "Count"},
                    {"Name": "RequestLatency", "Unit": "Milliseconds"}, {"Name": "InferenceLatency", "Unit": "Milliseconds"},
                    {"Name": "ColdStart", "Unit": "Count"}, {"Name": "ModelLoadTime", "Unit": "Milliseconds"}],
    }]
    assert (first["Model"], first["request_id"], first["status"], first["Requests"], first["Errors"], first["ColdStart"]) == ("iris", "req-1", 200, 1, 0, 1)
    assert first["ModelLoadTime"] > 0 and first["InferenceLatency"] > 0 and first["RequestLatency"] >= first["InferenceLatency"]
    assert (second["request_id"], second["status"], second["Errors"], second["ColdStart"], second["ErrorKind"]) == ("req-2", 400, 1, 0, "invalid_input")
    assert "ModelLoadTime" not in second and "InferenceLatency" not in second
    assert second["_aws"]["CloudWatchMetrics"][1] == {"Namespace": "Slimserve", "Dimensions": [["Model", "ErrorKind"]], "Metrics": [{"Name": "Errors", "Unit": "Count"}]}
    assert (failure_log["level"], failure_log["request_id"], failure_log["function"], failure_log["status"]) == ("WARNING", "req-2", "slimserve-demo-iris", 400)


def test_unexpected_failure_is_a_logged_500_without_a_trace(iris_function, capsys, monkeypatch):
    def explode(core, request, **arguments):
        raise KeyError("bug")

    monkeypatch.setitem(ACTIONS, "v2_infer", explode)
    response = iris_function(fixture_event("apigw_rest_v1.json"), Context("req-bug"))
    assert (response["statusCode"], body_of(response)) == (500, {"error": "internal error; see the server log"})
    error = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if '"exception"' in line)
    assert error["request_id"] == "req-bug" and "KeyError: 'bug'" in error["exception"]


def test_entry_module_loads_the_model_at_import_in_a_fresh_process(stored_iris, s3_store):
    """What Lambda does: import `lambda_handlers.handler` (init phase), then call `handler`."""
    script = (
        "import json, sys\n"
        "from lambda_handlers.handler import handler\n"
        f"event = json.load(open({str(FIXTURES / 'apigw_rest_v1.json')!r}))\n"
        "response = handler(event, None)\n"
        "print(json.dumps(response))\n"
    )
    env = {**os.environ, **s3_store.environment, **stored_iris.environment(), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True, text=True, check=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[0])["message"] == "model loaded"
    response = json.loads(lines[-1])
    assert response["statusCode"] == 200 and json.loads(response["body"])["id"] == "fixture-1"

