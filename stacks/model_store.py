"""The model store: the one bucket every model version lives in."""

import math
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import Duration, RemovalPolicy, Size, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_deployment as s3_deployment
from constructs import Construct

from slimserve.config import ENCRYPTIONS, LAMBDA_MAX_MB, AppConfig, ConfigError
from slimserve.registry.store import StoredModel

from .keys import new_key
from .nag import acknowledge, arn_in_findings, control, logical_id, managed_policy

# The bootstrap's asset bucket, as cdk-nag writes it into findings
CDK_ASSETS_BUCKET = "arn:<AWS::Partition>:s3:::cdk-hnb659fds-assets-<AWS::AccountId>-<AWS::Region>"


UPLOAD_STORAGE_FACTOR = 2.2  # BucketDeployment's /tmp holds the asset's zip and the files unzipped, with headroom


@dataclass(frozen=True)
class ModelStoreProps:
    encryption: str = AppConfig.model_store_encryption
    """"kms": a customer-managed key with rotation; "s3-managed": SSE-S3. @default "kms"."""
    noncurrent_version_days: int = 90
    """Days an overwritten or deleted object version is kept. @default 90."""
    removal_policy: RemovalPolicy = RemovalPolicy.RETAIN
    """What `cdk destroy` does to the bucket, its key and its log bucket. @default RETAIN: models outlive stacks."""
    existing_bucket: s3.IBucket | None = None
    """A bucket of your own to keep the models in, instead of a new one; the props above then do not apply.
    @default a new bucket."""
    existing_key: kms.IKey | None = None
    """The KMS key that encrypts `existing_bucket`, if it is one: readers are granted decrypt on it.
    @default none (SSE-S3)."""


