"""A large model's load on Lambda: peak memory and time of the function's own path (the S3 object streamed to a
file, the session built from it) beside reading the object into bytes first, in the same run.

The model is an MLP of 2048x2048 fp32 layers (16 MiB each) generated here, never committed, stored in the local S3.
Each load runs in a fresh process with numpy, ONNX Runtime and boto3 already imported, so the peak it adds is the
model's.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from slimserve.assets import function_bundle
from slimserve.local.s3 import local_s3
from slimserve.registry.versions import Registry

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
WIDTH, LAYERS = 2048, 12  # 192 MiB of weights
PEAK_TARGET = 1.3  # issue 16: peak RSS during load at most 1.3x the weights

# VmHWM, not ru_maxrss: a child's ru_maxrss keeps the high-water mark of the parent it was forked from
LOAD = """
import json, os, sys, time
import boto3, numpy, onnxruntime
def high_water_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
base = high_water_kib()
started = time.perf_counter()
if sys.argv[1] == "function":
    from lambda_handlers.function import ModelFunction
    assert ModelFunction(os.environ).model.ready
else:
    from lambda_handlers.runtimes import OnnxModel
    body = boto3.client("s3").get_object(Bucket=os.environ["SLIMSERVE_MODEL_BUCKET"], Key=os.environ["SLIMSERVE_MODEL_KEY"])
    OnnxModel(body["Body"].read())
elapsed = time.perf_counter() - started
print(json.dumps({"s": elapsed, "mib": (high_water_kib() - base) / 1024}))
"""


def mlp(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    nodes, weights, tensor = [], [], "x"
    for index in range(LAYERS):
        weights.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH), dtype=np.float32), f"w{index}"))
        nodes.append(helper.make_node("MatMul", [tensor, f"w{index}"], [f"h{index}"]))
        tensor = f"h{index}"
    graph = helper.make_graph(nodes, "large-mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, ["batch", WIDTH])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def load_peaks(runs: int) -> list[tuple]:
    model = mlp(BUILD / "large-mlp.onnx")
    weights_mib = LAYERS * WIDTH * WIDTH * 4 / 2**20
    with local_s3() as store, tempfile.TemporaryDirectory() as folder:
        stored = Registry(store.client(), store.bucket).register(model, "large")[0].stored(store.bucket)
        env = {**os.environ, **store.environment, **stored.environment(), "PYTHONPATH": str(function_bundle(Path(folder), None))}
        samples: dict[str, list[dict]] = {"function": [], "bytes": []}
        for _ in range(runs):  # alternated, so both see the same page cache and machine load
            for mode, found in samples.items():
                result = subprocess.run([sys.executable, "-c", LOAD, mode], env=env, cwd="/", capture_output=True, text=True, check=True)
                found.append(json.loads(result.stdout.strip().splitlines()[-1]))
    peak = {mode: statistics.median(s["mib"] for s in found) / weights_mib for mode, found in samples.items()}
    seconds = {mode: statistics.median(s["s"] for s in found) for mode, found in samples.items()}
    return [(f"Lambda load of a {weights_mib:.0f} MiB model: peak RSS / weights", peak["function"], f"<= {PEAK_TARGET}x",
             f"streamed to /tmp and loaded from the file in {seconds['function']:.2f} s; read into bytes first: "
             f"{peak['bytes']:.2f}x, {seconds['bytes']:.2f} s; median of {runs}", peak["function"] <= PEAK_TARGET, "x")]
