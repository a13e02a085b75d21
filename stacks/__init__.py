"""CDK constructs and stacks: infrastructure only, built from a validated `AppConfig`."""
