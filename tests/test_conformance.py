"""Protocol behaviours other servers' own tests define, checked on every front door: chunked request bodies,
Triton's raw binary request, TF Serving's NaN and Infinity tokens, and duplicate V2 output names."""

import http.client
import json
import socket

import numpy as np
import pytest
from onnx import TensorProto
from support import call, identity_onnx

from slimserve.lambda_handlers import wire
from slimserve.lambda_handlers.contract import CUSTOM_ATTRIBUTES, MAX_BODY_BYTES, route_attribute
from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.errors import InferenceError
from slimserve.lambda_handlers.runtimes import OnnxModel
from slimserve.local.gateway import EndpointRoute

RAW = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}


# chunked request bodies (Triton: test_content_encoding_chunked_manually)


class _EchoServer(wire.Server):
    """The shared plumbing alone: answers with the body it read, or the error reading it raised."""

    daemon_threads = True
    limit = 64

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(wire.Handler):
    def do_POST(self):
        try:
            self.reply(200, self.read_body(self.server.limit))
        except InferenceError as error:
            self.reply(error.status, error.message.encode())


@pytest.fixture(scope="module")
def echo():
    import threading

    server = _EchoServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)  # the client has no more to send
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, response.read()


def chunked(*chunks: bytes, extension=b"", trailer=b"") -> bytes:
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(chunk), extension, chunk) for chunk in chunks)
    return b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n" + trailer + b"\r\n"


def test_chunked_bodies_are_put_together_with_extensions_and_trailers(echo):
    assert raw_exchange(echo, chunked(b"hello ", b"chunked ", b"world")) == (200, b"hello chunked world")
    assert raw_exchange(echo, chunked(b"abc", extension=b";name=value")) == (200, b"abc")
    assert raw_exchange(echo, chunked(b"abc", trailer=b"X-Checksum: 1\r\n")) == (200, b"abc")
    assert raw_exchange(echo, chunked()) == (200, b"")


def test_the_connection_serves_a_next_request_after_a_chunked_one(echo):
    connection = http.client.HTTPConnection("127.0.0.1", echo, timeout=10)
    for body in ([b"one", b"two"], [b"three"]):
        connection.request("POST", "/", body=iter(body), encode_chunked=True)
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"".join(body))
    connection.close()


@pytest.mark.parametrize("request_bytes, status, message", [
    (chunked(b"x" * 40, b"y" * 40), 413, b"request body is 80 bytes; the limit is 64"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\n" + b"z" * 65, 413, b"request body is 65 bytes; the limit is 64"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400,
     b"malformed chunked body: chunk size line b'zz\\r\\n'"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcdef\r\n0\r\n\r\n", 400,
     b"malformed chunked body: a chunk of 2 bytes is cut short or overlong"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffff\r\nabc", 400,
     b"malformed chunked body: a chunk of 1099511627775 bytes is cut short or overlong"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
     b"unsupported Transfer-Encoding 'gzip': expected chunked"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n", 400,
     b"Content-Length must be a non-negative integer, got '-3'"),
])
def test_bad_framing_and_bodies_past_the_limit_are_refused_by_name(echo, request_bytes, status, message):
    assert raw_exchange(echo, request_bytes) == (status, message)


