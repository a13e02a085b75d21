#!/usr/bin/env python3
"""CDK entry point: read the config named in cdk.json, build the stacks."""

import sys

from slimserve.config import ConfigError, load_config

try:
    config = load_config(sys.argv[1] if len(sys.argv) > 1 else "slimserve.toml")
except ConfigError as error:
    sys.exit(f"error: {error}")

from stacks.app import build_app  # noqa: E402  (CDK loads only once the config is known good)

build_app(config).synth()
