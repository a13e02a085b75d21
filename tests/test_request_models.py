"""Signature checks at the API's door: each model's V2 request schema, made at synth from its signature, refuses what
the core refuses for a wrong name, datatype or shape, never refuses what the core takes, and is attached to the infer
methods with a gateway response in the core's {"error": "..."} shape."""

import json

import numpy as np
import pytest
import tritonclient.http as triton
from aws_cdk import assertions
from jsonschema import Draft4Validator
from support import MODELS, ROOT, call

from slimserve.config import load_config, parse_config
from slimserve.contract.schema import BAD_REQUEST_BODY_TEMPLATE, REFUSED, v2_request_schema
from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.runtimes import load_model
from slimserve.modelfiles import model_files
from slimserve.registry.store import describe
from slimserve.stacks.app import build_app


def signature_of(path) -> dict:
    return describe(model_files(path))["signature"]


EXAMPLES = {path.stem: path for path in (MODELS / "iris.onnx", MODELS / "digits.tflite")}


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def example(request):
    """An example model: its name, the core serving it, and the schema the API checks its requests with."""
    path = EXAMPLES[request.param]
    core = InferenceCore([ServedModel(request.param, "1", runtime=load_model(path.read_bytes(), path.suffix.lstrip(".")))])
    return request.param, core, Draft4Validator(v2_request_schema(request.param, signature_of(path)))


def tensor(name, datatype, shape, data=None):
    item = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        item["data"] = data
    return item


def good_bodies(name: str, core: InferenceCore) -> list[bytes]:
    """Requests the core answers with 200: tritonclient's own JSON, several batch sizes, outputs asked for or not."""
    runtime = core.models[name]["1"].runtime
    spec = runtime.signature.inputs[0]
    bodies = []
    for rows in (1, 3, 8):
        array = np.zeros((rows, *spec.shape[1:]), np.float32)
        for outputs in (None, [spec.name for spec in runtime.signature.outputs][:1]):
            item = triton.InferInput(spec.name, list(array.shape), spec.datatype)
            item.set_data_from_numpy(array, binary_data=False)
            requested = [triton.InferRequestedOutput(o, binary_data=False) for o in outputs] if outputs else None
            body, _ = triton.InferenceServerClient.generate_request_body([item], requested, request_id=f"r{rows}")
            bodies.append(body)
    nested = {"id": "x", "parameters": {"priority": 1}, "inputs": [tensor(spec.name, spec.datatype, [1, *spec.shape[1:]],
                                                                          np.zeros((1, *spec.shape[1:])).tolist())]}
    bodies.append(json.dumps(nested).encode())
    return bodies


def test_the_schema_takes_every_body_the_core_answers(example):
    name, core, validator = example
    for body in good_bodies(name, core):
        assert call(core, "POST", f"/v2/models/{name}/infer", body)[0] == 200
        assert list(validator.iter_errors(json.loads(body))) == [], body[:200]


def bad_bodies(spec, output: str) -> dict[str, tuple[dict, bool]]:
    """Bodies the core refuses, and whether the schema refuses them too (False: only the core can tell)."""
    width = spec.shape[1]
    row = [0.0] * width
    good = tensor(spec.name, spec.datatype, [1, width], row)
    return {
        "unknown input": ({"inputs": [{**good, "name": "petals"}]}, True),
        "wrong datatype": ({"inputs": [{**good, "datatype": "INT64"}]}, True),
        "unknown datatype": ({"inputs": [{**good, "datatype": "FLOAT"}]}, True),
        "wrong rank": ({"inputs": [{**good, "shape": [width]}]}, True),
        "wrong size of a fixed dimension": ({"inputs": [{**good, "shape": [1, width - 1], "data": row[:-1]}]}, True),
        "negative dimension": ({"inputs": [{**good, "shape": [-1, width]}]}, True),
        "shape not a list": ({"inputs": [{**good, "shape": "1x4"}]}, True),
        "missing datatype": ({"inputs": [{k: v for k, v in good.items() if k != "datatype"}]}, True),
        "missing shape": ({"inputs": [{k: v for k, v in good.items() if k != "shape"}]}, True),
        "missing name": ({"inputs": [{k: v for k, v in good.items() if k != "name"}]}, True),
        "missing inputs": ({"id": "x"}, True),
        "empty inputs": ({"inputs": []}, True),
        "inputs not a list": ({"inputs": good}, True),
        "request not an object": ([good], True),
        "id not a string": ({"id": 7, "inputs": [good]}, True),
        "parameter not a scalar": ({"parameters": {"p": [1]}, "inputs": [good]}, True),
        "unknown output": ({"inputs": [good], "outputs": [{"name": "scores"}]}, True),
        "output without a name": ({"inputs": [good], "outputs": [{}]}, True),
        # what JSON Schema cannot say, the core still refuses
        "data not filling the shape": ({"inputs": [{**good, "shape": [2, width]}]}, False),
        "input given twice": ({"inputs": [good, good]}, False),
        "strings where numbers go": ({"inputs": [{**good, "data": ["0"] * width}]}, False),
        "missing data": ({"inputs": [{k: v for k, v in good.items() if k != "data"}]}, False),
        "output asked for twice": ({"inputs": [good], "outputs": [{"name": output}, {"name": output}]}, False),
    }


