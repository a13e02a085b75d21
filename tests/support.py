"""What the tests share besides fixtures: where things are, model builders, and helpers to call the core, run an
extra venv or a local stack. Fixtures live in conftest.py; tests import these by name."""

import contextlib
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimserve.lambda_handlers.core import InferenceCore, Request

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

def run_in_extra_venv(extra: str, *args: str) -> subprocess.CompletedProcess:
    """Python in the venv `make test` builds for a heavy optional extra (.venv-EXTRA, or SLIMSERVE_EXTRA_PYTHON)."""
    python = os.environ.get(f"SLIMSERVE_{extra.upper()}_PYTHON") or str(ROOT / f".venv-{extra}" / "bin" / "python")
    if not os.path.exists(python):
        pytest.fail(f"{python}: no {extra} venv; `make test` builds it (make .venv-{extra}/.installed)")
    return subprocess.run([python, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"})


# Every V2 datatype, as the ONNX element type an identity model passes through unchanged.
IDENTITY_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity_onnx(datatypes: dict[str, int], shape=("batch", 3)) -> bytes:
    """An ONNX model echoing one input per datatype: `in_<type>` -> `out_<type>`."""
    nodes, inputs, outputs = [], [], []
    for name, elem in datatypes.items():
        lower = name.lower()
        inputs.append(helper.make_tensor_value_info(f"in_{lower}", elem, list(shape)))
        outputs.append(helper.make_tensor_value_info(f"out_{lower}", elem, list(shape)))
        nodes.append(helper.make_node("Identity", [f"in_{lower}"], [f"out_{lower}"]))
    graph = helper.make_graph(nodes, "identity", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def call(core: InferenceCore, method: str, path: str, body=b"", headers=None):
    """One request through the core; returns (status, decoded JSON or raw bytes, response)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    response = core.handle(Request(method, path, headers or {}, body))
    if response.headers.get("Content-Type") == "application/json":
        return response.status, json.loads(response.body), response
    return response.status, response.body, response


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    """Values that survive a round trip for `datatype`, with each type's extremes."""
    from slimserve.lambda_handlers.datatypes import V2_TO_NUMPY

    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        return np.array([[b"a", b"\xc3\xa9t\xc3\xa9", b""]] * rows, dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True]] * rows)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, 0, info.max]] * rows, dtype=dtype)
    return np.array([[-1.5, 0.0, 3.25]] * rows, dtype=dtype)


@contextlib.contextmanager
def running_stack(config: Path, work_dir: Path):
    """A local stack serving from a thread, with the lines it logged (`lines`) and its `work_dir` on it."""
    from slimserve.config import load_config
    from slimserve.local.s3 import free_port
    from slimserve.local.stack import LocalStack

    lines = []
    with LocalStack(load_config(config), port=free_port(), log=lines.append, work_dir=work_dir) as running:
        threading.Thread(target=running.serve_forever, daemon=True).start()
        running.lines, running.work_dir = lines, work_dir
        yield running
        running.gateway.shutdown()


def convert_error(capsys, *args) -> str:
    """`slimserve convert ARGS`, which must refuse in one line on stderr with exit status 2; that line."""
    from slimserve.cli import main

    assert main(["convert", *map(str, args)]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1, printed.err
    return printed.err
