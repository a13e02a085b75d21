"""The local stack end to end: real layers, workers driven by awslambdaric, moto's S3, and
tritonclient and TF Serving-style clients talking to the gateway over HTTP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from support import FIXTURES, ROOT, running_stack

from slimserve.assets import function_bundle
from slimserve.contract.apigw import rest_event
from slimserve.layers.builder import build_layer
from slimserve.local.gateway import LocalGateway, Route
from slimserve.local.runner import FunctionPool, FunctionSpec, lambda_python
from slimserve.local.s3 import free_port
from slimserve.local.stack import layer_runtime

pytestmark = pytest.mark.slow

LAYERS = ROOT / "build" / "layers"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(ROOT / "slimserve.toml", tmp_path_factory.mktemp("local")) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    return triton.InferenceServerClient(stack.gateway.url.removeprefix("http://"), concurrency=16, network_timeout=60)


@pytest.fixture
def key(stack):
    return {"x-api-key": stack.gateway.api_key}  # fresh each test: tritonclient adds its own headers to the dict it is given


def http(stack, method, path, body=None, headers=None):
    request = urllib.request.Request(stack.gateway.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_and_models_are_live_ready_and_described(client, key):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris", headers=key) and client.is_model_ready("digits", "1", headers=key)
    metadata = client.get_model_metadata("digits", headers=key)
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["platform"] == "tflite"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_predictions_equal_the_runtime(client, key, iris, digits, iris_test_split, digits_test_split, binary):
    for name, runtime, (test_x, _), input_name in [("iris", iris, iris_test_split, "features"), ("digits", digits, digits_test_split, "pixels")]:
        infer_input = triton.InferInput(input_name, list(test_x.shape), "FP32")
        infer_input.set_data_from_numpy(test_x, binary_data=binary)
        outputs = [triton.InferRequestedOutput(spec.name, binary_data=binary) for spec in runtime.signature.outputs]
        binary_body = {"Content-Type": "application/octet-stream"} if binary else {}  # as the deployed API needs it
        result = client.infer(name, [infer_input], outputs=outputs, headers={**key, **binary_body}, request_id=f"{name}-{binary}")
        direct = runtime.run({input_name: test_x}, [spec.name for spec in runtime.signature.outputs])
        for output, expected in direct.items():
            np.testing.assert_array_equal(result.as_numpy(output), expected)
        assert result.get_response()["id"] == f"{name}-{binary}"


def test_tf_serving_row_and_columnar(stack, key, iris, iris_test_split):
    test_x, _ = iris_test_split
    headers = {**key, "Content-Type": "application/json"}
    status, rows = http(stack, "POST", "/v1/models/iris:predict", json.dumps({"instances": test_x[:5].tolist()}).encode(), headers)
    status_c, columns = http(stack, "POST", "/v1/models/iris/versions/1:predict", json.dumps({"inputs": test_x[:5].tolist()}).encode(), headers)
    labels = iris.run({"features": test_x[:5]}, ["label"])["label"].tolist()
    assert (status, status_c) == (200, 200)
    assert [row["label"] for row in rows["predictions"]] == labels == columns["outputs"]["label"]


def test_a_missing_or_wrong_api_key_is_forbidden_as_api_gateway_says_it(stack):
    assert http(stack, "GET", "/v2/models/iris")[:2] == (403, {"message": "Forbidden"})
    assert http(stack, "GET", "/v2/models/iris", headers={"x-api-key": "wrong"}) == (403, {"message": "Forbidden"})


def test_a_body_past_api_gateways_10_mb_is_refused_as_api_gateway_says_it(stack, key):
    big = b" " * (10 * 1024 * 1024 + 1)
    assert http(stack, "POST", "/v2/models/iris/infer", big, key) == (413, {"message": "Request Too Long"})


def test_an_unknown_model_is_a_404_naming_the_served_ones(stack, key):
    assert http(stack, "GET", "/v2/models/nope", headers=key) == (404, {"error": "unknown model 'nope'; served models: digits, iris"})


def test_handler_errors_pass_through_unchanged(stack, key):
    assert http(stack, "POST", "/v2/models/iris/infer", b'{"inputs": [', {**key, "Content-Type": "application/json"}) == (
        400, {"error": "request body is not valid JSON: unexpected end of data: line 1 column 13 (char 12)"})


def test_cold_then_warm_starts_are_reported(stack, key, client):
    reports = [line for line in stack.lines if line.startswith("REPORT")]
    assert any("Init Duration:" in line for line in reports)
    assert any("Init Duration:" not in line for line in reports)
    assert any(line.startswith("workers run python") or "is not installed here" in line for line in stack.lines)


def test_sixteen_concurrent_clients_all_answered_correctly(stack, key, iris, iris_test_split):
    test_x, _ = iris_test_split
    expected = iris.run({"features": test_x}, ["label"])["label"]
    deadline = time.monotonic() + 3

    def loop(worker: int) -> int:
        client = triton.InferenceServerClient(stack.gateway.url.removeprefix("http://"), network_timeout=60)  # one per thread: gevent
        done = 0
        while time.monotonic() < deadline:
            rows = slice((worker + done) % 40, (worker + done) % 40 + 5)
            infer_input = triton.InferInput("features", [5, 4], "FP32")
            infer_input.set_data_from_numpy(test_x[rows], binary_data=bool(done % 2))
            binary_body = {"Content-Type": "application/octet-stream"} if done % 2 else {}
            result = client.infer("iris", [infer_input], outputs=[triton.InferRequestedOutput("label")], headers={**key, **binary_body})
            np.testing.assert_array_equal(result.as_numpy("label"), expected[rows])
            done += 1
        return done

    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(loop, range(16)))
    assert all(count > 0 for count in counts)


def test_versions_and_the_live_alias_reach_their_own_functions(stack, key, tmp_path):
    import onnx

    model = onnx.load(ROOT / "examples" / "models" / "iris.onnx")
    model.doc_string = "iris, retrained"
    onnx.save(model, tmp_path / "iris-v2.onnx")
    v2, _ = stack.registry.register(tmp_path / "iris-v2.onnx", "iris")
    headers = {**key, "Content-Type": "application/json"}
    row = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()

    def served_version(path):
        status, body = http(stack, "POST", path, row, headers)
        assert status == 200, body
        return body["model_version"]

    assert served_version("/v2/models/iris/infer") == "1"
    assert served_version(f"/v2/models/iris/versions/{v2.number}/infer") == "2"
    assert served_version(f"/v2/models/iris/versions/{v2.sha256[:12]}/infer") == "2"
    assert http(stack, "GET", "/v2/models/iris/versions/2", headers=key)[1]["versions"] == ["2"]
    assert http(stack, "GET", "/v2/models/iris/versions/7/ready", headers=key) == (404, {"error": "model 'iris' has no version '7'; versions: 1, 2"})
    stack.registry.set_alias("iris", "live", "1")
    stack.registry.set_alias("iris", "live", "2")
    time.sleep(1.1)  # the gateway looks the alias up at most once a second
    assert served_version("/v2/models/iris/infer") == "2"
    assert served_version("/v2/models/iris/versions/live/infer") == "2"
    assert stack.registry.rollback("iris", "live") == (2, 1)
    time.sleep(1.1)
    assert served_version("/v2/models/iris/infer") == "1"


# The runner and gateway on their own, with functions built to fail


def test_the_api_key_never_reaches_a_log(stack, key):
    """Requests with the key, good and bad, then every line the stack and its functions logged."""
    http(stack, "POST", "/v2/models/iris/infer", b'{"inputs": [', {**key, "Content-Type": "application/json"})
    http(stack, "GET", "/v2/models/digits/ready", headers=key)
    logs = "\n".join(stack.lines) + "".join(path.read_text() for path in sorted(stack.work_dir.glob("*.log")))
    assert "request failed" in logs and "REPORT RequestId" in logs  # the logs are there, with requests in them
    assert stack.gateway.api_key not in logs


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_sagemaker_model_answers_tritonclient_as_its_lambda_twin_does(mixed_stack, iris, iris_test_split, binary):
    test_x, _ = iris_test_split
    client = triton.InferenceServerClient(mixed_stack.gateway.url.removeprefix("http://"), network_timeout=60)
    key = {"x-api-key": mixed_stack.gateway.api_key}
    # API Gateway passes bodies through untouched only for binary media types; tritonclient sends no Content-Type
    body_type = {"Content-Type": "application/octet-stream"} if binary else {}
    assert client.is_server_ready()
    results = {}
    for name, version in [("iris", ""), ("iris-gpu", ""), ("iris-gpu", "1")]:
        assert client.is_model_ready(name, version, headers=dict(key))
        metadata = client.get_model_metadata(name, version, headers=dict(key))
        assert {**metadata, "name": "iris"} == client.get_model_metadata("iris", headers=dict(key))
        infer_input = triton.InferInput("features", list(test_x.shape), "FP32")
        infer_input.set_data_from_numpy(test_x, binary_data=binary)
        outputs = [triton.InferRequestedOutput(output, binary_data=binary) for output in ("label", "probabilities")]
        results[name, version] = client.infer(name, [infer_input], version, outputs=outputs, headers={**key, **body_type})
    direct = iris.run({"features": test_x}, ["label", "probabilities"])
    for result in results.values():
        for output, expected in direct.items():
            np.testing.assert_array_equal(result.as_numpy(output), expected)


def test_a_sagemaker_model_answers_tf_serving_and_bad_input_as_its_lambda_twin_does(mixed_stack, iris, iris_test_split):
    test_x, _ = iris_test_split
    key = {"x-api-key": mixed_stack.gateway.api_key, "Content-Type": "application/json"}
    for path in ["/v1/models/{}:predict", "/v1/models/{}/versions/1:predict"]:
        body = json.dumps({"instances": test_x[:4].tolist()}).encode()
        assert http(mixed_stack, "POST", path.format("iris-gpu"), body, key) == http(mixed_stack, "POST", path.format("iris"), body, key)
    assert http(mixed_stack, "GET", "/v1/models/iris-gpu/metadata", headers=key)[0] == 200
    for bad in [b'{"inputs": [', b'{"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}']:
        lambda_answer = http(mixed_stack, "POST", "/v2/models/iris/infer", bad, key)
        assert lambda_answer[0] == 400
        assert http(mixed_stack, "POST", "/v2/models/iris-gpu/infer", bad, key) == lambda_answer


def test_a_sagemaker_model_refuses_as_api_gateway_does(mixed_stack):
    key = {"x-api-key": mixed_stack.gateway.api_key}
    assert http(mixed_stack, "GET", "/v2/models/iris-gpu") == (403, {"message": "Forbidden"})
    # the endpoint serves one version: the API declares no route for another
    assert http(mixed_stack, "GET", "/v2/models/iris-gpu/versions/2", headers=key) == (403, {"message": "Missing Authentication Token"})
    assert http(mixed_stack, "DELETE", "/v2/models/iris-gpu", headers=key) == (403, {"message": "Missing Authentication Token"})


@pytest.fixture(scope="module")
def lambda_env():
    python, version, _ = lambda_python()
    return python, version, build_layer("lambda-runtime", version, out=LAYERS).python_path, build_layer(layer_runtime("onnx", version), version, out=LAYERS)


def test_incomplete_layer_fails_with_lambdas_import_error_and_a_502(lambda_env, tmp_path):
    python, _, runtime_dir, layer = lambda_env
    broken = tmp_path / "layer" / "python"
    shutil.copytree(layer.python_path, broken, symlinks=True)
    shutil.rmtree(broken / "numpy")
    spec = FunctionSpec("broken", python, function_bundle(tmp_path / "task", python), broken, runtime_dir,
                        environment={"SLIMSERVE_MODEL_NAME": "iris"})
    pool = FunctionPool(spec)
    try:
        result = pool.invoke(rest_event("GET", "/v2/models/iris/ready"))
        assert result.payload is None
        assert result.error == {"errorType": "Runtime.ImportModuleError",
                                "errorMessage": "Unable to import module 'lambda_handlers.handler': No module named 'numpy'"}
        gateway = LocalGateway({"iris": Route(pool, api_key_required=False)}, port=0, log=lambda line: None)
        assert gateway.answer("GET", "/v2/models/iris/ready", {}, b"")[0] == 502
        assert json.loads(gateway.answer("GET", "/v2/models/iris/ready", {}, b"")[2]) == {"message": "Internal server error"}
        gateway.server_close()
    finally:
        pool.close()


@pytest.fixture
def faulty(lambda_env, tmp_path):
    python, _, runtime_dir, layer = lambda_env
    task = tmp_path / "task"
    shutil.copytree(FIXTURES / "faulty_function", task)
    pools = []

    def make(timeout_s=2.0, memory_mb=256, integration_timeout_s=29.0):
        pool = FunctionPool(FunctionSpec("faulty", python, task, layer.python_path, runtime_dir, memory_mb=memory_mb,
                                         timeout_s=timeout_s, concurrency=2, handler="faulty.handler"))
        pools.append(pool)
        gateway = LocalGateway({"faulty": Route(pool, api_key_required=False)}, port=0, log=lambda line: None,
                               integration_timeout_s=integration_timeout_s)
        gateway.socket.close()  # answered in-process below: no listener, the executor kept
        return pool, lambda body: gateway.answer("POST", "/v2/models/faulty/infer", {}, body)

    yield make
    for pool in pools:
        pool.close()
        assert all(not worker.alive for worker in pool.workers)


def _pid(answer) -> int:
    status, _, body = answer
    assert status == 200
    return int(body.decode().rsplit(" ", 1)[1])


def test_crash_mid_request_is_a_502_and_the_next_request_gets_a_fresh_worker(faulty):
    pool, send = faulty()
    first = _pid(send(b"hello"))
    crashed = pool.idle[0]
    assert send(b"crash")[:1] == (502,)
    assert crashed.process.returncode == 3 and not crashed.alive
    assert _pid(send(b"hello")) != first


def test_function_timeout_is_lambdas_error_and_a_502(faulty):
    pool, send = faulty(timeout_s=1.0)
    result = pool.invoke(rest_event("POST", "/v2/models/faulty/infer", b"sleep"))
    assert result.error == {"errorMessage": "Task timed out after 1.00 seconds", "errorType": "Sandbox.Timedout"}
    assert send(b"sleep")[0] == 502
    assert send(b"hello")[0] == 200


def test_integration_timeout_is_a_504(faulty):
    pool, send = faulty(timeout_s=5.0, integration_timeout_s=1.0)
    status, _, body = send(b"sleep")
    assert (status, json.loads(body)) == (504, {"message": "Endpoint request timed out"})


def test_memory_limit_kills_the_worker(faulty):
    pool, send = faulty(memory_mb=128, timeout_s=20.0)
    result = pool.invoke(rest_event("POST", "/v2/models/faulty/infer", b"hog"))
    assert result.error == {"errorMessage": "Runtime exited with error: signal: kill", "errorType": "Runtime.ExitError"}
    assert result.max_memory_mb > 128
    assert send(b"hello")[0] == 200


def _processes_of(function_prefix: str) -> list[int]:
    """PIDs whose environment names one of our functions: workers are found even if orphaned."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"AWS_LAMBDA_FUNCTION_NAME={function_prefix}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_serve_prints_where_it_listens_and_ctrl_c_leaves_nothing_behind(tmp_path):
    app = f"ctrlc-{os.getpid()}"
    config = tmp_path / "slimserve.toml"
    config.write_text((ROOT / "slimserve.toml").read_text().replace('name = "slimserve-demo"', f'name = "{app}"')
                      .replace('artifact = "examples/', f'artifact = "{ROOT}/examples/'))
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "slimserve", "serve", "--config", str(config), "--port", str(port),
                              "--s3-port", str(free_port())],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = []
    for line in serve.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("ready"):
            break
    assert f"slimserve serving iris, digits at http://127.0.0.1:{port}" in lines, lines
    key = next(line.rsplit(" ", 1)[1] for line in lines if line.startswith("API key"))
    for name in ("iris", "digits"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{name}/ready", headers={"x-api-key": key})
        assert urllib.request.urlopen(request, timeout=60).status == 200
    assert len(_processes_of(app)) == 2  # one warm worker per model
    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=30) == 0
    assert serve.stdout.read().splitlines()[-1] == "stopping"
    assert _processes_of(app) == []


