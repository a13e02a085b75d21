"""One Lambda function per Lambda-target model, on a slim runtime layer built locally (no Docker)."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import aws_cdk as cdk
import jsii
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_codedeploy as codedeploy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct

from slimserve.assets import HANDLER, function_bundle, package_folder
from slimserve.config import ModelConfig
from slimserve.lambda_handlers.contract import (
    METRICS_NAMESPACE,
    METRICS_NAMESPACE_VARIABLE,
)
from slimserve.layers.builder import build_layer, find_python, layer_key
from slimserve.registry.store import StoredModel

from .defaults import DEPLOYMENT_CONFIGS, LAMBDA_ARCHITECTURES, log_group, log_retention
from .model_store import ModelStore
from .nag import acknowledge, managed_policy

PYTHON_VERSION = "3.12"
RUNTIME = lambda_.Runtime.PYTHON_3_12
ALIAS = "live"


@jsii.implements(cdk.ILocalBundling)
class _LayerBundling:
    """Builds (or reuses) the slim layer with the layer builder and copies it into the asset."""

    def __init__(self, runtime: str, architecture: str, out: Path | None):
        self.runtime, self.architecture, self.out = runtime, architecture, out

    def try_bundle(self, output_dir: str, options) -> bool:  # noqa: ARG002 (jsii passes the bundling options)
        layer = build_layer(self.runtime, PYTHON_VERSION, self.architecture, out=self.out)
        shutil.copytree(layer.python_path, Path(output_dir) / "python", symlinks=True, dirs_exist_ok=True)
        return True


@jsii.implements(cdk.ILocalBundling)
class _FunctionBundling:
    """The handler package with bytecode for the Lambda Python, as the local runner uses it."""

    def try_bundle(self, output_dir: str, options) -> bool:  # noqa: ARG002 (jsii passes the bundling options)
        function_bundle(Path(output_dir), find_python(PYTHON_VERSION))  # no python3.12 here: source only
        return True


def _local_only() -> cdk.DockerImage:
    # CDK wants an image for bundling; local bundling always succeeds, so it is never pulled
    return cdk.DockerImage.from_registry("slimserve/local-bundling-only")


def runtime_layer(
    scope: Construct, model_format: str, architecture: str, out: Path | None = None
) -> lambda_.LayerVersion:
    """One layer per runtime and architecture in a stack, shared by every model that needs it; built under `out`
    (default: the user cache's layers)."""
    stack = cdk.Stack.of(scope)
    layer_id = f"{model_format.capitalize()}Layer{architecture.replace('_', '').capitalize()}"
    existing = stack.node.try_find_child(layer_id)
    if existing is not None:
        return existing
    key = layer_key(model_format, PYTHON_VERSION, architecture)
    return lambda_.LayerVersion(
        stack,
        layer_id,
        code=lambda_.Code.from_asset(
            str(package_folder("slimserve.layers")),
            asset_hash_type=cdk.AssetHashType.CUSTOM,
            asset_hash=key,  # the builder's cache key: unchanged inputs, no rebuild
            bundling=cdk.BundlingOptions(image=_local_only(), local=_LayerBundling(model_format, architecture, out)),
        ),
        compatible_runtimes=[RUNTIME],
        compatible_architectures=[LAMBDA_ARCHITECTURES[architecture]],
        description=f"slimserve {model_format} runtime for python{PYTHON_VERSION} {architecture} ({key})",
    )


@dataclass(frozen=True)
class LambdaModelProps:
    model: ModelConfig
    """The model's config: memory, timeout, architecture, concurrency, SnapStart."""
    stored: StoredModel
    """Where the model's bytes are in the store, and their sha256."""
    store: ModelStore
    log_retention: logs.RetentionDays = log_retention()
    """How long the function's logs are kept. @default one month."""
    alarm_topic: sns.ITopic | None = None
    """Where the deployment alarms also page. @default they only roll back."""
    layer_dir: Path | None = None
    """Where the runtime layers are built. @default the user cache's layers, shared by every project."""
    log_key: kms.IKey | None = None
    """Encrypts the function's logs. @default CloudWatch Logs' service key."""


class LambdaModel(Construct):
    """The function, its log group, a least-privilege role, and a published version behind `live`."""

    def __init__(self, scope: Construct, construct_id: str, props: LambdaModelProps):
        model = props.model
        if model.target != "lambda":
            raise ValueError(f"LambdaModelProps.model {model.name!r} has target {model.target!r}, not 'lambda'")
        super().__init__(scope, construct_id)
        self.log_group = log_group(self, "Logs", props.log_retention, props.log_key)
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"slimserve {model.name}: read its model, write its logs",
        )
        self.function = lambda_.Function(
            self,
            "Function",
            runtime=RUNTIME,
            architecture=LAMBDA_ARCHITECTURES[model.architecture],
            handler=HANDLER,
            code=lambda_.Code.from_asset(
                str(package_folder("slimserve.lambda_handlers")),
                asset_hash_type=cdk.AssetHashType.SOURCE,
                exclude=["__pycache__"],
                bundling=cdk.BundlingOptions(image=_local_only(), local=_FunctionBundling()),
            ),
            layers=[runtime_layer(self, model.format, model.architecture, props.layer_dir)],
            memory_size=model.memory_mb,
            timeout=cdk.Duration.seconds(model.timeout_s),
            ephemeral_storage_size=cdk.Size.mebibytes(model.ephemeral_storage_mb),
            reserved_concurrent_executions=model.reserved_concurrency,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=self.log_group,
            role=self.role,
            snap_start=lambda_.SnapStartConf.ON_PUBLISHED_VERSIONS if model.snapstart else None,
            environment={**props.stored.environment(), METRICS_NAMESPACE_VARIABLE: METRICS_NAMESPACE},
            description=f"slimserve model {model.name} ({model.format})",
        )
        self.log_group.grant_write(self.role)
        props.store.grant_read_model(self.role, props.stored)
        self.alias = lambda_.Alias(
            self,
            "Live",
            alias_name=ALIAS,
            version=self.function.current_version,
            provisioned_concurrent_executions=model.provisioned_concurrency or None,
        )
        self.deployment = self._deployment(model, props.alarm_topic)
        acknowledge(
            self.role,
            {
                "AwsSolutions-IAM5[Resource::*]": "X-Ray's PutTraceSegments and PutTelemetryRecords "
                "support no resource-level permissions, so tracing needs Resource '*'"
            },
        )
        runtime_reason = (
            f"python{PYTHON_VERSION} matches the layer's wheels (ONNX Runtime, LiteRT) and the local runner; "
            "a newer runtime follows once its layer is built and tested"
        )
        acknowledge(
            self.function,
            {
                "AwsSolutions-L1": runtime_reason,
                "Serverless-LambdaLatestVersion": runtime_reason,
                "Serverless-LambdaDLQ": (
                    "invoked synchronously by API Gateway: a failed request is answered, there is nothing to redeliver"
                ),
            },
        )

    def _deployment(self, model: ModelConfig, topic: sns.ITopic | None) -> codedeploy.LambdaDeploymentGroup:
        """A new version reaches `live` through CodeDeploy, rolled back when the alias's errors or p99 pass the model's
        thresholds."""
        alarms = model.alarms
        errors = cloudwatch.MathExpression(
            expression="100 * errors / MAX([errors, invocations])",
            using_metrics={
                "errors": self.alias.metric_errors(statistic="Sum", period=cdk.Duration.minutes(1)),
                "invocations": self.alias.metric_invocations(statistic="Sum", period=cdk.Duration.minutes(1)),
            },
            label="error rate (%)",
            period=cdk.Duration.minutes(1),
        )
        checks = [
            metric.create_alarm(
                self,
                alarm_id,
                threshold=threshold,
                evaluation_periods=2,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description=f"{model.name}: {what} of the live alias during a deployment",
            )
            for alarm_id, metric, threshold, what in [
                ("ErrorRateAlarm", errors, alarms.error_rate_percent, "error rate"),
                (
                    "LatencyAlarm",
                    self.alias.metric_duration(statistic="p99", period=cdk.Duration.minutes(1)),
                    alarms.p99_latency_ms,
                    "p99 duration",
                ),
            ]
        ]
        if topic is not None:
            for alarm in checks:
                alarm.add_alarm_action(cloudwatch_actions.SnsAction(topic))
        group = codedeploy.LambdaDeploymentGroup(
            self,
            "Deployment",
            alias=self.alias,
            deployment_config=DEPLOYMENT_CONFIGS[model.deployment],
            alarms=checks,
            auto_rollback=codedeploy.AutoRollbackConfig(
                failed_deployment=True, stopped_deployment=True, deployment_in_alarm=True
            ),
        )
        acknowledge(
            group,
            {
                managed_policy("service-role/AWSCodeDeployRoleForLambdaLimited"): (
                    "CodeDeploy's Lambda role is AWS's own limited policy, scoped by CodeDeploy itself"
                )
            },
        )
        return group
