"""Every kind of bad request gets a 4xx naming the problem, through the real Lambda handler,
and the next good request still succeeds."""

import gzip
import json

import numpy as np
import pytest
from support import MODELS, call

from slimserve.contract.apigw import response_body, rest_event
from slimserve.lambda_handlers.contract import MAX_BODY_BYTES
from slimserve.lambda_handlers.function import ModelFunction
from slimserve.registry.versions import Registry

GOOD_ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def function(s3_store):
    stored = Registry(s3_store.client(), s3_store.bucket).register(MODELS / "iris.onnx", "iris")[0].stored(s3_store.bucket)
    function = ModelFunction(stored.environment())
    assert function.model.ready, function.model.failure
    return function


def v2(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra}).encode()


def features(data=None, shape=(1, 4), datatype="FP32", name="features"):
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": GOOD_ROW if data is None else data}


def binary_request(declared_size: int, payload: bytes, header_length: int | None = None):
    header = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": declared_size}}]}).encode()
    length = len(header) if header_length is None else header_length
    return header + payload, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}


ROW_BYTES = np.array([GOOD_ROW], np.float32).tobytes()
JSON = {"Content-Type": "application/json"}

CASES = {
    "malformed JSON": ("/v2/models/iris/infer", b'{"inputs": [', JSON, 400,
                       "request body is not valid JSON: unexpected end of data: line 1 column 13 (char 12)"),
    "malformed JSON (TF Serving)": ("/v1/models/iris:predict", b"{instances: 1}", JSON, 400,
                                    "request body is not valid JSON: unexpected character, expected a string key: line 1 column 2 (char 1)"),
    "JSON nested too deep": ("/v2/models/iris/infer", b'{"inputs": [' + b"[" * 70 + b"]" * 70 + b"]}", JSON, 400,
                             "request body nests JSON 72 levels deep; the limit is 64"),
    "JSON nested too deep (TF Serving)": ("/v1/models/iris:predict", b'{"instances": ' + b"[" * 100 + b"]" * 100 + b"}", JSON, 400,
                                          "request body nests JSON 101 levels deep; the limit is 64"),
    "unknown input": ("/v2/models/iris/infer", v2([features(name="petals")]), JSON, 400,
                      "unknown input 'petals': the model's inputs are 'features'"),
    "unknown input (TF Serving)": ("/v1/models/iris:predict", json.dumps({"instances": [{"petals": GOOD_ROW}]}).encode(), JSON, 400,
                                   "unknown input 'petals' in instances[0]: the model's inputs are ['features']"),
    "missing input": ("/v2/models/iris/infer", v2([]), JSON, 400, "request: 'inputs' is empty"),
    "missing inputs key": ("/v2/models/iris/infer", b'{"id": "x"}', JSON, 400, "request: missing 'inputs'"),
    "missing input (TF Serving)": ("/v1/models/iris:predict", b'{"signature_name": "serving_default"}', JSON, 400,
                                   "request must have exactly one of 'instances' (row format) or 'inputs' (columnar format)"),
    "wrong datatype": ("/v2/models/iris/infer", v2([features(datatype="INT64", data=[5, 3, 1, 0])]), JSON, 400,
                       "input 'features': expected datatype FP32, got INT64"),
    "unknown datatype": ("/v2/models/iris/infer", v2([features(datatype="FLOAT")]), JSON, 400,
                         "input 'features': unknown datatype 'FLOAT'; expected one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES"),
    "wrong shape": ("/v2/models/iris/infer", v2([features(shape=(1, 3), data=GOOD_ROW[:3])]), JSON, 400,
                    "input 'features': expected shape [-1, 4] (-1 is any size), got [1, 3]"),
    "wrong element count": ("/v2/models/iris/infer", v2([features(shape=(2, 4))]), JSON, 400,
                            "input 'features': shape [2, 4] needs 8 elements, data has 4"),
    "wrong shape (TF Serving)": ("/v1/models/iris:predict", json.dumps({"instances": [GOOD_ROW[:3]]}).encode(), JSON, 400,
                                 "input 'features': expected shape [-1, 4] (-1 is any size), got [1, 3]"),
    "ragged data (TF Serving)": ("/v1/models/iris:predict", json.dumps({"instances": [GOOD_ROW, GOOD_ROW[:3]]}).encode(), JSON, 400,
                                 "input 'features': data is ragged or mixes lists and scalars"),
    "BYTES where a number is expected": ("/v2/models/iris/infer", v2([features(data=["5.1", "3.5", "1.4", "0.2"])]), JSON, 400,
                                         "input 'features': expected FP32 values, found strings"),
    "b64 where a number is expected (TF Serving)": ("/v1/models/iris:predict", json.dumps({"instances": [{"b64": "AAAA"}]}).encode(), JSON, 400,
                                                    "input 'features': expected FP32 values, found values that are not numbers (null, objects or mixed types)"),
    "null where a number is expected": ("/v2/models/iris/infer", v2([features(data=[5.1, None, 1.4, 0.2])]), JSON, 400,
                                        "input 'features': expected FP32 values, found values that are not numbers (null, objects or mixed types)"),
    "binary size larger than the body": ("/v2/models/iris/infer", *binary_request(32, ROW_BYTES), 400,
                                         "input 'features': binary_data_size is 32 but only 16 bytes remain after the JSON header and earlier inputs"),
    "binary size wrong for the shape": ("/v2/models/iris/infer", *binary_request(8, ROW_BYTES[:8]), 400,
                                        "input 'features': binary_data_size is 8 but FP32 [1, 4] needs 16 bytes"),
    "binary bytes nobody declared": ("/v2/models/iris/infer", *binary_request(16, ROW_BYTES + b"\x00" * 5), 400,
                                     "the body has 5 bytes after the JSON header that no input's binary_data_size accounts for"),
    "header length past the body": ("/v2/models/iris/infer", *binary_request(16, ROW_BYTES, header_length=10_000), 400,
                                    "Inference-Header-Content-Length is 10000 but the body has 127 bytes"),
    "header length cutting the JSON": ("/v2/models/iris/infer", *binary_request(16, ROW_BYTES, header_length=20), 400,
                                       "JSON header is not valid JSON: unexpected end of data: line 1 column 21 (char 20)"),
    "header length not a number": ("/v2/models/iris/infer", *binary_request(16, ROW_BYTES, header_length=-1), 400,
                                   "Inference-Header-Content-Length is -1 but the body has 127 bytes"),
    "body over 6 MB": ("/v2/models/iris/infer", b" " * (MAX_BODY_BYTES + 1), JSON, 413,
                       f"request body is {MAX_BODY_BYTES + 1} bytes; the limit is {MAX_BODY_BYTES}"),
    "body over 6 MB (TF Serving)": ("/v1/models/iris:predict", b" " * (MAX_BODY_BYTES + 1), JSON, 413,
                                    f"request body is {MAX_BODY_BYTES + 1} bytes; the limit is {MAX_BODY_BYTES}"),
    "gzip bomb": ("/v2/models/iris/infer", gzip.compress(b" " * (4 * MAX_BODY_BYTES + 1)), {**JSON, "Content-Encoding": "gzip"}, 413,
                  f"gzip body expands past {4 * MAX_BODY_BYTES} bytes"),
    "unsupported Content-Encoding": ("/v2/models/iris/infer", v2([features()]), {**JSON, "Content-Encoding": "br"}, 400,
                                     "unsupported Content-Encoding 'br': expected one of identity, gzip, deflate"),
    "Content-Encoding that lies": ("/v2/models/iris/infer", v2([features()]), {**JSON, "Content-Encoding": "gzip"}, 400,
                                   "body is not valid gzip data: Error -3 while decompressing data: incorrect header check"),
    "classification extension": ("/v2/models/iris/infer", v2([features()], outputs=[{"name": "label", "parameters": {"classification": 2}}]), JSON, 400,
                             "output 'label': the classification extension is not supported"),
    "unknown output": ("/v2/models/iris/infer", v2([features()], outputs=[{"name": "scores"}]), JSON, 400,
                       "unknown output 'scores': the model's outputs are 'label', 'probabilities'"),
    "duplicate output": ("/v2/models/iris/infer", v2([features()], outputs=[{"name": "label"}, {"name": "label"}]), JSON, 400,
                         "output 'label' is requested twice"),
    "raw binary body of part rows": ("/v2/models/iris/infer", ROW_BYTES + ROW_BYTES[:4],
                                     {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}, 400,
                                     "raw binary request for input 'features' (FP32 [-1, 4]): the body has 20 bytes, not a whole number of 16-byte rows"),
    "NaN in V2 JSON": ("/v2/models/iris/infer", b'{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [NaN, 1, 2, 3]}]}', JSON, 400,
                       "request body is not valid JSON: unexpected character, expected a JSON value: line 1 column 80 (char 79)"),
}


