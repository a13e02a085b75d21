"""One API contract: the OpenAPI document, the core's routes and the stacks' declared routes agree, the
local gateway serves it, and schemathesis fuzzing the local stack through it finds no server error."""

import json
import re
import subprocess
import urllib.error
import urllib.request

import pytest
from aws_cdk import aws_apigateway as apigw
from openapi_spec_validator import validate
from support import ROOT

from slimserve.config import load_config
from slimserve.contract.openapi import openapi_document
from slimserve.lambda_handlers.contract import ROUTES
from slimserve.lambda_handlers.core import InferenceCore, Request, ServedModel
from slimserve.stacks.app import build_app


def operations(document: dict, name: str, version: str) -> list[tuple[str, str]]:
    """Every documented (method, path), for one model and version."""
    return [(method.upper(), path.replace("{model_name}", name).replace("{model_version}", version))
            for path, methods in document["paths"].items() for method in methods]


def test_the_document_is_valid_openapi_and_covers_every_route_of_the_core():
    document = openapi_document()
    validate(document)
    assert len(operations(document, "m", "1")) == len(ROUTES) + sum("{model}" in template for _, template, _ in ROUTES)
    assert document["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"]["post"]["requestBody"]["content"].keys() == {
        "application/json", "application/octet-stream", "text/plain", "image/jpeg", "image/png"}


def test_every_documented_operation_reaches_its_route_in_the_core(iris):
    core = InferenceCore([ServedModel("iris", "1", runtime=iris)])
    for method, path in operations(openapi_document(), "iris", "1"):
        response = core.handle(Request(method, path, {"content-type": "application/json"}, b"{}" if method == "POST" else b""))
        assert response.status in (200, 400), (method, path, response.body)  # 400: an empty request, not a missing route


def declared_routes(app) -> list[tuple[str, re.Pattern]]:
    """(method, path pattern) for every method the app's API declares, {proxy+} matching any rest of the path."""
    routes = []
    for construct in app.node.find_all():
        if isinstance(construct, apigw.Method):
            pattern = re.escape(construct.resource.path).replace(re.escape("{proxy+}"), ".+")
            routes.append((construct.http_method, re.compile(pattern)))
    return routes


@pytest.mark.parametrize("config", ["slimserve.toml", "examples/with-sagemaker.toml"])
def test_the_stacks_declare_every_documented_operation_for_every_model(config):
    app_config = load_config(ROOT / config)
    declared = declared_routes(build_app(app_config))
    document = openapi_document()
    for model in app_config.models:
        for method, path in operations(document, model.name, "1"):
            assert any(verb in (method, "ANY") and pattern.fullmatch(path) for verb, pattern in declared), (model.name, method, path)


def test_the_local_gateway_serves_the_document_for_its_models(mixed_stack):
    with urllib.request.urlopen(f"{mixed_stack.gateway.url}/openapi.json", timeout=30) as response:
        served = json.loads(response.read())
    assert served == json.loads(json.dumps(openapi_document(mixed_stack.gateway.url, ["iris", "iris-gpu"])))


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_through_the_contract(mixed_stack, tmp_path):
    gateway = mixed_stack.gateway
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "schemathesis"), "run", f"{gateway.url}/openapi.json", "--checks", "not_a_server_error",
         "--header", f"x-api-key: {gateway.api_key}", "--max-examples", "25", "--seed", "20261125", "--workers", "1",
         "--report", "junit", "--report-dir", str(tmp_path), "--warnings", "off"],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Tested: 15" in result.stdout, result.stdout[-3000:]  # every operation, both models


@pytest.mark.parametrize("path, answer", [
    ("/v2/models/iris", (405, {"error": "TRACE is not allowed on /v2/models/iris; use GET"})),  # Lambda: the core says so
    ("/v2/models/iris-gpu", (403, {"message": "Missing Authentication Token"})),  # SageMaker: no such route on the API
    ("/v2/health/live", (405, {"error": "TRACE is not allowed on /v2/health/live; use GET"})),
])
def test_methods_no_route_takes_are_refused_not_a_server_error(mixed_stack, path, answer):
    request = urllib.request.Request(mixed_stack.gateway.url + path, method="TRACE", headers={"x-api-key": mixed_stack.gateway.api_key})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert (refused.value.code, json.loads(refused.value.read())) == answer
