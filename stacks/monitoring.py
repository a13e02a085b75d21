"""Alarms for every model into one SNS topic, and one dashboard for the app."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import aws_cdk as cdk
import cdk_monitoring_constructs as monitoring
from aws_cdk import RemovalPolicy
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from slimserve.config import Alarms
from slimserve.lambda_handlers.contract import (
    COLD_START,
    ERRORS,
    INFERENCE_LATENCY,
    METRICS_NAMESPACE,
    MODEL_LOAD_FAILURES,
    MODEL_LOAD_TIME,
    REQUESTS,
    SERVER_ERROR_KINDS,
)

from .keys import new_key

if TYPE_CHECKING:
    from .gpu_endpoint import GpuEndpoint


@dataclass(frozen=True)
class ModelMonitoringProps:
    app_name: str
    """Prefix of alarm and dashboard names."""
    alarm_email: str | None = None
    """Subscribed to the alarm topic when set. @default no subscription."""
    existing_topic: sns.ITopic | None = None
    """A topic of your own (your on-call's) that the alarms publish to, instead of a new encrypted one; subscribe
    to it yourself. @default a new topic, encrypted with a key of its own."""


class ModelMonitoring(Construct):
    """A facade over cdk-monitoring-constructs where it covers the service, hand-written alarms where it does not."""

    def __init__(self, scope: Construct, construct_id: str, props: ModelMonitoringProps):
        if props.existing_topic is not None and props.alarm_email:
            raise ValueError("ModelMonitoringProps: existing_topic, or alarm_email for a new topic, not both")
        super().__init__(scope, construct_id)
        self.key, self.topic = None, props.existing_topic
        if self.topic is None:
            self.key, self.topic = self._topic(props)
        self.action = cloudwatch_actions.SnsAction(self.topic)
        self.facade = monitoring.MonitoringFacade(
            self,
            "Facade",
            alarm_factory_defaults=monitoring.AlarmFactoryDefaults(
                actions_enabled=True,
                alarm_name_prefix=props.app_name,
                action=monitoring.SnsAlarmActionStrategy(on_alarm_topic=self.topic),
                datapoints_to_alarm=2,
                evaluation_periods=3,
            ),
            dashboard_factory=monitoring.DefaultDashboardFactory(
                self,
                "Dashboards",
                dashboard_name_prefix=props.app_name,
                create_dashboard=True,
                create_summary_dashboard=False,
                create_alarm_dashboard=False,
            ),
        )

    def _topic(self, props: ModelMonitoringProps) -> tuple[kms.Key, sns.Topic]:
        key = new_key(self, "TopicKey", f"{props.app_name} alarm topic", RemovalPolicy.RETAIN)
        # CloudWatch publishes alarms into the encrypted topic, so it must be able to use the key
        key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
            )
        )
        topic = sns.Topic(self, "Alarms", master_key=key, enforce_ssl=True, display_name=f"{props.app_name} alarms")
        if props.alarm_email:
            topic.add_subscription(subscriptions.EmailSubscription(props.alarm_email))
        return key, topic

    def add_lambda_model(self, name: str, function: lambda_.IFunction, alarms: Alarms) -> None:
        self.facade.monitor_lambda_function(
            lambda_function=function,
            human_readable_name=f"{name} (Lambda)",
            alarm_friendly_name=f"{name}-lambda",
            add_fault_rate_alarm={"Critical": monitoring.ErrorRateThreshold(max_error_rate=alarms.error_rate_percent)},
            add_latency_p99_alarm={
                "Critical": monitoring.LatencyThreshold(max_latency=cdk.Duration.millis(alarms.p99_latency_ms))
            },
            add_throttles_count_alarm={"Critical": monitoring.ErrorCountThreshold(max_error_count=alarms.throttles)},
        )
        self._handler_metrics(name, alarms)

    def _handler_metrics(self, name: str, alarms: Alarms) -> None:
        """The handler's own EMF metrics. The facade graphs custom metrics but alarms on them are plainer by hand."""

        def emf(metric_name: str, statistic: str, error_kind: str | None = None) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name=metric_name,
                statistic=statistic,
                period=cdk.Duration.minutes(5),
                dimensions_map={"Model": name} | ({"ErrorKind": error_kind} if error_kind else {}),
            )

        self._graphs(
            f"{name} (handler)",
            f"{name}-handler",
            {
                "Inference latency": [emf(INFERENCE_LATENCY, "p99"), emf(INFERENCE_LATENCY, "p50")],
                "Requests and errors": [emf(REQUESTS, "Sum"), emf(ERRORS, "Sum")],
                "Cold starts": [
                    emf(COLD_START, "Sum"),
                    emf(MODEL_LOAD_TIME, "Maximum"),
                    emf(MODEL_LOAD_FAILURES, "Sum"),
                ],
            },
        )
        server_errors = cloudwatch.MathExpression(
            expression=" + ".join(f"FILL(e{i}, 0)" for i in range(len(SERVER_ERROR_KINDS))),
            using_metrics={f"e{i}": emf(ERRORS, "Sum", kind) for i, kind in enumerate(SERVER_ERROR_KINDS)},
            label=f"{name} server-side errors",
            period=cdk.Duration.minutes(5),
        )
        alarm = server_errors.create_alarm(
            self,
            f"{name}HandlerErrors",
            alarm_name=f"{cdk.Stack.of(self).stack_name}-{name}-handler-server-errors",
            threshold=alarms.server_errors,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=f"{name}: runtime failures, internal errors or a model that did not load (EMF ErrorKind)",
        )
        alarm.add_alarm_action(self.action)

    def add_gpu_endpoint(self, name: str, endpoint: "GpuEndpoint") -> None:
        """cdk-monitoring-constructs has no SageMaker monitoring in its facade, so the endpoint's own alarms
        (which also drive its blue/green rollback) page through the same topic, and its metrics are graphed as custom
        ones."""
        for alarm in endpoint.alarms:
            alarm.add_alarm_action(self.action)
        self._graphs(
            f"{name} (SageMaker)",
            f"{name}-sagemaker",
            {
                "Model latency (us)": [endpoint.metric("ModelLatency", "p99"), endpoint.metric("ModelLatency", "p50")],
                "Invocations and 5xx": [
                    endpoint.metric("Invocations", "Sum"),
                    endpoint.metric("Invocation5XXErrors", "Sum"),
                ],
                "GPU": [
                    endpoint.metric("GPUUtilization", "Average"),
                    endpoint.metric("GPUMemoryUtilization", "Average"),
                ],
            },
        )

    def _graphs(self, human_readable_name: str, friendly_name: str, groups: dict[str, list[cloudwatch.Metric]]) -> None:
        self.facade.monitor_custom(
            human_readable_name=human_readable_name,
            alarm_friendly_name=friendly_name,
            metric_groups=[
                monitoring.CustomMetricGroup(title=title, metrics=metrics) for title, metrics in groups.items()
            ],
        )

    def add_api(self, api, stage_name: str, alarms: Alarms) -> None:
        self.facade.monitor_api_gateway(
            api=api,
            api_stage=stage_name,
            human_readable_name="Inference API",
            alarm_friendly_name="api",
            add5_xx_fault_count_alarm={
                "Critical": monitoring.ErrorCountThreshold(max_error_count=alarms.server_errors)
            },
            add_latency_p99_alarm={
                "Critical": monitoring.LatencyThreshold(max_latency=cdk.Duration.millis(alarms.p99_latency_ms))
            },
        )
