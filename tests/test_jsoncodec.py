import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support import MODELS, ROOT

from slimserve.lambda_handlers import jsoncodec
from slimserve.lambda_handlers.errors import InvalidInput


@pytest.mark.parametrize("text, depth", [
    ('{"a": [1, 2, {"b": []}]}', 4),
    ('{"id": "' + "[" * 200 + '"}', 1),
    ('{"id": "\\"[[[[", "x": [[1]]}', 3),
    ('{"id": "\\\\", "x": [[1]]}', 3),
    ('{"id": "\\\\\\"{{{{", "x": [1]}', 2),
    ("[]", 1),
    ("3", 0),
])
def test_depth_ignores_brackets_inside_strings(monkeypatch, text, depth):
    assert jsoncodec.loads(text.encode()) == json.loads(text)
    monkeypatch.setattr(jsoncodec, "MAX_JSON_DEPTH", 0)  # every nesting is now too deep, and the error says how deep
    if depth == 0:
        assert jsoncodec.loads(text.encode()) == json.loads(text)
    else:
        with pytest.raises(InvalidInput, match=rf"^request body nests JSON {depth} levels deep; the limit is 0$"):
            jsoncodec.loads(text.encode())


def test_strings_full_of_brackets_are_not_mistaken_for_nesting():
    body = json.dumps({"id": "[" * 500, "inputs": []}).encode()
    assert jsoncodec.loads(body) == {"id": "[" * 500, "inputs": []}


def test_depth_limit_is_exact():
    assert jsoncodec.loads(b"[" * 64 + b"]" * 64) is not None
    with pytest.raises(InvalidInput, match=r"^request body nests JSON 65 levels deep; the limit is 64$"):
        jsoncodec.loads(b"[" * 65 + b"]" * 65)


def test_core_answers_the_same_without_orjson():
    """A layer built without orjson falls back to the standard library with identical answers."""
    script = (
        "import sys, json\n"
        "sys.modules['orjson'] = None\n"
        "from lambda_handlers import jsoncodec\n"
        "assert jsoncodec.orjson is None\n"
        "from lambda_handlers.core import InferenceCore, Request, ServedModel\n"
        "from lambda_handlers.runtimes import load_model\n"
        f"core = InferenceCore([ServedModel('iris', '1', runtime=load_model({str(MODELS / 'iris.onnx')!r}, 'onnx'))])\n"
        "for body in sys.stdin.read().split('\\n'):\n"
        "    r = core.handle(Request('POST', '/v2/models/iris/infer', {}, body.encode()))\n"
        "    print(r.status, json.dumps(json.loads(r.body), sort_keys=True))\n"
    )
    bodies = [
        json.dumps({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]}),
        '{"inputs": [',
        '{"inputs": ' + "[" * 80 + "]" * 80 + "}",
    ]
    fallback = subprocess.run([sys.executable, "-c", script], input="\n".join(bodies), cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    status = [line.split(" ", 1)[0] for line in fallback]
    assert status == ["200", "400", "400"]
    assert json.loads(fallback[0].split(" ", 1)[1])["outputs"][0]["data"] == [0, 2]
    assert json.loads(fallback[1].split(" ", 1)[1])["error"].startswith("request body is not valid JSON: ")
    assert json.loads(fallback[2].split(" ", 1)[1]) == {"error": "request body nests JSON 81 levels deep; the limit is 64"}


@pytest.mark.parametrize("with_orjson", [True, False])
def test_non_finite_tokens_are_taken_only_when_asked_for_with_or_without_orjson(monkeypatch, with_orjson):
    if not with_orjson:
        monkeypatch.setattr(jsoncodec, "orjson", None)
    parsed = jsoncodec.loads(b"[NaN, Infinity, -Infinity, 1]", non_finite=True)
    assert np.isnan(parsed[0]) and parsed[1:] == [float("inf"), float("-inf"), 1]
    with pytest.raises(InvalidInput, match="^request body is not valid JSON: "):
        jsoncodec.loads(b"[NaN]")
    assert jsoncodec.dumps({"x": np.array([np.nan, np.inf, -1.5], np.float32)}, non_finite=True) == b'{"x":[NaN,Infinity,-1.5]}'
