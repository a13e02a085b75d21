"""Security checks over every synthesized template: IAM statements name exact resources, wildcards only
where AWS offers nothing narrower, and each such place is acknowledged with a reason (cdk-nag fails
the synth otherwise, see test_stacks)."""


import pytest
from aws_cdk import assertions
from support import ROOT

from slimserve.config import load_config
from slimserve.stacks.app import build_app

# Actions AWS authorizes on no resource narrower than "*" (its service authorization reference)
NO_RESOURCE_LEVEL = {"cloudwatch:PutMetricData", "ecr:GetAuthorizationToken", "xray:PutTelemetryRecords", "xray:PutTraceSegments"}
# Action families aws-cdk-lib's grants write, each on the exact bucket, key or asset bucket named below
GRANT_FAMILIES = {"kms:GenerateDataKey*", "kms:ReEncrypt*", "s3:Abort*", "s3:DeleteObject*", "s3:GetBucket*", "s3:GetObject*", "s3:List*"}


def resources(config_file: str):
    """(logical id, resource) for every resource of the app, its nested stacks' included."""
    config = load_config(ROOT / config_file)
    stack = build_app(config).node.find_child(config.name)
    for part in (stack, *stack.shards):
        yield from assertions.Template.from_stack(part).to_json()["Resources"].items()


def statements(config_file: str):
    for logical_id, resource in resources(config_file):
        documents = []
        if resource["Type"] == "AWS::IAM::Policy":
            documents.append(resource["Properties"]["PolicyDocument"])
        elif resource["Type"] == "AWS::IAM::Role":
            documents += [policy["PolicyDocument"] for policy in resource["Properties"].get("Policies", [])]
        for document in documents:
            for statement in document["Statement"]:
                yield logical_id, statement


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def flat(resource) -> str:
    """An ARN as text, references and functions as placeholders: enough to see where a wildcard sits."""
    if isinstance(resource, str):
        return resource
    if "Fn::Join" in resource:
        return "".join(flat(part) for part in resource["Fn::Join"][1])
    if "Fn::Sub" in resource:
        return resource["Fn::Sub"]
    return "<" + "".join(resource) + ">"


# what a resource ending in `*` may be: a folder of the model store, an endpoint's log group and its
# streams, CDK's asset bucket (BucketDeployment copies from it), or the store (BucketDeployment copies into it)
PREFIXES = ("/models/", "/data-capture/", ":log-group:/aws/sagemaker/Endpoints/", ":s3:::cdk-hnb659fds-assets-", "<Fn::GetAtt>/*")


@pytest.mark.parametrize("config_file", ["slimserve.toml", "examples/with-sagemaker.toml"])
def test_every_iam_statement_is_scoped_to_exact_resources(config_file):
    walked = 0
    for logical_id, statement in statements(config_file):
        walked += 1
        assert statement["Effect"] == "Allow", (logical_id, statement)
        actions, resources = as_list(statement["Action"]), as_list(statement.get("Resource", []))
        for action in actions:
            assert action != "*" and not action.endswith(":*"), (logical_id, action)
            assert "*" not in action or action in GRANT_FAMILIES, (logical_id, action)
        if "*" in resources:
            assert set(actions) <= NO_RESOURCE_LEVEL, (logical_id, actions)
            continue
        for resource in map(flat, resources):
            if "*" in resource:
                assert resource.count("*") == 1 and resource.endswith("*"), (logical_id, resource)
                assert any(prefix in resource for prefix in PREFIXES), (logical_id, resource)
    assert walked > 10


@pytest.mark.parametrize("config_file", ["slimserve.toml", "examples/with-sagemaker.toml"])
def test_only_aws_services_may_create_grants_on_every_key(config_file):
    """AWS Control Tower's CT.KMS.PR.3, as its rule reads: a Deny of kms:CreateGrant to every principal unless the grant
    is for an AWS resource or the caller an AWS service (SageMaker's grants for endpoint volumes pass)."""
    keys = [resource for _, resource in resources(config_file) if resource["Type"] == "AWS::KMS::Key"]
    assert len(keys) == 2  # the model store's and the alarm topic's
    for key in keys:
        assert {"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "kms:CreateGrant", "Resource": "*",
                "Condition": {"BoolIfExists": {"kms:GrantIsForAWSResource": "false", "aws:PrincipalIsAWSService": "false"}},
                } in key["Properties"]["KeyPolicy"]["Statement"]
        assert key["Properties"]["EnableKeyRotation"] is True
