"""The rule packs that judge every synth (cdk-nag's, AWS Control Tower's), and acknowledging a finding of theirs with
the reason it is acceptable here."""

import functools
from pathlib import Path

import aws_cdk as cdk
import jsii
from aws_cdk import Acknowledgment, Names, Stack, Validations
from cdklabs.cdk_validator_cfnguard import CfnGuardValidator
from constructs import IConstruct

# The services slimserve's templates use. Control Tower's rules for the others (EC2, RDS, ...: 208 of 237) cannot
# match, and skipping them makes a 50-model synth 11 s faster here (18.7 s to 7.9 s). A resource of another service
# added by hand to a stack is then not judged by Control Tower's rules (cdk-nag's still judge it).
JUDGED_SERVICES = {"apigateway", "cloudwatch", "iam", "kms", "lambda", "s3", "sagemaker"}


@functools.cache  # the same for every app a process builds (the tests build dozens)
def _rules_for_other_services() -> tuple[str, ...]:
    """The bundled rules' names (ct-ec2-pr-1, ...) for services outside JUDGED_SERVICES, read from the package."""
    import tarfile
    from importlib import resources

    (bundle,) = [
        item for item in resources.files("cdklabs.cdk_validator_cfnguard._jsii").iterdir() if item.name.endswith(".tgz")
    ]
    with resources.as_file(bundle) as path, tarfile.open(path) as archive:
        rules = [
            Path(name)
            for name in archive.getnames()
            if "/rules/control-tower/cfn-guard/" in name and name.endswith(".guard")
        ]
    return tuple(sorted(rule.stem for rule in rules if rule.parent.name not in JUDGED_SERVICES))


@jsii.implements(cdk.IPolicyValidationPlugin)
class ControlTowerControls:
    """AWS Control Tower's proactive controls, run by cdklabs' cfn-guard validator. Its violations carry no severity,
    and CDK counts a violation without one as passing once any finding of any rule pack is acknowledged (as ours
    are): each is marked an error here, so one without an acknowledgment fails the synth."""

    def __init__(self):
        self._guard = CfnGuardValidator(disabled_rules=list(_rules_for_other_services()))

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


def arn_in_findings(resource: IConstruct, seen_from: IConstruct) -> str:
    """How cdk-nag writes `resource`'s ARN in a finding on `seen_from`: a GetAtt in the same stack, else the parameter
    aws-cdk-lib passes it into a nested stack as (`reference-to-<unique id>.Arn`, sanitized)."""
    if Stack.of(resource) is Stack.of(seen_from):
        return f"<{logical_id(resource)}.Arn>"
    return f"<referenceto{Names.node_unique_id(resource.node.default_child.node)}Arn>"
