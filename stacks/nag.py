"""Acknowledging cdk-nag findings, each with the reason it is acceptable here."""

from aws_cdk import Acknowledgment, Validations
from constructs import IConstruct


def acknowledge(construct: IConstruct, reasons: dict[str, str]) -> None:
    """`reasons` maps a finding (`AwsSolutions-IAM5[Resource::*]`, or a rule id) to why it stands."""
    Validations.of(construct).acknowledge(*(Acknowledgment(id=finding, reason=reason) for finding, reason in reasons.items()))
