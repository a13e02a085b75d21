"""The inference API: the routes the local gateway serves, on API Gateway (REST)."""

import json
from dataclasses import dataclass

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from slimserve.config import AUTH_MODES, AppConfig
from slimserve.contract.apigw import (
    BINARY_MEDIA_TYPES,
    ENDPOINT_FAILED,
    ENDPOINT_THROTTLED,
    MODEL_ERROR_TEMPLATE,
)
from slimserve.contract.schema import BAD_REQUEST_BODY_TEMPLATE, JSON_MEDIA_TYPE, v2_request_schema
from slimserve.lambda_handlers.contract import (
    CUSTOM_ATTRIBUTES,
    SERVER_NAME,
    SERVER_VERSION,
    endpoint_routes,
    route_attribute,
)

from .defaults import log_group, log_retention
from .nag import acknowledge, control, managed_policy


@dataclass(frozen=True)
class InferenceApiProps:
    name: str
    """The REST API's name."""
    throttle_rate: int = AppConfig.throttle_rate
    """Steady-state requests per second for the stage and the usage plan. @default 100."""
    throttle_burst: int = AppConfig.throttle_burst
    """Burst capacity. @default 200."""
    log_retention: logs.RetentionDays = log_retention()
    """How long access logs are kept. @default one month."""
    stage_name: str = "prod"
    """@default "prod"."""
    log_key: kms.IKey | None = None
    """Encrypts the access logs. @default CloudWatch Logs' service key."""


def _mock(status_body: dict) -> apigw.MockIntegration:
    return apigw.MockIntegration(
        request_templates={"application/json": '{"statusCode": 200}'},
        integration_responses=[
            apigw.IntegrationResponse(
                status_code="200", response_templates={"application/json": json.dumps(status_body)}
            )
        ],
        passthrough_behavior=apigw.PassthroughBehavior.WHEN_NO_TEMPLATES,
    )


