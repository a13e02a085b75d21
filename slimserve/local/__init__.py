"""The local stack: the gateway, Lambda-like worker processes, moto's S3 and the state file the CLI finds it by."""
