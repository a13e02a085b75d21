"""What ships to Lambda imports only the standard library, numpy and the runtimes."""

import ast
import sys

from conftest import ROOT

# boto3/botocore come with the Lambda Python runtime; orjson is an optional part of the layer.
ALLOWED = {"numpy", "onnxruntime", "ai_edge_litert", "tflite_runtime", "orjson", "boto3", "botocore"}


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_lambda_code_imports_only_stdlib_numpy_and_runtimes():
    files = sorted((ROOT / "lambda_handlers").glob("*.py"))
    assert files
    foreign = {
        (path.name, module)
        for path in files
        for module in imported_modules(path)
        if module not in sys.stdlib_module_names and module not in ALLOWED
    }
    assert foreign == set()


def _pins(path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.lower().split("==") for line in lines if line)


def test_layer_recipes_pin_what_the_tests_run():
    tested = _pins(ROOT / "requirements.lock")
    for recipe in ("onnx.txt", "tflite.txt"):
        layer = _pins(ROOT / "layers" / recipe)
        assert layer == {name: tested[name] for name in layer}, recipe
    assert _pins(ROOT / "layers" / "tflite-py311.txt") == _pins(ROOT / "requirements-tflite-runtime.lock")
