"""TF Serving's REST API: `:predict` in row (`instances`) or columnar (`inputs`) form.

TF Serving requests carry no datatypes; values are converted to the datatype in
the model's signature, with the same checks as V2 JSON tensors.
"""

import base64
from typing import NamedTuple

import numpy as np

from . import jsoncodec
from .datatypes import V2_TO_TFSERVING, Signature
from .errors import InvalidInput
from .tensors import bytes_to_utf8, check_spec, json_to_array

SIGNATURE_NAME = "serving_default"


class PredictRequest(NamedTuple):
    inputs: dict[str, np.ndarray]
    row_format: bool


def _named_values(value, signature: Signature, where: str) -> dict:
    """A bare value feeds the model's only input; an object names each input."""
    names = [spec.name for spec in signature.inputs]
    if isinstance(value, dict) and set(value) != {"b64"}:
        unknown = [key for key in value if signature.input(key) is None]
        if unknown:
            raise InvalidInput(f"unknown input {unknown[0]!r} in {where}: the model's inputs are {names}")
        missing = [name for name in names if name not in value]
        if missing:
            raise InvalidInput(f"missing input {missing[0]!r} in {where}")
        return value
    if len(names) != 1:
        raise InvalidInput(f"{where} must be an object naming each of the model's inputs {names}")
    return {names[0]: value}


def parse_predict(body: bytes, signature: Signature) -> PredictRequest:
    request = jsoncodec.loads(body, non_finite=True)  # TF Serving's JSON takes NaN, Infinity and -Infinity
    if not isinstance(request, dict):
        raise InvalidInput(f"request must be a JSON object, got {type(request).__name__}")
    signature_name = request.get("signature_name", SIGNATURE_NAME)
    if signature_name != SIGNATURE_NAME:
        raise InvalidInput(f"unknown signature_name {signature_name!r}: expected {SIGNATURE_NAME!r}")
    if ("instances" in request) == ("inputs" in request):
        raise InvalidInput("request must have exactly one of 'instances' (row format) or 'inputs' (columnar format)")

    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list")
        rows = [_named_values(row, signature, f"instances[{i}]") for i, row in enumerate(instances)]
        columns = {spec.name: [row[spec.name] for row in rows] for spec in signature.inputs}
    else:
        columns = _named_values(request["inputs"], signature, "'inputs'")

    inputs = {}
    for spec in signature.inputs:  # the values name exactly these inputs: _named_values made sure
        array = json_to_array(spec.name, columns[spec.name], spec.datatype)
        check_spec(spec, spec.datatype, array.shape)
        inputs[spec.name] = array
    return PredictRequest(inputs, row_format="instances" in request)


def _values(name: str, array: np.ndarray):
    if array.dtype == object:
        items = bytes_to_utf8(array)
        if name.endswith("_bytes"):  # TF Serving's rule for binary outputs
            items = [{"b64": base64.b64encode(s.encode()).decode()} if isinstance(s, str) else s for s in items]
        return np.array(items, dtype=object).reshape(array.shape).tolist()
    return array


def encode_predict(request: PredictRequest, results: dict[str, np.ndarray]) -> bytes:
    """TF Serving's answer; NaN and the infinities are written as its tokens, as it writes them."""
    non_finite = any(array.dtype.kind == "f" and not np.isfinite(array).all() for array in results.values())
    if not request.row_format:
        if len(results) == 1:
            ((name, array),) = results.items()
            payload = {"outputs": _values(name, array)}
        else:
            payload = {"outputs": {name: _values(name, array) for name, array in results.items()}}
    elif len(results) == 1:
        ((name, array),) = results.items()
        payload = {"predictions": _values(name, array)}
    else:
        batch = {len(array) if array.ndim else 0 for array in results.values()}
        if len(batch) != 1:
            raise InvalidInput("the model's outputs differ in batch size; use the columnar 'inputs' format")
        rows = batch.pop()
        values = {name: _values(name, array) for name, array in results.items()}
        payload = {"predictions": [{name: column[i] for name, column in values.items()} for i in range(rows)]}
    return jsoncodec.dumps(payload, non_finite=non_finite)


def model_status(version: str, ready: bool, reason: str | None) -> dict:
    status = {"error_code": "OK", "error_message": ""}
    if not ready:
        status = {"error_code": "UNAVAILABLE", "error_message": reason or "model is not loaded"}
    return {"model_version_status": [{"version": version, "state": "AVAILABLE" if ready else "END", "status": status}]}


def _tensor_info(spec) -> dict:
    return {
        "dtype": V2_TO_TFSERVING[spec.datatype],
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False},
        "name": spec.name,
    }


def model_metadata(name: str, version: str, signature: Signature) -> dict:
    return {
        "model_spec": {"name": name, "signature_name": "", "version": version},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    SIGNATURE_NAME: {
                        "inputs": {spec.name: _tensor_info(spec) for spec in signature.inputs},
                        "outputs": {spec.name: _tensor_info(spec) for spec in signature.outputs},
                        "method_name": "tensorflow/serving/predict",
                    }
                }
            }
        },
    }
