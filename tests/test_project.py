"""`slimserve init` and the deploy commands, from a user's side: what they write, and one line for each mistake."""

import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.error
from pathlib import Path

import pytest
import yaml
from support import MODELS

from bench.project import infer, serving
from slimserve import __version__
from slimserve.cli import main, scaffold
from slimserve.config import load_config
from slimserve.stacks.context import CDK_CONTEXT

pytestmark = pytest.mark.slow


def test_init_scaffolds_a_project_that_checks(tmp_path, capsys):
    assert main(["init", str(tmp_path / "proj"), "--model", str(MODELS / "digits.tflite")]) == 0
    project = tmp_path / "proj"
    assert sorted(str(path.relative_to(project)) for path in project.rglob("*") if path.is_file()) == [
        ".github/workflows/slimserve.yml", ".gitignore", "cdk.json", "models/digits.tflite", "slimserve.toml"]
    assert (project / "models" / "digits.tflite").read_bytes() == (MODELS / "digits.tflite").read_bytes()
    assert json.loads((project / "cdk.json").read_text()) == {"app": "slimserve cdk-app --config slimserve.toml",
                                                             "context": CDK_CONTEXT}
    assert (project / ".gitignore").read_text().splitlines()[:2] == ["build/", "cdk.out/"]
    config = load_config(project / "slimserve.toml")
    assert (config.name, [(m.name, m.format, m.target) for m in config.models]) == ("proj", [("digits", "tflite", "lambda")])
    workflow = yaml.safe_load((project / ".github" / "workflows" / "slimserve.yml").read_text())
    steps = workflow["jobs"]["synth"]["steps"]
    assert [step.get("run") or step["uses"] for step in steps] == [
        "actions/checkout@v4", "actions/setup-python@v5", "actions/cache@v4",
        f'pip install "slimserve[runtime,cdk]=={__version__}"', "slimserve check", "slimserve synth",
        "pip install pip-audit && slimserve audit"]
    assert steps[2]["with"] == {"path": "~/.cache/slimserve", "key": f"slimserve-${{{{ runner.os }}}}-{__version__}"}
    out = capsys.readouterr().out
    assert "slimserve check && slimserve serve" in out and "slimserve bootstrap && slimserve deploy" in out


@pytest.mark.parametrize("direct_url, requirement", [
    ({"url": "https://github.com/acme/slimserve", "vcs_info": {"vcs": "git", "commit_id": "0f1e2d"}},
     "slimserve[cdk] @ git+https://github.com/acme/slimserve@0f1e2d"),
    ({"url": "https://wheels.acme.dev/slimserve-0.1.0-py3-none-any.whl", "archive_info": {}},
     "slimserve[cdk] @ https://wheels.acme.dev/slimserve-0.1.0-py3-none-any.whl"),
    ({"url": "file:///home/me/slimserve", "dir_info": {"editable": True}}, f"slimserve[cdk]=={__version__}"),
    (None, f"slimserve[cdk]=={__version__}"),
])
def test_the_ci_workflow_installs_slimserve_from_where_this_one_came(monkeypatch, direct_url, requirement):
    class Installed:
        def read_text(self, name):
            assert name == "direct_url.json"
            return json.dumps(direct_url) if direct_url else None

    monkeypatch.setattr(scaffold, "distribution", lambda name: Installed())
    assert scaffold.install_requirement("cdk") == requirement


def test_init_without_a_model_names_it_after_the_project_and_says_where_it_goes(tmp_path, capsys):
    main(["init", str(tmp_path / "Fraud_Detector")])
    raw = tomllib.loads((tmp_path / "Fraud_Detector" / "slimserve.toml").read_text())
    assert raw["defaults"] == {"auth": "iam"}
    assert raw["models"] == {"fraud-detector": {"format": "onnx", "artifact": "models/fraud-detector.onnx",
                                                "target": "lambda", "memory_mb": 1024}}
    out = capsys.readouterr().out
    assert out.startswith(f"wrote a slimserve project in {tmp_path}/Fraud_Detector, serving the model 'fraud-detector':\n")
    assert (f"next: put your model at {tmp_path}/Fraud_Detector/models/fraud-detector.onnx (slimserve convert writes one "
            f"from scikit-learn, PyTorch or Keras), or point models.fraud-detector.artifact in "
            f"{tmp_path}/Fraud_Detector/slimserve.toml at it; then") in out
    assert main(["check", "--config", str(tmp_path / "Fraud_Detector" / "slimserve.toml")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/Fraud_Detector/slimserve.toml: models.fraud-detector.artifact: "
                                       f"model file {tmp_path}/Fraud_Detector/models/fraud-detector.onnx does not exist\n")


@pytest.mark.parametrize("existing", ["slimserve.toml", "cdk.json", ".github/workflows/slimserve.yml"])
def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path, capsys, existing):
    (tmp_path / existing).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / existing).write_text("mine\n")
    assert main(["init", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/{existing} already exists; nothing written "
                                       "(init makes a new project: choose an empty folder)\n")
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()] == [existing]
    assert (tmp_path / existing).read_text() == "mine\n"


