"""A multi-gigabyte model, past protobuf's 2 GB limit, from register to served: issue 16's bench.

The model is transformer-shaped (LAYERS blocks of MatMul+Add -> GELU -> MatMul+Add, with a residual Add) with
WIDTH-wide fp32 weights, about 2.5 GB, generated here into an external data file (never committed) and
registered into the local S3. Then, each started afresh, alternated:
  - the function in the local stack's Lambda runner (awslambdaric, the layers, Lambda's Python): every file
    streamed from the local S3 to a folder under TMPDIR, checked, the session built from the path; timed from
    the worker's start to its first answer, then warm requests;
  - the SageMaker serving program (lambda_handlers.sagemaker_server) on a model folder as SageMaker mounts
    it, timed from its start to /ping 200, then first and warm requests.
Peak RSS is what the model adds: a process's VmHWM past that of the same process serving a 1 KB model. Last,
`optimize --level fp16` on the model, timed.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from slimserve.assets import function_bundle
from slimserve.contract.apigw import rest_event
from slimserve.layers.builder import build_layer
from slimserve.local.runner import FunctionPool, FunctionSpec, lambda_python
from slimserve.local.s3 import free_port, local_s3
from slimserve.local.stack import layer_runtime
from slimserve.registry.versions import Registry

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench" / "large"
WIDTH, LAYERS = 2048, 19  # 8 x 2048^2 fp32 weights a block: 2.55 GB
PEAK_TARGET = 1.3  # issue 16: peak RSS during load at most 1.3x the weights
WARM_REQUESTS = 20

LAMBDA_MEMORY_MB = 4096  # what the config asks of a function for this model: 128 MB + 1.5x its MiB


def transformer(folder: Path) -> Path:
    """The model, written tensor by tensor into one data file: memory holds one weight at a time."""
    import onnx
    from onnx import TensorProto, helper

    path = folder / "transformer.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    nodes, initializers, x = [], [], "x"
    with open(folder / "transformer.onnx.data", "wb") as data:

        def weight(name: str, shape: tuple[int, ...]) -> str:
            array = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "transformer.onnx.data"), ("offset", data.tell()), ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(value))
            array.tofile(data)
            initializers.append(tensor)
            return name

        for block in range(LAYERS):
            up, down = weight(f"w_up{block}", (WIDTH, 4 * WIDTH)), weight(f"w_down{block}", (4 * WIDTH, WIDTH))
            b_up, b_down = weight(f"b_up{block}", (4 * WIDTH,)), weight(f"b_down{block}", (WIDTH,))
            h = f"h{block}"
            nodes += [helper.make_node("MatMul", [x, up], [f"{h}_up"]), helper.make_node("Add", [f"{h}_up", b_up], [f"{h}_b"]),
                      helper.make_node("Gelu", [f"{h}_b"], [f"{h}_g"]),
                      helper.make_node("MatMul", [f"{h}_g", down], [f"{h}_down"]),
                      helper.make_node("Add", [f"{h}_down", b_down], [f"{h}_d"]),
                      helper.make_node("Add", [x, f"{h}_d"], [f"{h}_out"])]
            x = f"{h}_out"
    graph = helper.make_graph(nodes, "transformer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", WIDTH])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _high_water_mib(pid: int) -> float:
    """VmHWM, not ru_maxrss: a child's ru_maxrss keeps the high-water mark of the parent it was forked from."""
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:")) / 1024


class Function:
    """The function in the Lambda runner, from its worker's start to its first answer."""

    def __init__(self, spec: FunctionSpec, body: bytes, path: str):
        self.event = rest_event("POST", path, body, {"Content-Type": "application/json"})
        self.pool = FunctionPool(spec)
        started = time.perf_counter()
        result = self.pool.invoke(self.event)
        self.first_answer_s = time.perf_counter() - started
        assert result.error is None and result.payload["statusCode"] == 200, result
        self.init_s = result.init_ms / 1000
        self.peak_mib = _high_water_mib(self.pool.workers[0].process.pid)

    def infer_ms(self) -> float:
        started = time.perf_counter()
        assert self.pool.invoke(self.event).payload["statusCode"] == 200
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self.pool.close()


