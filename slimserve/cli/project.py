"""Project commands: init, check, layer, synth, cdk-app, and the AWS CDK CLI's bootstrap, diff, deploy, destroy."""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from slimserve.config import DEFAULT_CONFIG, load_config
from slimserve.errors import UserError

from .common import add_config, counted, files_text


def add_commands(commands) -> None:
    init = commands.add_parser("init", help="start a project: slimserve.toml, cdk.json, .gitignore and a CI workflow")
    init.add_argument("dir", nargs="?", default=".", help="the project's folder, made if missing (default: this one)")
    init.add_argument("--model", help="an .onnx or .tflite file to copy into the project's models/ and serve")
    init.set_defaults(run=_init)

    check = commands.add_parser("check", help="validate the config and load its models as serving would")
    add_config(check)
    check.set_defaults(run=_check)

    audit = commands.add_parser(
        "audit", help="check the pins of what a deploy ships (runtime layers, serving image) for known vulnerabilities"
    )
    audit.set_defaults(run=_audit)

    layer = commands.add_parser("layer", help="build (or reuse) a slim runtime layer and print its size report")
    layer.add_argument("--runtime", default="onnx", help="onnx, tflite, tflite-py311 or lambda-runtime")
    layer.add_argument("--python", default="3.12", help="the Lambda Python version")
    layer.add_argument("--arch", default="x86_64", help="x86_64 or arm64")
    layer.add_argument("--out", help="where layers are built (default: the user cache, ~/.cache/slimserve/layers)")
    layer.set_defaults(run=_layer)

    synth = commands.add_parser("synth", help="synthesize the CloudFormation templates and count their resources")
    add_config(synth)
    synth.add_argument("--out", help="cloud assembly folder (default: cdk.out beside the config)")
    synth.set_defaults(run=_synth)

    cdk_app = commands.add_parser("cdk-app", help="the CDK app itself, as cdk.json runs it (cdk synth, cdk deploy)")
    add_config(cdk_app)
    cdk_app.set_defaults(run=_cdk_app)

    for name, text in [
        ("bootstrap", "prepare an AWS account and region for CDK deploys (once per account and region)"),
        ("diff", "show what a deploy would change in the AWS account"),
        ("deploy", "deploy the project's stack, then print its API URL and how to read the API key"),
        ("destroy", "delete the project's stack (the model store's bucket is kept)"),
    ]:
        command = commands.add_parser(
            name,
            help=text,
            description=f"{text}. Runs the pinned AWS CDK CLI, installed into "
            "the user cache on first use; arguments after -- go to it unchanged.",
        )
        add_config(command)
        command.add_argument("--profile", help="AWS profile (default: the AWS CLI's default credentials)")
        command.add_argument("--region", help="AWS region (default: app.region, else the profile's region)")
        if name == "destroy":
            command.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        command.add_argument("cdk_arguments", nargs=argparse.REMAINDER, help="-- then arguments for the CDK CLI")
        command.set_defaults(run=_cdk)


def _loadable_config(path: str):
    """The config and each model's files, every model loaded as serving would load it: what `serve` or a deploy
    would refuse is refused here, in one line naming the config key and the file."""
    from slimserve.registry.versions import RegistryError, read_model

    config = load_config(path)
    files = {}
    for model in config.models:
        try:
            files[model.name] = read_model(model.artifact)
        except RegistryError as error:
            raise UserError(f"{config.path}: models.{model.name}.artifact: {error}") from None
    return config, files


def _check(args) -> int:
    config, files = _loadable_config(args.config)
    print(f"{config.path}: app {config.name!r}, {counted(len(config.models), 'model')}")
    for model in config.models:
        size = files[model.name].size
        described = files_text(len(files[model.name].stored), size)
        if model.sagemaker:
            download_s, startup_s = model.sagemaker.timeouts_s(size)
            where = f"{model.sagemaker.instance_type}, download timeout {download_s} s, startup {startup_s} s"
        else:
            where = f"{model.memory_mb} MB {model.architecture}"
        print(
            f"  {model.name}: {model.format} {model.artifact} ({described}) -> {model.target} ({where}), "
            f"auth {model.auth}"
        )
        if model.sagemaker and model.sagemaker.min_instances == 1:
            print(
                f"    note: models.{model.name}.sagemaker.min_instances is 1: an instance that fails is an outage "
                "until SageMaker replaces it; 2 or more spread the endpoint across Availability Zones"
            )
    keyed = [model.name for model in config.models if model.auth == "api_key"]
    if keyed:
        print(
            f'warning: {", ".join(keyed)}: auth "api_key" meters and throttles callers, it does not authenticate them '
            '(every such model shares one key, sent as a plain header); auth = "iam" requires AWS credentials '
            '(README, "Authentication")',
            file=sys.stderr,
        )
    return 0