class ModelStore(Construct):
    """Versioned, encrypted, SSL-only, never public; access logged to a bucket of its own."""

    def __init__(self, scope: Construct, construct_id: str, props: ModelStoreProps = ModelStoreProps()):
        if props.encryption not in ENCRYPTIONS:
            raise ValueError(
                f"ModelStoreProps.encryption must be one of {', '.join(ENCRYPTIONS)}, got {props.encryption!r}"
            )
        if props.noncurrent_version_days < 1:
            raise ValueError(
                f"ModelStoreProps.noncurrent_version_days must be >= 1, got {props.noncurrent_version_days}"
            )
        if props.existing_key is not None and props.existing_bucket is None:
            raise ValueError("ModelStoreProps.existing_key is the key of existing_bucket, which is not given")
        new_bucket_props = {
            name: getattr(props, name) for name in ("encryption", "noncurrent_version_days", "removal_policy")
        }
        if props.existing_bucket is not None and new_bucket_props != {
            name: getattr(ModelStoreProps, name) for name in new_bucket_props
        }:
            raise ValueError(
                "ModelStoreProps: existing_bucket, or encryption, noncurrent_version_days and removal_policy "
                "for a new bucket, not both"
            )
        super().__init__(scope, construct_id)
        if props.existing_bucket is not None:
            self.bucket, self.key, self.access_logs = props.existing_bucket, props.existing_key, None
            return
        self.key = (
            new_key(self, "Key", "slimserve model store", props.removal_policy) if props.encryption == "kms" else None
        )
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,  # S3 server access logging cannot write to SSE-KMS buckets
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(365))],
            removal_policy=props.removal_policy,
        )
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            versioned=True,
            encryption=s3.BucketEncryption.KMS if self.key else s3.BucketEncryption.S3_MANAGED,
            encryption_key=self.key,
            bucket_key_enabled=self.key is not None,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="model-store/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    noncurrent_version_expiration=Duration.days(props.noncurrent_version_days),
                    abort_incomplete_multipart_upload_after=Duration.days(7),
                )
            ],
            removal_policy=props.removal_policy,
        )
        no_reader = "nothing reacts to a new object: the registry and deploys read the store when they need it"
        acknowledge(
            self.bucket,
            {
                control("s3_bucket_object_lock_enabled_check"): (
                    "object lock would keep versions past the noncurrent expiry that bounds the store's cost"
                ),
                control("s3_event_notifications_enabled_check"): no_reader,
            },
        )
        if self.key is None:
            acknowledge(self.bucket, {control("s3_bucket_default_encryption_kms_check"): "SSE-S3, as the props ask"})
        acknowledge(
            self.access_logs,
            {
                control("s3_bucket_default_encryption_kms_check"): "S3 server access logging cannot write to SSE-KMS",
                control("s3_bucket_versioning_enabled_check"): "log objects are written once and never overwritten",
                control(
                    "s3_bucket_logging_enabled_check"
                ): "the access-log bucket would log its own writes into itself",
                control("s3_bucket_object_lock_enabled_check"): "access logs expire after a year by the lifecycle rule",
                control("s3_event_notifications_enabled_check"): no_reader,
            },
        )

    def grant_read_model(self, grantee: iam.IGrantable, stored: StoredModel) -> None:
        """Read one model version's object, and decrypt it: all a function serving a model of one file needs
        (bucket.grant_read would add s3:GetObject* and s3:List* on the whole bucket). A version of several files is
        read from its folder, which the grant names."""
        if stored.files > 1:
            self._grant_read_folder(grantee, stored.folder)
            return
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[self.bucket.arn_for_objects(stored.key)])
        )
        self._grant_decrypt(grantee)

    def grant_read_model_folder(self, grantee: iam.IGrantable, stored: StoredModel) -> None:
        """Read and list one model version's folder, as SageMaker mounts it."""
        self._grant_read_folder(grantee, stored.folder)
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["s3:ListBucket"],
                resources=[self.bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{stored.folder}*"]}},
            )
        )

    def _grant_read_folder(self, grantee: iam.IGrantable, prefix: str) -> None:
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[self.bucket.arn_for_objects(f"{prefix}*")])
        )
        if isinstance(grantee, Construct):
            finding = f"AwsSolutions-IAM5[Resource::{arn_in_findings(self.bucket, grantee)}/{prefix}*]"
            acknowledge(grantee, {finding: "one model version's folder, named by its digest: its files and listing"})
        self._grant_decrypt(grantee)

    def _grant_decrypt(self, grantee: iam.IGrantable) -> None:
        if self.key is not None:
            self.key.grant_decrypt(grantee)

    def grant_write_capture(self, grantee: iam.IGrantable, prefix: str) -> None:
        """Write captured requests and responses under `prefix`, encrypted with the store's key."""
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(actions=["s3:PutObject"], resources=[self.bucket.arn_for_objects(f"{prefix}*")])
        )
        if self.key is not None:
            self.key.grant_encrypt(grantee)

    def add_uploads(self, staging: Path) -> None:
        """Upload a folder laid out as the store is (`stage_uploads` writes one) with the deploy. BucketDeployment's
        function unzips the folder's asset in its /tmp and copies it from there: it gets room for the zip and the
        files, and a folder too large for Lambda's most /tmp is refused, naming the way large models deploy."""
        sizes = {
            folder.name: sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
            for folder in (staging / "models").iterdir()
        }
        storage_mb = max(512, math.ceil(UPLOAD_STORAGE_FACTOR * sum(sizes.values()) / 2**20))
        if storage_mb > LAMBDA_MAX_MB:
            largest = ", ".join(
                f"{name} {size / 2**30:.1f} GiB" for name, size in sorted(sizes.items(), key=lambda i: -i[1])
            )
            most_gib = LAMBDA_MAX_MB / UPLOAD_STORAGE_FACTOR / 1024
            raise ConfigError(
                f"models that upload with the deploy ({largest}) are more than CDK's BucketDeployment can unzip in "
                f"its function's /tmp (at most {LAMBDA_MAX_MB} MB: about {most_gib:.1f} "
                "GiB of models): register the large ones (`slimserve register`) and deploy their versions (version = "
                '"1", `slimserve lock`)'
            )
        s3_deployment.BucketDeployment(
            self,
            "Models",
            sources=[s3_deployment.Source.asset(str(staging))],
            destination_bucket=self.bucket,
            prune=False,  # versions registered later stay
            retain_on_delete=True,
            memory_limit=512,
            ephemeral_storage_size=Size.mebibytes(storage_mb),
        )
        self._acknowledge_upload_handler()

    def _acknowledge_upload_handler(self) -> None:
        """BucketDeployment's handler is a singleton at stack level, written by aws-cdk-lib, not here."""
        stack = Stack.of(self)
        handler = next(c for c in stack.node.children if c.node.id.startswith("Custom::CDKBucketDeployment"))
        bucket = logical_id(self.bucket)
        copy = "BucketDeployment copies every object of the upload from the CDK asset bucket into the store"
        acknowledge(
            handler,
            {
                managed_policy("service-role/AWSLambdaBasicExecutionRole"): (
                    "aws-cdk-lib gives BucketDeployment's handler the managed basic execution role for its own logs"
                ),
                **{
                    f"AwsSolutions-IAM5[Action::{action}]": copy
                    for action in (
                        "s3:GetObject*",
                        "s3:GetBucket*",
                        "s3:List*",
                        "s3:DeleteObject*",
                        "s3:Abort*",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                    )
                },
                f"AwsSolutions-IAM5[Resource::<{bucket}.Arn>/*]": copy,
                f"AwsSolutions-IAM5[Resource::{CDK_ASSETS_BUCKET}/*]": copy,
                "AwsSolutions-L1": "aws-cdk-lib chooses the runtime of BucketDeployment's handler",
                "Serverless-LambdaLatestVersion": "aws-cdk-lib chooses the runtime of BucketDeployment's handler",
                "Serverless-LambdaDLQ": (
                    "a CloudFormation custom resource: CloudFormation reports and retries its failures"
                ),
                "Serverless-LambdaTracing": "a deploy-time custom resource, not on any request path",
                control("lambda_inside_vpc_check"): "copies between two S3 buckets at deploy time; it needs no VPC",
            },
        )
