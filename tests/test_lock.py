"""Deploying a registered version: `slimserve lock` resolves the config's `version` against the registry
(moto's S3), synth reads only the lock, and a new locked version is a new Lambda version for CodeDeploy."""

import json

import onnx
import pytest
from aws_cdk import assertions
from support import MODELS

from slimserve.cli import main
from slimserve.config import ConfigError, load_config
from slimserve.contract.schema import v2_request_schema
from slimserve.registry.lock import ALLOW_LOCAL_LOCK, lock_path, write_lock
from slimserve.registry.versions import Registry
from slimserve.stacks.app import build_app


@pytest.fixture(autouse=True)
def local_locks_allowed(monkeypatch):
    """These tests lock against moto's S3, a local store: synth takes such a lock only when told."""
    monkeypatch.setenv(ALLOW_LOCAL_LOCK, "1")


@pytest.fixture
def registry(s3_store, request):
    bucket = f"lock-{request.node.name.replace('_', '-')[:40]}"
    client = s3_store.client()
    client.create_bucket(Bucket=bucket)
    registry = Registry(client, bucket)
    registry.register(MODELS / "iris.onnx", "iris")
    return registry


@pytest.fixture
def retrained(registry, tmp_path):
    """Version 2 of iris, the `prod` alias pointing at it."""
    model = onnx.load(MODELS / "iris.onnx")
    model.doc_string = "retrained"
    onnx.save(model, tmp_path / "retrained.onnx")
    version, _ = registry.register(tmp_path / "retrained.onnx", "iris")
    registry.set_alias("iris", "prod", "2")
    return version


def config_with(tmp_path, version: str | None = '"prod"'):
    (tmp_path / "iris.onnx").write_bytes((MODELS / "iris.onnx").read_bytes())
    line = f"version = {version}\n" if version else ""
    (tmp_path / "slimserve.toml").write_text(f'[app]\nname = "locked"\n\n[models.iris]\nformat = "onnx"\nartifact = "iris.onnx"\n{line}')
    return load_config(tmp_path / "slimserve.toml")


def function_environment(config) -> tuple[dict, list[str]]:
    shard = assertions.Template.from_stack(build_app(config).node.find_child(config.name).shards[0])
    (function,) = shard.find_resources("AWS::Lambda::Function").values()
    return function["Properties"]["Environment"]["Variables"], sorted(shard.find_resources("AWS::Lambda::Version"))