@pytest.mark.parametrize("model, message", [
    ("model.pt", "expected an .onnx or .tflite model file, found '.pt'"),
    ("gone.onnx", "model file does not exist"),
])
def test_init_refuses_a_model_it_cannot_serve(tmp_path, capsys, model, message):
    (tmp_path / "model.pt").write_bytes(b"torch")
    assert main(["init", str(tmp_path / "proj"), "--model", str(tmp_path / model)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / model}: {message}\n"
    assert not (tmp_path / "proj").exists()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scaffolded project, and an AWS setup with nothing in it: no credentials, no region, no instance metadata."""
    main(["init", str(tmp_path), "--model", str(MODELS / "iris.onnx")])
    for key in [key for key in os.environ if key.startswith("AWS_")]:
        monkeypatch.delenv(key)
    aws_config = tmp_path / "aws-config"
    aws_config.write_text("[profile dev]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


@pytest.mark.parametrize("command", ["bootstrap", "diff", "deploy", "destroy"])
@pytest.mark.parametrize("flags, message", [
    (["--profile", "nope"], "--profile nope: no such profile in your AWS config (`aws configure list-profiles` lists them)"),
    (["--profile", "dev"], "no AWS credentials found: run `aws configure` (or `aws sso login --profile NAME`), "
                           "or pass --profile NAME"),
])
def test_deploy_commands_say_what_is_missing_before_starting_cdk(project, capsys, monkeypatch, command, flags, message):
    monkeypatch.chdir(project)
    assert main([command, *flags]) == 2
    assert capsys.readouterr() == ("", f"error: {message}\n")


def test_deploy_commands_need_a_region(project, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    assert main(["deploy", "--config", str(project / "slimserve.toml")]) == 2
    assert capsys.readouterr().err == (f"error: no AWS region: pass --region, set app.region in {project}/slimserve.toml, "
                                       "or give your profile one (`aws configure set region eu-west-1`)\n")


def test_every_command_has_help_and_the_cli_a_version():
    version = subprocess.run([sys.executable, "-m", "slimserve", "--version"], capture_output=True, text=True)
    assert (version.returncode, version.stdout) == (0, f"slimserve {__version__}\n")
    usage = subprocess.run([sys.executable, "-m", "slimserve", "--help"], capture_output=True, text=True).stdout
    listed = re.findall(r"^    ([a-z-]+)(?: |$)", usage, flags=re.M)
    assert {"init", "check", "serve", "synth", "cdk-app", "bootstrap", "diff", "deploy", "destroy", "register"} <= set(listed)
    for command in listed:
        result = subprocess.run([sys.executable, "-m", "slimserve", command, "--help"], capture_output=True, text=True)
        assert (result.returncode, result.stdout.startswith(f"usage: slimserve {command}")) == (0, True), command


def test_two_projects_serve_side_by_side_each_from_its_own_folder(tmp_path):
    """Each project's build/ holds its own functions, models and logs; neither answers for the other's model."""
    main(["init", str(tmp_path / "flowers"), "--model", str(MODELS / "iris.onnx")])
    main(["init", str(tmp_path / "digits"), "--model", str(MODELS / "digits.tflite")])
    slimserve = [sys.executable, "-m", "slimserve"]
    flower = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
    with serving(slimserve, tmp_path / "flowers" / "slimserve.toml") as (flowers_port, flowers_key), \
            serving(slimserve, tmp_path / "digits" / "slimserve.toml") as (digits_port, digits_key):
        assert infer(flowers_port, flowers_key, "iris", flower)["outputs"][0]["data"] == [0]
        digit = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
        assert infer(digits_port, digits_key, "digits", digit)["model_name"] == "digits"
        with pytest.raises(urllib.error.HTTPError) as refused:
            infer(digits_port, digits_key, "iris", flower)
        assert refused.value.code == 404
    for project, function in (("flowers", "flowers-iris"), ("digits", "digits-digits")):
        local = tmp_path / project / "build" / "local"
        assert sorted(path.name for path in local.glob("*.log")) == [f"{function}.log"]
        assert (local / "function" / "lambda_handlers" / "handler.py").is_file()


@pytest.mark.filterwarnings("ignore:Tried to parse AWS.+S3.+BucketPolicy:UserWarning")  # moto's CloudFormation, in-process
def test_bootstrap_and_diff_run_the_pinned_cdk_cli_on_the_project(project, monkeypatch):
    """Against moto's CloudFormation, S3 and SSM (AWS_ENDPOINT_URL), with credentials from the environment."""
    from moto.server import ThreadedMotoServer

    from slimserve import cdk_cli
    from slimserve.local.s3 import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    environment = {**os.environ, "AWS_ACCESS_KEY_ID": "slimserve-test", "AWS_SECRET_ACCESS_KEY": "slimserve-test",
                   "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        runs = [subprocess.run([sys.executable, "-m", "slimserve", *command], cwd=project, env=environment,
                               capture_output=True, text=True, timeout=600)
                for command in (["bootstrap", "--region", "eu-west-2"], ["diff", "--region", "eu-west-2", "--", "--no-change-set"])]
    finally:
        server.stop()
    bootstrap, diff = runs
    assert bootstrap.returncode == 0, bootstrap.stderr[-3000:]
    assert bootstrap.stdout.startswith(f"cdk bootstrap of slimserve.toml in eu-west-2, AWS CDK CLI {cdk_cli.version()}\n")
    # The CDK CLI logs to stderr, or to stdout where CI=true (as on GitHub Actions and our CI)
    assert re.search(r"Environment aws://\d{12}/eu-west-2 bootstrapped", bootstrap.stdout + bootstrap.stderr), bootstrap.stderr[-2000:]
    assert diff.returncode == 0, diff.stderr[-3000:]
    assert "[+] AWS::Lambda::Function Models1/Model-iris/Function" in diff.stdout + diff.stderr
    assert "Number of stacks with differences: 2" in diff.stdout + diff.stderr
    app = load_config(project / "slimserve.toml").name
    assert (project / "cdk.out" / f"{app}.template.json").is_file()  # the project's own cdk.out


