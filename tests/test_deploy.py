"""`slimserve bootstrap`, `deploy` and `destroy` of a scaffolded project, end to end through the pinned CDK CLI,
against LocalStack in host mode (no Docker): CloudFormation creates what the templates say; Lambda functions are
created but not run there (the local stack runs them)."""

import os
import re
import subprocess
import sys
import time
import urllib.request

import boto3
import pytest
from support import MODELS, ROOT

from slimserve.local.s3 import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def localstack(tmp_path_factory):
    """LocalStack's gateway URL; LocalStack runs from .venv-localstack (`make test` builds it)."""
    python = os.environ.get("SLIMSERVE_LOCALSTACK_PYTHON") or str(ROOT / ".venv-localstack" / "bin" / "python")
    if not os.path.exists(python):
        pytest.fail(f"{python}: no LocalStack venv; `make test` builds it (make .venv-localstack/.installed)")
    port, root = free_port(), tmp_path_factory.mktemp("localstack")
    environment = {**os.environ, "GATEWAY_LISTEN": f"127.0.0.1:{port}", "FILESYSTEM_ROOT": str(root),
                   "OVERRIDE_IN_DOCKER": "0",  # a container itself, this machine would make it write to /var/lib
                   "LAMBDA_RUNTIME_EXECUTOR": "noop", "DNS_ADDRESS": "0", "SKIP_SSL_CERT_DOWNLOAD": "1",
                   "DISABLE_EVENTS": "1", "CFN_IGNORE_UNSUPPORTED_RESOURCE_TYPES": "1"}
    log = open(root / "localstack.log", "wb")
    process = subprocess.Popen([python, "-m", "localstack.runtime.main"], env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/_localstack/health", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (root / "localstack.log").read_text()[-3000:]
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_a_project_bootstraps_deploys_and_is_destroyed(localstack, tmp_path):
    project = tmp_path / "shop"
    subprocess.run([sys.executable, "-m", "slimserve", "init", str(project), "--model", str(MODELS / "iris.onnx")], check=True,
                   capture_output=True)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    environment |= {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_ENDPOINT_URL": localstack,
                    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def slimserve(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "slimserve", *args], cwd=project, env=environment,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result

    slimserve("bootstrap", "--region", "eu-central-1")
    deployed = slimserve("deploy", "--region", "eu-central-1", "--", "--require-approval", "never").stdout.splitlines()
    cloudformation = boto3.client("cloudformation", region_name="eu-central-1", endpoint_url=localstack,
                                  aws_access_key_id="test", aws_secret_access_key="test")
    (stack,) = cloudformation.describe_stacks(StackName="shop")["Stacks"]
    outputs = {output["OutputKey"]: output["OutputValue"] for output in stack["Outputs"]}
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    assert deployed[-4:] == [
        f"API: {outputs['ApiUrl']}",
        f'API key (for models with auth = "api_key"; send it as x-api-key): aws apigateway get-api-key --api-key '
        f"{outputs['ApiKeyId']} --include-value --query value --output text --region eu-central-1",
        f"model store: s3://{outputs['ModelStoreBucket']} (slimserve register|versions|alias ... --bucket "
        f"{outputs['ModelStoreBucket']} --region eu-central-1)",
        f"all outputs: {project / 'build' / 'cdk-outputs.json'}",
    ]
    assert re.fullmatch(r"https://\w+\.execute-api\.[\w.:-]+/prod/", outputs["ApiUrl"])
    functions = boto3.client("lambda", region_name="eu-central-1", endpoint_url=localstack, aws_access_key_id="test",
                             aws_secret_access_key="test").list_functions()["Functions"]
    (iris,) = [function for function in functions if function["Handler"] == "lambda_handlers.handler.handler"]
    assert (iris["Runtime"], iris["MemorySize"], iris["Architectures"]) == ("python3.12", 1024, ["x86_64"])

    slimserve("destroy", "--region", "eu-central-1", "--yes")
    remaining = [s["StackStatus"] for s in cloudformation.list_stacks()["StackSummaries"] if s["StackName"] == "shop"]
    assert set(remaining) <= {"DELETE_COMPLETE"}
