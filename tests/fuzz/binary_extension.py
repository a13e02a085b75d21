"""atheris target: the binary tensor extension through the core, for a model with every datatype.

Run by tests/test_fuzz.py with a bounded number of runs; a crash is an exception escaping the
core or a 5xx answer. The input is split into the Inference-Header-Content-Length value, a JSON
header describing inputs, and the bytes that follow.
"""

import json
import sys

import atheris

with atheris.instrument_imports():
    from slimserve.lambda_handlers.core import InferenceCore, Request, ServedModel
    from slimserve.lambda_handlers.runtimes import OnnxModel

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from support import IDENTITY_TYPES, identity_onnx  # noqa: E402

CORE = InferenceCore([ServedModel("identity", "1", runtime=OnnxModel(identity_onnx(IDENTITY_TYPES)))])
DATATYPES = sorted(IDENTITY_TYPES)


def one_input(data: bytes) -> None:
    source = atheris.FuzzedDataProvider(data)
    inputs = []
    for _ in range(source.ConsumeIntInRange(0, 3)):
        datatype = DATATYPES[source.ConsumeIntInRange(0, len(DATATYPES) - 1)]
        inputs.append({"name": f"in_{datatype.lower()}", "datatype": datatype,
                       "shape": [source.ConsumeIntInRange(0, 3), source.ConsumeIntInRange(0, 4)],
                       "parameters": {"binary_data_size": source.ConsumeIntInRange(0, 64)}})
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": source.ConsumeBool()}}).encode()
    length = str(len(header) + source.ConsumeIntInRange(-4, 4)) if source.ConsumeBool() else source.ConsumeUnicodeNoSurrogates(4)
    body = header + source.ConsumeBytes(source.remaining_bytes())
    response = CORE.handle(Request("POST", "/v2/models/identity/infer", {"inference-header-content-length": length}, body))
    if response.status >= 500:
        raise AssertionError(f"{response.status}: {response.body[:300]!r} for {body[:300]!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
