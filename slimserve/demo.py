"""`slimserve demo`: the example models through the real Lambda handler, no AWS account.

Each Lambda-target model is uploaded to a local S3 under its sha256, a handler is
initialised from the environment a deployed function gets, and API Gateway events
carry V2 JSON, V2 binary and TF Serving requests through it.
"""

import contextlib
import io
import json
import statistics
import time
from types import SimpleNamespace

import numpy as np

from lambda_handlers.datatypes import V2_TO_NUMPY
from lambda_handlers.function import ModelFunction

from . import examples
from .apigw import http_api_event, response_body, rest_event
from .config import AppConfig
from .local_s3 import local_s3
from .store import upload_model

HELD_OUT = {"iris": examples.iris_split, "digits": examples.digits_split}


def _sample_inputs(model_name: str, signature) -> tuple[np.ndarray, np.ndarray | None]:
    """The held-out split for the example models; a zero tensor for anything else."""
    if model_name in HELD_OUT:
        _, test_x, _, test_y = HELD_OUT[model_name]()
        return test_x, test_y
    spec = signature.inputs[0]
    shape = [1 if dim == -1 else dim for dim in spec.shape]
    return np.zeros(shape, V2_TO_NUMPY[spec.datatype]), None


def v2_binary_body(name: str, array: np.ndarray, datatype: str, outputs: list[str]) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(array).tobytes()
    header = json.dumps(
        {
            "inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        }
    ).encode()
    return header + raw, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def _decode_v2_binary(body: bytes, header_length: int) -> dict[str, np.ndarray]:
    header = json.loads(body[:header_length])
    arrays, offset = {}, header_length
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = V2_TO_NUMPY[output["datatype"]]
        arrays[output["name"]] = np.frombuffer(body[offset : offset + size], dtype).reshape(output["shape"])
        offset += size
    return arrays


def _predicted_classes(outputs: dict[str, np.ndarray]) -> np.ndarray:
    if "label" in outputs:
        return outputs["label"]
    return next(iter(outputs.values())).argmax(axis=-1)


def _row_class(row) -> int:
    if isinstance(row, dict):
        row = row["label"] if "label" in row else next(iter(row.values()))
    return int(np.argmax(row)) if isinstance(row, list) else int(row)


def _invoke(function: ModelFunction, event: dict) -> dict:
    """Call the handler as Lambda does, with a context carrying the request id."""
    return function(event, SimpleNamespace(aws_request_id=event["requestContext"]["requestId"]))


def demo_model(function: ModelFunction, out) -> None:
    name = function.model.name
    runtime = function.model.require_ready()
    spec = runtime.signature.inputs[0]
    output_names = [o.name for o in runtime.signature.outputs]
    inputs, labels = _sample_inputs(name, runtime.signature)

    body = json.dumps({"id": "demo-1", "inputs": [{"name": spec.name, "shape": list(inputs.shape), "datatype": spec.datatype, "data": inputs.tolist()}]}).encode()
    response = _invoke(function, rest_event("POST", f"/v2/models/{name}/infer", body, {"Content-Type": "application/json"}))
    v2_json = json.loads(response_body(response))
    json_outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in v2_json["outputs"]}

    body, headers = v2_binary_body(spec.name, inputs, spec.datatype, output_names)
    response = _invoke(function, rest_event("POST", f"/v2/models/{name}/infer", body, headers))
    binary_outputs = _decode_v2_binary(response_body(response), int(response["headers"]["Inference-Header-Content-Length"]))

    tfs_body = json.dumps({"instances": inputs[:3].tolist()}).encode()
    response = _invoke(function, http_api_event("POST", f"/v1/models/{name}:predict", tfs_body, {"content-type": "application/json"}))
    predictions = json.loads(response_body(response))["predictions"]

    direct = runtime.run({spec.name: inputs}, output_names)
    same = all(np.array_equal(direct[n], binary_outputs[n]) and np.allclose(direct[n], json_outputs[n]) for n in output_names)

    warm = []
    single = json.dumps({"inputs": [{"name": spec.name, "shape": [1, *inputs.shape[1:]], "datatype": spec.datatype, "data": inputs[:1].tolist()}]}).encode()
    event = rest_event("POST", f"/v2/models/{name}/infer", single, {"Content-Type": "application/json"})
    for _ in range(200):
        started = time.perf_counter()
        _invoke(function, event)
        warm.append((time.perf_counter() - started) * 1000)

    print(f"\n== {name} ({runtime.format}, {runtime.platform}) ==", file=out)
    print(f"  model load at init (S3 fetch + sha256 + session): {function.load_ms:.1f} ms", file=out)
    print(f"  V2 JSON request id echoed: {v2_json.get('id')!r}; {len(inputs)} rows", file=out)
    print(f"  first 3 predictions (V2 binary): {_predicted_classes(binary_outputs)[:3].tolist()}", file=out)
    print(f"  first 3 predictions (TF Serving rows): {[_row_class(row) for row in predictions]}", file=out)
    print(f"  handler outputs equal to the runtime's own: {same}", file=out)
    if labels is not None:
        accuracy = float((_predicted_classes(binary_outputs) == labels).mean())
        print(f"  held-out accuracy through the handler: {accuracy:.3f}", file=out)
    print(f"  warm request, 1 row, median of 200: {statistics.median(warm):.3f} ms", file=out)


def run_demo(config: AppConfig, out) -> int:
    lambda_models = [m for m in config.models if m.target == "lambda"]
    with local_s3() as s3:
        print(f"local S3 (moto) at {s3.endpoint}, bucket {s3.bucket}", file=out)
        for model in lambda_models:
            stored = upload_model(s3.client(), s3.bucket, model)
            print(f"uploaded {model.name}: s3://{stored.bucket}/{stored.key} ({stored.size} bytes)", file=out)
            telemetry_lines = io.StringIO()
            with contextlib.redirect_stdout(telemetry_lines):
                function = ModelFunction({**stored.environment(), "AWS_LAMBDA_FUNCTION_NAME": f"{config.name}-{model.name}"})
                if not function.model.ready:
                    print(f"{model.name} failed to load: {function.model.failure}", file=out)
                    return 1
                demo_model(function, out)
            lines = telemetry_lines.getvalue().splitlines()
            emf = [line for line in lines if '"_aws"' in line]
            print(f"  handler wrote {len(lines)} JSON log lines, {len(emf)} with EMF metrics; the first:\n  {emf[0]}", file=out)
    skipped = [m.name for m in config.models if m.target != "lambda"]
    if skipped:
        print(f"\nnot run here (target sagemaker): {', '.join(skipped)}", file=out)
    return 0