def test_the_schema_and_the_core_agree_on_every_bad_body(example):
    name, core, validator = example
    runtime = core.models[name]["1"].runtime
    for case, (body, schema_refuses) in bad_bodies(runtime.signature.inputs[0], runtime.signature.outputs[0].name).items():
        status, answer, _ = call(core, "POST", f"/v2/models/{name}/infer", json.dumps(body).encode())
        assert status == 400, (case, answer)
        assert validator.is_valid(body) is not schema_refuses, (case, [e.message for e in validator.iter_errors(body)])


def test_a_model_with_several_inputs_checks_each_by_its_name():
    signature = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 2]}, {"name": "b", "datatype": "INT64", "shape": [-1]}],
                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}]}
    validator = Draft4Validator(v2_request_schema("two", signature))
    a, b = tensor("a", "FP32", [1, 2], [0, 0]), tensor("b", "INT64", [1], [0])
    assert validator.is_valid({"inputs": [a, b]}) and validator.is_valid({"inputs": [b, a]})
    assert not validator.is_valid({"inputs": [{**a, "datatype": "INT64"}, b]})  # a's datatype is not b's
    assert not validator.is_valid({"inputs": [a, {**b, "shape": [1, 2]}]})
    assert not validator.is_valid({"inputs": [a, {**b, "name": "c"}]})


def test_the_gateway_response_renders_the_cores_error_shape():
    """API Gateway's VTL, as it renders: escapeJavaScript escapes ' as \\' and " as \\", and replaceAll undoes the first."""
    validation = '[instance value ("petals") not found in enum (possible values: ["features"]) at \'inputs\']'
    escaped = validation.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    rendered = BAD_REQUEST_BODY_TEMPLATE.replace(
        '$util.escapeJavaScript($context.error.validationErrorString).replaceAll("\\\\\'","\'")', escaped.replace("\\'", "'"))
    assert json.loads(rendered) == {"error": f"{REFUSED}: {validation}"}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checked")
    (folder / "iris.onnx").write_bytes((MODELS / "iris.onnx").read_bytes())
    config = parse_config({"app": {"name": "checked"}, "models": {
        "iris": {"format": "onnx", "artifact": "iris.onnx"},
        "big": {"format": "onnx", "artifact": "iris.onnx", "target": "sagemaker",
                "sagemaker": {"image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/slimserve-gpu:1"}}}}, folder / "slimserve.toml")
    stack = build_app(config).node.find_child(config.name)
    return assertions.Template.from_stack(stack), assertions.Template.from_stack(stack.shards[0])


def test_synth_attaches_each_models_schema_to_its_infer_methods(templates):
    app_stack, shard = templates
    schema = v2_request_schema("iris", signature_of(MODELS / "iris.onnx"))
    for template, model, infer_paths in ((shard, "iris", ["infer"]), (app_stack, "big", ["infer", "1"])):
        models = template.find_resources("AWS::ApiGateway::Model")
        (model_id,) = [key for key in models if model in key]
        properties = models[model_id]["Properties"]
        assert properties["ContentType"] == "application/json"
        assert properties["Schema"] == {**schema, "title": f"{model} V2 inference request"}
        methods = template.find_resources("AWS::ApiGateway::Method", {"Properties": {"RequestModels": {"application/json": {"Ref": model_id}}}})
        assert len(methods) == len(infer_paths), methods.keys()
        assert all(m["Properties"]["HttpMethod"] == "POST" and "RequestValidatorId" in m["Properties"] for m in methods.values())
    app_stack.has_resource_properties("AWS::ApiGateway::GatewayResponse", {
        "ResponseType": "BAD_REQUEST_BODY", "StatusCode": "400", "ResponseTemplates": {"application/json": BAD_REQUEST_BODY_TEMPLATE}})


