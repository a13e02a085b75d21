"""What ships to Lambda imports only the standard library, numpy and the runtimes."""

import ast
import sys

from support import ROOT

# boto3/botocore come with the Lambda Python runtime; orjson is an optional part of the layer.
ALLOWED = {"numpy", "onnxruntime", "ai_edge_litert", "tflite_runtime", "orjson", "boto3", "botocore"}


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


# Not on Lambda's path: the SageMaker serving program's and the local gateway's Prometheus metrics, and the serving
# program's HTTP parser.
OFF_LAMBDA = {"prometheus.py": {"prometheus_client"}, "sagemaker_server.py": {"httptools"}}


def lambda_closure() -> set[str]:
    """The package's modules the Lambda handler imports, directly or through one another."""
    package = ROOT / "lambda_handlers"
    seen, todo = set(), ["handler.py"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((package / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                modules = [node.module] if node.module else [alias.name for alias in node.names]
                todo += [f"{module}.py" for module in modules if (package / f"{module}.py").exists()]
    return seen


def test_lambda_code_imports_only_stdlib_numpy_and_runtimes():
    files = sorted((ROOT / "lambda_handlers").glob("*.py"))
    assert files
    foreign = {
        (path.name, module)
        for path in files
        for module in imported_modules(path)
        if module not in sys.stdlib_module_names and module not in ALLOWED | OFF_LAMBDA.get(path.name, set())
    }
    assert foreign == set()


def test_the_lambda_handler_never_imports_what_is_off_lambdas_path():
    closure = lambda_closure()
    assert {"handler.py", "function.py", "core.py", "v2.py", "tfserving.py"} <= closure
    assert closure.isdisjoint(OFF_LAMBDA) and "sagemaker_server.py" not in closure


def _pins(path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.lower().split("==") for line in lines if line)


def test_layer_recipes_pin_what_the_tests_run():
    tested = _pins(ROOT / "requirements.lock")
    for recipe in ("onnx.txt", "tflite.txt"):
        layer = _pins(ROOT / "layers" / recipe)
        assert layer == {name: tested[name] for name in layer}, recipe
    assert _pins(ROOT / "layers" / "tflite-py311.txt") == _pins(ROOT / "requirements-tflite-runtime.lock")


# The dependency rule: each part imports only parts of a lower tier, or its own package.
#   0 runtime    lambda_handlers: what runs in Lambda and the SageMaker image (its `contract` module holds what the
#                deploy side must agree on, standard library only)
#   1 contract   config, a model's files, the registry and store layout, the API's events and OpenAPI document,
#                the layer builder, package data, the error base
#   2 stacks | local stack | model tools: siblings, none imports another (the stacks never emulate, the local
#                stack never synthesizes)
#   3 CLI        the command line, the demo, and the pinned CDK CLI it drives
TIERS = {
    "slimserve.lambda_handlers": 0,
    "slimserve.errors": 1, "slimserve.assets": 1, "slimserve.config": 1, "slimserve.contract": 1,
    "slimserve.modelfiles": 1, "slimserve.registry": 1, "slimserve.layers": 1,
    "slimserve.stacks": 2, "slimserve.local": 2, "slimserve.modeltools": 2,
    "slimserve.cli": 3, "slimserve.cdk_cli": 3, "slimserve.__main__": 3, "slimserve": 3,
}
# From the runtime, the stacks read only the contract: never the serving code (numpy, the runtimes, batching).
STACKS_MAY_IMPORT_FROM_RUNTIME = {"slimserve.lambda_handlers.contract"}
FOLDERS = {"slimserve": ROOT / "slimserve", "slimserve.lambda_handlers": ROOT / "lambda_handlers",
           "slimserve.stacks": ROOT / "stacks", "slimserve.layers": ROOT / "layers", "slimserve.serving": ROOT / "serving"}


def _modules():
    """Every installed module by dotted name, with its file."""
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            name = ".".join((package, *parts))
            if package == "slimserve" and any(name.startswith(other + ".") or name == other for other in FOLDERS if other != package):
                continue  # not there: mapped from its own folder
            yield name, path


def _part(module: str) -> str:
    return max((part for part in TIERS if module == part or module.startswith(part + ".")), key=len)


def _slimserve_imports(module: str, path):
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("slimserve"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            if target.startswith("slimserve"):
                # `from slimserve.x import y` may name a module y: count the deeper one where it is a module
                yield from (f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target for alias in node.names)


MODULES = dict(_modules())


def test_dependencies_point_one_way():
    wrong = set()
    for module, path in MODULES.items():
        part = _part(module)
        for imported in _slimserve_imports(module, path):
            other = _part(imported)
            if other == part or (TIERS[other] == TIERS[part] != 2):  # tier 2's parts are siblings; other tiers are one part
                continue
            if TIERS[other] >= TIERS[part]:
                wrong.add(f"{module} (tier {TIERS[part]}) imports {imported} (tier {TIERS[other]})")
            elif part == "slimserve.stacks" and other == "slimserve.lambda_handlers" and imported not in STACKS_MAY_IMPORT_FROM_RUNTIME:
                wrong.add(f"{module} imports {imported}: the stacks read only the runtime's contract")
    assert sorted(wrong) == []


def test_the_runtime_contract_needs_nothing_but_the_standard_library():
    contract = ROOT / "lambda_handlers" / "contract.py"
    assert {module for module in imported_modules(contract)} <= set(sys.stdlib_module_names)
    relative = {node.module for node in ast.walk(ast.parse(contract.read_text())) if isinstance(node, ast.ImportFrom) and node.level}
    assert relative == {"errors"} and set(imported_modules(ROOT / "lambda_handlers" / "errors.py")) == set()


def test_every_part_of_the_package_has_its_tier():
    """A new module or package under slimserve/ is placed in the rule on purpose, not by falling under `slimserve`."""
    parts = {f"slimserve.{path.stem}" for path in (ROOT / "slimserve").iterdir()
             if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()}
    assert parts - set(TIERS) == set()
