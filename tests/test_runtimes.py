import json
import os
import subprocess

import numpy as np
import onnxruntime
import pytest
from ai_edge_litert.interpreter import Interpreter
from support import IDENTITY_TYPES, MODELS, ROOT

from slimserve.lambda_handlers.datatypes import Signature, TensorSpec
from slimserve.lambda_handlers.runtimes import (
    ModelLoadError,
    OnnxModel,
    TfliteModel,
    load_model,
)


def test_onnx_signature_has_names_datatypes_and_dynamic_dims(iris):
    assert iris.signature == Signature(
        inputs=(TensorSpec("features", "FP32", (-1, 4)),),
        outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))),
    )


def test_onnx_from_bytes_and_path_predict_what_onnxruntime_predicts(iris_test_split):
    test_x, _ = iris_test_split
    session = onnxruntime.InferenceSession(str(MODELS / "iris.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"features": test_x})
    for source in (MODELS / "iris.onnx", (MODELS / "iris.onnx").read_bytes()):
        results = OnnxModel(source).run({"features": test_x}, ["label", "probabilities"])
        np.testing.assert_array_equal(results["label"], label)
        np.testing.assert_array_equal(results["probabilities"], probabilities)


def test_onnx_signature_covers_every_datatype(identity):
    assert [spec.datatype for spec in identity.signature.inputs] == list(IDENTITY_TYPES)
    assert all(spec.shape == (-1, 3) for spec in identity.signature.outputs)


def test_tflite_signature_has_dynamic_batch(digits):
    assert digits.signature == Signature(
        inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
        outputs=(TensorSpec("probabilities", "FP32", (-1, 10)),),
    )


def _litert_reference(pixels: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_path=str(MODELS / "digits.tflite"))
    (detail,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(detail["index"], pixels.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], pixels)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_tflite_from_bytes_and_path_predict_what_litert_predicts(digits_test_split):
    test_x, _ = digits_test_split
    expected = _litert_reference(test_x)
    for source in (MODELS / "digits.tflite", (MODELS / "digits.tflite").read_bytes()):
        model = TfliteModel(source)
        assert model.runtime == "ai_edge_litert"
        np.testing.assert_array_equal(model.run({"pixels": test_x}, ["probabilities"])["probabilities"], expected)


def test_tflite_resizes_between_batch_sizes(digits, digits_test_split):
    test_x, _ = digits_test_split
    for rows in (1, 7, 1, 30):
        got = digits.run({"pixels": test_x[:rows]}, ["probabilities"])["probabilities"]
        np.testing.assert_array_equal(got, _litert_reference(test_x[:rows]))


def test_tflite_runtime_serves_when_litert_is_absent(digits_test_split, tmp_path):
    """python3.11 layers carry tflite-runtime instead of LiteRT; the adapter must pick it up."""
    python = os.environ.get("SLIMSERVE_TFLITE_RUNTIME_PYTHON")
    if not python:
        pytest.skip("SLIMSERVE_TFLITE_RUNTIME_PYTHON not set; `make test` sets it")
    test_x, _ = digits_test_split
    np.save(tmp_path / "pixels.npy", test_x)
    script = (
        "import json, sys, numpy as np\n"
        "from lambda_handlers.runtimes import TfliteModel\n"
        f"model = TfliteModel({str(MODELS / 'digits.tflite')!r})\n"
        f"out = model.run({{'pixels': np.load({str(tmp_path / 'pixels.npy')!r})}}, ['probabilities'])['probabilities']\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        "print(json.dumps({'runtime': model.runtime, 'litert': 'ai_edge_litert' in sys.modules}))\n"
    )
    result = subprocess.run([python, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"runtime": "tflite_runtime", "litert": False}
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _litert_reference(test_x), rtol=1e-5, atol=1e-6)


def test_corrupt_file_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^ONNX Runtime cannot load <9 bytes>: "):
        load_model(b"not onnx!", "onnx")
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=rf"^ai_edge_litert cannot load {broken}: "):
        load_model(broken, "tflite")


def test_unknown_format_is_refused():
    with pytest.raises(ModelLoadError, match=r"^unknown model format 'pickle': expected one of onnx, tflite$"):
        load_model(b"", "pickle")


def test_non_tensor_outputs_are_refused_with_advice():
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    zipmap_model = to_onnx(LogisticRegression(max_iter=300).fit(features, labels), features[:1].astype(np.float32))
    with pytest.raises(ModelLoadError, match=r"^ONNX 'output_probability' has type seq\(map\(int64,tensor\(float\)\)\); only tensors can be served \(for scikit-learn classifiers convert with options=\{'zipmap': False\}\)$"):
        OnnxModel(zipmap_model.SerializeToString())