def _audit(args) -> int:
    """pip-audit over the shipped pins. Exit 1 on a known vulnerability; a package that could not be looked up is a
    failure to audit, said in one line (exit 2), never a pass."""
    import importlib.util
    import json

    from slimserve.assets import package_folder
    from slimserve.layers.builder import RECIPES

    if importlib.util.find_spec("pip_audit") is None:
        raise UserError("slimserve audit runs pip-audit: pip install pip-audit")
    # what a deploy ships: the runtime layers' pins and the serving image's
    files = [package_folder("slimserve.layers") / recipe.requirements for recipe in RECIPES.values() if recipe.deployed]
    files.append(package_folder("slimserve.serving") / "requirements-gpu.txt")
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "--no-deps",
        "--disable-pip",
        "--progress-spinner",
        "off",
        "-f",
        "json",
    ]
    dependencies = {}  # one run a file: the files pin some packages at different versions (numpy 1 for python3.11)
    for path in files:
        result = subprocess.run([*command, "-r", str(path)], capture_output=True, text=True)
        try:
            found = json.loads(result.stdout)["dependencies"]
        except (json.JSONDecodeError, KeyError):
            last = (result.stderr.strip() or "no output").splitlines()[-1]
            raise UserError(f"pip-audit could not audit {path} (exit {result.returncode}): {last}") from None
        dependencies |= {(dependency["name"], dependency.get("version")): dependency for dependency in found}
    dependencies = list(dependencies.values())
    unaudited = [dependency["name"] for dependency in dependencies if "skip_reason" in dependency]
    if unaudited:
        raise UserError(
            f"no vulnerability source reachable: pip-audit could not look up {', '.join(unaudited)} "
            "(it asks PyPI's JSON API); nothing was audited"
        )
    found = [(dep["name"], dep["version"], vuln) for dep in dependencies for vuln in dep["vulns"]]
    for name, version, vuln in found:
        fixed = ", ".join(vuln["fix_versions"]) or "no fix yet"
        print(f"{name} {version}: {vuln['id']} (fixed in {fixed})")
    print(f"{len(dependencies)} pinned packages audited ({len(files)} files): {len(found)} known vulnerabilities")
    return 1 if found else 0


def _layer(args) -> int:
    from slimserve.layers.builder import build_layer

    layer = build_layer(args.runtime, args.python, args.arch, out=args.out and Path(args.out), log=print)
    print(
        f"{layer.runtime} layer for python{layer.python_version} {layer.architecture}"
        f"{' (cached)' if layer.cached else ''}: {layer.path}"
    )
    print(
        f"  {layer.slim_bytes / 2**20:.1f} MiB unzipped (naive install {layer.naive_bytes / 2**20:.1f} MiB), "
        f"{layer.files} files; bytecode: {layer.pyc}; {layer.stripped}; smoke test: {layer.smoke}"
    )
    return 0


def _init(args) -> int:
    from .scaffold import init_project

    folder = Path(args.dir)
    project = init_project(folder, Path(args.model) if args.model else None)
    print(f"wrote a slimserve project in {folder.resolve()}, serving the model {project.model!r}:")
    for path in project.written:
        print(f"  {path.relative_to(folder)}")
    config = folder / DEFAULT_CONFIG
    where = "" if folder.resolve() == Path.cwd() else f"cd {shlex.quote(str(folder))} && "
    if not args.model:
        print(
            f"next: put your model at {folder / project.artifact} (slimserve convert writes one from scikit-learn, "
            f"PyTorch or Keras), or point models.{project.model}.artifact in {config} at it; then"
        )
    print(f"  {where}slimserve check && slimserve serve     # locally, no AWS account needed")
    print(f"  {where}slimserve bootstrap && slimserve deploy  # to your AWS account (--profile, --region)")
    return 0


def _cdk_app(args) -> int:
    """The CDK app itself: what cdk.json runs, and what `synth` and the deploy commands run."""
    config, _ = _loadable_config(args.config)  # a config error is one line, before CDK starts
    from slimserve import cdk_cli

    cdk_cli.use_bundled_node()
    from slimserve.stacks.app import build_app

    build_app(config).synth()
    return 0


def _app_command(config) -> str:
    """The CDK app as a command line for this interpreter: works whether or not its venv is activated."""
    return f"{shlex.quote(sys.executable)} -m slimserve cdk-app --config {shlex.quote(str(config.path.resolve()))}"


def _synth(args) -> int:
    """The CDK app in a process of its own, as the CDK CLI runs it; prints what each stack holds."""
    import collections
    import json

    config = load_config(args.config)
    out = Path(args.out).resolve() if args.out else config.project_dir / "cdk.out"
    synth = subprocess.run(
        shlex.split(_app_command(config)), cwd=config.project_dir, env={**os.environ, "CDK_OUTDIR": str(out)}
    )
    if synth.returncode != 0:
        return synth.returncode  # the app has said why, in one line
    for template in sorted(out.glob("*.template.json")):
        resources = json.loads(template.read_text()).get("Resources", {})
        counts = collections.Counter(resource["Type"] for resource in resources.values())
        print(f"{template.name.removesuffix('.template.json')}: {len(resources)} resources")
        for kind, count in sorted(counts.items()):
            print(f"  {count} x {kind}")
    return 0