def test_binary_data_without_a_binary_media_type_fails_as_deployed_on_both_routes(mixed_stack, iris_test_split):
    """API Gateway passes a body of another type on as UTF-8 text: binary tensors are damaged there, so here too,
    on the Lambda and the SageMaker route alike, and the log says which header to send."""
    test_x, _ = iris_test_split
    tensor = triton.InferInput("features", list(test_x.shape), "FP32")
    tensor.set_data_from_numpy(test_x, binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    headers = {"x-api-key": mixed_stack.gateway.api_key, "Inference-Header-Content-Length": str(header_length)}
    answers = {name: http(mixed_stack, "POST", f"/v2/models/{name}/infer", body, headers) for name in ("iris", "iris-gpu")}
    assert {status for status, _ in answers.values()} == {400}, answers
    hints = [line for line in mixed_stack.lines if "without Content-Type: application/octet-stream" in line]
    assert [hint.split(":")[0] for hint in hints[-2:]] == ["POST /v2/models/iris/infer", "POST /v2/models/iris-gpu/infer"]
    assert hints[-1].endswith("the deployed API passes it on as text, damaged, as it is here; send that header with binary data")
    binary = {**headers, "Content-Type": "application/octet-stream"}
    for name in ("iris", "iris-gpu"):
        request = urllib.request.Request(f"{mixed_stack.gateway.url}/v2/models/{name}/infer", body, binary, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200, name


def test_the_local_store_keeps_versions_and_aliases_across_restarts(tmp_path):
    """Each stack in a process of its own: moto's backends are shared within a process, so only separate processes
    show what a restart keeps."""
    import onnx

    from bench.project import infer, serving
    from slimserve.cli import main

    main(["init", str(tmp_path / "proj"), "--model", str(ROOT / "examples" / "models" / "iris.onnx")])
    project = tmp_path / "proj"
    retrained = onnx.load(ROOT / "examples" / "models" / "iris.onnx")
    retrained.doc_string = "retrained"
    onnx.save(retrained, tmp_path / "iris-v2.onnx")
    slimserve = [sys.executable, "-m", "slimserve"]

    def cli(*args: str) -> str:
        result = subprocess.run([*slimserve, *args], cwd=project, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    with serving(slimserve, project / "slimserve.toml"):
        assert cli("register", str(tmp_path / "iris-v2.onnx"), "--name", "iris").startswith("registered iris version 2: ")
        cli("alias", "iris", "live", "2")
    saved = project / "build" / "local" / "store" / "models" / "iris"  # what the stopped stack saved
    assert (saved / "aliases" / "live.json").is_file() and len(list(saved.glob("*/manifest.json"))) == 2
    flower = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
    with serving(slimserve, project / "slimserve.toml") as (port, key):
        assert [line.split()[0] for line in cli("versions", "iris").splitlines()[1:]] == ["1", "2"]
        deadline = time.monotonic() + 10
        while (answer := infer(port, key, "iris", flower))["model_version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.2)  # the stack reads live at most once a second
        assert answer["model_version"] == "2"  # live's version, registered before the restart


@pytest.mark.parametrize("model, target", [("drain-fn", "lambda"), ("drain-sm", "sagemaker")])
def test_stopping_the_stack_answers_the_requests_in_flight_first(tmp_path, iris, iris_test_split, model, target):
    """A request still uploading when the stack stops gets its answer, from a model still up; one that starts while
    the stack drains is told it is stopping. (Each names its own model: the moto servers of one process share buckets.)"""
    import socket
    import threading

    from support import MODELS

    config = tmp_path / "slimserve.toml"
    config.write_text(f'[app]\nname = "drain"\n\n[defaults]\nauth = "none"\n\n[models.{model}]\nformat = "onnx"\n'
                      f'artifact = "{MODELS / "iris.onnx"}"\ntarget = "{target}"\n')
    rows = iris_test_split[0][:3]
    body = json.dumps({"inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32", "data": rows.ravel().tolist()}]}).encode()
    with running_stack(config, tmp_path / "work") as stack:
        port = int(stack.gateway.url.rsplit(":", 1)[1])
        uploading = socket.create_connection(("127.0.0.1", port), timeout=60)
        uploading.sendall(b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (model.encode(), len(body), body[:10]))
        idle = socket.create_connection(("127.0.0.1", port), timeout=60)  # a keep-alive client between requests
        time.sleep(0.3)
        stack.gateway.shutdown()
        stopping = threading.Thread(target=stack.close)
        stopping.start()
        time.sleep(0.5)
        idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        late = read_response(idle)
        uploading.sendall(body[10:])
        answer = read_response(uploading)
        stopping.join(timeout=60)
    assert answer[0] == 200 and json.loads(answer[1])["outputs"][0]["data"] == iris.run({"features": rows}, ["label"])["label"].tolist()
    assert late == (503, b'{"message": "the local stack is stopping"}')
    assert not stopping.is_alive()


def read_response(connection) -> tuple[int, bytes]:
    import http.client

    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, response.read()


def test_a_sagemaker_model_follows_live_as_a_deploy_moves_an_endpoint(tmp_path, iris_test_split):
    """Blue/green: the new version's serving program starts beside the old, takes requests once it answers /ping,
    and the old one stops; no request in between fails. Rolling back moves it back the same way."""
    import onnx

    config = tmp_path / "slimserve.toml"
    config.write_text(f'[app]\nname = "follow"\n\n[defaults]\nauth = "none"\n\n[models.follow-sm]\nformat = "onnx"\n'
                      f'artifact = "{ROOT / "examples" / "models" / "iris.onnx"}"\ntarget = "sagemaker"\n')
    retrained = onnx.load(ROOT / "examples" / "models" / "iris.onnx")
    retrained.doc_string = "retrained"
    onnx.save(retrained, tmp_path / "iris-v2.onnx")
    row = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    headers = {"Content-Type": "application/json"}
    with running_stack(config, tmp_path / "work") as stack:

        def answers_until(version: str) -> list[int]:
            statuses, deadline = [], time.monotonic() + 90
            while time.monotonic() < deadline:
                status, body = http(stack, "POST", "/v2/models/follow-sm/infer", row, headers)
                statuses.append(status)
                if status == 200 and body["model_version"] == version:
                    return statuses
            raise AssertionError(f"still not version {version}: {stack.lines[-5:]}")

        assert answers_until("1") == [200]
        stack.registry.register(tmp_path / "iris-v2.onnx", "follow-sm")
        stack.registry.set_alias("follow-sm", "live", "2", served=stack.registry.version("follow-sm", "1"))
        assert set(answers_until("2")) == {200}  # every request answered while the endpoint moved
        assert http(stack, "POST", "/v2/models/follow-sm/versions/2/infer", row, headers)[0] == 200
        assert http(stack, "POST", "/v2/models/follow-sm/versions/1/infer", row, headers)[0] == 403  # as API Gateway
        deadline = time.monotonic() + 30
        while "follow-sm: now serving version 2 (was 1)" not in stack.lines and time.monotonic() < deadline:
            time.sleep(0.1)  # said once the old program has answered what it had and stopped
        assert not (tmp_path / "work" / "follow-sm-model-1").exists()  # the old version's folder went with it
        stack.registry.rollback("follow-sm")
        assert set(answers_until("1")) == {200}
