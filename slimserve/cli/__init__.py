"""The `slimserve` command line: one module per command group, each adding its own commands.

- project: init, check, layer, synth, cdk-app, and bootstrap, diff, deploy, destroy through the pinned CDK CLI
- local: serve and demo, on the local stack
- registry: register, versions, alias, rollback and lock, on the local or the deployed model store
- models: convert, optimize and examples

A user's mistake raises a `UserError`: one line on stderr, exit 2. Anything else is a bug in slimserve:
its traceback, a request to report it, exit 1.
"""

import argparse
import sys

from slimserve import __version__
from slimserve.errors import UserError

from . import local, models, project, registry

GROUPS = (project, local, registry, models)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slimserve", description="Serve ONNX and TFLite models on AWS Lambda and SageMaker."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print(
            f"error: this is a bug in slimserve {__version__}, not a mistake of yours: please report it with the "
            "traceback above and the command you ran",
            file=sys.stderr,
        )
        return 1
