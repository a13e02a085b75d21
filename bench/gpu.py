"""`python -m bench.gpu`: the serving bench on a GPU machine: the serving program with batching on and off, and
Triton (PyTriton) where `--pytriton-python` names a Python that has it, on two models: a ResNet-18-shaped CNN
(large requests, where copies cost as much as the run) and a wide MLP (small requests, heavy compute: where
batching should pay).

Prints the GPU, the ONNX Runtime provider the server says it runs on, and per model and concurrency the
throughput, p50/p99 and the GPU's utilization sampled by nvidia-smi during the run, then the targets: batching
on at least matches off at every concurrency, and on the MLP at 32 clients reaches 1.5x off and 1.5x PyTriton.
Refuses (exit 2, one line) where there is no GPU or onnxruntime cannot run on CUDA.
"""

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from . import serving
from .table import print_table

IMAGE_SHAPE = (3, 224, 224)
DISTINCT_IMAGES = 16
# ~1.1 GB of fp32 weights read per call: a lone row keeps the GPU as busy as a batch of 32 does
HEAVY_MLP_WIDTHS = (256, 8192, 8192, 8192, 8192, 8192, 16)
TOLERANCE = 2e-2  # cuDNN's kernels (TF32 where allowed) against the CPU reference, relative to the logits' scale


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = result.stdout.strip().splitlines()
    return names[0].strip() if result.returncode == 0 and names else None


