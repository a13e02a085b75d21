#!/usr/bin/env python3
"""CDK entry point: read the config named in cdk.json, build the stacks."""

import sys

from slimserve.config import ConfigError, load_config

try:
    config = load_config(sys.argv[1] if len(sys.argv) > 1 else "slimserve.toml")
    from stacks.app import build_app  # CDK loads only once the config is known good

    app = build_app(config)
except ConfigError as error:
    sys.exit(f"error: {error}")
app.synth()