class InferenceApi(Construct):
    """The REST API, its validation, health routes, stage, throttling, usage plan and access logs.

    Model routes are added by `ModelRoutes`, which may live in other (nested) stacks so
    that one app can hold more models than a single stack's 500 resources allow; `deploy`
    then publishes the stage once every route exists.
    """

    def __init__(self, scope: Construct, construct_id: str, props: InferenceApiProps):
        if props.throttle_rate < 1 or props.throttle_burst < 1:
            raise ValueError(
                "InferenceApiProps throttle_rate and throttle_burst must be >= 1, "
                f"got {props.throttle_rate}, {props.throttle_burst}"
            )
        super().__init__(scope, construct_id)
        self.props = props
        self.api = apigw.RestApi(
            self,
            "Api",
            rest_api_name=props.name,
            description="slimserve inference API: Open Inference Protocol V2 and TF Serving REST",
            binary_media_types=list(BINARY_MEDIA_TYPES),  # the binary tensor extension passes through untouched
            endpoint_types=[apigw.EndpointType.REGIONAL],
            cloud_watch_role=True,
            deploy=False,  # deployed by `deploy`, after the routes in other stacks
        )
        self.validator = self.api.add_request_validator(
            "Validator", validate_request_parameters=True, validate_request_body=True
        )
        # a body the request model refuses gets the core's {"error": "..."} shape, not API Gateway's own
        self.api.add_gateway_response(
            "BadRequestBody",
            type=apigw.ResponseType.BAD_REQUEST_BODY,
            status_code="400",
            templates={JSON_MEDIA_TYPE: BAD_REQUEST_BODY_TEMPLATE},
        )
        self.models_v2 = self._path("v2", "models")
        self.models_v1 = self._path("v1", "models")
        v2 = self.api.root.get_resource("v2")
        self._public(v2, "GET", {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]})
        health = v2.add_resource("health")
        self._public(health.add_resource("live"), "GET", {"live": True})
        self._public(health.add_resource("ready"), "GET", {"ready": True})
        acknowledge(
            self.api,
            {
                managed_policy("service-role/AmazonAPIGatewayPushToCloudWatchLogs"): (
                    "API Gateway's account-level CloudWatch role is the AWS-managed push-to-logs policy, "
                    "as CDK creates it"
                ),
            },
        )

    def _path(self, *parts: str) -> apigw.IResource:
        resource = self.api.root
        for part in parts:
            resource = resource.get_resource(part) or resource.add_resource(part)
        return resource

    def _public(self, resource: apigw.IResource, method: str, answer: dict) -> None:
        resource.add_method(
            method,
            _mock(answer),
            request_validator=self.validator,
            method_responses=[apigw.MethodResponse(status_code="200")],
        )
        _acknowledge_auth(resource, "server health and metadata carry no model data and answer without credentials")

    def deploy(self, routes: list["ModelRoutes"]) -> apigw.Stage:
        """Publish the stage once every model's routes exist; a changed set of models is a new deployment."""
        props = self.props
        deployment = apigw.Deployment(self, "Deployment", api=self.api, description="slimserve routes")
        deployment.add_to_logical_id(sorted(f"{name}:{auth}" for group in routes for name, auth in group.models))
        for group in routes:
            deployment.node.add_dependency(group)
        self.access_logs = log_group(self, "AccessLogs", props.log_retention, props.log_key)
        acknowledge(
            self.access_logs,
            {
                control("cloudwatch_log_group_retention_period_check"): (
                    "kept for the config's log_retention_days (30 by default): access logs are for debugging, not audit"
                ),
            },
        )
        if props.log_key is None:
            acknowledge(
                self.access_logs,
                {
                    control(
                        "cloudwatch_log_group_encrypted_check"
                    ): 'CloudWatch Logs\' service key (log_encryption = "kms")'
                },
            )
        self.stage = apigw.Stage(
            self,
            "Stage",
            deployment=deployment,
            stage_name=props.stage_name,
            access_log_destination=apigw.LogGroupLogDestination(self.access_logs),
            access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
                caller=False,
                http_method=True,
                ip=True,
                protocol=True,
                request_time=True,
                resource_path=True,
                response_length=True,
                status=True,
                user=False,
            ),
            logging_level=apigw.MethodLoggingLevel.ERROR,
            data_trace_enabled=False,  # request bodies are tensors, and may be personal data
            tracing_enabled=True,
            metrics_enabled=True,
            throttling_rate_limit=props.throttle_rate,
            throttling_burst_limit=props.throttle_burst,
        )
        self.api.deployment_stage = self.stage
        usage_plan = self.api.add_usage_plan(
            "UsagePlan",
            name=f"{props.name}-default",
            throttle=apigw.ThrottleSettings(rate_limit=props.throttle_rate, burst_limit=props.throttle_burst),
            api_stages=[apigw.UsagePlanPerApiStage(api=self.api, stage=self.stage)],
        )
        self.api_key = self.api.add_api_key(
            "ApiKey", description=f"{props.name}: the key for models with auth 'api_key'"
        )
        usage_plan.add_api_key(self.api_key)
        acknowledge(
            self.stage,
            {
                "AwsSolutions-APIG3": (
                    "WAF is an account-level choice with its own cost; attach a web ACL to the stage where needed"
                ),
            },
        )
        return self.stage


