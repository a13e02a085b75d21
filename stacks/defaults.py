"""The constructs' defaults and allowed values, taken from the config schema (`slimserve.config`) and put in CDK's
types: a default or a choice is written once, there, whether a stack is built from a config or by hand."""

from aws_cdk import RemovalPolicy
from aws_cdk import aws_codedeploy as codedeploy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from slimserve.config import ARCHITECTURES, DEPLOYMENTS, LOG_RETENTION, AppConfig


def log_group(
    scope: Construct, construct_id: str, retention: logs.RetentionDays, key: kms.IKey | None
) -> logs.LogGroup:
    """A log group as slimserve keeps them: for `retention`, on `key` (None: CloudWatch Logs' own), gone with the
    stack."""
    return logs.LogGroup(
        scope, construct_id, retention=retention, encryption_key=key, removal_policy=RemovalPolicy.DESTROY
    )


def log_retention(days: int = AppConfig.log_retention_days) -> logs.RetentionDays:
    return getattr(logs.RetentionDays, LOG_RETENTION[days])


LAMBDA_ARCHITECTURES = dict(zip(ARCHITECTURES, (lambda_.Architecture.X86_64, lambda_.Architecture.ARM_64), strict=True))
DEPLOYMENT_CONFIGS = dict(
    zip(
        DEPLOYMENTS,
        (
            codedeploy.LambdaDeploymentConfig.CANARY_10_PERCENT_5_MINUTES,
            codedeploy.LambdaDeploymentConfig.LINEAR_10_PERCENT_EVERY_1_MINUTE,
            codedeploy.LambdaDeploymentConfig.ALL_AT_ONCE,
        ),
        strict=True,
    )
)
