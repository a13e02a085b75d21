"""Turning request data into arrays, checked against the model's signature.

Both protocols funnel through here, so a wrong dtype or shape gets the same
message whether it came as a V2 tensor or a TF Serving instance.
"""

import base64
import binascii

import numpy as np

from .datatypes import NUMPY_TO_V2, V2_TO_NUMPY, TensorSpec
from .errors import InvalidInput


def shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def element_count(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_spec(spec: TensorSpec, datatype: str, shape) -> None:
    if datatype != spec.datatype:
        raise InvalidInput(f"input {spec.name!r}: expected datatype {spec.datatype}, got {datatype}")
    if not spec.shape_matches(shape):
        raise InvalidInput(
            f"input {spec.name!r}: expected shape {shape_text(spec.shape)} (-1 is any size), got {shape_text(shape)}"
        )


def _describe_kind(array: np.ndarray) -> str:
    return {
        "U": "strings",
        "S": "strings",
        "b": "booleans",
        "f": "fractional numbers",
        "i": "integers",
        "u": "integers",
    }.get(array.dtype.kind, "values that are not numbers (null, objects or mixed types)")


def json_to_array(name: str, data, datatype: str) -> np.ndarray:
    """Convert JSON data (nested or flat lists) to `datatype`, refusing lossy or wrong values."""
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        return _bytes_array(name, data)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: data is ragged or mixes lists and scalars") from None
    if array.size == 0:
        return array.astype(dtype)
    if dtype.kind in "iu" and array.dtype.kind in "fO":
        array = _exact_integers(name, data, array, dtype)
    kind = array.dtype.kind
    if datatype == "BOOL":
        allowed = "b"
    elif dtype.kind == "f":
        allowed = "iuf"
    else:
        allowed = "iu"
    if kind not in allowed:
        raise InvalidInput(f"input {name!r}: expected {datatype} values, found {_describe_kind(array)}")
    if dtype.kind in "iu":
        low, high = array.min(), array.max()
        _check_range(name, dtype, low)
        _check_range(name, dtype, high)
    return array.astype(dtype, copy=False)


def _exact_integers(name: str, data, inferred: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """numpy infers float64 or object for integers beyond int64 (UINT64's upper half); keep them exact."""
    items = np.array(data, dtype=object).reshape(-1)
    if not all(type(item) is int for item in items):
        return inferred  # genuinely fractional or mixed: the kind check below names it
    for item in items:
        _check_range(name, dtype, item)
    return np.array(items.tolist(), dtype=dtype).reshape(inferred.shape)


def _check_range(name: str, dtype: np.dtype, value) -> None:
    info = np.iinfo(dtype)
    if not info.min <= value <= info.max:
        raise InvalidInput(
            f"input {name!r}: values must lie in [{info.min}, {info.max}] for {NUMPY_TO_V2[dtype]}, found {value}"
        )


def _bytes_array(name: str, data) -> np.ndarray:
    try:
        array = np.array(data, dtype=object)
    except ValueError:
        raise InvalidInput(f"input {name!r}: data is ragged or mixes lists and scalars") from None
    flat = array.reshape(-1)
    for index, item in enumerate(flat):
        if isinstance(item, str):
            flat[index] = item.encode()
        elif isinstance(item, dict) and set(item) == {"b64"}:
            flat[index] = _b64(name, item["b64"])
        elif not isinstance(item, bytes):
            raise InvalidInput(f"input {name!r}: BYTES elements must be strings, found {type(item).__name__}")
    return array


def _b64(name: str, text) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"input {name!r}: a b64 value must be a string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise InvalidInput(f"input {name!r}: invalid base64: {exc}") from None


def fit_to_shape(name: str, array: np.ndarray, shape) -> np.ndarray:
    """V2 data may be flat or nested; either way its element count must match `shape`."""
    needed = element_count(shape)
    if array.size != needed:
        raise InvalidInput(f"input {name!r}: shape {shape_text(shape)} needs {needed} elements, data has {array.size}")
    return array.reshape(shape)


def bytes_to_utf8(array: np.ndarray) -> list:
    """BYTES outputs as JSON strings (flat); raw bytes that are not UTF-8 come back base64 encoded."""
    out: list[str | dict[str, str]] = []
    for item in array.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        try:
            out.append(raw.decode())
        except UnicodeDecodeError:
            out.append({"b64": base64.b64encode(raw).decode()})
    return out
