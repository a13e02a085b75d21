"""Acknowledging cdk-nag findings, each with the reason it is acceptable here."""

from aws_cdk import Acknowledgment, Stack, Validations
from constructs import IConstruct


def acknowledge(construct: IConstruct, reasons: dict[str, str]) -> None:
    """`reasons` maps a finding (`AwsSolutions-IAM5[Resource::*]`, or a rule id) to why it stands."""
    Validations.of(construct).acknowledge(
        *(Acknowledgment(id=finding, reason=reason) for finding, reason in reasons.items())
    )


def managed_policy(name: str) -> str:
    """The finding for an AWS-managed policy on a role (`service-role/AWSLambdaBasicExecutionRole`)."""
    return f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/{name}]"


def logical_id(construct: IConstruct) -> str:
    """The CloudFormation logical id cdk-nag writes into findings (`<ModelStoreBucket9405F36E.Arn>`)."""
    stack = Stack.of(construct)
    return stack.resolve(stack.get_logical_id(construct.node.default_child))
