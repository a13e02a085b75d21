"""What slimserve ships as package data and copies into what it builds: the Lambda function's code and the
serving image's build context. Found through the installed package, whichever way it was installed."""

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

LAMBDA_PACKAGE = "lambda_handlers"
"""The Lambda code's package name in a function (and in the serving image); installed: slimserve.lambda_handlers."""
HANDLER = f"{LAMBDA_PACKAGE}.handler.handler"
_NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc")


def cache_dir() -> Path:
    """What slimserve builds or installs once for every project: SLIMSERVE_CACHE_DIR, else $XDG_CACHE_HOME/slimserve,
    else ~/.cache/slimserve."""
    if os.environ.get("SLIMSERVE_CACHE_DIR"):
        return Path(os.environ["SLIMSERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimserve"


def layer_cache() -> Path:
    """The runtime layers, shared by every project: a layer's folder is named by the hash of what shapes it."""
    return cache_dir() / "layers"


def package_folder(package: str) -> Path:
    return Path(str(resources.files(package)))


def function_bundle(folder: Path, python: str | None) -> Path:
    """The function's code as Lambda gets it: the handler package, with bytecode compiled for `python` if given."""
    target = folder / LAMBDA_PACKAGE
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(package_folder("slimserve.lambda_handlers"), target, ignore=_NOT_SHIPPED)
    if python:
        subprocess.run(
            [python, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", str(target)], check=True
        )
    return folder


def serving_context(folder: Path) -> Path:
    """The serving image's Docker build context as serving/Dockerfile expects it: serving/ and lambda_handlers/."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(
        package_folder("slimserve.serving"),
        folder / "serving",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "__init__.py"),
    )
    return function_bundle(folder, None)
