"""The constructs' defaults and allowed values, taken from the config schema (`slimserve.config`) and put in CDK's
types: a default or a choice is written once, there, whether a stack is built from a config or by hand."""

from aws_cdk import aws_codedeploy as codedeploy
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs

from slimserve.config import ARCHITECTURES, DEPLOYMENTS, LOG_RETENTION, AppConfig


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
