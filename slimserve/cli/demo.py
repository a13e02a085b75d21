"""`slimserve demo`: the whole local stack, called by real clients, then stopped.

Layers are built (cached), the models go to a local S3 under their sha256, each
Lambda model runs in Lambda-faithful workers behind the local gateway, and
tritonclient and a TF Serving-style client send requests over HTTP.
"""

import json
import statistics
import threading
import time
import urllib.request

import numpy as np

from slimserve.config import AppConfig, ModelConfig
from slimserve.lambda_handlers.datatypes import V2_TO_NUMPY
from slimserve.lambda_handlers.runtimes import load_model
from slimserve.local.s3 import free_port
from slimserve.local.stack import LocalStack
from slimserve.modeltools import examples

HELD_OUT = {"iris": examples.iris_split, "digits": examples.digits_split}
WARM_REQUESTS = 50
DEMO_DIR = "demo"
"""The demo's own folder in build/local: a store and a lock of its own, so a demo never touches, nor waits for, the
project's `slimserve serve`."""


def _sample_inputs(model: ModelConfig, signature) -> tuple[np.ndarray, np.ndarray | None]:
    """The held-out split for the example models (by file name); a zero tensor for anything else."""
    if model.artifact.stem in HELD_OUT:
        _, test_x, _, test_y = HELD_OUT[model.artifact.stem]()
        return test_x, test_y
    spec = signature.inputs[0]
    return np.zeros([1 if dim == -1 else dim for dim in spec.shape], V2_TO_NUMPY[spec.datatype]), None


def _classes(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return outputs["label"] if "label" in outputs else next(iter(outputs.values())).argmax(axis=-1)


def _row_class(row) -> int:
    if isinstance(row, dict):
        row = row["label"] if "label" in row else next(iter(row.values()))
    return int(np.argmax(row)) if isinstance(row, list) else int(row)


def _tf_serving_predict(url: str, name: str, instances: list, api_key: str) -> list:
    request = urllib.request.Request(
        f"{url}/v1/models/{name}:predict",
        data=json.dumps({"instances": instances}).encode(),
        headers={"Content-Type": "application/json", "x-api-key": api_key},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


def demo_model(stack: LocalStack, model: ModelConfig, out) -> bool:
    import tritonclient.http as triton

    gateway = stack.gateway
    headers = {"x-api-key": gateway.api_key}
    client = triton.InferenceServerClient(gateway.url.removeprefix("http://"), network_timeout=60)
    runtime = load_model(model.artifact, model.format)  # the reference the served answers are compared with
    spec = runtime.signature.inputs[0]
    output_names = [o.name for o in runtime.signature.outputs]
    inputs, labels = _sample_inputs(model, runtime.signature)

    def infer(data: np.ndarray, binary: bool):
        tensor = triton.InferInput(spec.name, list(data.shape), spec.datatype)
        tensor.set_data_from_numpy(data, binary_data=binary)
        requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in output_names]
        body_type = (
            {"Content-Type": "application/octet-stream"} if binary else {}
        )  # a binary media type: passed through
        result = client.infer(model.name, [tensor], outputs=requested, headers={**headers, **body_type})
        return {name: result.as_numpy(name) for name in output_names}

    started = time.perf_counter()
    ready = client.is_model_ready(model.name, headers=dict(headers))
    cold_ms = (time.perf_counter() - started) * 1000
    json_outputs, binary_outputs = infer(inputs, binary=False), infer(inputs, binary=True)
    rows = _tf_serving_predict(gateway.url, model.name, inputs[:3].tolist(), gateway.api_key)
    direct = runtime.run({spec.name: inputs}, output_names)
    same = all(
        np.array_equal(direct[n], json_outputs[n]) and np.array_equal(direct[n], binary_outputs[n])
        for n in output_names
    )
    warm = []
    for _ in range(WARM_REQUESTS):
        started = time.perf_counter()
        infer(inputs[:1], binary=True)
        warm.append((time.perf_counter() - started) * 1000)

    where, cold = (
        ("SageMaker serving program", " (model loaded at start)")
        if model.target == "sagemaker"
        else ("Lambda", ", a cold start")
    )
    print(f"\n== {model.name} ({model.format}, {where}) at {gateway.url}/v2/models/{model.name} ==", file=out)
    print(f"  ready: {ready}; first request{cold}: {cold_ms:.0f} ms", file=out)
    print(f"  first 3 predictions (tritonclient, binary): {_classes(binary_outputs)[:3].tolist()}", file=out)
    print(f"  first 3 predictions (TF Serving rows): {[_row_class(row) for row in rows]}", file=out)
    print(f"  JSON and binary answers equal to the runtime's own: {same}", file=out)
    if labels is not None:
        print(
            f"  held-out accuracy through the local stack: {float((_classes(binary_outputs) == labels).mean()):.3f} "
            f"on {len(labels)} samples",
            file=out,
        )
    print(
        f"  warm request, 1 row, client to client: median {statistics.median(warm):.2f} ms of {WARM_REQUESTS}", file=out
    )
    return ready and same


def run_demo(config: AppConfig, out) -> int:
    def log(line: str) -> None:
        if not line.startswith("REPORT") or "Init Duration" in line:  # cold starts only; warm ones are many
            print(line, file=out, flush=True)

    with LocalStack(config, port=free_port(), log=log, work_dir=config.local_dir / DEMO_DIR) as stack:
        threading.Thread(target=stack.serve_forever, daemon=True).start()
        try:
            served = [m for m in config.models if m.name in stack.gateway.routes]
            results = [demo_model(stack, model, out) for model in served]
        finally:
            stack.gateway.shutdown()
    print("\nlocal stack stopped: gateway, workers, serving programs and S3", file=out)
    return 0 if all(results) else 1