class Program:
    """The SageMaker serving program on a model folder, from its start to /ping 200."""

    def __init__(self, code: Path, model_dir: Path, sha256: str):
        self.port = free_port()
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(code), "SAGEMAKER_BIND_TO_PORT": str(self.port),
               "SLIMSERVE_HOST": "127.0.0.1", "SM_MODEL_DIR": str(model_dir), "SLIMSERVE_MODEL_SHA256": sha256}
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "lambda_handlers.sagemaker_server", "serve"], env=env,
                                        cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5):
                    break
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the serving program exited with {self.process.returncode}") from None
                time.sleep(0.05)
        self.ready_s = time.perf_counter() - self.started
        self.peak_mib = _high_water_mib(self.process.pid)

    def infer_ms(self, body: bytes) -> float:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            response.read()
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def load_peaks(runs: int) -> list[tuple]:
    from slimserve.modelfiles import model_files
    from slimserve.modeltools.optimize import optimize

    model = transformer(BUILD)
    weights = model_files(model).size
    weights_mib = weights / 2**20
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH],
                                   "data": np.random.default_rng(1).standard_normal(WIDTH).tolist()}]}).encode()
    with local_s3() as store, tempfile.TemporaryDirectory(dir=BUILD) as folder:
        registry = Registry(store.client(), store.bucket)
        started = time.perf_counter()
        version, _ = registry.register(model, "large")
        register_s = time.perf_counter() - started
        code = function_bundle(Path(folder) / "code", None)
        model_dir = registry.download("large", "1", Path(folder) / "model").parent
        tiny, _ = registry.register(ROOT / "examples" / "models" / "iris.onnx", "tiny")
        tiny_dir = registry.download("tiny", "1", Path(folder) / "tiny").parent
        python, python_version, _ = lambda_python()
        layers = ROOT / "build" / "layers"
        runtime_dir = build_layer("lambda-runtime", python_version, out=layers).python_path
        layer = build_layer(layer_runtime("onnx", python_version), python_version, out=layers).python_path
        task_root = function_bundle(Path(folder) / "task", python)

        def spec(stored) -> FunctionSpec:
            environment = {**store.environment, **stored.environment(store.bucket), "TMPDIR": folder}
            return FunctionSpec("large", python, task_root, layer, runtime_dir, environment, LAMBDA_MEMORY_MB, 29.0, 1)

        tiny_body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                                            "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
        function, program, first_ms, warm_ms, function_warm_ms = [], [], [], [], []
        for _ in range(runs):  # alternated, so both see the same page cache and machine load
            baseline = Function(spec(tiny), tiny_body, "/v2/models/tiny/infer")
            base_mib = baseline.peak_mib
            baseline.close()
            served = Function(spec(version), body, "/v2/models/large/infer")
            try:
                function_warm_ms.append(statistics.median(served.infer_ms() for _ in range(WARM_REQUESTS)))
                function.append({"s": served.first_answer_s, "init": served.init_s, "mib": served.peak_mib - base_mib})
            finally:
                served.close()
            baseline = Program(code, tiny_dir, tiny.sha256)
            base_mib = baseline.peak_mib
            baseline.close()
            served = Program(code, model_dir, version.sha256)
            try:
                first_ms.append(served.infer_ms(body))
                warm_ms.append(statistics.median(served.infer_ms(body) for _ in range(WARM_REQUESTS)))
                program.append({"s": served.ready_s, "mib": served.peak_mib - base_mib})
            finally:
                served.close()
        started = time.perf_counter()
        samples = Path(folder) / "samples.npy"
        np.save(samples, np.random.default_rng(2).standard_normal((4, WIDTH), dtype=np.float32))
        report = optimize(model, "fp16", samples, float("inf"), Path(folder) / "fp16" / "transformer.onnx", force=True,
                          min_agreement=0)  # gate off: random weights
        optimize_s = time.perf_counter() - started
        shutil.rmtree(Path(folder) / "fp16")

    def median(found, key):
        return statistics.median(sample[key] for sample in found)

    function_peak, program_peak = median(function, "mib") / weights_mib, median(program, "mib") / weights_mib
    size = f"{weights / 1e9:.2f} GB"
    return [
        (f"register a {size} model (2 files) into the local S3", register_s, "report",
         "sha256 of every file, a session for its signature, a multipart upload", True, "s"),
        (f"{size} model, Lambda runner: peak RSS / weights", function_peak, f"<= {PEAK_TARGET}x",
         f"start to first answer {median(function, 's'):.1f} s (init: streamed to /tmp, checked, loaded "
         f"{median(function, 'init'):.1f} s); warm {statistics.median(function_warm_ms):.1f} ms; median of {runs}",
         function_peak <= PEAK_TARGET, "x"),
        (f"{size} model, SageMaker program: peak RSS / weights", program_peak, f"<= {PEAK_TARGET}x",
         f"start to /ping 200 in {median(program, 's'):.1f} s; median of {runs}", program_peak <= PEAK_TARGET, "x"),
        (f"{size} model, SageMaker program: first / warm request", statistics.median(first_ms), "report",
         f"warm {statistics.median(warm_ms):.1f} ms (1 row, JSON, {WARM_REQUESTS} requests), CPU", True, "ms"),
        (f"{size} model, optimize --level fp16", optimize_s, "report",
         f"size {report.optimized.size / report.original.size:.2f}x, max |diff| {report.optimized.max_abs_diff:.3g}, "
         f"on 4 samples (gate off: random weights)", True, "s"),
    ]
