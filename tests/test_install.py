"""slimserve as a user gets it: the wheel, installed into a fresh venv outside the repository, serving and
synthesizing a project of the user's own, with models this repository does not ship."""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import tritonclient.http as triton
from skl2onnx import to_onnx
from sklearn.datasets import load_wine
from sklearn.ensemble import RandomForestClassifier
from support import ROOT

from bench.project import build_wheel, install_wheel
from slimserve import __version__, cdk_cli
from slimserve.local.s3 import free_port

pytestmark = pytest.mark.slow


def _run(command, cwd, environment=None, timeout=600):
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result.stdout


def _repository_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", ".", ":!.venv*",
                           ":!.pytest_cache", ":!build", ":!**/__pycache__"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The venv's bin folder, with slimserve's wheel (built from a copy of the tree) and its user extras installed."""
    before = _repository_state()
    work = tmp_path_factory.mktemp("install")
    yield install_wheel(build_wheel(work), work / "venv")
    assert _repository_state() == before  # nothing was written into the repository
    shutil.rmtree(work)  # 1.3 GB of venv


def _user_model(folder: Path) -> tuple[Path, np.ndarray]:
    """A model of the user's own: a random forest on the wine data set, as ONNX, and rows to ask it about."""
    features, labels = load_wine(return_X_y=True)
    features = features.astype(np.float32)
    forest = RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0).fit(features, labels)
    path = folder / "wine-forest.onnx"
    path.write_bytes(to_onnx(forest, features[:1], options={id(forest): {"zipmap": False}}).SerializeToString())
    return path, features[::17]


def test_the_wheel_installs_only_slimserve_names(installed):
    (record,) = installed.parent.glob("lib/python*/site-packages/slimserve-*.dist-info/RECORD")
    top_level = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    assert {name for name in top_level if not name.endswith(".dist-info") and name != ".."} == {"slimserve"}
    files = {line.split(",")[0] for line in record.read_text().splitlines()}
    assert {"slimserve/layers/onnx.txt", "slimserve/layers/lambda-runtime.txt", "slimserve/serving/Dockerfile",
            "slimserve/serving/requirements-gpu.txt", "slimserve/cdk_cli/package-lock.json",
            "slimserve/lambda_handlers/handler.py"} <= files
    assert not any(name.startswith(("slimserve/bench", "tests/", "bench/")) for name in files)
    site_packages = record.parent.parent
    assert [heavy for heavy in ("torch", "tensorflow", "keras", "bentoml") if (site_packages / heavy).exists()] == []
    assert _run([str(installed / "slimserve"), "--version"], installed) == f"slimserve {__version__}\n"


def test_a_users_own_project_serves_and_synthesizes_from_the_installed_wheel(installed, tmp_path):
    model, rows = _user_model(tmp_path)
    environment = {**os.environ, "PATH": f"{installed}{os.pathsep}{os.environ['PATH']}"}
    slimserve = str(installed / "slimserve")
    out = _run([slimserve, "init", "myproject", "--model", str(model)], tmp_path, environment)
    project = tmp_path / "myproject"
    assert "models/wine-forest.onnx" in out
    config = project / "slimserve.toml"
    # the scaffold's commented SageMaker model, switched on: the same file on an endpoint beside its Lambda twin
    config.write_text(re.sub(r"^# (\[models|format|artifact|target|instance_type)", r"\1", config.read_text(), flags=re.M))
    size = f"{(project / 'models/wine-forest.onnx').stat().st_size / 1024:.1f} KiB"
    assert _run([slimserve, "check"], project, environment).splitlines()[1:] == [
        f"  wine-forest: onnx models/wine-forest.onnx (1 file, {size}) -> lambda (1024 MB x86_64), auth iam",
        f"  wine-forest-gpu: onnx models/wine-forest.onnx (1 file, {size}) -> sagemaker (ml.g5.xlarge, download timeout "
        "120 s, startup 180 s), auth iam",
        "    note: models.wine-forest-gpu.sagemaker.min_instances is 1: an instance that fails is an outage until "
        "SageMaker replaces it; 2 or more spread the endpoint across Availability Zones",
    ]

    port = free_port()
    server = subprocess.Popen([slimserve, "serve", "--port", str(port), "--s3-port", str(free_port())], cwd=project,
                              env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        assert lines[-1].startswith("ready"), "".join(lines)
        assert not any(line.startswith("API key") for line in lines)  # the scaffold's models authenticate with IAM
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        session = onnxruntime.InferenceSession(model)
        (input_name,) = [tensor.name for tensor in session.get_inputs()]
        expected = dict(zip([output.name for output in session.get_outputs()], session.run(None, {input_name: rows})))
        assert sorted(expected) == ["label", "probabilities"]
        for name in ("wine-forest", "wine-forest-gpu"):
            tensor = triton.InferInput(input_name, list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows, binary_data=True)
            # binary bodies through API Gateway need a binary media type (README: "Through API Gateway")
            # (IAM is not checked locally: the local gateway has no AWS account to check signatures against)
            answer = client.infer(name, [tensor], headers={"Content-Type": "application/octet-stream"})
            for output, values in expected.items():
                assert np.array_equal(answer.as_numpy(output), values), (name, output)
    finally:
        server.send_signal(signal.SIGINT)
        remaining, _ = server.communicate(timeout=60)
    assert server.returncode == 0 and remaining.endswith("stopping\n"), remaining[-2000:]
    logs = project / "build" / "local"
    assert sorted(path.name for path in logs.glob("*.log")) == ["myproject-wine-forest.log", "wine-forest-gpu.log"]

    out = _run([slimserve, "synth"], project, environment)
    assert "myproject: " in out
    (template,) = (project / "cdk.out").glob("myproject.template.json")
    text = template.read_text()
    assert text.count('"AWS::SageMaker::Endpoint"') == 1
    assert (project / "build" / "serving-image" / "serving" / "Dockerfile").is_file()
    (nested,) = (project / "cdk.out").glob("*.nested.template.json")
    assert nested.read_text().count('"AWS::Lambda::Function"') == 1

    # plain `cdk synth` in the scaffolded project, with the pinned CLI, offline and without credentials, once the
    # venv's bin is on PATH (an activated venv): cdk.json's app is `slimserve cdk-app`, nothing else
    plain = {key: value for key, value in cdk_cli.environment().items() if not key.startswith("AWS_")}
    plain |= {"PATH": f"{installed}{os.pathsep}{plain['PATH']}", "AWS_EC2_METADATA_DISABLED": "true",
              "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_CONFIG_FILE": "/dev/null"}
    _run(["node", str(cdk_cli.install()), "synth", "--no-notices", "--no-version-reporting", "--quiet",
          "--output", str(tmp_path / "plain.out")], project, plain)
    assert (tmp_path / "plain.out" / "myproject.template.json").read_text().count('"AWS::SageMaker::Endpoint"') == 1
