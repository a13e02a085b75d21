"""Property-based fuzzing of the protocol parsers and validation: any bytes, headers or events in, a
well-formed 2xx or 4xx out, and never an exception or a 500. Derandomized and bounded, so CI repeats it."""

import base64
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import IDENTITY_TYPES, ROOT
from support import MODELS as MODEL_FILES

from slimserve.lambda_handlers.contract import ROUTES
from slimserve.lambda_handlers.core import Request
from slimserve.lambda_handlers.function import ModelFunction
from slimserve.registry.store import file_environment

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
MODELS = ["iris", "digits", "identity", "nope"]
DATATYPES = sorted(IDENTITY_TYPES)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["features", "pixels"] + [f"in_{t.lower()}" for t in DATATYPES]) | st.text(max_size=6)},
    optional={"shape": st.lists(st.integers(-2, 4), max_size=4) | json_values,
              "datatype": st.sampled_from(DATATYPES + ["FP8", ""]) | json_values,
              "data": json_values | st.lists(st.integers(-300, 300), max_size=12),
              "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "binary_data", "x"]), json_values, max_size=2)})
v2_requests = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(tensors, max_size=3) | json_values, "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=6)}), max_size=2),
    "id": json_values, "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "y"]), json_values, max_size=2)})
predict_requests = st.fixed_dictionaries({}, optional={
    "instances": json_values, "inputs": json_values, "signature_name": st.sampled_from(["serving_default", "other"])})
paths = st.builds(lambda template, model, version: template.replace("{model}", model if version is None else f"{model}/versions/{version}"),
                  st.sampled_from([template for _, template, _ in ROUTES]), st.sampled_from(MODELS), st.none() | st.sampled_from(["1", "2", "x"]))
bodies = (st.binary(max_size=300) | v2_requests.map(lambda r: json.dumps(r, allow_nan=True).encode())
          | predict_requests.map(lambda r: json.dumps(r, allow_nan=True).encode()))
headers = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "application/octet-stream", "text/plain"]),
    "inference-header-content-length": st.integers(-5, 400).map(str) | st.text(max_size=4),
    "content-encoding": st.sampled_from(["gzip", "deflate", "identity", "br", ""])})


def well_formed(response) -> None:
    assert response.status < 500, (response.status, response.body[:300])
    if response.status >= 400:
        error = json.loads(response.body)
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), path=paths, body=bodies, request_headers=headers)
def test_any_request_to_the_core_is_answered_well_formed(core, method, path, body, request_headers):
    well_formed(core.handle(Request(method, path, request_headers, body)))


@FUZZ
@given(inputs=st.lists(st.tuples(st.sampled_from(DATATYPES), st.integers(0, 3), st.binary(max_size=64)), min_size=1, max_size=3),
       header_extra=st.integers(-3, 3), outputs_binary=st.booleans())
def test_binary_tensor_bodies_of_any_length_are_answered_well_formed(core, inputs, header_extra, outputs_binary):
    header = {"inputs": [{"name": f"in_{datatype.lower()}", "shape": [rows, 3], "datatype": datatype,
                          "parameters": {"binary_data_size": len(data)}} for datatype, rows, data in inputs],
              "parameters": {"binary_data_output": outputs_binary}}
    encoded = json.dumps(header).encode()
    body = encoded + b"".join(data for _, _, data in inputs)
    request_headers = {"inference-header-content-length": str(len(encoded) + header_extra)}
    well_formed(core.handle(Request("POST", "/v2/models/identity/infer", request_headers, body)))


events = st.fixed_dictionaries({}, optional={
    "version": st.sampled_from(["1.0", "2.0", "3"]) | json_values,
    "httpMethod": st.sampled_from(["GET", "POST"]) | json_values, "path": paths | json_values,
    "rawPath": paths | json_values, "requestContext": st.fixed_dictionaries({}, optional={
        "http": st.fixed_dictionaries({}, optional={"method": st.sampled_from(["GET", "POST"]) | json_values, "path": paths}),
        "stage": st.sampled_from(["prod", "$default"])}),
    "headers": st.none() | st.dictionaries(st.sampled_from(["Content-Type", "content-encoding", "x"]), st.text(max_size=20), max_size=3)
               | json_values,
    "body": st.none() | bodies.map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=50) | json_values,
    "isBase64Encoded": st.booleans() | json_values})


@pytest.fixture(scope="module")
def function():
    return ModelFunction(file_environment(MODEL_FILES / "iris.onnx"))


@FUZZ
@given(event=events)
def test_any_lambda_event_gets_a_well_formed_proxy_response(function, event):
    answer = function(event, None)
    assert set(answer) == {"statusCode", "headers", "body", "isBase64Encoded"} and answer["statusCode"] < 500, answer


def test_atheris_finds_no_crash_in_the_binary_extension_parser(tmp_path):
    """Coverage-guided fuzzing of the binary tensor extension through the core, bounded by runs."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz" / "binary_extension.py"), "-runs=20000", "-seed=1",
                             f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 20000 runs" in result.stderr


@pytest.mark.parametrize("event, message", [
    ({}, "event httpMethod must be a non-empty string, got NoneType"),
    ({"version": "2.0", "requestContext": {"http": {}}}, "event requestContext.http.method must be a non-empty string, got NoneType"),
    ({"httpMethod": "GET", "path": 7}, "event path must be a non-empty string, got int"),
    ({"httpMethod": "GET", "path": "/v2", "headers": {"x": 1}}, "event headers must map names to strings"),
    ({"httpMethod": "POST", "path": "/v2/models/iris/infer", "body": {"inputs": []}}, "event body must be a string, got dict"),
    ({"httpMethod": "POST", "path": "/v2/models/iris/infer", "body": "a", "isBase64Encoded": True},
     "body marked base64 is not valid base64: Invalid base64-encoded string: number of data characters (1) cannot be 1 more than a multiple of 4"),
])
def test_events_not_from_api_gateway_are_a_400_naming_the_field(function, event, message):
    answer = function(event, None)
    assert (answer["statusCode"], json.loads(answer["body"])) == (400, {"error": message})
