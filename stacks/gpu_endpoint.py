"""A SageMaker real-time endpoint for a model too large or too slow for Lambda."""

from dataclasses import dataclass
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_applicationautoscaling as autoscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sagemaker as sagemaker
from constructs import Construct

from slimserve.assets import serving_context
from slimserve.config import EBS_FAMILIES, ModelConfig
from slimserve.lambda_handlers.contract import MODEL_DIR, model_environment
from slimserve.registry.store import StoredModel

from .model_store import ModelStore
from .nag import acknowledge, arn_in_findings

VARIANT = "AllTraffic"
# Invocation metrics live in AWS/SageMaker, instance metrics (GPU, CPU, memory) in /aws/sagemaker/Endpoints
INSTANCE_METRICS = ("GPUUtilization", "GPUMemoryUtilization", "CPUUtilization", "MemoryUtilization", "DiskUtilization")


@dataclass(frozen=True)
class GpuEndpointProps:
    model: ModelConfig
    """The model's config; its `sagemaker` settings size the endpoint."""
    stored: StoredModel
    """The model's files in the store: the folder under its sha256 is mounted at /opt/ml/model."""
    store: ModelStore
    image: "str | ecr_assets.DockerImageAsset"
    """The serving container (SageMaker's contract: GET /ping, POST /invocations on 8080): an image URI, or
    slimserve's own image built at deploy (`serving_image`)."""
    canary_percent: int = 10
    """Share of capacity that takes traffic first in a blue/green update. @default 10."""
    bake_seconds: int = 600
    """How long the canary must stay clear of alarms before the rest shifts. @default 10 minutes."""


def serving_image(scope: Construct, context: Path) -> ecr_assets.DockerImageAsset:
    """slimserve's serving container from serving/Dockerfile, built and pushed by `cdk deploy`; synth only stages
    its context (the Dockerfile, its requirements and the inference core) in `context`, so no Docker is needed
    before deploy."""
    return ecr_assets.DockerImageAsset(
        scope,
        "ServingImage",
        directory=str(serving_context(context)),
        file="serving/Dockerfile",
        platform=ecr_assets.Platform.LINUX_AMD64,
    )


