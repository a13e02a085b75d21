"""The model store: the one bucket every model version lives in."""

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

ENCRYPTIONS = ("kms", "s3-managed")


@dataclass(frozen=True)
class ModelStoreProps:
    encryption: str = "kms"
    """"kms": a customer-managed key with rotation; "s3-managed": SSE-S3. @default "kms"."""
    noncurrent_version_days: int = 90
    """Days an overwritten or deleted object version is kept. @default 90."""
    removal_policy: RemovalPolicy = RemovalPolicy.RETAIN
    """What `cdk destroy` does to the bucket, its key and its log bucket. @default RETAIN: models outlive stacks."""


class ModelStore(Construct):
    """Versioned, encrypted, SSL-only, never public; access logged to a bucket of its own."""

    def __init__(self, scope: Construct, construct_id: str, props: ModelStoreProps = ModelStoreProps()):
        if props.encryption not in ENCRYPTIONS:
            raise ValueError(f"ModelStoreProps.encryption must be one of {', '.join(ENCRYPTIONS)}, got {props.encryption!r}")
        if props.noncurrent_version_days < 1:
            raise ValueError(f"ModelStoreProps.noncurrent_version_days must be >= 1, got {props.noncurrent_version_days}")
        super().__init__(scope, construct_id)
        self.key = (
            kms.Key(self, "Key", enable_key_rotation=True, removal_policy=props.removal_policy,
                    description="slimserve model store")
            if props.encryption == "kms"
            else None
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
