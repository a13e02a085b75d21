"""Open Inference Protocol V2 (REST), with the binary tensor data extension.

A binary request is a JSON header of `Inference-Header-Content-Length` bytes
followed by the raw tensors, in input order, each `binary_data_size` bytes long.
"""

import struct
from typing import NamedTuple

import numpy as np

from . import jsoncodec
from .contract import RAW_MEDIA_TYPES
from .datatypes import V2_TO_NUMPY, Signature, TensorSpec
from .errors import InvalidInput
from .tensors import (
    bytes_to_utf8,
    check_spec,
    element_count,
    fit_to_shape,
    json_to_array,
    shape_text,
)

HEADER_LENGTH = "inference-header-content-length"


class RequestedOutput(NamedTuple):
    name: str
    binary: bool


class InferRequest(NamedTuple):
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]


def _header_length(header_length: str, body: bytes) -> int:
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 <= length <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes")
    return length


def _field(obj: dict, key: str, kind, where: str, required: bool = True):
    if key not in obj:
        if required:
            raise InvalidInput(f"{where}: missing {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidInput(f"{where}: {key!r} must be {expected}, got {type(value).__name__}")
    return value


def _parameters(obj: dict, where: str) -> dict:
    parameters = _field(obj, "parameters", dict, where, required=False) or {}
    for key, value in parameters.items():
        if not isinstance(value, (str, int, float, bool)):
            raise InvalidInput(f"{where}: parameter {key!r} must be a string, number or boolean")
    return parameters


def _shape(tensor: dict, where: str) -> tuple[int, ...]:
    shape = _field(tensor, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers, got {shape}")
    return tuple(shape)


def parse_infer(
    body: bytes, header_length: str | None, signature: Signature, content_type: str | None = None
) -> InferRequest:
    media_type = content_type.split(";")[0].strip().lower() if content_type is not None else None
    if media_type in RAW_MEDIA_TYPES:
        return _raw_value_request(body, signature, media_type)
    header, binary = body, b""
    if header_length is not None:
        length = _header_length(header_length, body)
        if length == 0:
            return _raw_request(body, signature)
        header, binary = body[:length], body[length:]
    request = jsoncodec.loads(header, "request body" if header_length is None else "JSON header")
    if not isinstance(request, dict):
        raise InvalidInput(f"request must be a JSON object, got {type(request).__name__}")
    request_id = _field(request, "id", str, "request", required=False)
    binary_output_default = bool(_parameters(request, "request").get("binary_data_output", False))
    tensors = _field(request, "inputs", list, "request")
    if not tensors:
        raise InvalidInput("request: 'inputs' is empty")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise InvalidInput(f"inputs[{position}] must be an object")
        name = _field(tensor, "name", str, f"inputs[{position}]")
        where = f"input {name!r}"
        spec = signature.input(name)
        if spec is None:
            expected = ", ".join(repr(s.name) for s in signature.inputs)
            raise InvalidInput(f"unknown input {name!r}: the model's inputs are {expected}")
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        datatype = _field(tensor, "datatype", str, where)
        if datatype not in V2_TO_NUMPY:
            raise InvalidInput(f"{where}: unknown datatype {datatype!r}; expected one of {', '.join(V2_TO_NUMPY)}")
        shape = _shape(tensor, where)
        check_spec(spec, datatype, shape)
        binary_size = _parameters(tensor, where).get("binary_data_size")
        if binary_size is not None:
            if "data" in tensor:
                raise InvalidInput(f"{where}: has both 'data' and binary_data_size")
            array, offset = _binary_tensor(spec, shape, binary_size, binary, offset)
        else:
            if "data" not in tensor:
                raise InvalidInput(f"{where}: missing 'data' (or a binary_data_size parameter)")
            array = fit_to_shape(name, json_to_array(name, tensor["data"], datatype), shape)
        inputs[name] = array
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes after the JSON header that no input's "
            "binary_data_size accounts for"
        )
    missing = [s for s in signature.inputs if s.name not in inputs]
    if missing:
        spec = missing[0]
        raise InvalidInput(f"missing input {spec.name!r} ({spec.datatype} {shape_text(spec.shape)})")
    return InferRequest(request_id, inputs, _requested_outputs(request, signature, binary_output_default))


def _raw_value_request(body: bytes, signature: Signature, media_type: str) -> InferRequest:
    """A text/plain, image/jpeg or image/png body: one value (a text, an image) for the model's one BYTES input, a
    batch of one. The answer holds every output, as JSON."""
    what = RAW_MEDIA_TYPES[media_type]
    values = [spec for spec in signature.inputs if spec.datatype == "BYTES"]
    if len(signature.inputs) != 1 or not values:
        found = ", ".join(f"{spec.name!r} ({spec.datatype})" for spec in signature.inputs)
        raise InvalidInput(
            f"a {media_type} body is the {what} of a model's one BYTES input; this model takes {found}: "
            "send a JSON request"
        )
    spec = values[0]
    if any(size not in (-1, 1) for size in spec.shape):
        raise InvalidInput(
            f"a {media_type} body is one {what}; input {spec.name!r} takes {shape_text(spec.shape)}: "
            "send a JSON request"
        )
    array = np.empty((1,) * len(spec.shape), dtype=object)
    array.reshape(-1)[0] = body
    return InferRequest(None, {spec.name: array}, tuple(RequestedOutput(out.name, False) for out in signature.outputs))


def _raw_request(body: bytes, signature: Signature) -> InferRequest:
    """Triton's raw binary request (Inference-Header-Content-Length: 0): no JSON header, the whole body is the one
    input's tensor. Its datatype and shape come from the signature; a dynamic first dimension, the batch, from the
    byte count. The answer holds every output, as JSON."""
    if len(signature.inputs) != 1:
        names = ", ".join(repr(spec.name) for spec in signature.inputs)
        raise InvalidInput(
            "Inference-Header-Content-Length is 0 (a raw binary request), which only a model with one input takes; "
            f"this model has {len(signature.inputs)}: {names}"
        )
    spec = signature.inputs[0]
    where = f"raw binary request for input {spec.name!r} ({spec.datatype} {shape_text(spec.shape)})"
    if spec.datatype == "BYTES":
        raise InvalidInput(f"{where}: a BYTES input's shape cannot be told from its bytes; send a JSON header")
    dynamic = [axis for axis, size in enumerate(spec.shape) if size < 0]
    if any(axis > 0 for axis in dynamic):
        raise InvalidInput(
            f"{where}: dimension {max(dynamic)} is dynamic, so the shape cannot be told from the byte count; "
            "send a JSON header"
        )
    dtype = V2_TO_NUMPY[spec.datatype]
    row_bytes = element_count(spec.shape[1:]) * dtype.itemsize
    if dynamic:
        if not body or row_bytes == 0 or len(body) % row_bytes:
            raise InvalidInput(f"{where}: the body has {len(body)} bytes, not a whole number of {row_bytes}-byte rows")
        shape = (len(body) // row_bytes, *spec.shape[1:])
    else:
        shape = spec.shape
        needed = element_count(shape) * dtype.itemsize
        if len(body) != needed:
            raise InvalidInput(f"{where}: the body has {len(body)} bytes but the input needs {needed}")
    array = np.frombuffer(body, dtype=dtype.newbyteorder("<")).reshape(shape)
    return InferRequest(None, {spec.name: array}, tuple(RequestedOutput(out.name, False) for out in signature.outputs))


def _binary_tensor(spec: TensorSpec, shape, size, binary: bytes, offset: int):
    where = f"input {spec.name!r}"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
    end = offset + size
    if end > len(binary):
        raise InvalidInput(
            f"{where}: binary_data_size is {size} but only {len(binary) - offset} bytes remain "
            "after the JSON header and earlier inputs"
        )
    chunk = binary[offset:end]
    if spec.datatype == "BYTES":
        array = np.array(_unpack_bytes(spec.name, chunk), dtype=object)
    else:
        dtype = V2_TO_NUMPY[spec.datatype]
        needed = element_count(shape) * dtype.itemsize
        if size != needed:
            raise InvalidInput(
                f"{where}: binary_data_size is {size} but {spec.datatype} {shape_text(shape)} needs {needed} bytes"
            )
        array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"))
    return fit_to_shape(spec.name, array, shape), end


def _unpack_bytes(name: str, chunk: bytes) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise InvalidInput(f"input {name!r}: BYTES data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise InvalidInput(
                f"input {name!r}: a BYTES element claims {length} bytes but {len(chunk) - offset} remain"
            )
        items.append(chunk[offset : offset + length])
        offset += length
    return items


def _pack_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _requested_outputs(request: dict, signature: Signature, binary_default: bool):
    requested = _field(request, "outputs", list, "request", required=False)
    if not requested:
        return tuple(RequestedOutput(spec.name, binary_default) for spec in signature.outputs)
    outputs: list[RequestedOutput] = []
    for position, item in enumerate(requested):
        if not isinstance(item, dict):
            raise InvalidInput(f"outputs[{position}] must be an object")
        name = _field(item, "name", str, f"outputs[{position}]")
        if signature.output(name) is None:
            expected = ", ".join(repr(s.name) for s in signature.outputs)
            raise InvalidInput(f"unknown output {name!r}: the model's outputs are {expected}")
        if any(output.name == name for output in outputs):
            raise InvalidInput(f"output {name!r} is requested twice")
        parameters = _parameters(item, f"output {name!r}")
        if "classification" in parameters:
            raise InvalidInput(f"output {name!r}: the classification extension is not supported")
        outputs.append(RequestedOutput(name, bool(parameters.get("binary_data", binary_default))))
    return tuple(outputs)


def encode_infer(
    model_name: str, model_version: str, request: InferRequest, results: dict[str, np.ndarray], signature: Signature
) -> tuple[bytes, dict[str, str]]:
    outputs, chunks = [], []
    datatypes = {spec.name: spec.datatype for spec in signature.outputs}
    for wanted in request.outputs:
        array = results[wanted.name]
        datatype = datatypes[wanted.name]
        entry: dict[str, object] = {"name": wanted.name, "datatype": datatype, "shape": list(array.shape)}
        if wanted.binary:
            raw = _pack_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = bytes_to_utf8(array)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    response = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = jsoncodec.dumps(response)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def model_metadata(name: str, versions: list[str], platform: str, signature: Signature) -> dict:
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [spec.describe() for spec in signature.inputs],
        "outputs": [spec.describe() for spec in signature.outputs],
    }