def v2_request(rows: np.ndarray, **extra) -> bytes:
    inputs = [{"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]
    return json.dumps({"inputs": inputs, **extra}).encode()


def post_chunked(url: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    connection.request("POST", path, body=iter(pieces), headers=headers, encode_chunked=True)
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


@pytest.mark.parametrize("model", ["iris", "iris-gpu"])
def test_chunked_v2_requests_answer_as_the_runtime_through_the_gateway(mixed_stack, model, iris, iris_test_split):
    rows = iris_test_split[0][:5]
    key = {"x-api-key": mixed_stack.gateway.api_key, "Content-Type": "application/json"}
    status, answer = post_chunked(mixed_stack.gateway.url, f"/v2/models/{model}/infer", v2_request(rows), key)
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == iris.run({"features": rows}, ["label"])["label"].tolist()


def test_chunked_invocations_answer_as_the_runtime_on_the_sagemaker_program(mixed_stack, iris, iris_test_split):
    rows = iris_test_split[0][:5]
    endpoint = next(route for route in mixed_stack.gateway.routes.values() if isinstance(route, EndpointRoute))
    headers = {"Content-Type": "application/json", CUSTOM_ATTRIBUTES: route_attribute("POST", "/v2/models/iris-gpu/infer")}
    status, answer = post_chunked(endpoint.url, "/invocations", v2_request(rows), headers)
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == iris.run({"features": rows}, ["label"])["label"].tolist()


# raw binary requests (Triton's binary tensor extension, "Raw Binary Request")


def test_a_raw_binary_request_infers_the_batch_from_the_byte_count(core, iris, iris_test_split):
    rows = iris_test_split[0][:7]
    status, answer, _ = call(core, "POST", "/v2/models/iris/infer", rows.astype("<f4").tobytes(), RAW)
    assert status == 200, answer
    expected = iris.run({"features": rows}, ["label", "probabilities"])
    assert [output["name"] for output in answer["outputs"]] == ["label", "probabilities"]
    assert answer["outputs"][0]["data"] == expected["label"].tolist()
    assert answer["outputs"][1]["shape"] == [7, 3]
    assert np.array_equal(np.array(answer["outputs"][1]["data"], np.float32), expected["probabilities"].ravel())


@pytest.mark.parametrize("model", ["iris", "iris-gpu"])
def test_raw_binary_requests_pass_the_gateway_to_either_target(mixed_stack, model, iris, iris_test_split):
    rows = iris_test_split[0][:3]
    connection = http.client.HTTPConnection(mixed_stack.gateway.url.removeprefix("http://"), timeout=60)
    connection.request("POST", f"/v2/models/{model}/infer", rows.astype("<f4").tobytes(),
                       {**RAW, "x-api-key": mixed_stack.gateway.api_key})
    response = connection.getresponse()
    status, answer = response.status, json.loads(response.read())
    connection.close()
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == iris.run({"features": rows}, ["label"])["label"].tolist()


def test_a_raw_binary_request_for_a_fixed_shape_needs_exactly_its_bytes():
    fixed = InferenceCore([ServedModel("fixed", "1", runtime=OnnxModel(identity_onnx({"FP32": TensorProto.FLOAT}, shape=(2, 3))))])
    values = np.arange(6, dtype=np.float32)
    status, answer, _ = call(fixed, "POST", "/v2/models/fixed/infer", values.tobytes(), RAW)
    assert status == 200 and answer["outputs"][0]["shape"] == [2, 3] and answer["outputs"][0]["data"] == values.tolist()
    assert call(fixed, "POST", "/v2/models/fixed/infer", values[:5].tobytes(), RAW)[:2] == (400, {
        "error": "raw binary request for input 'in_fp32' (FP32 [2, 3]): the body has 20 bytes but the input needs 24"})


@pytest.mark.parametrize("model, body, message", [
    ("iris", np.zeros(5, np.float32).tobytes(),
     "raw binary request for input 'features' (FP32 [-1, 4]): the body has 20 bytes, not a whole number of 16-byte rows"),
    ("iris", b"", "raw binary request for input 'features' (FP32 [-1, 4]): the body has 0 bytes, not a whole number of 16-byte rows"),
    ("identity", np.zeros(3, np.float32).tobytes(),
     "Inference-Header-Content-Length is 0 (a raw binary request), which only a model with one input takes; this model has 13: "
     "'in_bool', 'in_uint8', 'in_uint16', 'in_uint32', 'in_uint64', 'in_int8', 'in_int16', 'in_int32', 'in_int64', 'in_fp16', "
     "'in_fp32', 'in_fp64', 'in_bytes'"),
])
def test_raw_binary_requests_the_shape_cannot_be_told_from_are_refused_by_name(core, model, body, message):
    assert call(core, "POST", f"/v2/models/{model}/infer", body, RAW)[:2] == (400, {"error": message})


@pytest.mark.parametrize("datatype, shape, message", [
    ("FP32", ("batch", "width"), "raw binary request for input 'in_fp32' (FP32 [-1, -1]): dimension 1 is dynamic, so the shape "
                                 "cannot be told from the byte count; send a JSON header"),
    ("BYTES", ("batch", 3), "raw binary request for input 'in_bytes' (BYTES [-1, 3]): a BYTES input's shape cannot be told "
                            "from its bytes; send a JSON header"),
])
def test_raw_binary_requests_for_inputs_of_unknown_size_are_refused_by_name(datatype, shape, message):
    from support import IDENTITY_TYPES

    model = OnnxModel(identity_onnx({datatype: IDENTITY_TYPES[datatype]}, shape=shape))
    single = InferenceCore([ServedModel("single", "1", runtime=model)])
    assert call(single, "POST", "/v2/models/single/infer", b"\0" * 24, RAW)[:2] == (400, {"error": message})


# TF Serving's NaN, Infinity and -Infinity tokens (api_rest.md, "JSON conformance")


@pytest.fixture(scope="module")
def echo_fp32():
    return InferenceCore([ServedModel("echo", "1", runtime=OnnxModel(identity_onnx({"FP32": TensorProto.FLOAT})))])


@pytest.mark.parametrize("request_body, answer", [
    (b'{"instances": [[NaN, Infinity, -Infinity], [1.5, -0.0, 2]]}', b'{"predictions":[[NaN,Infinity,-Infinity],[1.5,-0.0,2.0]]}'),
    (b'{"inputs": [[NaN, 1, -Infinity]]}', b'{"outputs":[[NaN,1.0,-Infinity]]}'),
])
def test_tf_serving_takes_and_writes_nan_and_infinity_tokens(echo_fp32, request_body, answer):
    status, _, response = call(echo_fp32, "POST", "/v1/models/echo:predict", request_body)
    assert (status, response.body) == (200, answer)


def test_tf_serving_answers_without_non_finite_values_stay_plain(echo_fp32):
    assert call(echo_fp32, "POST", "/v1/models/echo:predict", b'{"instances": [[1, 2, 3]]}')[1] == {"predictions": [[1.0, 2.0, 3.0]]}


def test_v2_json_still_refuses_nan_tokens(echo_fp32):
    body = b'{"inputs": [{"name": "in_fp32", "shape": [1, 3], "datatype": "FP32", "data": [NaN, 1, 2]}]}'
    status, answer, _ = call(echo_fp32, "POST", "/v2/models/echo/infer", body)
    assert status == 400 and answer["error"].startswith("request body is not valid JSON: ")


# duplicate output names (Triton: test_duplicate_output_names)


def test_duplicate_output_names_are_a_400_naming_the_output(core):
    body = v2_request(np.zeros((1, 4), np.float32), outputs=[{"name": "label"}, {"name": "probabilities"}, {"name": "label"}])
    assert call(core, "POST", "/v2/models/iris/infer", body)[:2] == (400, {"error": "output 'label' is requested twice"})


def test_a_chunked_body_past_the_limit_is_a_413_on_the_sagemaker_program(mixed_stack):
    endpoint = next(route for route in mixed_stack.gateway.routes.values() if isinstance(route, EndpointRoute))
    status, answer = post_chunked(endpoint.url, "/invocations", b" " * (MAX_BODY_BYTES + 1), {"Content-Type": "application/json"})
    assert (status, answer) == (413, {"error": f"request body is {MAX_BODY_BYTES + 1} bytes; the limit is {MAX_BODY_BYTES}"})


def test_a_function_answer_past_lambdas_payload_limit_is_the_error_lambda_records(mixed_stack):
    rows = np.tile(np.array([[5.1, 3.5, 1.4, 0.2]], "<f4"), (200_000, 1))  # 3.2 MB in, about 7 MB of JSON out
    connection = http.client.HTTPConnection(mixed_stack.gateway.url.removeprefix("http://"), timeout=120)
    connection.request("POST", "/v2/models/iris/infer", rows.tobytes(), {**RAW, "x-api-key": mixed_stack.gateway.api_key})
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())) == (502, {"message": "Internal server error"})
    connection.close()
    assert any("Function.ResponseSizeTooLarge" in line and f"maximum allowed payload size ({MAX_BODY_BYTES} bytes)" in line
               for line in mixed_stack.lines)