def test_a_deploy_prints_the_api_url_and_how_to_read_the_key(tmp_path, capsys):
    from argparse import Namespace

    from slimserve.cli.project import print_deployed

    main(["init", str(tmp_path / "shop"), "--model", str(MODELS / "iris.onnx")])
    capsys.readouterr()
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"shop": {"ApiUrl": "https://abc.execute-api.eu-west-1.amazonaws.com/prod/",
                                            "ApiKeyId": "k3y1d", "ModelStoreBucket": "shop-store"}}))
    config = load_config(tmp_path / "shop" / "slimserve.toml")
    assert print_deployed(config, outputs, Namespace(profile="dev", region="eu-west-1")) == 0
    assert capsys.readouterr().out.splitlines() == [
        "API: https://abc.execute-api.eu-west-1.amazonaws.com/prod/",
        'API key (for models with auth = "api_key"; send it as x-api-key): aws apigateway get-api-key --api-key k3y1d '
        "--include-value --query value --output text --profile dev --region eu-west-1",
        "model store: s3://shop-store (slimserve register|versions|alias ... --bucket shop-store --profile dev --region eu-west-1)",
        f"all outputs: {outputs}",
    ]
    outputs.write_text(json.dumps({"shop": {"ModelStoreBucket": "shop-store"}}))  # a stack created only in part
    assert print_deployed(config, outputs, Namespace(profile=None, region=None)) == 1
    assert capsys.readouterr() == ("", f"error: the CDK CLI reported success, but the stack shop has no output ApiUrl, "
                                       f"ApiKeyId in {outputs}: it was not fully created; its events in CloudFormation say why\n")


def test_a_stopped_deploy_command_stops_the_cdk_cli_too(project, tmp_path):
    """SIGTERM to slimserve (a CI job's timeout) reaches the CDK CLI: no node process runs on without a parent."""
    import signal
    import socket
    import time

    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections and never answers: the CLI waits on it
    environment = {**os.environ, "AWS_ACCESS_KEY_ID": "slimserve-test", "AWS_SECRET_ACCESS_KEY": "slimserve-test",
                   "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    command = subprocess.Popen([sys.executable, "-m", "slimserve", "diff"], cwd=project, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cdk_processes() -> list[int]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"aws-cdk/bin/cdk") for part in cmdline) and b"diff" in cmdline:
                found.append(int(proc.name))
        return found

    try:
        silent.settimeout(120)
        silent.accept()[0].close()  # the CLI has synthesized and is calling "AWS"
        assert cdk_processes()
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while cdk_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cdk_processes() == []
    finally:
        command.kill()
        silent.close()