def _aws_session(args, config):
    """The deploy's AWS session from --profile and --region; a missing profile, credentials or region in one line."""
    import boto3
    import botocore.exceptions

    try:
        # boto3 reads AWS_DEFAULT_REGION, the CDK CLI (JavaScript SDK) AWS_REGION: a user may have set either
        session = boto3.Session(
            profile_name=args.profile, region_name=args.region or config.region or os.environ.get("AWS_REGION")
        )
    except botocore.exceptions.ProfileNotFound:
        raise UserError(
            f"--profile {args.profile}: no such profile in your AWS config (`aws configure list-profiles` lists them)"
        ) from None
    if session.get_credentials() is None:
        raise UserError(
            "no AWS credentials found: run `aws configure` (or `aws sso login --profile NAME`), or pass --profile NAME"
        )
    if not session.region_name:
        raise UserError(
            f"no AWS region: pass --region, set app.region in {config.path}, or give your profile one "
            "(`aws configure set region eu-west-1`)"
        )
    return session


def _cdk(args) -> int:
    """bootstrap, diff, deploy, destroy: the pinned CDK CLI on the project's app and cdk.out."""
    from slimserve import cdk_cli

    config = load_config(args.config)
    session = _aws_session(args, config)
    # --profile and --region as the CDK CLI reads them
    environment = {"AWS_REGION": session.region_name, "AWS_DEFAULT_REGION": session.region_name}
    environment |= {"AWS_PROFILE": args.profile} if args.profile else {}
    out = config.project_dir / "cdk.out"
    arguments = [args.command, "--app", _app_command(config), "--output", str(out)]
    if args.profile:
        arguments += ["--profile", args.profile]
    outputs = config.build_dir / "cdk-outputs.json"
    if args.command == "bootstrap" and config.account:
        arguments.append(f"aws://{config.account}/{environment['AWS_REGION']}")
    if args.command == "deploy":
        check_locked_objects(config, session)
        arguments += ["--outputs-file", str(outputs)]
        outputs.unlink(missing_ok=True)
    if args.command == "destroy" and args.yes:
        arguments.append("--force")
    arguments += args.cdk_arguments[1:] if args.cdk_arguments[:1] == ["--"] else args.cdk_arguments
    print(
        f"cdk {args.command} of {config.path} in {environment['AWS_REGION']}"
        f"{f' (profile {args.profile})' if args.profile else ''}, AWS CDK CLI {cdk_cli.version()}",
        flush=True,
    )
    code = cdk_cli.run(arguments, config.project_dir, extra_environment=environment)
    if code == 0 and args.command == "deploy":
        return print_deployed(config, outputs, args)
    return code


def check_locked_objects(config, session) -> None:
    """A deploy never points a function at an object that is not there: each locked version is looked up in the store
    the lock was resolved against, with the deploy's session; where its credentials may not look, it says so."""
    import botocore.exceptions

    from slimserve.registry.lock import lock_path, read_lock
    from slimserve.registry.store import model_key

    lock = read_lock(config)
    if not lock["models"] or not str(lock["store"]).startswith("s3://"):
        return  # nothing locked, or a local lock, which synth refuses unless told
    bucket = lock["store"].removeprefix("s3://")
    s3 = session.client("s3")
    for name, entry in sorted(lock["models"].items()):
        key = model_key(name, entry["sha256"], entry["format"])
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as error:
            code = error.response["Error"].get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise UserError(
                    f"{lock_path(config)}: models.{name}: version {entry['version']} is not in its store "
                    f"(s3://{bucket}/{key} does not exist); a deploy would point the function at nothing: "
                    "register it there and lock again"
                ) from None
            print(f"note: could not check s3://{bucket}/{key} for models.{name} ({code}); deploying without that check")


DEPLOY_OUTPUTS = ("ApiUrl", "ApiKeyId", "ModelStoreBucket")


def print_deployed(config, outputs: Path, args) -> int:
    """The API's URL, how to read its key and the model store, from the stack's outputs; a deploy that left the
    stack without them (an emulator's half-created stack) is a failure, not a success with blanks."""
    import json

    stack = json.loads(outputs.read_text()).get(config.name, {}) if outputs.is_file() else {}
    missing = [name for name in DEPLOY_OUTPUTS if not stack.get(name)]
    if missing:
        print(
            f"error: the CDK CLI reported success, but the stack {config.name} has no output {', '.join(missing)} "
            f"in {outputs}: it was not fully created; its events in CloudFormation say why",
            file=sys.stderr,
        )
        return 1
    flags = "".join(
        f" --{flag} {shlex.quote(value)}"
        for flag, value in (("profile", args.profile), ("region", args.region))
        if value
    )
    print(f"API: {stack['ApiUrl']}")
    print(
        f'API key (for models with auth = "api_key"; send it as x-api-key): aws apigateway get-api-key '
        f"--api-key {stack['ApiKeyId']} --include-value --query value --output text{flags}"
    )
    print(
        f"model store: s3://{stack['ModelStoreBucket']} (slimserve register|versions|alias ... "
        f"--bucket {stack['ModelStoreBucket']}{flags or ' --region REGION'})"
    )
    print(f"all outputs: {outputs}")
    return 0
