"""The rule packs that judge every synth (cdk-nag's, AWS Control Tower's), and acknowledging a finding of theirs with
the reason it is acceptable here."""

import aws_cdk as cdk
import jsii
from aws_cdk import Acknowledgment, Stack, Validations
from cdklabs.cdk_validator_cfnguard import CfnGuardValidator
from constructs import IConstruct


@jsii.implements(cdk.IPolicyValidationPlugin)
class ControlTowerControls:
    """AWS Control Tower's proactive controls, run by cdklabs' cfn-guard validator. Its violations carry no severity,
    and CDK counts a violation without one as passing once any finding of any rule pack is acknowledged (as ours
    are): each is marked an error here, so one without an acknowledgment fails the synth."""

    def __init__(self):
        self._guard = CfnGuardValidator()

    @property
    def name(self) -> str:
        return self._guard.name

    @property
    def version(self) -> str | None:
        return self._guard.version

    @property
    def rule_ids(self) -> list[str] | None:
        return self._guard.rule_ids

    def validate(self, context) -> cdk.PolicyValidationPluginReport:
        report = self._guard.validate(context)
        violations = [
            cdk.PolicyViolation(
                rule_name=violation.rule_name,
                description=violation.description,
                violating_resources=[
                    cdk.PolicyViolatingResource(  # CDK finds the construct from the logical id
                        locations=resource.locations,
                        resource_logical_id=resource.resource_logical_id,
                        template_path=resource.template_path,
                    )
                    for resource in violation.violating_resources
                ],
                fix=violation.fix,
                rule_metadata=violation.rule_metadata,
                severity=violation.severity or "error",
            )
            for violation in report.violations
        ]
        return cdk.PolicyValidationPluginReport(
            success=report.success,
            violations=violations,
            metadata=report.metadata,
            plugin_version=report.plugin_version,
        )


def acknowledge(construct: IConstruct, reasons: dict[str, str]) -> None:
    """`reasons` maps a finding (`AwsSolutions-IAM5[Resource::*]`, or a rule id) to why it stands."""
    Validations.of(construct).acknowledge(
        *(Acknowledgment(id=finding, reason=reason) for finding, reason in reasons.items())
    )


def control(rule: str) -> str:
    """The finding of one of AWS Control Tower's proactive controls, as the cfn-guard validator names it."""
    return f"cdk-validator-cfnguard::{rule}"


def managed_policy(name: str) -> str:
    """The finding for an AWS-managed policy on a role (`service-role/AWSLambdaBasicExecutionRole`)."""
    return f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{name}]"


def logical_id(construct: IConstruct) -> str:
    """The CloudFormation logical id cdk-nag writes into findings (`<ModelStoreBucket9405F36E.Arn>`)."""
    stack = Stack.of(construct)
    return stack.resolve(stack.get_logical_id(construct.node.default_child))
