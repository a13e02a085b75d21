"""Open Inference Protocol V2 through the core, with requests encoded by tritonclient itself."""

import gzip
import zlib

import numpy as np
import pytest
import tritonclient.http as triton
from support import IDENTITY_TYPES, call, identity_onnx, sample

from slimserve.lambda_handlers.core import InferenceCore, Request, ServedModel


def triton_request(inputs: dict[str, tuple[np.ndarray, str]], binary: bool, outputs=None, binary_outputs=False, request_id=""):
    """Encode with tritonclient's own request builder: (body, headers)."""
    infer_inputs = []
    for name, (array, datatype) in inputs.items():
        item = triton.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array, binary_data=binary)
        infer_inputs.append(item)
    requested = [triton.InferRequestedOutput(name, binary_data=binary_outputs) for name in outputs] if outputs else None
    body, json_size = triton.InferenceServerClient.generate_request_body(infer_inputs, requested, request_id=request_id)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def triton_result(response) -> triton.InferResult:
    header_length = response.headers.get("Inference-Header-Content-Length")
    return triton.InferResult.from_response_body(response.body, header_length=int(header_length) if header_length else None)


def infer(core, model, body, headers, path=None):
    response = core.handle(Request("POST", path or f"/v2/models/{model}/infer", headers, body))
    assert response.status == 200, response.body
    return triton_result(response)


def test_server_live_ready_and_metadata(core):
    assert call(core, "GET", "/v2/health/live")[:2] == (200, {"live": True})
    assert call(core, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
    assert call(core, "GET", "/v2")[:2] == (200, {"name": "slimserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]})


@pytest.mark.parametrize("path", ["/v2/models/iris", "/v2/models/iris/versions/1"])
def test_model_metadata_with_and_without_version(core, path):
    assert call(core, "GET", path)[:2] == (200, {
        "name": "iris",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        ],
    })


@pytest.mark.parametrize("path", ["/v2/models/digits/ready", "/v2/models/digits/versions/1/ready"])
def test_model_ready_with_and_without_version(core, path):
    assert call(core, "GET", path)[:2] == (200, {"ready": True})


def test_unknown_model_and_version_are_404(core):
    assert call(core, "GET", "/v2/models/nope")[:2] == (404, {"error": "unknown model 'nope'; served models: digits, identity, iris"})
    assert call(core, "GET", "/v2/models/iris/versions/7/ready")[:2] == (404, {"error": "model 'iris' has no version '7'; served versions: 1"})
    assert call(core, "POST", "/v2/models/iris/versions/7/infer", b"{}")[:2] == (404, {"error": "model 'iris' has no version '7'; served versions: 1"})


def test_unknown_route_and_wrong_method(core):
    assert call(core, "GET", "/v3/whatever")[:2] == (404, {"error": "no route for GET /v3/whatever"})
    assert call(core, "GET", "/v2/models/iris/infer")[:2] == (405, {"error": "GET is not allowed on /v2/models/iris/infer; use POST"})


def test_latest_version_answers_when_none_is_named(iris, digits):
    core = InferenceCore([ServedModel("m", "2", runtime=digits), ServedModel("m", "10", runtime=iris)])
    assert call(core, "GET", "/v2/models/m")[1]["platform"] == "onnxruntime_onnx"
    assert call(core, "GET", "/v2/models/m")[1]["versions"] == ["2", "10"]
    assert call(core, "GET", "/v2/models/m/versions/2")[1]["platform"] == "tflite"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_iris_predictions_equal_the_runtime(core, iris, iris_test_split, binary):
    test_x, _ = iris_test_split
    body, headers = triton_request({"features": (test_x, "FP32")}, binary, ["label", "probabilities"], binary, request_id="req-42")
    result = infer(core, "iris", body, headers)
    direct = iris.run({"features": test_x}, ["label", "probabilities"])
    np.testing.assert_array_equal(result.as_numpy("label"), direct["label"])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), direct["probabilities"])
    assert result.get_response()["id"] == "req-42"
    assert result.get_response()["model_name"] == "iris"
    assert result.get_response()["model_version"] == "1"


def test_digits_through_versioned_route_equal_the_runtime(core, digits, digits_test_split):
    test_x, _ = digits_test_split
    body, headers = triton_request({"pixels": (test_x[:17], "FP32")}, True, ["probabilities"], True)
    result = infer(core, "digits", body, headers, path="/v2/models/digits/versions/1/infer")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), digits.run({"pixels": test_x[:17]}, ["probabilities"])["probabilities"])


