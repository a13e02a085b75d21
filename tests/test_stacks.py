"""CDK template assertions per construct, AWS's own judges (cdk-nag, cfn-lint), and synth from the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from aws_cdk import App, Stack, assertions
from aws_cdk import aws_s3 as s3
from support import ROOT

from slimserve import cdk_cli
from slimserve.config import (
    API_RESOURCES_FOR_MODELS,
    API_RESOURCES_PER_MODEL,
    load_config,
    parse_config,
)
from slimserve.contract.apigw import MODEL_ERROR_TEMPLATE
from slimserve.lambda_handlers.contract import (
    CUSTOM_ATTRIBUTES,
    endpoint_routes,
    route_attribute,
)
from slimserve.stacks.app import build_app
from slimserve.stacks.model_store import ModelStore, ModelStoreProps

IRIS_SHA = "2df43e351eee5a9bb6b4a44c9e4b83388cb64d7e67fd84880ff8886bd53c1680"
Match = assertions.Match


def stack_for(config):
    return build_app(config).node.find_child(config.name)


@pytest.fixture(scope="module")
def stack():
    return stack_for(load_config(ROOT / "slimserve.toml"))


@pytest.fixture(scope="module")
def template(stack):
    """The app's stack: store, API, monitoring."""
    return assertions.Template.from_stack(stack)


@pytest.fixture(scope="module")
def shard(stack):
    """The nested stack holding the example models and their routes."""
    (only,) = stack.shards
    return assertions.Template.from_stack(only)


@pytest.fixture(scope="module")
def resources(template):
    return template.to_json()["Resources"]


@pytest.fixture(scope="module")
def shard_resources(shard):
    return shard.to_json()["Resources"]


def logical_id(resources, kind: str, contains: str) -> str:
    (found,) = [key for key, value in resources.items() if value["Type"] == kind and contains in key]
    return found


# Model store