class GpuEndpoint(Construct):
    """Model, endpoint config (with data capture) and endpoint with guarded blue/green updates and autoscaling."""

    def __init__(self, scope: Construct, construct_id: str, props: GpuEndpointProps):
        model, settings = props.model, props.model.sagemaker
        if model.target != "sagemaker" or settings is None:
            raise ValueError(f"GpuEndpointProps.model {model.name!r} has target {model.target!r}, not 'sagemaker'")
        if not 1 <= props.canary_percent <= 50:
            raise ValueError(f"GpuEndpointProps.canary_percent must be between 1 and 50, got {props.canary_percent}")
        super().__init__(scope, construct_id)
        self.endpoint_name = f"{cdk.Stack.of(self).stack_name}-{model.name}"[:63]
        self.version = props.stored.version  # the API routes `/versions/{version}` here
        capture_prefix = f"data-capture/{model.name}/"
        self.role = self._role(props, capture_prefix)
        self.model = self._model(props)
        self.config = self._config(props, capture_prefix)
        self.alarms = self._alarms(model)
        self.endpoint = self._endpoint(props)
        self._autoscaling(settings)

    def _role(self, props: GpuEndpointProps, capture_prefix: str) -> iam.Role:
        """Reads its model's folder, writes its captured data, logs and metrics, pulls its image: nothing else."""
        stack = cdk.Stack.of(self)
        role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
            description=f"slimserve {props.model.name}: read its model, write captured data and logs",
        )
        props.store.grant_read_model_folder(role, props.stored)
        props.store.grant_write_capture(role, capture_prefix)
        log_group = f"/aws/sagemaker/Endpoints/{self.endpoint_name}:*"
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                resources=[
                    stack.format_arn(
                        service="logs",
                        resource="log-group",
                        resource_name=log_group,
                        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*"]}},
            )
        )
        if isinstance(props.image, str):  # a repository of the user's: which one is not known here
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=[
                        "ecr:GetAuthorizationToken",
                        "ecr:BatchGetImage",
                        "ecr:GetDownloadUrlForLayer",
                        "ecr:BatchCheckLayerAvailability",
                    ],
                    resources=["*"],
                )
            )
        else:
            props.image.repository.grant_pull(role)
        capture_objects = f"{arn_in_findings(props.store.bucket, role)}/{capture_prefix}*"
        log_groups = "arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:"
        acknowledge(
            role,
            {
                "AwsSolutions-IAM5[Resource::*]": (
                    "ecr:GetAuthorizationToken and cloudwatch:PutMetricData have no resource-level permissions; "
                    "PutMetricData is limited to SageMaker's namespaces by condition; "
                    "an image URI from the config names a repository this app does not know"
                ),
                f"AwsSolutions-IAM5[Resource::{capture_objects}]": "this endpoint's captured requests",
                "AwsSolutions-IAM5[Action::kms:GenerateDataKey*]": "data capture encrypts with the store's key",
                "AwsSolutions-IAM5[Action::kms:ReEncrypt*]": "data capture encrypts with the store's key",
                f"AwsSolutions-IAM5[Resource::{log_groups}{log_group}]": "the endpoint's own log group and its streams",
            },
        )
        return role

    def _model(self, props: GpuEndpointProps) -> sagemaker.CfnModel:
        """The image, with the model version's folder mounted uncompressed at /opt/ml/model."""
        model = props.model
        image_uri = props.image if isinstance(props.image, str) else props.image.image_uri
        cfn_model = sagemaker.CfnModel(
            self,
            "Model",
            execution_role_arn=self.role.role_arn,
            enable_network_isolation=model.sagemaker.network_isolation,
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                image=image_uri,
                model_data_source=sagemaker.CfnModel.ModelDataSourceProperty(
                    s3_data_source=sagemaker.CfnModel.S3DataSourceProperty(
                        s3_uri=f"s3://{props.store.bucket.bucket_name}/{props.stored.folder}",
                        s3_data_type="S3Prefix",
                        compression_type="None",
                    )
                ),
                environment=model_environment(
                    model.name,
                    props.stored.version,
                    model.format,
                    props.stored.sha256,
                    path=f"{MODEL_DIR}/model.{model.format}",
                ),
            ),
        )
        cfn_model.node.add_dependency(self.role)
        return cfn_model

    def _config(self, props: GpuEndpointProps, capture_prefix: str) -> sagemaker.CfnEndpointConfig:
        """One variant of the configured instances, capturing the configured share of requests into the store."""
        settings = props.model.sagemaker
        capture = settings.data_capture_percent
        key_arn = props.store.key.key_arn if props.store.key else None
        volume_key = key_arn if settings.family in EBS_FAMILIES else None
        download_s, startup_s = settings.timeouts_s(props.stored.size)
        config = sagemaker.CfnEndpointConfig(
            self,
            "Config",
            kms_key_id=volume_key,
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name=VARIANT,
                    model_name=self.model.attr_model_name,
                    initial_instance_count=settings.initial_instance_count,
                    instance_type=settings.instance_type,
                    model_data_download_timeout_in_seconds=download_s,
                    container_startup_health_check_timeout_in_seconds=startup_s,
                )
            ],
            data_capture_config=sagemaker.CfnEndpointConfig.DataCaptureConfigProperty(
                enable_capture=capture > 0,
                initial_sampling_percentage=max(capture, 1),  # SageMaker wants 1..100 even when capture is off
                destination_s3_uri=props.store.bucket.s3_url_for_object(capture_prefix),
                kms_key_id=key_arn,
                capture_options=[
                    sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode=mode) for mode in ("Input", "Output")
                ],
            ),
        )
        return config

    def _endpoint(self, props: GpuEndpointProps) -> sagemaker.CfnEndpoint:
        """Updates go blue/green: a canary share first, rolled back if an alarm fires while it bakes."""
        return sagemaker.CfnEndpoint(
            self,
            "Endpoint",
            endpoint_name=self.endpoint_name,
            endpoint_config_name=self.config.attr_endpoint_config_name,
            deployment_config=sagemaker.CfnEndpoint.DeploymentConfigProperty(
                blue_green_update_policy=sagemaker.CfnEndpoint.BlueGreenUpdatePolicyProperty(
                    traffic_routing_configuration=sagemaker.CfnEndpoint.TrafficRoutingConfigProperty(
                        type="CANARY",
                        wait_interval_in_seconds=props.bake_seconds,
                        canary_size=sagemaker.CfnEndpoint.CapacitySizeProperty(
                            type="CAPACITY_PERCENT", value=props.canary_percent
                        ),
                    ),
                    termination_wait_in_seconds=300,
                    maximum_execution_timeout_in_seconds=props.bake_seconds + 3600,
                ),
                auto_rollback_configuration=sagemaker.CfnEndpoint.AutoRollbackConfigProperty(
                    alarms=[sagemaker.CfnEndpoint.AlarmProperty(alarm_name=alarm.alarm_name) for alarm in self.alarms]
                ),
            ),
        )

    def metric(self, name: str, statistic: str, minutes: int = 5) -> cloudwatch.Metric:
        """One of the endpoint's CloudWatch metrics, by SageMaker's name (ModelLatency, Invocations, GPUUtilization)."""
        return cloudwatch.Metric(
            namespace="/aws/sagemaker/Endpoints" if name in INSTANCE_METRICS else "AWS/SageMaker",
            metric_name=name,
            statistic=statistic,
            dimensions_map={"EndpointName": self.endpoint_name, "VariantName": VARIANT},
            period=cdk.Duration.minutes(minutes),
        )

    def _alarms(self, model: ModelConfig) -> list[cloudwatch.Alarm]:
        """Alarms that both page (via monitoring) and roll a blue/green update back."""

        def metric(name: str, statistic: str) -> cloudwatch.Metric:
            return self.metric(name, statistic, minutes=1)

        alarms = model.alarms
        specs = [
            (
                "ModelLatency",
                metric("ModelLatency", "p99"),
                alarms.p99_latency_ms * 1000,
                "p99 model latency (microseconds)",
            ),
            ("Invocation5XXErrors", metric("Invocation5XXErrors", "Sum"), alarms.server_errors, "5xx answers"),
            (
                "GPUUtilization",
                metric("GPUUtilization", "Average"),
                alarms.gpu_utilization_percent,
                "GPU utilization (%)",
            ),
        ]
        return [
            metric_.create_alarm(
                self,
                f"{name}Alarm",
                alarm_name=f"{self.endpoint_name}-{name}",
                threshold=threshold,
                evaluation_periods=3,
                datapoints_to_alarm=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
                alarm_description=f"{model.name}: {text}",
            )
            for name, metric_, threshold, text in specs
        ]

    def _autoscaling(self, settings) -> None:
        target = autoscaling.ScalableTarget(
            self,
            "Scaling",
            service_namespace=autoscaling.ServiceNamespace.SAGEMAKER,
            resource_id=f"endpoint/{self.endpoint_name}/variant/{VARIANT}",
            scalable_dimension="sagemaker:variant:DesiredInstanceCount",
            min_capacity=settings.min_instances,
            max_capacity=settings.max_instances,
        )
        target.node.add_dependency(self.endpoint)
        target.scale_to_track_metric(
            "InvocationsPerInstance",
            target_value=settings.invocations_per_instance,
            predefined_metric=autoscaling.PredefinedMetric.SAGEMAKER_VARIANT_INVOCATIONS_PER_INSTANCE,
            scale_in_cooldown=cdk.Duration.minutes(5),
            scale_out_cooldown=cdk.Duration.minutes(1),
        )