@pytest.mark.slow
def test_lock_resolves_the_alias_and_synth_deploys_those_bytes(registry, retrained, tmp_path, s3_store, capsys):
    config = config_with(tmp_path)
    assert main(["lock", "--config", str(config.path), "--endpoint-url", s3_store.endpoint, "--bucket", registry.bucket]) == 0
    assert capsys.readouterr().out == (f"iris: 'prod' is version 2 (sha256 {retrained.sha256})\n"
                                       f"wrote {tmp_path}/slimserve.lock: 1 of 1 models deploy a registered version\n")
    assert json.loads(lock_path(config).read_text()) == {"store": "local", "models": {"iris": {
        "ref": "prod", "version": 2, "sha256": retrained.sha256, "format": "onnx", "size": retrained.size, "files": 1,
        "signature": retrained.signature}}}
    assert retrained.signature["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    environment, _ = function_environment(config)
    assert environment["SLIMSERVE_MODEL_VERSION"] == "2"
    assert environment["SLIMSERVE_MODEL_SHA256"] == retrained.sha256
    assert environment["SLIMSERVE_MODEL_KEY"] == f"models/iris/{retrained.sha256}/model.onnx"
    stack = build_app(config).node.find_child(config.name)
    app_stack = assertions.Template.from_stack(stack)
    assert app_stack.find_resources("Custom::CDKBucketDeployment") == {}  # the bytes are in the store already
    (request_model,) = assertions.Template.from_stack(stack.shards[0]).find_resources("AWS::ApiGateway::Model").values()
    assert request_model["Properties"]["Schema"] == v2_request_schema("iris", retrained.signature)  # from the lock, offline


@pytest.mark.slow
def test_a_new_locked_version_is_a_new_function_version(registry, retrained, tmp_path):
    config = config_with(tmp_path)
    write_lock(config, registry)
    environment_v2, versions_v2 = function_environment(config)
    registry.set_alias("iris", "prod", "1")
    write_lock(config, registry)
    environment_v1, versions_v1 = function_environment(config)
    assert (environment_v1["SLIMSERVE_MODEL_VERSION"], environment_v2["SLIMSERVE_MODEL_VERSION"]) == ("1", "2")
    assert versions_v1 != versions_v2  # CodeDeploy shifts the live alias to the new one


def test_synth_refuses_a_version_the_lock_does_not_settle(registry, retrained, tmp_path):
    config = config_with(tmp_path)
    with pytest.raises(ConfigError) as missing:
        build_app(config)
    assert str(missing.value) == (f"{config.path}: models.iris.version: expected slimserve.lock to settle 'prod', found nothing; "
                                  "run `slimserve lock` to resolve it against the model store")
    write_lock(config_with(tmp_path, "2"), registry)
    with pytest.raises(ConfigError) as stale:
        build_app(config)
    assert str(stale.value) == (f"{config.path}: models.iris.version: expected slimserve.lock to settle 'prod', found a lock "
                                "for '2'; run `slimserve lock` to resolve it against the model store")


def test_lock_refuses_an_unknown_version_and_writes_nothing(registry, tmp_path, s3_store, capsys):
    config = config_with(tmp_path, '"canary"')
    assert main(["lock", "--config", str(config.path), "--endpoint-url", s3_store.endpoint, "--bucket", registry.bucket]) == 2
    assert capsys.readouterr().err == f"error: {config.path}: models.iris.version: model 'iris' has no alias 'canary'\n"
    assert not lock_path(config).exists()


def test_models_without_a_version_upload_their_artifact_as_before(tmp_path):
    environment, _ = function_environment(config_with(tmp_path, None))
    assert environment["SLIMSERVE_MODEL_VERSION"] == "1"
    assert environment["SLIMSERVE_MODEL_KEY"] == f"models/iris/{environment['SLIMSERVE_MODEL_SHA256']}/model.onnx"


def test_synth_refuses_a_lock_from_the_local_store_unless_told(registry, retrained, tmp_path, monkeypatch):
    config = config_with(tmp_path)
    write_lock(config, registry)
    monkeypatch.delenv(ALLOW_LOCAL_LOCK)
    with pytest.raises(ConfigError) as refused:
        build_app(config)
    assert str(refused.value) == (
        f"{tmp_path}/slimserve.lock: resolved against the local store, whose versions exist on this machine only: a deployed "
        "function would find no object. Lock against the deployed store (`slimserve lock --profile P --region R --bucket "
        "BUCKET`), or set SLIMSERVE_ALLOW_LOCAL_LOCK=1 to synth it anyway (an emulator, a test)")


def test_deploy_refuses_a_locked_version_missing_from_its_store(registry, retrained, tmp_path, monkeypatch):
    """The lock names the deployed store it was resolved against; deploy looks each version up there first."""
    import boto3

    from slimserve.cli.project import check_locked_objects
    from slimserve.errors import UserError
    from slimserve.local.s3 import LOCAL_CREDENTIALS

    for key, value in LOCAL_CREDENTIALS.items():  # moto's S3 stands for the account's (AWS_ENDPOINT_URL_S3 points at it)
        monkeypatch.setenv(key, value)
    config = config_with(tmp_path)
    deployed = Registry(registry.s3, registry.bucket, deployed=True)
    write_lock(config, deployed)
    assert json.loads(lock_path(config).read_text())["store"] == f"s3://{registry.bucket}"
    session = boto3.Session(region_name="us-east-1")
    check_locked_objects(config, session)  # version 2 is there
    registry.s3.delete_object(Bucket=registry.bucket, Key=retrained.key)
    with pytest.raises(UserError) as refused:
        check_locked_objects(config, session)
    assert str(refused.value) == (
        f"{tmp_path}/slimserve.lock: models.iris: version 2 is not in its store (s3://{registry.bucket}/{retrained.key} does "
        "not exist); a deploy would point the function at nothing: register it there and lock again")
