"""Tensor datatypes: the V2 protocol's names, numpy's dtypes and TF Serving's names."""

from typing import NamedTuple

import numpy as np

# V2 datatype -> numpy dtype. BYTES is an object array of Python bytes.
V2_TO_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}

V2_TO_TFSERVING = {
    "BOOL": "DT_BOOL",
    "UINT8": "DT_UINT8",
    "UINT16": "DT_UINT16",
    "UINT32": "DT_UINT32",
    "UINT64": "DT_UINT64",
    "INT8": "DT_INT8",
    "INT16": "DT_INT16",
    "INT32": "DT_INT32",
    "INT64": "DT_INT64",
    "FP16": "DT_HALF",
    "FP32": "DT_FLOAT",
    "FP64": "DT_DOUBLE",
    "BYTES": "DT_STRING",
}


def v2_datatype(dtype) -> str:
    """The V2 name of a numpy dtype; strings of any kind are BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no V2 datatype") from None


class TensorSpec(NamedTuple):
    """One input or output of a model; -1 in `shape` marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def shape_matches(self, shape) -> bool:
        return len(shape) == len(self.shape) and all(want == -1 or want == got for want, got in zip(self.shape, shape))


class Signature(NamedTuple):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)