def refusal() -> str | None:
    """Why this machine cannot run the bench, or None."""
    if gpu_name() is None:
        return "bench.gpu: no NVIDIA GPU here (nvidia-smi missing or lists none); run it on a GPU machine"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return (f"bench.gpu: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                f"({', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu in place of onnxruntime")
    return None


def resnet_onnx(path: Path, widths=(64, 128, 256, 512), blocks_per_stage: int = 2, classes: int = 1000) -> Path:
    """A ResNet-18-shaped CNN over batch x 3 x 224 x 224 (no batch norm), seeded, logits out: enough work to keep a GPU busy."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights = [], []

    def conv(source: str, name: str, channels_in: int, channels_out: int, kernel: int, stride: int, relu: bool = True) -> str:
        scale = np.sqrt(2 / (channels_in * kernel * kernel)) * (1 if relu else 0.5)
        weights.append(numpy_helper.from_array(rng.normal(0, scale, (channels_out, channels_in, kernel, kernel)).astype(np.float32), f"{name}_w"))
        weights.append(numpy_helper.from_array(np.zeros(channels_out, np.float32), f"{name}_b"))
        nodes.append(helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [name], strides=[stride, stride], pads=[kernel // 2] * 4))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}_relu"]))
        return f"{name}_relu"

    stem = conv("image", "stem", IMAGE_SHAPE[0], widths[0], 7, 2)
    nodes.append(helper.make_node("MaxPool", [stem], ["pooled"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    features, channels = "pooled", widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks_per_stage):
            name, stride = f"stage{stage}_block{block}", 2 if stage and not block else 1
            residual = conv(conv(features, f"{name}_a", channels, width, 3, stride), f"{name}_b", width, width, 3, 1, relu=False)
            shortcut = features if stride == 1 and channels == width else conv(features, f"{name}_down", channels, width, 1, stride, relu=False)
            nodes.append(helper.make_node("Add", [residual, shortcut], [f"{name}_sum"]))
            nodes.append(helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"]))
            features, channels = f"{name}_out", width
    weights += [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(channels), (channels, classes)).astype(np.float32), "dense_w"),
                numpy_helper.from_array(np.zeros(classes, np.float32), "dense_b")]
    nodes += [helper.make_node("GlobalAveragePool", [features], ["global"]),
              helper.make_node("Flatten", ["global"], ["flat"]),
              helper.make_node("Gemm", ["flat", "dense_w", "dense_b"], ["logits"])]
    graph = helper.make_graph(
        nodes, "resnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=weights,
    )
    return serving.write_model(graph, path)


def v2_binary_request(name: str):
    """Requests carrying the input `name` as raw bytes behind a V2 JSON header, as Triton's clients send tensors: no
    JSON number parsing."""
    def encode(row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        data = np.ascontiguousarray(row, np.float32).tobytes()
        header = orjson.dumps({"inputs": [{"name": name, "shape": list(row.shape), "datatype": "FP32",
                                           "parameters": {"binary_data_size": len(data)}}]})
        return header + data, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return encode


@contextlib.contextmanager
def gpu_utilization(interval_ms: int = 100) -> Iterator[list[float]]:
    """The GPU's busy percentage, sampled by nvidia-smi while the block runs; the list fills when it ends."""
    samples: list[float] = []
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", str(interval_ms)],
                               stdout=subprocess.PIPE, text=True)
    try:
        yield samples
    finally:
        sampler.terminate()
        output, _ = sampler.communicate()
        samples += [float(line.split(",")[0]) for line in output.splitlines() if line.strip()]


def provider_used(log_path: Path) -> str:
    """What the serving program logged choosing its ONNX Runtime provider."""
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("message", "").startswith("ONNX Runtime runs on "):
                return record["message"].removeprefix("ONNX Runtime runs on ")
    return "unknown (no provider line in the server's log)"


@dataclass
class Workload:
    name: str
    model: Path
    rows: np.ndarray
    input_name: str
    batching_pays: bool  # small requests, heavy compute: the 1.5x targets apply


def workloads() -> list[Workload]:
    rng = np.random.default_rng(1)
    return [
        Workload("ResNet-18-shaped CNN, 0.6 MB requests", resnet_onnx(serving.BUILD / "resnet.onnx"),
                 rng.random((DISTINCT_IMAGES, *IMAGE_SHAPE), dtype=np.float32), "image", batching_pays=False),
        Workload(f"MLP {'-'.join(map(str, HEAVY_MLP_WIDTHS))}, 1 KB requests",
                 serving.mlp_onnx(serving.BUILD / "heavy-mlp.onnx", HEAVY_MLP_WIDTHS),
                 rng.random((serving.DISTINCT_INPUTS, HEAVY_MLP_WIDTHS[0]), dtype=np.float32), "features",
                 batching_pays=True),
    ]


def measure_workload(workload: Workload, seconds: float, rounds: int, pytriton_python: str | None) -> list[tuple] | str:
    """The workload's rows and targets, or why it could not run."""
    encode = v2_binary_request(workload.input_name)
    on, off = (serving.slimserve_contender(f"{workload.name}: slimserve, batching {state}", workload.model, size, encode)
               for state, size in (("on", serving.MAX_BATCH_SIZE), ("off", 1)))
    contenders = [on, off]
    if pytriton_python:
        peer = serving.pytriton_contender(workload.model, pytriton_python, providers=CUDA_PROVIDERS)
        peer.name, peer.encode = f"{workload.name}: {peer.name}", encode
        contenders.append(peer)
    expected = serving.reference_outputs(workload.model, workload.rows)
    with contextlib.ExitStack() as stack:
        for contender in contenders:
            log = stack.enter_context(serving.running(contender))
            if contender.stats and (provider := provider_used(log)) != "CUDAExecutionProvider":
                return f"bench.gpu: the serving program runs on {provider}, not CUDA; see {log}"
        cells = serving.measure(contenders, workload.rows, expected, seconds, rounds, tolerance=TOLERANCE,
                                during_run=gpu_utilization)
    rows = [serving.cell_row(name, concurrency, cell, f"; GPU {np.median(cell.extras):.0f}% busy")
            for (name, concurrency), cell in cells.items()]
    for concurrency in serving.CONCURRENCIES:
        ratio = cells[on.name, concurrency].median("throughput") / cells[off.name, concurrency].median("throughput")
        target = 1.5 if workload.batching_pays and concurrency == serving.CONCURRENCIES[-1] else 1.0
        rows.append((f"{workload.name}: batching on / off, {concurrency} clients", ratio, f">= {target}x",
                     "throughput", ratio >= target, "x"))
    if pytriton_python:
        most = serving.CONCURRENCIES[-1]
        ours, theirs = cells[on.name, most], cells[contenders[-1].name, most]
        ratio = ours.median("throughput") / theirs.median("throughput")
        rows.append((f"{workload.name}: slimserve batched / PyTriton, {most} clients", ratio, ">= 1.5x" if workload.batching_pays else "report",
                     f"{ours.median('throughput'):.0f} vs {theirs.median('throughput'):.0f} req/s; GPU "
                     f"{np.median(ours.extras):.0f}% vs {np.median(theirs.extras):.0f}% busy", ratio >= 1.5 or not workload.batching_pays, "x"))
    return rows


CUDA_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu")
    parser.add_argument("--seconds", type=float, default=10, help="each timed run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--pytriton-python", help="a Python with nvidia-pytriton and onnxruntime-gpu: Triton as the peer")
    args = parser.parse_args(argv)
    reason = refusal()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    print(f"GPU: {gpu_name()}")
    rows: list[tuple] = []
    for workload in workloads():
        measured = measure_workload(workload, args.seconds, args.rounds, args.pytriton_python)
        if isinstance(measured, str):
            print(measured, file=sys.stderr)
            return 2
        rows += measured
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