class ModelRoutes(Construct):
    """Every route the local gateway serves for some models, on an API defined in another stack."""

    def __init__(self, scope: Construct, construct_id: str, api: InferenceApi):
        super().__init__(scope, construct_id)
        rest_api = apigw.RestApi.from_rest_api_attributes(
            self, "Api", rest_api_id=api.api.rest_api_id, root_resource_id=api.api.rest_api_root_resource_id
        )
        self.models_v2 = apigw.Resource.from_resource_attributes(
            self, "V2Models", resource_id=api.models_v2.resource_id, rest_api=rest_api, path="/v2/models"
        )
        self.models_v1 = apigw.Resource.from_resource_attributes(
            self, "V1Models", resource_id=api.models_v1.resource_id, rest_api=rest_api, path="/v1/models"
        )
        self.validator = apigw.RequestValidator.from_request_validator_id(
            self, "Validator", api.validator.request_validator_id
        )
        self.rest_api_id, self.stage_name = api.api.rest_api_id, api.props.stage_name
        self.models: list[tuple[str, str]] = []

    def add_lambda_model(self, name: str, target: lambda_.IFunction, auth: str, signature: dict | None = None) -> None:
        """The model's routes, proxied to `target` (its `live` alias); V2 JSON bodies checked against `signature`."""
        options, reason = self._auth(name, auth)
        stack = cdk.Stack.of(self)
        # LambdaIntegration would let any stage, method and path of the API invoke the function: the permissions below
        # name the stage and this model's routes only
        integration = apigw.Integration(
            type=apigw.IntegrationType.AWS_PROXY,
            integration_http_method="POST",
            uri=stack.format_arn(
                service="apigateway",
                account="lambda",
                resource="path/2015-03-31/functions",
                resource_name=f"{target.function_arn}/invocations",
                arn_format=cdk.ArnFormat.SLASH_RESOURCE_NAME,
            ),
        )
        v2 = self.models_v2.add_resource(name)
        v1 = self.models_v1.add_resource(name)
        routes = [  # six resources a model (config.API_RESOURCES_PER_MODEL): API Gateway allows 300 per API by default
            (v2, "GET"),  # metadata
            (v2.add_resource("{proxy+}"), "ANY"),  # ready, versions/{v}[/ready|/infer]
            (v1, "GET"),  # status
            (v1.add_resource("{proxy+}"), "ANY"),  # metadata, versions/{v}[/metadata|:predict]
            (self.models_v1.add_resource(f"{name}:predict"), "POST"),
        ]
        for index, (resource, method) in enumerate(routes):
            resource.add_method(method, integration, **options)
            _acknowledge_auth(resource, reason, iam_authorised=auth == "iam")
            path = resource.path.replace("{proxy+}", "*")
            target.add_permission(
                f"ApiRoute{index}",
                principal=iam.ServicePrincipal("apigateway.amazonaws.com"),
                source_arn=stack.format_arn(
                    service="execute-api",
                    resource=self.rest_api_id,
                    resource_name=f"{self.stage_name}/{'*' if method == 'ANY' else method}{path}",
                    arn_format=cdk.ArnFormat.SLASH_RESOURCE_NAME,
                ),
            )
        # infer on a resource of its own, to carry the request model; v2/{proxy+}'s permission covers it
        infer = v2.add_resource("infer")
        infer.add_method("POST", integration, **options, **self._request_model(name, signature))
        _acknowledge_auth(infer, reason, iam_authorised=auth == "iam")
        self.models.append((name, auth))

    def _request_model(self, name: str, signature: dict | None) -> dict:
        """The infer method's request model: the model's V2 request schema for JSON bodies (slimserve.contract.schema);
        none where the signature is not known."""
        if signature is None:
            return {}
        schema = apigw.CfnModel(
            self,
            f"RequestModel-{name}",
            rest_api_id=self.rest_api_id,
            content_type=JSON_MEDIA_TYPE,
            description=f"{name}: a V2 inference request, from the model's signature",
            schema=v2_request_schema(name, signature),
        )
        model = apigw.Model.from_model_name(self, f"RequestModelName-{name}", schema.ref)
        return {"request_models": {JSON_MEDIA_TYPE: model}}

    def add_endpoint_model(
        self, name: str, endpoint_name: str, version: str, auth: str, signature: dict | None = None
    ) -> None:
        """The model's routes, each an InvokeEndpoint call that tells the container which route the client called.

        InvokeEndpoint passes on only Content-Type, Accept and one custom-attributes header, so each
        route is a resource of its own with its route as a constant (see lambda_handlers.sagemaker_server).
        """
        options, reason = self._auth(name, auth)
        endpoint_arn = cdk.Stack.of(self).format_arn(
            service="sagemaker", resource="endpoint", resource_name=endpoint_name.lower()
        )
        self._invoke_role().add_to_policy(
            iam.PolicyStatement(actions=["sagemaker:InvokeEndpoint"], resources=[endpoint_arn])
        )
        request_model = self._request_model(name, signature)  # both infer routes, unversioned and versioned
        for method, path in endpoint_routes(name, version):
            resource = self.models_v2 if path.startswith("/v2/") else self.models_v1
            for part in path.split("/")[3:]:
                resource = resource.get_resource(part) or resource.add_resource(part)
            checked = request_model if path.endswith("/infer") else {}
            resource.add_method(
                method,
                self._endpoint_integration(endpoint_name, method, path),
                **options,
                **checked,
                request_parameters={"method.request.header.Content-Type": False, "method.request.header.Accept": False},
                method_responses=_ENDPOINT_METHOD_RESPONSES,
            )
            _acknowledge_auth(resource, reason, iam_authorised=auth == "iam")
        self.models.append((name, auth))

    def _endpoint_integration(self, endpoint_name: str, method: str, path: str) -> apigw.AwsIntegration:
        parameters = {
            f"integration.request.header.{CUSTOM_ATTRIBUTES}": f"'{route_attribute(method, path)}'",
            "integration.request.header.Accept": "method.request.header.Accept",
        }
        if method == "POST":  # the body as the client sent it, binary tensors included
            parameters["integration.request.header.Content-Type"] = "method.request.header.Content-Type"
            templates, passthrough = None, apigw.PassthroughBehavior.WHEN_NO_TEMPLATES
        else:  # InvokeEndpoint always posts a body
            parameters["integration.request.header.Content-Type"] = "'application/json'"
            templates, passthrough = {"application/json": "{}"}, apigw.PassthroughBehavior.WHEN_NO_MATCH
        json_type = {"method.response.header.Content-Type": "'application/json'"}
        return apigw.AwsIntegration(
            service="runtime.sagemaker",
            path=f"endpoints/{endpoint_name}/invocations",
            integration_http_method="POST",
            options=apigw.IntegrationOptions(
                credentials_role=self._invoke_role(),
                request_parameters=parameters,
                request_templates=templates,
                passthrough_behavior=passthrough,
                integration_responses=[
                    apigw.IntegrationResponse(
                        status_code="200",
                        response_parameters={
                            "method.response.header.Content-Type": "integration.response.header.Content-Type",
                            "method.response.header.Inference-Header-Content-Length": (
                                f"integration.response.header.{CUSTOM_ATTRIBUTES}"
                            ),
                        },
                    ),
                    apigw.IntegrationResponse(
                        status_code="400",
                        selection_pattern="424",
                        response_parameters=json_type,
                        response_templates={"application/json": MODEL_ERROR_TEMPLATE},
                    ),
                    apigw.IntegrationResponse(
                        status_code=str(ENDPOINT_THROTTLED.status),
                        selection_pattern="429",
                        response_parameters=json_type,
                        response_templates={"application/json": json.dumps(ENDPOINT_THROTTLED.payload)},
                    ),
                    apigw.IntegrationResponse(
                        status_code=str(ENDPOINT_FAILED.status),
                        selection_pattern=r"(4(?!24|29)|5)\d\d",
                        response_parameters=json_type,
                        response_templates={"application/json": json.dumps(ENDPOINT_FAILED.payload)},
                    ),
                ],
            ),
        )

    def _invoke_role(self) -> iam.Role:
        """One role for every endpoint route here; each endpoint adds a statement for its own ARN."""
        role = self.node.try_find_child("InvokeEndpointRole")
        return role or iam.Role(
            self,
            "InvokeEndpointRole",
            assumed_by=iam.ServicePrincipal("apigateway.amazonaws.com"),
            description="slimserve API: invoke the SageMaker endpoints of its models",
        )

    def _auth(self, name: str, auth: str) -> tuple[dict, str]:
        """The method options for a model's auth mode, and the reason the nag findings about it are acknowledged."""
        if auth not in AUTH_MODES:
            raise ValueError(f"auth for model {name!r} must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
        options = {
            "api_key_required": auth == "api_key",
            "authorization_type": apigw.AuthorizationType.IAM if auth == "iam" else apigw.AuthorizationType.NONE,
            "request_validator": self.validator,
        }
        reason = {
            "api_key": "authorised by API key and usage plan, as slimserve.toml asks for this model",
            "none": "auth = 'none' is an explicit choice in slimserve.toml for this model",
            "iam": "authorised by IAM (SigV4), as slimserve.toml asks for this model",
        }[auth]
        return options, reason


# every status the container's core answers, and the API's own for SageMaker's refusals
_ENDPOINT_METHOD_RESPONSES = [
    apigw.MethodResponse(
        status_code=str(status),
        response_parameters={
            "method.response.header.Content-Type": True,
            "method.response.header.Inference-Header-Content-Length": False,
        },
    )
    for status in (200, 400, 404, 405, 413, 415, 429, 500, 502, 503)
]


def _acknowledge_auth(resource: apigw.IResource, reason: str, iam_authorised: bool = False) -> None:
    findings = {"AwsSolutions-COG4": reason} | ({} if iam_authorised else {"AwsSolutions-APIG4": reason})
    acknowledge(resource, findings)
