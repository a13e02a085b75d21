"""Layer sizes, cold start through the runner, and the gateway's warm overhead."""

import contextlib
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from slimserve.assets import function_bundle
from slimserve.contract.apigw import rest_event
from slimserve.lambda_handlers.function import ModelFunction
from slimserve.layers.builder import build_layer
from slimserve.local.gateway import LocalGateway, Route
from slimserve.local.runner import FunctionPool, FunctionSpec, lambda_python
from slimserve.local.stack import layer_runtime
from slimserve.registry.store import file_environment

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
# The ONNX layer carries onnxruntime-extensions (about 7 MiB) for the pre- and post-processing convert puts in graphs.
LAYER_TARGETS_MIB = {"onnx": 100, "tflite": 60}
IRIS_REQUEST = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()

FLOOR = """
import sys, numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
session.run(None, {"features": np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)})
print("done", flush=True)
sys.stdin.read()
"""


def layer_sizes() -> list[tuple]:
    rows = []
    for runtime, target in LAYER_TARGETS_MIB.items():
        for architecture in ("x86_64", "arm64"):
            layer = build_layer(runtime, "3.12", architecture, out=ROOT / "build" / "layers")
            slim, naive = layer.slim_bytes / 2**20, layer.naive_bytes / 2**20
            rows.append((f"{runtime} layer, python3.12 {architecture} (MiB unzipped)", slim, f"<= {target} MiB",
                         f"naive install {naive:.1f} MiB ({slim / naive:.0%}); pyc {layer.pyc}; smoke {layer.smoke}",
                         slim <= target, "MiB"))
    return rows


# A process with the function's code and the layer: import the runtime, load one model, answer once.
RUNTIME_COLD = """
import json, sys, time
started = time.perf_counter()
import numpy as np
from lambda_handlers.runtimes import OnnxModel
model = OnnxModel(sys.argv[1])
model.run({"text": np.array(["Some Text"], dtype=object)}, ["out"])
print(json.dumps({"ms": (time.perf_counter() - started) * 1000}))
"""


def _text_graph(path: Path, domain: str) -> None:
    """text -> lower case: ONNX's own StringNormalizer, or onnxruntime-extensions' StringLower (their library)."""
    from onnx import TensorProto, helper

    node = (helper.make_node("StringLower", ["text"], ["out"], domain=domain) if domain
            else helper.make_node("StringNormalizer", ["text"], ["out"], case_change_action="LOWER", locale="C.UTF-8"))
    graph = helper.make_graph([node], "lower", [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
                              [helper.make_tensor_value_info("out", TensorProto.STRING, ["N"])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path.write_bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())


def extensions_cold_init(runs: int) -> list[tuple]:
    """A model whose graph uses onnxruntime-extensions' operators against one that does not, both from the same
    layer: the extensions' library is loaded only for the first."""
    from slimserve.lambda_handlers.runtimes import EXTENSIONS_DOMAIN

    python, version, _ = lambda_python()
    layer = build_layer(layer_runtime("onnx", version), version, out=ROOT / "build" / "layers").python_path
    with tempfile.TemporaryDirectory() as folder:
        bundle = function_bundle(Path(folder), python)
        plain, extended = Path(folder) / "plain.onnx", Path(folder) / "extended.onnx"
        _text_graph(plain, ""), _text_graph(extended, EXTENSIONS_DOMAIN)
        env = {"PYTHONPATH": f"{bundle}:{layer}"}
        timings = {plain: [], extended: []}
        for _ in range(runs):  # alternate, so both see the same disk cache and machine load
            for model, times in timings.items():
                done = subprocess.run([python, "-S", "-c", RUNTIME_COLD, str(model)], env=env, capture_output=True,
                                      text=True, check=True)
                times.append(json.loads(done.stdout)["ms"])
    with_extensions, without = statistics.median(timings[extended]), statistics.median(timings[plain])
    return [(f"cold init with onnxruntime-extensions' operators / without (onnx layer, python{version})",
             with_extensions / without, "<= 1.2x",
             f"{with_extensions:.0f} ms against {without:.0f} ms (import + load + one run)",
             with_extensions / without <= 1.2, "x")]


def _floor_ms(python: str, layer: Path) -> float:
    """Same Python, same layer, nothing else: spawn -> import + session + one run."""
    started = time.perf_counter()
    process = subprocess.Popen([python, "-S", "-c", FLOOR, str(MODELS / "iris.onnx")], env={"PYTHONPATH": str(layer)},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "done"
    elapsed = (time.perf_counter() - started) * 1000
    process.communicate("")
    return elapsed


def cold_and_warm(runs: int, warm_requests: int) -> list[tuple]:
    python, version, note = lambda_python()
    runtime_dir = build_layer("lambda-runtime", version, out=ROOT / "build" / "layers").python_path
    layer = build_layer(layer_runtime("onnx", version), version, out=ROOT / "build" / "layers").python_path
    event = rest_event("POST", "/v2/models/iris/infer", IRIS_REQUEST, {"Content-Type": "application/json"})
    with tempfile.TemporaryDirectory() as folder:
        spec = FunctionSpec("bench-iris", python, function_bundle(Path(folder), python), layer, runtime_dir,
                            environment=file_environment(MODELS / "iris.onnx"), concurrency=1)
        runner_ms, floor_ms = [], []
        for _ in range(runs):
            floor_ms.append(_floor_ms(python, layer))
            pool = FunctionPool(spec)
            started = time.perf_counter()
            result = pool.invoke(event)
            runner_ms.append((time.perf_counter() - started) * 1000)
            assert result.error is None and result.payload["statusCode"] == 200, result
            pool.close()
        cold, floor = statistics.median(runner_ms), statistics.median(floor_ms)
        rows = [("cold start through the runner / floor", cold / floor, "<= 1.2x",
                 f"runner {cold:.0f} ms (spawn -> first response), floor {floor:.0f} ms; {note}", cold / floor <= 1.2, "x")]
        rows.append(_warm_overhead(spec, event, warm_requests))
    return rows


def _warm_overhead(spec: FunctionSpec, event: dict, requests: int) -> tuple:
    """HTTP through gateway and runner against calling the handler in-process, on the same request."""
    pool = FunctionPool(spec)
    gateway = LocalGateway({"iris": Route(pool, api_key_required=False)}, port=0, log=lambda line: None)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        function = ModelFunction(spec.environment)
    connection = http.client.HTTPConnection(*gateway.server_address[:2])

    def through_gateway():
        connection.request("POST", "/v2/models/iris/infer", IRIS_REQUEST, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.read()

    def in_process():
        with contextlib.redirect_stdout(sink):
            function(event, None)

    try:
        through_gateway()  # the cold start is not what this measures
        with open(os.devnull, "w") as sink:
            gateway_ms, process_ms = [], []
            for _ in range(requests):
                for samples, call in ((gateway_ms, through_gateway), (process_ms, in_process)):
                    started = time.perf_counter()
                    call()
                    samples.append((time.perf_counter() - started) * 1000)
    finally:
        connection.close()
        gateway.shutdown()
        gateway.server_close()
        pool.close()
    overhead = statistics.median(gateway_ms) - statistics.median(process_ms)
    return ("warm: gateway + runner minus in-process handler", overhead, "<= 1 ms",
            f"through HTTP {statistics.median(gateway_ms):.2f} ms, in-process {statistics.median(process_ms):.3f} ms",
            overhead <= 1, "ms")
