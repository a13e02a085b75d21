"""The CDK feature flags every slimserve app is built with: `slimserve init` writes them into a project's
cdk.json, and an app run without the CDK CLI (`slimserve synth`) starts from them. No CDK import here."""

CDK_CONTEXT = {
    "@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy": True,
    "@aws-cdk/aws-s3:createDefaultLoggingPolicy": True,
    "@aws-cdk/core:enablePartitionLiterals": True,
}
