"""Layer sizes, cold start through the runner, the gateway's warm overhead, and an image as JPEG against tensors."""

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


IMAGE_SIDE = 224
IMAGE_MEAN, IMAGE_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def _image_net(path: Path) -> None:
    """A small seeded classifier over 1x3x224x224 floats: strided convolution, ReLU, average pool, ten logits."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"kernel": (16, 3, 3, 3), "bias": (16,), "head": (16, 10), "head_bias": (10,)}
    nodes = [helper.make_node("Conv", ["pixels", "kernel", "bias"], ["features"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["features"], ["active"]),
             helper.make_node("GlobalAveragePool", ["active"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "head", "head_bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, IMAGE_SIDE, IMAGE_SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(rng.normal(size=size).astype(np.float32), name) for name, size in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _photo_jpeg() -> bytes:
    """A 224x224 JPEG with a photo's detail (smooth shapes under fine texture), at quality 90: about 30 KB, a camera
    thumbnail's size, where a flat test card would compress to almost nothing."""
    import io

    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    shapes = np.stack([np.sin(rows / 17) * 90 + 128, np.cos(columns / 23) * 90 + 128, (rows + columns) / 3.5], -1)
    texture = Image.fromarray(rng.integers(0, 255, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
    texture = np.asarray(texture.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64) - 128
    picture = Image.fromarray(np.clip(shapes + texture, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_requests(requests: int) -> list[tuple]:
    """One 224x224 image as its JPEG (decoded, resized and normalized in the graph, convert --image), as the
    binary tensor of the pixels (the V2 binary extension) and as a JSON tensor, each through the local stack's
    gateway and a Lambda-faithful worker: bytes on the wire, and the median end-to-end latency, interleaved."""
    import numpy as np

    from slimserve.modeltools.convert import Processing, convert_file
    from slimserve.modeltools.processing import ImageInput, read_images

    python, version, _ = lambda_python()
    runtime_dir = build_layer("lambda-runtime", version, out=ROOT / "build" / "layers").python_path
    layer = build_layer(layer_runtime("onnx", version), version, out=ROOT / "build" / "layers").python_path
    jpeg = _photo_jpeg()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "samples").mkdir()
        (folder / "samples" / "photo.jpg").write_bytes(jpeg)
        _image_net(folder / "net.onnx")
        processing = Processing(image=f"{IMAGE_SIDE}x{IMAGE_SIDE}", mean=IMAGE_MEAN, std=IMAGE_STD)
        convert_file(folder / "net.onnx", folder / "samples", folder / "photo.onnx", processing=processing)
        started = time.perf_counter()
        pixels = ImageInput(processing.image, IMAGE_MEAN, IMAGE_STD).pixels(read_images(folder / "samples"), "NCHW")
        client_ms = (time.perf_counter() - started) * 1000
        raw = pixels.astype(np.float32).tobytes()
        header = json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
        bodies = {
            "JPEG": ("photo", jpeg, {"Content-Type": "image/jpeg"}),
            "binary tensor": ("net", header + raw, {"Content-Type": "application/octet-stream",
                                                    "Inference-Header-Content-Length": str(len(header))}),
            "JSON tensor": ("net", json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape),
                                                           "datatype": "FP32", "data": pixels.ravel().tolist()}]}).encode(),
                            {"Content-Type": "application/json"}),
        }
        pools = {name: FunctionPool(FunctionSpec(f"bench-{name}", python, function_bundle(folder / name, python), layer,
                                                 runtime_dir, environment=file_environment(folder / f"{name}.onnx"),
                                                 concurrency=1))
                 for name in ("photo", "net")}
        gateway = LocalGateway({name: Route(pool, api_key_required=False) for name, pool in pools.items()}, port=0,
                               log=lambda line: None)
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        connection = http.client.HTTPConnection(*gateway.server_address[:2])
        logits = {}

        def send(kind: str) -> float:
            model, body, headers = bodies[kind]
            started = time.perf_counter()
            connection.request("POST", f"/v2/models/{model}/infer", body, headers)
            response = connection.getresponse()
            answer = response.read()
            elapsed = (time.perf_counter() - started) * 1000
            assert response.status == 200, answer[:300]
            logits[kind] = next(o["data"] for o in json.loads(answer)["outputs"] if o["name"] == "logits")
            return elapsed

        try:
            timings = {kind: [] for kind in bodies}
            for kind in bodies:
                send(kind)  # the cold start is not what this measures
            for _ in range(requests):
                for kind, times in timings.items():
                    times.append(send(kind))
        finally:
            connection.close()
            gateway.shutdown()
            gateway.server_close()
            for pool in pools.values():
                pool.close()
    sizes = {kind: len(body) for kind, (_, body, _) in bodies.items()}
    medians = {kind: statistics.median(times) for kind, times in timings.items()}
    top = {kind: int(np.argmax(values)) for kind, values in logits.items()}
    spread = np.abs(np.subtract(logits["JPEG"], logits["binary tensor"])).max()
    smaller = sizes["binary tensor"] / sizes["JPEG"]
    latency = medians["JPEG"] / medians["binary tensor"]
    context = (f"JPEG {sizes['JPEG'] / 1024:.1f} KiB, binary tensor {sizes['binary tensor'] / 1024:.0f} KiB, JSON tensor "
               f"{sizes['JSON tensor'] / 1024:.0f} KiB ({sizes['JSON tensor'] / sizes['JPEG']:.0f}x the JPEG)")
    return [
        ("one 224x224 image: binary tensor bytes / JPEG bytes", smaller, ">= 10x", context, smaller >= 10, "x"),
        ("one 224x224 image: JPEG / binary tensor end-to-end latency", latency, "<= 1.0x",
         f"median of {requests}: JPEG {medians['JPEG']:.1f} ms, binary tensor {medians['binary tensor']:.1f} ms, "
         f"JSON tensor {medians['JSON tensor']:.1f} ms; the client's own Pillow decode+resize+normalize for the "
         f"tensors {client_ms:.1f} ms, not counted; top class {'the same' if len(set(top.values())) == 1 else 'differs'}, "
         f"max |logit diff| {spread:.3g}", latency <= 1.0, "x"),
    ]