def invoke(function, path, body, headers):
    response = function(rest_event("POST", path, body, headers), None)
    return response["statusCode"], json.loads(response_body(response))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_clear_4xx_and_the_next_request_succeeds(function, case, capsys):
    path, body, headers, status, message = CASES[case]
    assert invoke(function, path, body, headers) == (status, {"error": message})
    good_status, good = invoke(function, "/v2/models/iris/infer", v2([features()]), JSON)
    assert good_status == 200 and good["outputs"][0]["data"] == [0]
    metrics = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert metrics[0]["Errors"] == 1 and metrics[0]["ErrorKind"] == ("payload_too_large" if status == 413 else "invalid_input")
    assert metrics[1]["Errors"] == 0 and "ErrorKind" not in metrics[1]


@pytest.mark.parametrize("datatype, data, message", [
    ("INT8", [1, 2, 300], "input 'in_int8': values must lie in [-128, 127] for INT8, found 300"),
    ("UINT64", [0, 2**64 - 1, -1], "input 'in_uint64': values must lie in [0, 18446744073709551615] for UINT64, found -1"),
    ("UINT8", [0, -1, 2], "input 'in_uint8': values must lie in [0, 255] for UINT8, found -1"),
    ("INT32", [1.5, 2, 3], "input 'in_int32': expected INT32 values, found fractional numbers"),
    ("BOOL", [1, 0, 1], "input 'in_bool': expected BOOL values, found integers"),
    ("BYTES", [1, 2, 3], "input 'in_bytes': BYTES elements must be strings, found int"),
])
def test_values_a_datatype_cannot_hold_are_refused(core, datatype, data, message):
    request = {"inputs": [{"name": f"in_{datatype.lower()}", "shape": [1, 3], "datatype": datatype, "data": data}],
               "outputs": [{"name": f"out_{datatype.lower()}"}]}
    # values are checked while parsing, before the identity model's other inputs are found missing
    status, body, _ = call(core, "POST", "/v2/models/identity/infer", request)
    assert (status, body) == (400, {"error": message})


def test_missing_input_names_the_input(core):
    request = {"inputs": [{"name": "in_fp32", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert call(core, "POST", "/v2/models/identity/infer", request)[:2] == (400, {"error": "missing input 'in_bool' (BOOL [-1, 3])"})