def test_requested_outputs_only_are_returned(core, iris_test_split):
    test_x, _ = iris_test_split
    body, headers = triton_request({"features": (test_x[:3], "FP32")}, False, ["probabilities"])
    outputs = infer(core, "iris", body, headers).get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["probabilities"]


def test_binary_data_output_parameter_makes_every_output_binary(core, iris_test_split):
    test_x, _ = iris_test_split
    request = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": test_x[:2].tolist()}],
               "parameters": {"binary_data_output": True}}
    status, body, response = call(core, "POST", "/v2/models/iris/infer", request)
    assert status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    outputs = triton_result(response).get_response()["outputs"]
    assert [o["parameters"] for o in outputs] == [{"binary_data_size": 16}, {"binary_data_size": 24}]


def test_nested_and_flat_json_data_are_the_same_request(core, iris_test_split):
    test_x, _ = iris_test_split
    answers = []
    for data in (test_x[:4].tolist(), test_x[:4].reshape(-1).tolist()):
        request = {"inputs": [{"name": "features", "shape": [4, 4], "datatype": "FP32", "data": data}]}
        answers.append(call(core, "POST", "/v2/models/iris/infer", request)[1])
    assert answers[0] == answers[1]


@pytest.mark.parametrize("datatype", list(IDENTITY_TYPES))
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(core, datatype, binary):
    array = sample(datatype)
    name = datatype.lower()
    feeds = {f"in_{n.lower()}": (sample(n), n) for n in IDENTITY_TYPES}
    body, headers = triton_request(feeds, binary, [f"out_{name}"], binary)
    result = infer(core, "identity", body, headers)
    got = result.as_numpy(f"out_{name}")
    if datatype == "BYTES":
        got = np.vectorize(lambda s: s if isinstance(s, bytes) else s.encode(), otypes=[object])(got)
    else:
        assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)
    assert result.get_output(f"out_{name}")["datatype"] == datatype


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_request_bodies(core, iris, iris_test_split, encoding, compress):
    test_x, _ = iris_test_split
    body, headers = triton_request({"features": (test_x[:5], "FP32")}, True, ["label"], True)
    # tritonclient counts the JSON header before compression, as the extension specifies
    result = infer(core, "iris", compress(body), {**headers, "Content-Encoding": encoding})
    np.testing.assert_array_equal(result.as_numpy("label"), iris.run({"features": test_x[:5]}, ["label"])["label"])


def test_a_text_plain_body_is_the_one_bytes_input_and_other_models_say_to_send_json():
    from onnx import TensorProto

    from slimserve.lambda_handlers.runtimes import OnnxModel

    texts = InferenceCore([ServedModel("echo", "1", runtime=OnnxModel(identity_onnx({"BYTES": TensorProto.STRING}, shape=("batch",))))])
    status, body, _ = call(texts, "POST", "/v2/models/echo/infer", "héllo wörld".encode(), {"Content-Type": "text/plain; charset=utf-8"})
    assert status == 200 and body["outputs"] == [{"name": "out_bytes", "datatype": "BYTES", "shape": [1], "data": ["héllo wörld"]}]
    numbers = InferenceCore([ServedModel("numbers", "1", runtime=OnnxModel(identity_onnx({"FP32": TensorProto.FLOAT})))])
    status, body, _ = call(numbers, "POST", "/v2/models/numbers/infer", b"1 2 3", {"Content-Type": "text/plain"})
    assert (status, body) == (400, {"error": "a text/plain body is the text of a model's one BYTES input; this model "
                                             "takes 'in_fp32' (FP32): send a JSON request"})
    wide = InferenceCore([ServedModel("wide", "1", runtime=OnnxModel(identity_onnx({"BYTES": TensorProto.STRING})))])
    status, body, _ = call(wide, "POST", "/v2/models/wide/infer", b"x", {"Content-Type": "text/plain"})
    assert (status, body) == (400, {"error": "a text/plain body is one text; input 'in_bytes' takes [-1, 3]: send a JSON request"})
    status, body, _ = call(texts, "POST", "/v2/models/echo/infer", b"\xff\xfe", {"Content-Type": "text/plain"})
    assert status == 400 and body["error"].startswith("input 'in_bytes': ONNX string tensors hold UTF-8 text")
