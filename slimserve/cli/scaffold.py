"""`slimserve init`: a project of the user's own, with nothing in it tied to where slimserve is installed."""

import json
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from slimserve import __version__
from slimserve.config import DEFAULT_CONFIG, MODEL_NAME
from slimserve.errors import UserError
from slimserve.modelfiles import model_files
from slimserve.registry.versions import SUFFIX_FORMATS
from slimserve.stacks.context import CDK_CONTEXT

WORKFLOW = Path(".github") / "workflows" / "slimserve.yml"


class ScaffoldError(UserError):
    pass


def _config(app: str, model: str, format_: str, artifact: str) -> str:
    return f'''# The models this project serves. slimserve's README documents every key ("Config reference");
# an unset key takes the default shown there. `slimserve check` validates this file.

[app]
name = "{app}"  # the CloudFormation stack's name
# region = "eu-west-1"  # where `slimserve deploy` puts it (default: your AWS profile's region)
# alarm_email = "you@example.com"  # CloudWatch alarms mail here, once you confirm the subscription

[defaults]  # every model's, unless its own table says otherwise
auth = "iam"  # iam: callers sign with AWS credentials (SigV4); api_key only meters; none is open to anyone

[models.{model}]
format = "{format_}"  # onnx or tflite
artifact = "{artifact}"  # the model file, relative to this file
target = "lambda"  # lambda; sagemaker for models too large or slow for Lambda (a GPU endpoint)
memory_mb = 1024  # Lambda memory (128-10240): more memory is also more CPU

# A second model on a SageMaker endpoint (billed per instance-hour while it runs):
# [models.{model}-gpu]
# format = "{format_}"
# artifact = "{artifact}"
# target = "sagemaker"
# [models.{model}-gpu.sagemaker]
# instance_type = "ml.g5.xlarge"
'''


def install_requirement(extras: str) -> str:
    """What the project's CI installs: the source this slimserve came from where any machine can reach it (a git or
    https URL, as pip recorded it in direct_url.json), else this release by version."""
    try:
        direct = json.loads(distribution("slimserve").read_text("direct_url.json") or "{}")
    except PackageNotFoundError:
        direct = {}
    vcs = direct.get("vcs_info")
    if vcs:
        return f"slimserve[{extras}] @ {vcs['vcs']}+{direct['url']}@{vcs['commit_id']}"
    if direct.get("url", "").startswith("https://"):
        return f"slimserve[{extras}] @ {direct['url']}"
    return f"slimserve[{extras}]=={__version__}"


def _workflow(extras: str) -> str:
    requirement = install_requirement(extras)
    where = (
        ""
        if "@" in requirement
        else "      # slimserve is not on PyPI yet: point this at a wheel or git URL your CI can reach\n"
    )
    return f'''# On every push: checks the slimserve config, synthesizes the stacks, audits what a deploy ships.
# A config error, a cdk-nag or AWS Control Tower finding without a reasoned acknowledgment, or a known
# vulnerability in the runtime layers' or the serving image's packages fails the job.
name: slimserve
on: [push, pull_request]
jobs:
  synth:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.12"
      - uses: actions/cache@v4  # the runtime layers and the CDK CLI, built once per slimserve version
        with:
          path: ~/.cache/slimserve
          key: slimserve-${{{{ runner.os }}}}-{__version__}
{where}      - run: pip install "{requirement}"
      - run: slimserve check
      - run: slimserve synth
      - run: pip install pip-audit && slimserve audit  # known vulnerabilities in the layers and the serving image
'''


GITIGNORE = "build/\ncdk.out/\n.venv/\n__pycache__/\n"


@dataclass(frozen=True)
class Scaffold:
    written: list[Path]
    model: str
    """The model's name in the config: the model file's name, else the project folder's."""
    artifact: str
    """Where the config expects the model file, relative to the project."""


def init_project(folder: Path, model: Path | None = None) -> Scaffold:
    """Writes the project's files into `folder` (made if missing); refuses, writing nothing, if any exists."""
    folder = Path(folder)
    app = _name(folder.resolve().name, "slimserve-app")
    copies: dict[str, Path] = {}
    if model is not None:
        if model.suffix not in SUFFIX_FORMATS:
            raise ScaffoldError(
                f"{model}: expected an .onnx or .tflite model file, found {model.suffix or 'no suffix'!r}"
            )
        if not model.is_file():
            raise ScaffoldError(f"{model}: model file does not exist")
        name, format_ = _name(model.stem, "model"), SUFFIX_FORMATS[model.suffix]
        copies = _model_copies(model)
        artifact = next(iter(copies))
    else:
        name = _name(folder.resolve().name, "model")
        format_, artifact = "onnx", f"models/{name}.onnx"
    files = {
        Path(DEFAULT_CONFIG): _config(app, name, format_, artifact),
        Path("cdk.json"): json.dumps(
            {"app": f"slimserve cdk-app --config {DEFAULT_CONFIG}", "context": CDK_CONTEXT}, indent=2
        )
        + "\n",
        Path(".gitignore"): GITIGNORE,
        WORKFLOW: _workflow("runtime,cdk"),
    }
    existing = [str(folder / path) for path in [*files, *copies] if (folder / path).exists()]
    if existing:
        raise ScaffoldError(
            f"{existing[0]} already exists; nothing written (init makes a new project: choose an empty folder)"
        )
    written = []
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
        written.append(folder / path)
    (folder / "models").mkdir(exist_ok=True)
    for target, source in copies.items():
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / target)
        written.append(folder / target)
    return Scaffold(written, name, artifact)


def _model_copies(model: Path) -> dict[str, Path]:
    """{path in the project: file to copy}, the model's first: `models/<file>`, or with external data the model and
    its data files in a folder of their own, `models/<stem>/`, named as the model names them."""
    files = model_files(model)
    if not files.data:
        return {f"models/{model.name}": model}
    folder = f"models/{model.stem}"
    return {f"{folder}/{model.name}": model, **{f"{folder}/{name}": model.parent / name for name in files.data}}


def _name(text: str, fallback: str) -> str:
    """A model or app name from a file or folder name: lower case, letters, digits and hyphens."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].rstrip("-")
    return name if MODEL_NAME.fullmatch(name) else fallback
