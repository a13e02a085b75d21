#!/usr/bin/env python3
"""CDK entry point of this repository's example project (its cdk.json runs it): `slimserve cdk-app` for a config."""

import sys

from slimserve.cli import main

sys.exit(main(["cdk-app", "--config", sys.argv[1] if len(sys.argv) > 1 else "slimserve.toml"]))
