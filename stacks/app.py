"""The CDK app for one config: one stack, constructs per concern, reused per model."""

import json
from dataclasses import dataclass
from pathlib import Path

import aws_cdk as cdk
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from cdk_nag import AwsSolutionsChecks, ServerlessChecks
from constructs import Construct

from slimserve.config import Alarms, AppConfig, ModelConfig
from slimserve.registry.lock import locked_models
from slimserve.registry.store import StoredModel, stage_uploads

from .api import InferenceApi, InferenceApiProps, ModelRoutes
from .context import CDK_CONTEXT
from .defaults import log_retention
from .gpu_endpoint import GpuEndpoint, GpuEndpointProps, serving_image
from .keys import new_log_key
from .lambda_model import LambdaModel, LambdaModelProps
from .model_store import ModelStore, ModelStoreProps
from .monitoring import ModelMonitoring, ModelMonitoringProps
from .nag import ControlTowerControls


def _api_alarms(config: AppConfig) -> Alarms:
    """The API serves every model: alarm on its strictest thresholds."""
    models = config.models
    return Alarms(
        p99_latency_ms=min(m.alarms.p99_latency_ms for m in models),
        server_errors=min(m.alarms.server_errors for m in models),
    )


# a model takes 29 resources in its shard (5 of them invoke permissions, 1 its request model); a stack may hold 500
MODELS_PER_SHARD = 17


@dataclass(frozen=True)
class ModelShardProps:
    models: list[ModelConfig]
    """The Lambda models this shard holds."""
    stored: dict[str, StoredModel]
    """Where each model's version is in the store, by model name."""
    store: ModelStore
    api: InferenceApi
    """The API the shard adds its models' routes to."""
    log_retention: logs.RetentionDays = log_retention()
    """How long the functions' logs are kept. @default one month."""
    alarm_topic: sns.ITopic | None = None
    """Where the deployment alarms also page. @default they only roll back."""
    log_key: kms.IKey | None = None
    """Encrypts the functions' logs. @default CloudWatch Logs' service key."""


class ModelShard(cdk.NestedStack):
    """Some Lambda models and their routes, in a nested stack so the app is not bound by one stack's limits."""

    def __init__(self, scope: Construct, construct_id: str, props: ModelShardProps):
        names = ", ".join(model.name for model in props.models)
        super().__init__(scope, construct_id, description=f"slimserve models {names}")
        self.routes = ModelRoutes(self, "Routes", props.api)
        self.lambda_models = {}
        for model in props.models:
            lambda_model = LambdaModel(
                self,
                f"Model-{model.name}",
                LambdaModelProps(
                    model=model,
                    stored=props.stored[model.name],
                    store=props.store,
                    log_retention=props.log_retention,
                    alarm_topic=props.alarm_topic,
                    log_key=props.log_key,
                ),
            )
            self.routes.add_lambda_model(model.name, lambda_model.alias, model.auth, props.stored[model.name].signature)
            self.lambda_models[model.name] = lambda_model


class SlimserveStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, config: AppConfig, **kwargs):
        super().__init__(scope, construct_id, **kwargs)
        retention = log_retention(config.log_retention_days)
        log_key = new_log_key(self, "LogKey", f"{config.name} logs") if config.log_encryption == "kms" else None
        self.model_store = ModelStore(self, "ModelStore", ModelStoreProps(encryption=config.model_store_encryption))
        bucket_name = self.model_store.bucket.bucket_name
        locked = locked_models(config, bucket_name)  # registered versions, already in the store
        uploads = [model for model in config.models if model.name not in locked]
        staging = config.build_dir / "model-upload" / construct_id
        stored = {**locked, **stage_uploads(uploads, staging, bucket_name)}
        if uploads:
            self.model_store.add_uploads(staging)
        self.api = InferenceApi(
            self,
            "Api",
            InferenceApiProps(
                name=config.name,
                throttle_rate=config.throttle_rate,
                throttle_burst=config.throttle_burst,
                log_retention=retention,
                log_key=log_key,
            ),
        )
        self.monitoring = ModelMonitoring(
            self, "Monitoring", ModelMonitoringProps(app_name=config.name, alarm_email=config.alarm_email)
        )
        lambda_models = [model for model in config.models if model.target == "lambda"]
        self.shards = [
            ModelShard(
                self,
                f"Models{index + 1}",
                ModelShardProps(
                    models=lambda_models[start : start + MODELS_PER_SHARD],
                    stored=stored,
                    store=self.model_store,
                    api=self.api,
                    log_retention=retention,
                    alarm_topic=self.monitoring.topic,
                    log_key=log_key,
                ),
            )
            for index, start in enumerate(range(0, len(lambda_models), MODELS_PER_SHARD))
        ]
        self.lambda_models = {name: model for shard in self.shards for name, model in shard.lambda_models.items()}
        for model in lambda_models:
            self.monitoring.add_lambda_model(model.name, self.lambda_models[model.name].function, model.alarms)
        self.gpu_endpoints, endpoint_routes = self._gpu_endpoints(
            [m for m in config.models if m.target == "sagemaker"], stored, config.build_dir
        )
        stage = self.api.deploy([shard.routes for shard in self.shards] + endpoint_routes)
        self.monitoring.add_api(self.api.api, stage.stage_name, _api_alarms(config))
        cdk.CfnOutput(self, "ModelStoreBucket", value=self.model_store.bucket.bucket_name)
        cdk.CfnOutput(self, "ApiUrl", value=stage.url_for_path("/"))
        cdk.CfnOutput(self, "ApiKeyId", value=self.api.api_key.key_id)

    def _gpu_endpoints(
        self, models: list[ModelConfig], stored: dict, build_dir: Path
    ) -> tuple[dict[str, GpuEndpoint], list[ModelRoutes]]:
        """An endpoint per SageMaker model, its routes on the API and its alarms on the app's topic."""
        if not models:
            return {}, []
        own_image = (
            serving_image(self, build_dir / "serving-image")
            if any(model.sagemaker.image is None for model in models)
            else None
        )
        routes = ModelRoutes(self, "EndpointRoutes", self.api)
        endpoints = {}
        for model in models:
            endpoint = GpuEndpoint(
                self,
                f"Endpoint-{model.name}",
                GpuEndpointProps(
                    model=model,
                    stored=stored[model.name],
                    store=self.model_store,
                    image=model.sagemaker.image or own_image,
                ),
            )
            routes.add_endpoint_model(
                model.name, endpoint.endpoint_name, endpoint.version, model.auth, stored[model.name].signature
            )
            self.monitoring.add_gpu_endpoint(model.name, endpoint)
            endpoints[model.name] = endpoint
        return endpoints, [routes]


def build_app(config: AppConfig, app: cdk.App | None = None) -> cdk.App:
    # run through the CDK CLI, cdk.json's context arrives by itself (and wins); run directly, it is read here
    project_cdk_json = config.project_dir / "cdk.json"
    context = json.loads(project_cdk_json.read_text()).get("context", {}) if project_cdk_json.is_file() else {}
    app = app or cdk.App(context={**CDK_CONTEXT, **context})
    environment = (
        cdk.Environment(account=config.account, region=config.region) if config.account or config.region else None
    )
    SlimserveStack(
        app,
        config.name,
        config,
        env=environment,
        description=f"slimserve app {config.name}: {len(config.models)} models",
    )
    # AWS's own rule packs judge every synth; a finding without a reasoned suppression fails it
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app), ServerlessChecks(app), ControlTowerControls())
    return app
