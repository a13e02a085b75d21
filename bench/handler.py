"""Warm handler overhead and cold init, each beside its baseline measured in the same run."""

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from slimserve.assets import function_bundle
from slimserve.contract.apigw import rest_event
from slimserve.lambda_handlers.function import ModelFunction
from slimserve.registry.store import file_environment

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"


def image_classifier_onnx(path: Path) -> Path:
    """A small CNN over 1x3x224x224 images: conv, ReLU, global average pool, dense, softmax."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8, 10)).astype(np.float32), "dense_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "dense_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "dense_w", "dense_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "image_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _v2_binary_request(name: str, array: np.ndarray) -> tuple[bytes, dict]:
    """Encoded by tritonclient itself, as a real client sends it."""
    import tritonclient.http as triton

    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=True)
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [tensor], [triton.InferRequestedOutput("probabilities", binary_data=True)])
    return body, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}


def _function(path: Path) -> ModelFunction:
    return ModelFunction(file_environment(path))


def _median_ms(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _interleaved(calls: dict, repeat: int, rounds: int) -> dict:
    """Median of per-round medians, alternating the contenders so noise hits each alike."""
    results = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            results[name].append(_median_ms(call, repeat))
    return {name: statistics.median(values) for name, values in results.items()}


def warm_overhead(rounds: int) -> list[tuple]:
    rows = []
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # EMF lines are written, as in Lambda
        iris = _function(MODELS / "iris.onnx")
        runtime = iris.model.runtime
        row = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
        body = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": row.tolist()}]}).encode()
        event = rest_event("POST", "/v2/models/iris/infer", body, {"Content-Type": "application/json"})
        m = _interleaved({
            "handler": lambda: iris(event, None),
            "runtime": lambda: runtime.run({"features": row}, ["label", "probabilities"]),
        }, repeat=2000, rounds=rounds)
        rows.append(("iris warm overhead (V2 JSON, 1 row)", m["handler"] - m["runtime"], "<= 0.2 ms",
                     f"runtime call {m['runtime']:.3f} ms", m["handler"] - m["runtime"] <= 0.2, "ms"))

        with tempfile.TemporaryDirectory() as folder:
            image_model = _function(image_classifier_onnx(Path(folder) / "image.onnx"))
        runtime = image_model.model.runtime
        image = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
        binary_body, headers = _v2_binary_request("image", image)
        binary_event = rest_event("POST", "/v2/models/image/infer", binary_body, headers)
        json_body = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": image}]},
                                 option=orjson.OPT_SERIALIZE_NUMPY)
        json_event = rest_event("POST", "/v2/models/image/infer", json_body, {"Content-Type": "application/json"})
        tensors = orjson.loads(json_body)

        def orjson_round_trip():
            decoded = orjson.loads(json_body)
            orjson.dumps({"outputs": [{"name": t["name"], "shape": t["shape"], "datatype": t["datatype"], "data": t["data"]}
                                      for t in decoded["inputs"]]})

        assert tensors["inputs"][0]["shape"] == [1, 3, 224, 224]
        m = _interleaved({
            "binary": lambda: image_model(binary_event, None),
            "json": lambda: image_model(json_event, None),
            "runtime": lambda: runtime.run({"image": image}, ["probabilities"]),
            "orjson": orjson_round_trip,
        }, repeat=15, rounds=rounds)
        binary_overhead = m["binary"] - m["runtime"]
        rows.append(("1x3x224x224 binary: handler minus runtime", binary_overhead, "<= 2 ms",
                     f"runtime call {m['runtime']:.2f} ms; body {len(binary_body) / 1e6:.2f} MB", binary_overhead <= 2, "ms"))
        json_overhead = m["json"] - m["runtime"]
        rows.append(("1x3x224x224 JSON: handler minus runtime", json_overhead, f"<= orjson {m['orjson']:.2f} ms",
                     f"orjson decode+encode of the tensors {m['orjson']:.2f} ms; body {len(json_body) / 1e6:.1f} MB",
                     json_overhead <= m["orjson"], "ms"))
    return rows


# the bundle's own top-level package, as Lambda imports it: not slimserve.lambda_handlers, whose parent package
# (importlib.metadata for its version, the editable install's finder) Lambda never loads
COLD_HANDLER = """
import json, sys, time
started = time.perf_counter()
from lambda_handlers.handler import handler
response = handler(json.loads(sys.argv[1]), None)
assert response["statusCode"] == 200, response
print(json.dumps({"ms": (time.perf_counter() - started) * 1000}), file=sys.stderr)
"""

COLD_FLOOR = {
    "onnx": """
import json, sys, time
started = time.perf_counter()
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
session.run(None, {"features": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)})
print(json.dumps({"ms": (time.perf_counter() - started) * 1000}), file=sys.stderr)
""",
    "tflite": """
import json, sys, time
started = time.perf_counter()
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[2])
interpreter.allocate_tensors()
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.zeros((1, 64), np.float32))
interpreter.invoke()
interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
print(json.dumps({"ms": (time.perf_counter() - started) * 1000}), file=sys.stderr)
""",
}


def _process_ms(script: str, args: list[str], env: dict) -> float:
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd="/", capture_output=True, text=True, check=True)
    return json.loads(result.stderr.strip().splitlines()[-1])["ms"]


def cold_init(runs: int) -> list[tuple]:
    with tempfile.TemporaryDirectory() as folder:  # the function's code as Lambda gets it, bytecode beside it
        return _cold_init(function_bundle(Path(folder), sys.executable), runs)


def _cold_init(bundle: Path, runs: int) -> list[tuple]:
    rows = []
    cases = [
        ("iris", "onnx", {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}),
        ("digits", "tflite", {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}),
    ]
    for name, model_format, request in cases:
        path = MODELS / f"{name}.{model_format}"
        env = {**os.environ, "PYTHONPATH": str(bundle), **file_environment(path)}
        event = json.dumps(rest_event("POST", f"/v2/models/{name}/infer", json.dumps(request).encode(), {"Content-Type": "application/json"}))
        handler_ms, floor_ms = [], []
        for _ in range(runs):  # alternate, so both see the same disk cache and machine load
            floor_ms.append(_process_ms(COLD_FLOOR[model_format], [event, str(path)], env))
            handler_ms.append(_process_ms(COLD_HANDLER, [event, str(path)], env))
        handler, floor = statistics.median(handler_ms), statistics.median(floor_ms)
        rows.append((f"{name} cold init, handler / floor ({model_format})", handler / floor, "<= 1.2x",
                     f"handler {handler:.0f} ms, floor {floor:.0f} ms (import + session + one run)", handler / floor <= 1.2, "x"))
    return rows
