"""CDK constructs and stacks: infrastructure only, built from a validated `AppConfig`.

Importing them starts jsii, aws_cdk's bridge to Node 22 or newer: call
`slimserve.cdk_cli.use_bundled_node()` first to run the Node that the cdk extra brings.
"""
