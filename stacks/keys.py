"""The KMS keys slimserve creates: rotated yearly, and only AWS services may create grants on them."""

from aws_cdk import ArnFormat, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct


def new_key(scope: Construct, construct_id: str, description: str, removal_policy: RemovalPolicy) -> kms.Key:
    key = kms.Key(scope, construct_id, enable_key_rotation=True, removal_policy=removal_policy, description=description)
    # AWS Control Tower's CT.KMS.PR.3: a grant outlives IAM review, so no principal may mint one unless an AWS
    # service asks for it on the key user's behalf (SageMaker's, for an endpoint's volume and its data capture)
    key.add_to_resource_policy(
        iam.PolicyStatement(
            effect=iam.Effect.DENY,
            principals=[iam.AnyPrincipal()],
            actions=["kms:CreateGrant"],
            resources=["*"],
            conditions={"BoolIfExists": {"kms:GrantIsForAWSResource": "false", "aws:PrincipalIsAWSService": "false"}},
        )
    )
    return key


def new_log_key(scope: Construct, construct_id: str, description: str) -> kms.Key:
    """A key CloudWatch Logs may encrypt this account's log groups with, in this region (`log_encryption = "kms"`)."""
    key = new_key(scope, construct_id, description, RemovalPolicy.RETAIN)  # logs written with it outlive the stack
    stack = Stack.of(scope)
    key.add_to_resource_policy(
        iam.PolicyStatement(
            principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
            actions=["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"],
            resources=["*"],
            conditions={
                "ArnLike": {
                    "kms:EncryptionContext:aws:logs:arn": stack.format_arn(
                        service="logs",
                        resource="log-group",
                        resource_name="*",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                }
            },
        )
    )
    return key