def test_model_store_bucket_is_versioned_kms_encrypted_private_and_logged(template):
    template.has_resource("AWS::S3::Bucket", {
        "DeletionPolicy": "Retain",
        "Properties": {
            "VersioningConfiguration": {"Status": "Enabled"},
            "BucketEncryption": {"ServerSideEncryptionConfiguration": [{
                "BucketKeyEnabled": True,
                "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": Match.any_value()},
            }]},
            "PublicAccessBlockConfiguration": {"BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True},
            "LoggingConfiguration": {"DestinationBucketName": Match.any_value(), "LogFilePrefix": "model-store/"},
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


def test_models_upload_with_the_deploy_under_their_sha256_keys(template):
    template.has_resource_properties("Custom::CDKBucketDeployment", {"Prune": False, "RetainOnDelete": True})
    staged = ROOT / "build" / "model-upload" / "slimserve-demo" / "models" / "iris" / IRIS_SHA
    assert (staged / "model.onnx").read_bytes() == (ROOT / "examples/models/iris.onnx").read_bytes()
    manifest = json.loads((staged / "manifest.json").read_text())
    assert manifest["sha256"] == IRIS_SHA and "created" not in manifest  # reproducible: same bytes, same asset


def test_s3_managed_encryption_from_config(tmp_path):
    (tmp_path / "m.onnx").write_bytes((ROOT / "examples/models/iris.onnx").read_bytes())
    config = parse_config({"app": {"name": "plain", "model_store_encryption": "s3-managed"},
                           "models": {"m": {"format": "onnx", "artifact": "m.onnx", "auth": "iam"}}}, tmp_path / "slimserve.toml")
    template = assertions.Template.from_stack(stack_for(config))
    assert not [k for k in template.find_resources("AWS::KMS::Key") if k.startswith("ModelStore")]
    template.has_resource_properties("AWS::S3::Bucket", {
        "VersioningConfiguration": {"Status": "Enabled"},
        "BucketEncryption": {"ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
    })
    assertions.Template.from_stack(stack_for(config).shards[0]).has_resource_properties(
        "AWS::ApiGateway::Method", {"HttpMethod": "POST", "AuthorizationType": "AWS_IAM", "ApiKeyRequired": False})


@pytest.mark.parametrize("props, message", [
    (ModelStoreProps(encryption="aws:kms"), "ModelStoreProps.encryption must be one of kms, s3-managed, got 'aws:kms'"),
    (ModelStoreProps(noncurrent_version_days=0), "ModelStoreProps.noncurrent_version_days must be >= 1, got 0"),
])
def test_bad_props_are_refused_before_any_resource(props, message):
    stack = Stack(App(), "S")
    with pytest.raises(ValueError) as caught:
        ModelStore(stack, "Store", props)
    assert str(caught.value) == message
    assert stack.node.children == []


@pytest.mark.parametrize("props, message", [
    ({"existing_bucket": "models", "encryption": "s3-managed"},
     "ModelStoreProps: existing_bucket, or encryption, noncurrent_version_days and removal_policy for a new bucket, not both"),
    ({"existing_key": "key"}, "ModelStoreProps.existing_key is the key of existing_bucket, which is not given"),
])
def test_an_existing_bucket_or_a_new_ones_props_not_both(props, message):
    from aws_cdk import aws_kms as kms

    stack = Stack(App(), "S")
    existing = {"existing_bucket": s3.Bucket.from_bucket_name(stack, "Mine", "my-models"),
                "existing_key": kms.Key.from_key_arn(stack, "MyKey", "arn:aws:kms:eu-west-1:123456789012:key/k")}
    with pytest.raises(ValueError) as caught:
        ModelStore(stack, "Store", ModelStoreProps(**{name: existing.get(name, value) for name, value in props.items()}))
    assert str(caught.value) == message


def test_an_existing_bucket_is_used_as_it_is_and_reads_are_granted_on_it():
    from aws_cdk import aws_iam as iam
    from aws_cdk import aws_kms as kms

    from slimserve.registry.store import StoredModel

    stack = Stack(App(), "S")
    key = kms.Key.from_key_arn(stack, "MyKey", "arn:aws:kms:eu-west-1:123456789012:key/k")
    store = ModelStore(stack, "Store", ModelStoreProps(existing_bucket=s3.Bucket.from_bucket_name(stack, "Mine", "my-models"),
                                                        existing_key=key))
    role = iam.Role(stack, "Reader", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
    store.grant_read_model(role, StoredModel("iris", "onnx", "my-models", f"models/iris/{IRIS_SHA}/model.onnx", IRIS_SHA, 1))
    template = assertions.Template.from_stack(stack)
    template.resource_count_is("AWS::S3::Bucket", 0)
    template.resource_count_is("AWS::KMS::Key", 0)
    (policy,) = template.find_resources("AWS::IAM::Policy").values()
    assert policy["Properties"]["PolicyDocument"]["Statement"] == [
        {"Action": "s3:GetObject", "Effect": "Allow",
         "Resource": {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, f":s3:::my-models/models/iris/{IRIS_SHA}/model.onnx"]]}},
        {"Action": "kms:Decrypt", "Effect": "Allow", "Resource": "arn:aws:kms:eu-west-1:123456789012:key/k"},
    ]


def test_alarms_page_an_existing_topic_instead_of_a_new_one():
    from aws_cdk import aws_sns as sns

    from slimserve.stacks.monitoring import ModelMonitoring, ModelMonitoringProps

    stack = Stack(App(), "S")
    topic = sns.Topic.from_topic_arn(stack, "OnCall", "arn:aws:sns:eu-west-1:123456789012:on-call")
    monitoring = ModelMonitoring(stack, "Monitoring", ModelMonitoringProps(app_name="a", existing_topic=topic))
    assert monitoring.topic is topic and monitoring.key is None
    template = assertions.Template.from_stack(stack)
    template.resource_count_is("AWS::SNS::Topic", 0)
    template.resource_count_is("AWS::KMS::Key", 0)
    with pytest.raises(ValueError) as caught:
        ModelMonitoring(stack, "Again", ModelMonitoringProps(app_name="a", existing_topic=topic, alarm_email="me@example.com"))
    assert str(caught.value) == "ModelMonitoringProps: existing_topic, or alarm_email for a new topic, not both"


# Lambda models


def test_one_function_per_model_from_its_config(shard):
    template = shard
    template.has_resource_properties("AWS::Lambda::Function", {
        "Runtime": "python3.12", "Handler": "lambda_handlers.handler.handler", "Architectures": ["x86_64"],
        "MemorySize": 512, "Timeout": 10, "ReservedConcurrentExecutions": 10, "EphemeralStorage": {"Size": 512},
        "TracingConfig": {"Mode": "Active"},
        "Environment": {"Variables": Match.object_like({
            "SLIMSERVE_MODEL_NAME": "iris", "SLIMSERVE_MODEL_FORMAT": "onnx", "SLIMSERVE_MODEL_SHA256": IRIS_SHA,
            "SLIMSERVE_MODEL_KEY": f"models/iris/{IRIS_SHA}/model.onnx", "SLIMSERVE_MODEL_BUCKET": Match.any_value()})},
        "Layers": [Match.any_value()],
    })
    template.has_resource_properties("AWS::Lambda::Alias", {"Name": "live"})
    template.resource_properties_count_is("AWS::Lambda::Alias", {"Name": "live"}, 2)
    template.has_resource_properties("AWS::Logs::LogGroup", {"RetentionInDays": 30})


def test_only_the_models_own_routes_on_the_deployed_stage_may_invoke_its_function(shard):
    permissions = shard.find_resources("AWS::Lambda::Permission")
    by_function = {}
    for permission in permissions.values():
        properties = permission["Properties"]
        assert (properties["Action"], properties["Principal"]) == ("lambda:InvokeFunction", "apigateway.amazonaws.com")
        by_function.setdefault(properties["FunctionName"]["Ref"], []).append(properties["SourceArn"]["Fn::Join"][1][-1])
    iris = next(suffixes for function, suffixes in by_function.items() if function.startswith("ModelirisLive"))
    assert sorted(iris) == sorted([
        "/prod/GET/v2/models/iris", "/prod/*/v2/models/iris/*", "/prod/GET/v1/models/iris", "/prod/*/v1/models/iris/*",
        "/prod/POST/v1/models/iris:predict"])
    assert len(by_function) == 2 and all(len(suffixes) == 5 for suffixes in by_function.values())


def test_models_share_one_layer_per_runtime(shard):
    template = shard
    layers = template.find_resources("AWS::Lambda::LayerVersion", {"Properties": {"Description": Match.string_like_regexp("^slimserve ")}})
    assert sorted(layer["Properties"]["Description"].split(" (")[0] for layer in layers.values()) == [
        "slimserve onnx runtime for python3.12 x86_64", "slimserve tflite runtime for python3.12 x86_64"]


def test_function_reads_exactly_its_own_model_object(shard, shard_resources):
    resources = shard_resources
    policy = resources[logical_id(resources, "AWS::IAM::Policy", "ModelirisRole")]
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    parameters = shard.to_json()["Parameters"]
    bucket_arn = next(name for name in parameters if "ModelStoreBucket" in name and name.endswith("Arn"))
    key_arn = next(name for name in parameters if "ModelStoreKey" in name and name.endswith("Arn"))
    assert {"Action": "s3:GetObject", "Effect": "Allow", "Resource": {
        "Fn::Join": ["", [{"Ref": bucket_arn}, f"/models/iris/{IRIS_SHA}/model.onnx"]]}} in statements
    assert {"Action": "kms:Decrypt", "Effect": "Allow", "Resource": {"Ref": key_arn}} in statements
    assert {"Action": ["logs:CreateLogStream", "logs:PutLogEvents"], "Effect": "Allow",
            "Resource": {"Fn::GetAtt": [logical_id(resources, "AWS::Logs::LogGroup", "ModelirisLogs"), "Arn"]}} in statements
    assert len(statements) == 4  # and X-Ray, which has no resource-level permissions
    role = resources[logical_id(resources, "AWS::IAM::Role", "ModelirisRole")]
    assert "ManagedPolicyArns" not in role["Properties"]


# API


def api_paths(*templates: dict) -> set[str]:
    """Every resource path, following parents across the nested stack's parameters."""
    parents = {key: value["Properties"] for template in templates for key, value in template["Resources"].items()
               if value["Type"] == "AWS::ApiGateway::Resource"}

    def path(key):
        parent = parents[key]["ParentId"]
        reference = parent.get("Ref", "") if isinstance(parent, dict) else ""
        if reference in parents:
            prefix = path(reference)
        else:  # the API root, or a resource passed into the nested stack as a parameter
            prefix = next((f"/{v}/models" for v in ("v1", "v2") if f"Api{v}models" in reference), "")
        return f"{prefix}/{parents[key]['PathPart']}"

    return {path(key) for key in parents}


def test_api_routes_are_the_local_gateways(template, shard):
    per_model = ["/v2/models/{m}", "/v2/models/{m}/infer", "/v2/models/{m}/{proxy+}", "/v1/models/{m}", "/v1/models/{m}/{proxy+}",
                 "/v1/models/{m}:predict"]
    expected = {"/v1", "/v2", "/v1/models", "/v2/models", "/v2/health", "/v2/health/live", "/v2/health/ready"}
    expected |= {route.replace("{m}", model) for model in ("iris", "digits") for route in per_model}
    assert api_paths(template.to_json(), shard.to_json()) == expected


def test_api_key_models_require_the_key_and_pass_binary_through(template, shard):
    template.has_resource_properties("AWS::ApiGateway::RestApi", {
        "BinaryMediaTypes": ["application/octet-stream", "application/vnd.slimserve.binary", "image/jpeg", "image/png"],
        "EndpointConfiguration": {"Types": ["REGIONAL"]}})
    methods = shard.find_resources("AWS::ApiGateway::Method", {"Properties": {"Integration": {"Type": "AWS_PROXY"}}})
    assert len(methods) == 12 and all(m["Properties"]["ApiKeyRequired"] is True for m in methods.values())
    template.has_resource_properties("AWS::ApiGateway::RequestValidator", {"ValidateRequestBody": True, "ValidateRequestParameters": True})


def test_stage_throttles_traces_and_logs_access(template):
    template.has_resource_properties("AWS::ApiGateway::Stage", {
        "StageName": "prod", "TracingEnabled": True,
        "AccessLogSetting": {"DestinationArn": Match.any_value(), "Format": Match.string_like_regexp('"status"')},
        "MethodSettings": [Match.object_like({"ThrottlingRateLimit": 100, "ThrottlingBurstLimit": 200,
                                              "DataTraceEnabled": False, "MetricsEnabled": True})]})
    template.has_resource_properties("AWS::ApiGateway::UsagePlan", {"Throttle": {"RateLimit": 100, "BurstLimit": 200}})
    template.resource_count_is("AWS::ApiGateway::ApiKey", 1)


# Monitoring


def test_alarms_for_every_model_go_to_one_encrypted_topic(template, resources):
    template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    topic = logical_id(resources, "AWS::SNS::Topic", "Alarms")
    alarms = template.find_resources("AWS::CloudWatch::Alarm")
    assert all(alarm["Properties"]["AlarmActions"] == [{"Ref": topic}] for alarm in alarms.values())
    names = sorted(alarm["Properties"]["AlarmName"] for alarm in alarms.values())
    for model in ("iris", "digits"):
        assert sum(f"{model}-lambda" in name for name in names) == 3, names  # fault rate, p99, throttles
        assert f"slimserve-demo-{model}-handler-server-errors" in names
    assert sum("-api-" in name for name in names) == 2, names  # 5xx, p99
    template.resource_count_is("AWS::CloudWatch::Dashboard", 1)
    template.has_resource_properties("AWS::CloudWatch::Alarm", {
        "AlarmName": Match.string_like_regexp("iris-lambda.*Latency"), "Threshold": 300})


# AWS's own judges


def test_cdk_nag_fails_a_synth_with_an_unacknowledged_finding():
    config = load_config(ROOT / "slimserve.toml")
    app = build_app(config)
    s3.Bucket(app.node.find_child(config.name), "Careless")  # no SSL enforcement, no access logs
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()


def test_control_towers_proactive_controls_fail_a_synth_with_an_unacknowledged_violation(tmp_path):
    """cfn-guard runs AWS Control Tower's rules in every synth: a log group kept a week (CT.CLOUDWATCH.PR.2), which
    cdk-nag lets pass, fails it, and the report names the rule and the construct."""
    from aws_cdk import aws_logs as logs

    from slimserve.stacks.context import CDK_CONTEXT

    config = load_config(ROOT / "slimserve.toml")
    app = build_app(config, App(outdir=str(tmp_path), context=CDK_CONTEXT))
    logs.LogGroup(app.node.find_child(config.name), "Short", retention=logs.RetentionDays.ONE_WEEK)
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = json.loads((tmp_path / "validation-report.json").read_text())
    failing = {(plugin["pluginName"], violation["ruleName"], construct["constructPath"])
               for plugin in report["pluginReports"] for violation in plugin["violations"]
               for construct in violation["violatingConstructs"]}
    assert failing == {
        ("cdk-validator-cfnguard", "cloudwatch_log_group_retention_period_check", "slimserve-demo/Short/Resource"),
        ("cdk-validator-cfnguard", "cloudwatch_log_group_encrypted_check", "slimserve-demo/Short/Resource"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("config", ["slimserve.toml", "examples/with-sagemaker.toml"])
def test_cfn_lint_finds_no_errors(tmp_path, monkeypatch, config):
    from slimserve.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["synth", "--config", config, "--out", str(tmp_path)]) == 0
    templates = sorted(str(path) for path in tmp_path.glob("*.template.json"))
    assert len(templates) == 2  # the app's stack and its nested model shard
    result = subprocess.run([sys.executable, "-m", "cfnlint", "--format", "json", *templates], capture_output=True, text=True)
    findings = json.loads(result.stdout or "[]")
    assert [f for f in findings if f["Level"] == "Error"] == []


def test_app_entry_reports_config_errors_without_a_trace(tmp_path):
    config = tmp_path / "slimserve.toml"
    config.write_text('[models.iris]\nformat = "onnx"\nartifact = "gone.onnx"\n')
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), str(config)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: {config}: models.iris.artifact: model file {tmp_path}/gone.onnx does not exist\n"


@pytest.mark.slow
def test_pinned_cdk_cli_synthesizes_offline_without_credentials(tmp_path):
    environment = {key: value for key, value in cdk_cli.environment().items() if not key.startswith("AWS_")}
    environment |= {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_CONFIG_FILE": "/dev/null"}
    result = subprocess.run(["node", str(cdk_cli.install()), "synth", "--no-notices", "--no-version-reporting", "--output",
                             str(tmp_path), "--quiet"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    template = json.loads((tmp_path / "slimserve-demo.template.json").read_text())
    assert sum(r["Type"] == "AWS::Lambda::Function" for r in template["Resources"].values()) == 1  # the upload handler
    (nested,) = tmp_path.glob("*.nested.template.json")
    assert sum(r["Type"] == "AWS::Lambda::Function" for r in json.loads(nested.read_text())["Resources"].values()) == 2


def test_sagemaker_models_without_an_image_get_slimserves_own_built_at_deploy(tmp_path):
    (tmp_path / "big.onnx").write_bytes((ROOT / "examples/models/iris.onnx").read_bytes())
    config = parse_config({"app": {"name": "own-image"}, "models": {"big": {
        "format": "onnx", "artifact": "big.onnx", "target": "sagemaker"}}}, tmp_path / "slimserve.toml")
    app = build_app(config)
    stack = app.node.find_child(config.name)
    template = assertions.Template.from_stack(stack)
    image = next(iter(template.find_resources("AWS::SageMaker::Model").values()))["Properties"]["PrimaryContainer"]["Image"]
    asset_hash = image["Fn::Sub"].rsplit(":", 1)[1]
    assert image["Fn::Sub"].startswith("${AWS::AccountId}.dkr.ecr.${AWS::Region}.${AWS::URLSuffix}/cdk-hnb659fds-container-assets-")
    staged = Path(app.synth().directory) / f"asset.{asset_hash}"  # synth stages the build context; deploy builds it
    assert sorted(path.name for path in staged.iterdir()) == ["lambda_handlers", "serving"]
    assert sorted(path.name for path in (staged / "serving").iterdir()) == ["Dockerfile", "requirements-gpu.txt"]
    assert (staged / "serving" / "Dockerfile").read_bytes() == (ROOT / "serving" / "Dockerfile").read_bytes()
    assert (tmp_path / "build" / "serving-image" / "serving" / "Dockerfile").is_file()  # staged beside the config first
    assert {path.name for path in (staged / "lambda_handlers").iterdir()} == {path.name for path in (ROOT / "lambda_handlers").glob("*.py")}
    (policy,) = [p for key, p in template.find_resources("AWS::IAM::Policy").items() if key.startswith("EndpointbigRole")]
    (pull,) = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if "ecr:BatchGetImage" in s["Action"]]
    assert "cdk-hnb659fds-container-assets-" in json.dumps(pull["Resource"])  # that repository only


def sagemaker_template(folder, sagemaker: dict, encryption: str = "kms") -> assertions.Template:
    (folder / "big.onnx").write_bytes((ROOT / "examples/models/iris.onnx").read_bytes())
    config = parse_config({"app": {"name": "sm", "model_store_encryption": encryption}, "models": {"big": {
        "format": "onnx", "artifact": "big.onnx", "target": "sagemaker", "sagemaker": sagemaker}}}, folder / "slimserve.toml")
    return assertions.Template.from_stack(stack_for(config))


IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mine:1"


@pytest.mark.parametrize("sagemaker, isolated", [
    ({}, True),  # slimserve's own image reads only /opt/ml/model
    ({"image": IMAGE}, True),
    ({"image": IMAGE, "network_isolation": False}, False),  # an image of yours that must reach the network
], ids=["own-image", "your-image", "your-image-with-network"])
def test_sagemaker_models_run_network_isolated_unless_the_config_says_otherwise(tmp_path, sagemaker, isolated):
    (model,) = sagemaker_template(tmp_path, sagemaker).find_resources("AWS::SageMaker::Model").values()
    assert model["Properties"]["EnableNetworkIsolation"] is isolated


@pytest.mark.parametrize("instance_type, volume_encrypted", [
    ("ml.c5.xlarge", True), ("ml.inf2.xlarge", True), ("ml.p3.2xlarge", True), ("ml.m7i.large", True),  # EBS volumes
    ("ml.g5.xlarge", False), ("ml.g6e.xlarge", False), ("ml.p4d.24xlarge", False),  # NVMe instance store: no KmsKeyId
])
def test_endpoint_volumes_are_encrypted_with_the_stores_key_where_the_family_takes_a_key(tmp_path, instance_type, volume_encrypted):
    (config,) = sagemaker_template(tmp_path, {"instance_type": instance_type}).find_resources("AWS::SageMaker::EndpointConfig").values()
    properties = config["Properties"]
    key = properties["DataCaptureConfig"]["KmsKeyId"]  # captured data: the store's key on every family
    assert key["Fn::GetAtt"][0].startswith("ModelStoreKey") and key["Fn::GetAtt"][1] == "Arn"
    assert properties.get("KmsKeyId") == (key if volume_encrypted else None)


def test_every_instance_family_is_either_ebs_or_instance_store():
    from slimserve.config import EBS_FAMILIES, INSTANCE_FAMILIES, INSTANCE_STORE_FAMILIES

    assert sorted(EBS_FAMILIES + INSTANCE_STORE_FAMILIES) == sorted(INSTANCE_FAMILIES)
    assert set(EBS_FAMILIES) == {"p3", "inf2", "c5", "c6i", "c7i", "m5", "m6i", "m7i", "r5"}


def test_an_s3_managed_store_sets_no_key_on_the_endpoint(tmp_path):
    (config,) = sagemaker_template(tmp_path, {"instance_type": "ml.c5.xlarge"}, "s3-managed").find_resources(
        "AWS::SageMaker::EndpointConfig").values()
    assert "KmsKeyId" not in config["Properties"] and "KmsKeyId" not in config["Properties"]["DataCaptureConfig"]


def test_sagemaker_models_answer_on_the_api_through_invoke_endpoint(gpu_template):
    methods = [m["Properties"] for m in gpu_template.find_resources("AWS::ApiGateway::Method").values()
               if m["Properties"]["Integration"].get("Type") == "AWS"]
    routes = endpoint_routes("big", "1")
    assert sorted(m["Integration"]["RequestParameters"][f"integration.request.header.{CUSTOM_ATTRIBUTES}"] for m in methods) == \
        sorted(f"'{route_attribute(method, path)}'" for method, path in routes)
    for method in methods:
        integration = method["Integration"]
        assert integration["Uri"]["Fn::Join"][1][-1] == ":runtime.sagemaker:path/endpoints/gpu-demo-big/invocations"
        assert (integration["IntegrationHttpMethod"], method["ApiKeyRequired"]) == ("POST", True)
        content_type = integration["RequestParameters"]["integration.request.header.Content-Type"]
        assert content_type == ("method.request.header.Content-Type" if method["HttpMethod"] == "POST" else "'application/json'")
        assert "RequestTemplates" not in integration if method["HttpMethod"] == "POST" else integration["RequestTemplates"] == {"application/json": "{}"}
        by_pattern = {r.get("SelectionPattern"): r for r in integration["IntegrationResponses"]}
        assert by_pattern["424"]["ResponseTemplates"]["application/json"] == MODEL_ERROR_TEMPLATE
        assert by_pattern[None]["ResponseParameters"]["method.response.header.Inference-Header-Content-Length"] == \
            f"integration.response.header.{CUSTOM_ATTRIBUTES}"
    (policy,) = [p for key, p in gpu_template.find_resources("AWS::IAM::Policy").items() if key.startswith("EndpointRoutesInvokeEndpointRole")]
    assert policy["Properties"]["PolicyDocument"]["Statement"] == [{"Action": "sagemaker:InvokeEndpoint", "Effect": "Allow", "Resource": {
        "Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":sagemaker:", {"Ref": "AWS::Region"}, ":", {"Ref": "AWS::AccountId"},
                          ":endpoint/gpu-demo-big"]]}}]


def test_api_resources_per_model_are_what_the_config_budgets(gpu_template, template, shard):
    server_own = len(template.find_resources("AWS::ApiGateway::Resource"))  # no model routes in the app's stack here
    assert server_own == 300 - API_RESOURCES_FOR_MODELS - 1  # and the root
    assert len(shard.find_resources("AWS::ApiGateway::Resource")) == 2 * API_RESOURCES_PER_MODEL["lambda"]
    assert len(gpu_template.find_resources("AWS::ApiGateway::Resource")) - server_own == API_RESOURCES_PER_MODEL["sagemaker"]


@pytest.fixture(scope="module")
def gpu_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    (folder / "big.onnx").write_bytes((ROOT / "examples/models/iris.onnx").read_bytes())
    config = parse_config({"app": {"name": "gpu-demo"}, "models": {"big": {
        "format": "onnx", "artifact": "big.onnx", "target": "sagemaker",
        "alarms": {"p99_latency_ms": 250, "gpu_utilization_percent": 95},
        "sagemaker": {"image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/slimserve-gpu:1", "data_capture_percent": 20,
                      "max_instances": 4, "invocations_per_instance": 300}}}}, folder / "slimserve.toml")
    return assertions.Template.from_stack(stack_for(config))


def test_gpu_endpoint_serves_the_models_folder_from_the_store(gpu_template):
    gpu_template.has_resource_properties("AWS::SageMaker::Model", {"PrimaryContainer": {
        "Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/slimserve-gpu:1",
        "ModelDataSource": {"S3DataSource": {"CompressionType": "None", "S3DataType": "S3Prefix",
                                             "S3Uri": {"Fn::Join": ["", ["s3://", Match.any_value(), f"/models/big/{IRIS_SHA}/"]]}}},
        "Environment": Match.object_like({"SLIMSERVE_MODEL_PATH": "/opt/ml/model/model.onnx", "SLIMSERVE_MODEL_SHA256": IRIS_SHA})}})
    gpu_template.has_resource_properties("AWS::SageMaker::EndpointConfig", {
        "ProductionVariants": [Match.object_like({"InstanceType": "ml.g5.xlarge", "InitialInstanceCount": 1, "VariantName": "AllTraffic"})],
        "DataCaptureConfig": {"EnableCapture": True, "InitialSamplingPercentage": 20, "KmsKeyId": Match.any_value(),
                              "DestinationS3Uri": {"Fn::Join": ["", ["s3://", Match.any_value(), "/data-capture/big/"]]},
                              "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}]}})


def test_gpu_endpoint_updates_blue_green_and_rolls_back_on_its_alarms(gpu_template):
    endpoint = next(iter(gpu_template.find_resources("AWS::SageMaker::Endpoint").values()))["Properties"]
    policy = endpoint["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"] == {"Type": "CANARY", "WaitIntervalInSeconds": 600,
                                                     "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}}
    rollback = [alarm["AlarmName"]["Ref"] for alarm in endpoint["DeploymentConfig"]["AutoRollbackConfiguration"]["Alarms"]]
    alarms = gpu_template.find_resources("AWS::CloudWatch::Alarm")
    metrics = {alarms[ref]["Properties"]["MetricName"]: alarms[ref]["Properties"] for ref in rollback}
    assert set(metrics) == {"ModelLatency", "Invocation5XXErrors", "GPUUtilization"}
    assert metrics["ModelLatency"]["Threshold"] == 250_000 and metrics["ModelLatency"]["ExtendedStatistic"] == "p99"
    assert metrics["GPUUtilization"]["Threshold"] == 95 and metrics["GPUUtilization"]["Namespace"] == "/aws/sagemaker/Endpoints"
    assert all(len(props["AlarmActions"]) == 1 for props in metrics.values())  # they page, too
    dashboard = json.dumps(next(iter(gpu_template.find_resources("AWS::CloudWatch::Dashboard").values()))["Properties"]["DashboardBody"])
    assert "GPUUtilization" in dashboard and "gpu-demo-big" in dashboard


def test_gpu_endpoint_scales_on_invocations_per_instance(gpu_template):
    gpu_template.has_resource_properties("AWS::ApplicationAutoScaling::ScalableTarget", {
        "MinCapacity": 1, "MaxCapacity": 4, "ResourceId": "endpoint/gpu-demo-big/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount", "ServiceNamespace": "sagemaker"})
    gpu_template.has_resource_properties("AWS::ApplicationAutoScaling::ScalingPolicy", {
        "TargetTrackingScalingPolicyConfiguration": Match.object_like({
            "TargetValue": 300, "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}})})


def test_gpu_endpoint_role_reads_its_model_folder_and_writes_only_its_capture(gpu_template):
    (policy,) = [p for key, p in gpu_template.find_resources("AWS::IAM::Policy").items() if key.startswith("EndpointbigRole")]
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    by_action = {json.dumps(s["Action"]): s for s in statements}
    assert by_action['"s3:GetObject"']["Resource"]["Fn::Join"][1][1] == f"/models/big/{IRIS_SHA}/*"
    assert by_action['"s3:PutObject"']["Resource"]["Fn::Join"][1][1] == "/data-capture/big/*"
    assert by_action['"s3:ListBucket"']["Condition"] == {"StringLike": {"s3:prefix": [f"models/big/{IRIS_SHA}/*"]}}
    assert by_action['"cloudwatch:PutMetricData"']["Condition"] == {"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*"]}}


@pytest.mark.slow
def test_the_most_models_an_app_takes_stay_under_cloudformations_limits(tmp_path):
    (tmp_path / "iris.onnx").write_bytes((ROOT / "examples/models/iris.onnx").read_bytes())
    models = {f"m{i}": {"format": "onnx", "artifact": "iris.onnx"} for i in range(30)}  # with 8 below: all the API holds
    models |= {f"s{i}": {"format": "onnx", "artifact": "iris.onnx", "target": "sagemaker"} for i in range(8)}
    stack = stack_for(parse_config({"app": {"name": "many"}, "models": models}, tmp_path / "slimserve.toml"))
    counts = [len(assertions.Template.from_stack(part).to_json()["Resources"]) for part in (stack, *stack.shards)]
    assert len(stack.shards) == 2 and max(counts) <= 500, counts
    assert sum(len(shard.lambda_models) for shard in stack.shards) == 30 and len(stack.gpu_endpoints) == 8


def test_new_versions_reach_live_through_codedeploy_with_rollback_alarms(shard, shard_resources):
    groups = shard.find_resources("AWS::CodeDeploy::DeploymentGroup")
    assert len(groups) == 2
    iris = next(g["Properties"] for key, g in groups.items() if "iris" in key)
    assert iris["DeploymentConfigName"] == "CodeDeployDefault.LambdaCanary10Percent5Minutes"
    assert iris["AutoRollbackConfiguration"] == {
        "Enabled": True, "Events": ["DEPLOYMENT_FAILURE", "DEPLOYMENT_STOP_ON_REQUEST", "DEPLOYMENT_STOP_ON_ALARM"]}
    assert iris["AlarmConfiguration"]["Enabled"] is True
    alarm_refs = [alarm["Name"]["Ref"] for alarm in iris["AlarmConfiguration"]["Alarms"]]
    alarms = {ref: shard_resources[ref]["Properties"] for ref in alarm_refs}
    thresholds = sorted(props["Threshold"] for props in alarms.values())
    assert thresholds == [1.0, 300]  # the model's error rate (%) and p99 (ms) from slimserve.toml
    assert all(len(props["AlarmActions"]) == 1 for props in alarms.values())  # and they page
    shard.has_resource("AWS::Lambda::Alias", {"UpdatePolicy": {"CodeDeployLambdaAliasUpdate": Match.any_value()}})


def test_deployment_strategy_from_config(tmp_path):
    (tmp_path / "m.onnx").write_bytes((ROOT / "examples/models/iris.onnx").read_bytes())
    config = parse_config({"models": {"m": {"format": "onnx", "artifact": "m.onnx", "deployment": "linear"}}}, tmp_path / "slimserve.toml")
    template = assertions.Template.from_stack(stack_for(config).shards[0])
    template.has_resource_properties("AWS::CodeDeploy::DeploymentGroup",
                                     {"DeploymentConfigName": "CodeDeployDefault.LambdaLinear10PercentEvery1Minute"})


def test_cli_synth_from_elsewhere_and_its_errors(tmp_path, monkeypatch, capsys):
    from slimserve.cli import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "slimserve.toml"
    config.write_text(f'[models.big]\nformat = "onnx"\nartifact = "{ROOT}/examples/models/iris.onnx"\ntarget = "gpu"\n')
    assert main(["synth", "--config", "slimserve.toml", "--out", "out"]) == 2
    assert capsys.readouterr().err == "error: slimserve.toml: models.big.target: expected one of 'lambda', 'sagemaker', found 'gpu'\n"
    assert not list(tmp_path.glob("out/*.template.json"))


@pytest.mark.parametrize("log_encryption", ["service", "kms"])
def test_log_groups_take_a_key_of_their_own_when_the_config_asks(tmp_path, log_encryption):
    (tmp_path / "iris.onnx").write_bytes((ROOT / "examples/models/iris.onnx").read_bytes())
    config = parse_config({"app": {"name": "logs", "log_encryption": log_encryption},
                           "models": {"iris": {"format": "onnx", "artifact": "iris.onnx"}}}, tmp_path / "slimserve.toml")
    stack = stack_for(config)
    groups = [group["Properties"] for part in (stack, *stack.shards)
              for group in assertions.Template.from_stack(part).find_resources("AWS::Logs::LogGroup").values()]
    assert len(groups) == 2  # the function's and the API's access logs
    if log_encryption == "service":
        assert not any("KmsKeyId" in group for group in groups)
        return
    keys = assertions.Template.from_stack(stack).find_resources("AWS::KMS::Key")
    (log_key_id,) = [key_id for key_id in keys if key_id.startswith("LogKey")]
    assert all("KmsKeyId" in group for group in groups)
    statements = keys[log_key_id]["Properties"]["KeyPolicy"]["Statement"]
    (for_logs,) = [statement for statement in statements if "Service" in statement["Principal"]]
    assert for_logs["Principal"]["Service"] == {"Fn::Join": ["", ["logs.", {"Ref": "AWS::Region"}, ".amazonaws.com"]]}
    assert list(for_logs["Condition"]["ArnLike"]) == ["kms:EncryptionContext:aws:logs:arn"]


@pytest.mark.parametrize("settings, timeouts", [
    ({}, (120, 180)),  # a model under a GiB: one minute plus one to download, two plus one to start
    ({"download_timeout_s": 900, "startup_timeout_s": 1800}, (900, 1800)),
])
def test_endpoint_timeouts_are_derived_from_the_model_size_unless_configured(tmp_path, settings, timeouts):
    (config,) = sagemaker_template(tmp_path, {"instance_type": "ml.g5.xlarge", **settings}).find_resources(
        "AWS::SageMaker::EndpointConfig").values()
    (variant,) = config["Properties"]["ProductionVariants"]
    assert (variant["ModelDataDownloadTimeoutInSeconds"], variant["ContainerStartupHealthCheckTimeoutInSeconds"]) == timeouts


def test_the_timeout_formula_grows_a_minute_a_gib_within_sagemakers_range():
    from slimserve.config import SageMakerSettings

    settings = SageMakerSettings()
    assert settings.timeouts_s(637) == (120, 180)
    assert settings.timeouts_s(int(2.5 * 2**30)) == (240, 300)  # 3 GiB started: the weights of issue 16's bench model
    assert settings.timeouts_s(200 * 2**30) == (3600, 3600)
