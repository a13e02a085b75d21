"""TF Serving REST through the core."""

import base64

import numpy as np
import pytest
from onnx import TensorProto
from support import call, identity_onnx

from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.runtimes import OnnxModel


def test_row_format_with_several_outputs_gives_one_object_per_instance(core, iris, iris_test_split):
    test_x, _ = iris_test_split
    status, body, _ = call(core, "POST", "/v1/models/iris:predict", {"instances": test_x[:5].tolist()})
    direct = iris.run({"features": test_x[:5]}, ["label", "probabilities"])
    assert status == 200
    assert [row["label"] for row in body["predictions"]] == direct["label"].tolist()
    np.testing.assert_array_equal(np.array([row["probabilities"] for row in body["predictions"]], np.float32), direct["probabilities"])


def test_row_format_accepts_named_instances(core, iris, iris_test_split):
    test_x, _ = iris_test_split
    status, body, _ = call(core, "POST", "/v1/models/iris/versions/1:predict", {"instances": [{"features": row} for row in test_x[:3].tolist()]})
    assert status == 200
    assert [row["label"] for row in body["predictions"]] == iris.run({"features": test_x[:3]}, ["label"])["label"].tolist()


def test_row_format_with_one_output_gives_plain_values(core, digits, digits_test_split):
    test_x, _ = digits_test_split
    status, body, _ = call(core, "POST", "/v1/models/digits:predict", {"signature_name": "serving_default", "instances": test_x[:4].tolist()})
    assert status == 200
    np.testing.assert_array_equal(np.array(body["predictions"], np.float32), digits.run({"pixels": test_x[:4]}, ["probabilities"])["probabilities"])


@pytest.mark.parametrize("inputs", ["bare", "named"])
def test_columnar_inputs_answer_as_the_runtime(core, iris, iris_test_split, inputs):
    test_x, _ = iris_test_split
    value = test_x[:6].tolist() if inputs == "bare" else {"features": test_x[:6].tolist()}
    status, body, _ = call(core, "POST", "/v1/models/iris:predict", {"inputs": value})
    direct = iris.run({"features": test_x[:6]}, ["label", "probabilities"])
    assert status == 200
    assert body["outputs"]["label"] == direct["label"].tolist()
    np.testing.assert_array_equal(np.array(body["outputs"]["probabilities"], np.float32), direct["probabilities"])


def test_b64_values_feed_bytes_inputs_and_bytes_outputs_come_back_b64():
    model = OnnxModel(identity_onnx({"BYTES": TensorProto.STRING}, shape=("batch",)))
    assert model.signature.outputs[0].name == "out_bytes"  # TF Serving base64-encodes outputs named *_bytes
    core = InferenceCore([ServedModel("echo", "1", runtime=model)])
    instances = [{"b64": base64.b64encode(t.encode()).decode()} for t in ["héllo", "wörld"]]
    status, body, _ = call(core, "POST", "/v1/models/echo:predict", {"instances": instances})
    assert (status, body) == (200, {"predictions": instances})


def test_model_status_and_metadata(core):
    assert call(core, "GET", "/v1/models/iris")[:2] == (200, {
        "model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    })
    status, body, _ = call(core, "GET", "/v1/models/digits/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "digits", "signature_name": "", "version": "1"}
    assert body["metadata"]["signature_def"]["signature_def"]["serving_default"] == {
        "inputs": {"pixels": {"dtype": "DT_FLOAT", "name": "pixels", "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "64", "name": ""}], "unknown_rank": False}}},
        "outputs": {"probabilities": {"dtype": "DT_FLOAT", "name": "probabilities", "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "10", "name": ""}], "unknown_rank": False}}},
        "method_name": "tensorflow/serving/predict",
    }


def test_status_of_a_model_that_failed_to_load():
    core = InferenceCore([ServedModel("broken", "3", failure="sha256 mismatch")])
    assert call(core, "GET", "/v1/models/broken")[:2] == (200, {
        "model_version_status": [{"version": "3", "state": "END", "status": {"error_code": "UNAVAILABLE", "error_message": "sha256 mismatch"}}]
    })