def test_the_example_app_checks_both_its_models():
    config = load_config(ROOT / "slimserve.toml")
    stack = build_app(config).node.find_child(config.name)
    models = assertions.Template.from_stack(stack.shards[0]).find_resources("AWS::ApiGateway::Model")
    assert sorted(model["Properties"]["Schema"]["title"] for model in models.values()) == [
        "digits V2 inference request", "iris V2 inference request"]


def post(stack, path: str, body: bytes, content_type: str | None = "application/json") -> tuple[int, dict]:
    """http.client, which sends no Content-Type unless told (urllib would add a form's)."""
    import http.client

    headers = {"x-api-key": stack.gateway.api_key} | ({"Content-Type": content_type} if content_type else {})
    connection = http.client.HTTPConnection(stack.gateway.url.removeprefix("http://"), timeout=60)
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


@pytest.mark.parametrize("path", ["/v2/models/iris/infer", "/v2/models/iris-gpu/infer", "/v2/models/iris-gpu/versions/1/infer"])
def test_the_local_gateway_refuses_what_the_apis_request_model_refuses_before_the_model_runs(mixed_stack, path):
    unknown = json.dumps({"inputs": [tensor("petals", "FP32", [1, 4], [0, 0, 0, 0])]}).encode()
    for content_type in ("application/json", None):
        assert post(mixed_stack, path, unknown, content_type) == (
            400, {"error": f"{REFUSED}: ['petals' is not one of ['features']]"})
    wrong_rank = json.dumps({"inputs": [tensor("features", "FP32", [4], [0, 0, 0, 0])]}).encode()
    status, answer = post(mixed_stack, path, wrong_rank)
    assert status == 400 and answer["error"].startswith(f"{REFUSED}: [[4] is too short")
    # a body the schema cannot judge reaches the model, which says why
    assert post(mixed_stack, path, b'{"inputs": [', "application/json")[0] == 400


def test_versioned_lambda_routes_and_binary_bodies_reach_the_model_unchecked(mixed_stack):
    """The deployed API has no infer resource per Lambda version (the {proxy+} route takes them), and applies models
    to JSON only: the core answers these."""
    unknown = json.dumps({"inputs": [tensor("petals", "FP32", [1, 4], [0, 0, 0, 0])]}).encode()
    assert post(mixed_stack, "/v2/models/iris/versions/1/infer", unknown) == (
        400, {"error": "unknown input 'petals': the model's inputs are 'features'"})
    assert post(mixed_stack, "/v2/models/iris/infer", unknown, "application/octet-stream") == (
        400, {"error": "unknown input 'petals': the model's inputs are 'features'"})


# test_bad_input's bodies, which the Lambda handler refuses: those the iris schema refuses too, by case name
SCHEMA_REFUSES = {"unknown input", "missing input", "missing inputs key", "wrong datatype", "unknown datatype", "wrong shape",
                  "unknown output", "JSON nested too deep"}


def test_the_iris_schema_refuses_the_handlers_bad_bodies_it_can_judge_and_passes_the_rest():
    from test_bad_input import CASES

    validator = Draft4Validator(v2_request_schema("iris", signature_of(MODELS / "iris.onnx")))
    judged = {}
    for case, (path, body, headers, status, _) in CASES.items():
        if path != "/v2/models/iris/infer" or headers.get("Content-Type") != "application/json" or status != 400:
            continue
        try:
            request = json.loads(body)
        except ValueError:
            continue  # not JSON: API Gateway's validator refuses it too ("Invalid request body")
        judged[case] = not validator.is_valid(request)
    assert {case for case, refused in judged.items() if refused} == SCHEMA_REFUSES
    assert len(judged) > len(SCHEMA_REFUSES)  # and some only the model can judge (element counts, value types, ...)
