"""The `slimserve` command line."""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from slimserve import __version__
from slimserve.config import DEFAULT_CONFIG, load_config
from slimserve.errors import UserError
from slimserve.local.s3 import DEFAULT_BUCKET
from slimserve.local.state import running_state
from slimserve.registry.versions import LIVE_ALIAS


def _examples(args) -> int:
    from slimserve.modeltools.examples import build_all

    for model in build_all(Path(args.out)):
        print(f"{model.name}: wrote {model.path} ({model.path.stat().st_size} bytes), "
              f"held-out accuracy {model.accuracy:.3f} on {len(model.test_labels)} samples")
    return 0


def _loadable_config(path: str):
    """The config, with every model file loaded as serving would load it: what `serve` or a deploy would refuse is
    refused here, in one line naming the config key and the file."""
    from slimserve.registry.versions import RegistryError, read_model

    config = load_config(path)
    for model in config.models:
        try:
            read_model(model.artifact)
        except RegistryError as error:
            raise UserError(f"{config.path}: models.{model.name}.artifact: {error}") from None
    return config


def _check(args) -> int:
    config = _loadable_config(args.config)
    print(f"{config.path}: app {config.name!r}, {len(config.models)} models")
    for model in config.models:
        where = model.sagemaker.instance_type if model.sagemaker else f"{model.memory_mb} MB {model.architecture}"
        print(f"  {model.name}: {model.format} {model.artifact} -> {model.target} ({where}), auth {model.auth}")
    return 0


def _demo(args) -> int:
    from slimserve.demo import run_demo

    return run_demo(load_config(args.config), sys.stdout)


def _layer(args) -> int:
    from slimserve.layers.builder import build_layer

    layer = build_layer(args.runtime, args.python, args.arch, out=args.out and Path(args.out), log=print)
    print(f"{layer.runtime} layer for python{layer.python_version} {layer.architecture}"
          f"{' (cached)' if layer.cached else ''}: {layer.path}")
    print(f"  {layer.slim_bytes / 2**20:.1f} MiB unzipped (naive install {layer.naive_bytes / 2**20:.1f} MiB), "
          f"{layer.files} files; bytecode: {layer.pyc}; {layer.stripped}; smoke test: {layer.smoke}")
    return 0


def _init(args) -> int:
    from slimserve.scaffold import init_project

    folder = Path(args.dir)
    project = init_project(folder, Path(args.model) if args.model else None)
    print(f"wrote a slimserve project in {folder.resolve()}, serving the model {project.model!r}:")
    for path in project.written:
        print(f"  {path.relative_to(folder)}")
    config = folder / DEFAULT_CONFIG
    where = "" if folder.resolve() == Path.cwd() else f"cd {shlex.quote(str(folder))} && "
    if not args.model:
        print(f"next: put your model at {folder / project.artifact} (slimserve convert writes one from scikit-learn, "
              f"PyTorch or Keras), or point models.{project.model}.artifact in {config} at it; then")
    print(f"  {where}slimserve check && slimserve serve     # locally, no AWS account needed")
    print(f"  {where}slimserve bootstrap && slimserve deploy  # to your AWS account (--profile, --region)")
    return 0


def _cdk_app(args) -> int:
    """The CDK app itself: what cdk.json runs, and what `synth` and the deploy commands run."""
    config = _loadable_config(args.config)  # a config error is one line, before CDK starts
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
    synth = subprocess.run(shlex.split(_app_command(config)), cwd=config.project_dir, env={**os.environ, "CDK_OUTDIR": str(out)})
    if synth.returncode != 0:
        return synth.returncode  # the app has said why, in one line
    for template in sorted(out.glob("*.template.json")):
        resources = json.loads(template.read_text()).get("Resources", {})
        counts = collections.Counter(resource["Type"] for resource in resources.values())
        print(f"{template.name.removesuffix('.template.json')}: {len(resources)} resources")
        for kind, count in sorted(counts.items()):
            print(f"  {count} x {kind}")
    return 0


def _serve(args) -> int:
    import signal

    from slimserve.local.stack import LocalStack

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (a process manager, a test) stops everything as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    config = load_config(args.config)
    with LocalStack(config, args.host, args.port, log=lambda line: print(line, flush=True), s3_port=args.s3_port,
                    api_key=args.api_key) as stack:
        gateway = stack.gateway
        print(f"slimserve serving {', '.join(gateway.routes)} at {gateway.url}", flush=True)
        if any(route.api_key_required for route in gateway.routes.values()):
            print(f"API key (send as x-api-key): {gateway.api_key}", flush=True)
        print("ready; Ctrl-C stops everything", flush=True)
        try:
            stack.serve_forever()
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


def _registry(args):
    """The registry on the local stack's S3 unless --profile/--region name an AWS account."""
    import boto3

    from slimserve.local.s3 import local_client
    from slimserve.registry.versions import Registry

    if args.profile or args.region:
        if not args.bucket:
            raise UserError("--bucket: name the model store's bucket (the stack output ModelStoreBucket)")
        session = boto3.Session(profile_name=args.profile, region_name=args.region)
        return _reachable(Registry(session.client("s3"), args.bucket, deployed=True), f"the bucket {args.bucket} in your AWS account")
    endpoint, bucket = args.endpoint_url, args.bucket
    if endpoint is None:
        config = Path(args.config)
        state = running_state(load_config(config).local_dir)
        if state is None:
            raise UserError(f"no local stack of {config} is running: start one with `slimserve serve` (in another terminal), "
                            "or pass --endpoint-url, or --profile/--region and --bucket for the deployed store")
        endpoint, bucket = state["s3_endpoint"], bucket or state["bucket"]
    return _reachable(Registry(local_client(endpoint), bucket or DEFAULT_BUCKET), f"the local store at {endpoint}")


def _reachable(registry, where: str):
    """The registry, once its bucket answered; an S3 that is not there, or refuses, in one line."""
    import botocore.exceptions

    try:
        registry.s3.head_bucket(Bucket=registry.bucket)
    except botocore.exceptions.EndpointConnectionError:
        raise UserError(f"{where}: nothing answers there; is the local stack running (`slimserve serve`)?") from None
    except botocore.exceptions.NoCredentialsError:
        raise UserError(f"{where}: no AWS credentials found: run `aws configure`, or pass --profile NAME") from None
    except botocore.exceptions.ClientError as error:
        raise UserError(f"{where}: --bucket {registry.bucket}: {error.response['Error'].get('Message') or error}") from None
    return registry


def _aws_session(args, config):
    """The deploy's AWS session from --profile and --region; a missing profile, credentials or region in one line."""
    import boto3
    import botocore.exceptions

    try:
        # boto3 reads AWS_DEFAULT_REGION, the CDK CLI (JavaScript SDK) AWS_REGION: a user may have set either
        session = boto3.Session(profile_name=args.profile, region_name=args.region or config.region or os.environ.get("AWS_REGION"))
    except botocore.exceptions.ProfileNotFound:
        raise UserError(f"--profile {args.profile}: no such profile in your AWS config "
                        "(`aws configure list-profiles` lists them)") from None
    if session.get_credentials() is None:
        raise UserError("no AWS credentials found: run `aws configure` (or `aws sso login --profile NAME`), "
                        "or pass --profile NAME")
    if not session.region_name:
        raise UserError(f"no AWS region: pass --region, set app.region in {config.path}, or give your profile one "
                        "(`aws configure set region eu-west-1`)")
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
        _check_locked_objects(config, session)
        arguments += ["--outputs-file", str(outputs)]
        outputs.unlink(missing_ok=True)
    if args.command == "destroy" and args.yes:
        arguments.append("--force")
    arguments += args.cdk_arguments
    print(f"cdk {args.command} of {config.path} in {environment['AWS_REGION']}"
          f"{f' (profile {args.profile})' if args.profile else ''}, AWS CDK CLI {cdk_cli.version()}", flush=True)
    code = cdk_cli.run(arguments, config.project_dir, extra_environment=environment)
    if code == 0 and args.command == "deploy":
        return _print_deployed(config, outputs, args)
    return code


def _check_locked_objects(config, session) -> None:
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
                raise UserError(f"{lock_path(config)}: models.{name}: version {entry['version']} is not in its store "
                                f"(s3://{bucket}/{key} does not exist); a deploy would point the function at nothing: "
                                "register it there and lock again") from None
            print(f"note: could not check s3://{bucket}/{key} for models.{name} ({code}); deploying without that check")


DEPLOY_OUTPUTS = ("ApiUrl", "ApiKeyId", "ModelStoreBucket")


def _print_deployed(config, outputs: Path, args) -> int:
    """The API's URL, how to read its key and the model store, from the stack's outputs; a deploy that left the
    stack without them (an emulator's half-created stack) is a failure, not a success with blanks."""
    import json

    stack = json.loads(outputs.read_text()).get(config.name, {}) if outputs.is_file() else {}
    missing = [name for name in DEPLOY_OUTPUTS if not stack.get(name)]
    if missing:
        print(f"error: the CDK CLI reported success, but the stack {config.name} has no output {', '.join(missing)} "
              f"in {outputs}: it was not fully created; its events in CloudFormation say why", file=sys.stderr)
        return 1
    flags = "".join(f" --{flag} {shlex.quote(value)}" for flag, value in (("profile", args.profile), ("region", args.region)) if value)
    print(f"API: {stack['ApiUrl']}")
    print(f"API key (for models with auth = \"api_key\"; send it as x-api-key): aws apigateway get-api-key "
          f"--api-key {stack['ApiKeyId']} --include-value --query value --output text{flags}")
    print(f"model store: s3://{stack['ModelStoreBucket']} (slimserve register|versions|alias ... "
          f"--bucket {stack['ModelStoreBucket']}{flags or ' --region REGION'})")
    print(f"all outputs: {outputs}")
    return 0


def _convert(args) -> int:
    import numpy as np

    from slimserve.modeltools.convert import (
        KERAS_SUFFIXES,
        ConvertError,
        convert_keras,
        convert_sklearn,
        convert_torch,
        load_keras,
    )

    source = Path(args.model)
    try:
        samples = np.load(args.samples, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"--samples {args.samples}: not a numpy .npy file of samples: {error}") from None
    # the user's own trained model, on their own machine: loading it is theirs to trust; it is never served as is
    if source.suffix in (".joblib", ".pkl", ".pickle"):
        import joblib

        estimator = joblib.load(source)
        width = getattr(estimator, "n_features_in_", None)
        if width is not None and (samples.ndim != 2 or samples.shape[1] != width):
            raise UserError(f"--samples {args.samples}: expected rows of {width} features, as {source} was fitted on, "
                            f"found an array of shape {samples.shape}")
        result = convert_sklearn(estimator, samples, Path(args.out), args.tolerance)
    elif source.suffix in (".pt", ".pth"):
        import torch

        result = convert_torch(torch.load(source, weights_only=False), samples, Path(args.out), args.tolerance)
    elif source.suffix in KERAS_SUFFIXES:
        result = convert_keras(load_keras(source), samples, Path(args.out), args.tolerance)
    else:
        raise ConvertError(f"{source}: expected a scikit-learn model (.joblib, .pkl), a saved PyTorch module (.pt, .pth) "
                           "or a Keras model (.keras, .h5)")
    agreement = f", labels agree on {result.label_agreement:.2%}" if result.label_agreement is not None else ""
    print(f"wrote {result.path}: checked on {result.samples} samples, max |diff| {result.max_abs_diff:.3g}{agreement}")
    return 0


def _optimize(args) -> int:
    from slimserve.modeltools.convert import KERAS_SUFFIXES
    from slimserve.modeltools.optimize import optimize

    model = Path(args.model)
    suffix = ".tflite" if model.suffix in KERAS_SUFFIXES else ".onnx"
    out = Path(args.out) if args.out else model.with_suffix(f".{args.level}{suffix}")
    report = optimize(model, args.level, Path(args.samples), args.tolerance, out, args.force)
    print(report.table())
    print(f"wrote {report.written} ({report.optimized.size / report.original.size:.0%} of the original's size; "
          f"max |diff| {report.optimized.max_abs_diff:.3g} within the tolerance {args.tolerance:g})")
    return 0


def _lock(args) -> int:
    from slimserve.registry.lock import lock_path, write_lock

    config = load_config(args.config)
    resolved = write_lock(config, _registry(args))
    for name, version in resolved.items():
        print(f"{name}: {config.model(name).version!r} is version {version.number} (sha256 {version.sha256})")
    print(f"wrote {lock_path(config)}: {len(resolved)} of {len(config.models)} models deploy a registered version")
    return 0


def _register(args) -> int:
    version, new = _registry(args).register(Path(args.model), args.name, allow_signature_change=args.allow_signature_change)
    if new:
        print(f"registered {args.name} version {version.number}: sha256 {version.sha256}, {version.size} bytes, {version.key}")
    else:
        print(f"{args.name}: these bytes are already version {version.number} (sha256 {version.sha256}); nothing uploaded")
    return 0


def _versions(args) -> int:
    registry = _registry(args)
    versions = registry.versions(args.name)
    if not versions:
        print(f"{args.name}: no registered versions")
        return 0
    print(f"{'version':>7}  {'sha256':12}  {'format':6}  {'bytes':>9}  {'created':20}  source")
    for version in versions:
        print(f"{version.number:>7}  {version.sha256[:12]}  {version.format:6}  {version.size:>9}  {version.created:20}  {version.source}")
    return 0


def _alias(args) -> int:
    before, after = _registry(args).set_alias(args.name, args.alias, args.version)
    was = f"was version {before}" if before is not None else "new alias"
    print(f"{args.name}: alias {args.alias} now points at version {after} ({was})")
    print(_what_serves(args, args.alias))
    return 0


def _what_serves(args, alias: str) -> str:
    """Which traffic an alias move affects: the two mechanisms, said where they act."""
    deployed = f'a deployed API serves it once a config with version = "{alias}" is locked (slimserve lock) and deployed'
    if args.profile or args.region:
        return f"  in the deployed store: {deployed}"
    local = ("a running local stack serves it within a second" if alias == LIVE_ALIAS
             else f"a running local stack serves the {LIVE_ALIAS} alias, not this one")
    return f"  in the local store: {local}; {deployed}"


def _rollback(args) -> int:
    before, after = _registry(args).rollback(args.name, args.alias)
    print(f"{args.name}: alias {args.alias} rolled back from version {before} to version {after}")
    print(_what_serves(args, args.alias))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimserve", description="Serve ONNX and TFLite models on AWS Lambda and SageMaker.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="start a project: slimserve.toml, cdk.json, .gitignore and a CI workflow")
    init.add_argument("dir", nargs="?", default=".", help="the project's folder, made if missing (default: this one)")
    init.add_argument("--model", help="an .onnx or .tflite file to copy into the project's models/ and serve")
    init.set_defaults(run=_init)

    examples = commands.add_parser("examples", help="train the example models and write them")
    examples.add_argument("--out", default="examples/models", help="folder for the model files")
    examples.set_defaults(run=_examples)

    for name, run, text in [
        ("check", _check, "validate the config and list its models"),
        ("demo", _demo, "start the local stack, call it with real clients, then stop it"),
    ]:
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
        command.set_defaults(run=run)

    layer = commands.add_parser("layer", help="build (or reuse) a slim runtime layer and print its size report")
    layer.add_argument("--runtime", default="onnx", help="onnx, tflite, tflite-py311 or lambda-runtime")
    layer.add_argument("--python", default="3.12", help="the Lambda Python version")
    layer.add_argument("--arch", default="x86_64", help="x86_64 or arm64")
    layer.add_argument("--out", help="where layers are built (default: the user cache, ~/.cache/slimserve/layers)")
    layer.set_defaults(run=_layer)

    synth = commands.add_parser("synth", help="synthesize the CloudFormation templates and count their resources")
    synth.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    synth.add_argument("--out", help="cloud assembly folder (default: cdk.out beside the config)")
    synth.set_defaults(run=_synth)

    cdk_app = commands.add_parser("cdk-app", help="the CDK app itself, as cdk.json runs it (cdk synth, cdk deploy)")
    cdk_app.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    cdk_app.set_defaults(run=_cdk_app)

    for name, text in [
        ("bootstrap", "prepare an AWS account and region for CDK deploys (once per account and region)"),
        ("diff", "show what a deploy would change in the AWS account"),
        ("deploy", "deploy the project's stack, then print its API URL and how to read the API key"),
        ("destroy", "delete the project's stack (the model store's bucket is kept)"),
    ]:
        command = commands.add_parser(name, help=text, description=f"{text}. Runs the pinned AWS CDK CLI, installed into "
                                      "the user cache on first use; arguments after -- go to it unchanged.")
        command.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
        command.add_argument("--profile", help="AWS profile (default: the AWS CLI's default credentials)")
        command.add_argument("--region", help="AWS region (default: app.region, else the profile's region)")
        if name == "destroy":
            command.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        command.add_argument("cdk_arguments", nargs=argparse.REMAINDER, help="-- then arguments for the CDK CLI")
        command.set_defaults(run=_cdk)

    serve = commands.add_parser("serve", help="serve every model of the config on one port, as the deployed API does")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", default=os.environ.get("SLIMSERVE_API_KEY"),
                       help="the API key clients send as x-api-key (default: $SLIMSERVE_API_KEY, else a new one each start)")
    serve.add_argument("--s3-port", type=int, help="the local S3's port (default: any free one; the registry commands "
                                                   "find it in build/local/stack.json)")
    serve.set_defaults(run=_serve)

    convert = commands.add_parser("convert", help="a scikit-learn or PyTorch model to ONNX, or Keras to TFLite, checked on samples first")
    convert.add_argument("model", help="scikit-learn (.joblib, .pkl), PyTorch module (.pt, .pth, saved whole) "
                                       "or Keras (.keras, .h5; needs the tensorflow extra)")
    convert.add_argument("--samples", required=True, help=".npy of representative inputs")
    convert.add_argument("--out", required=True, help="the .onnx file to write (.tflite for Keras)")
    convert.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute output difference accepted (default: %(default)s)")
    convert.set_defaults(run=_convert)

    optimize = commands.add_parser("optimize", help="graph-optimize, int8- or fp16-quantize an ONNX model (or a Keras "
                                                    "model to TFLite), gated on drift")
    optimize.add_argument("model", help="the .onnx model, or a Keras model (.keras, .h5; int8 or fp16; needs the tensorflow extra)")
    optimize.add_argument("--level", required=True, choices=["graph", "int8", "fp16"])
    optimize.add_argument("--samples", required=True, help=".npy (one input) or .npz (named inputs) of representative inputs")
    optimize.add_argument("--tolerance", type=float, default=0.01, help="largest absolute output difference accepted (default: %(default)s)")
    optimize.add_argument("--force", action="store_true", help="write the result even if it is larger and not faster")
    optimize.add_argument("--out", help="where to write the result (default: MODEL with .LEVEL.onnx, .LEVEL.tflite for Keras)")
    optimize.set_defaults(run=_optimize)

    for name, run, text, positionals in [
        ("register", _register, "upload a model version under its sha256 with a manifest", [("model", "the .onnx or .tflite file")]),
        ("versions", _versions, "list a model's versions", []),
        ("alias", _alias, "point an alias (prod, canary, ...) at a version", [("alias", "alias name"), ("version", "number, sha256 prefix or alias")]),
        ("rollback", _rollback, "point an alias back where it was", []),
        ("lock", _lock, "resolve the config's model versions into its lock file, for synth", []),
    ]:
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", default=DEFAULT_CONFIG,
                             help="config file; its running local stack is the default store (default: %(default)s)")
        if name == "register":
            command.add_argument("model", help=positionals[0][1])
            command.add_argument("--name", required=True, help="the model's name")
        elif name != "lock":
            command.add_argument("name", help="the model's name")
            for positional, description in positionals:
                command.add_argument(positional, help=description)
        if name == "rollback":
            command.add_argument("--alias", default=LIVE_ALIAS, help="alias to roll back (default: %(default)s)")
        if name == "register":
            command.add_argument("--allow-signature-change", action="store_true",
                                 help="register a version whose inputs differ from those of the version served now")
        command.add_argument("--endpoint-url", help="S3 endpoint (default: the S3 of this project's running local stack)")
        command.add_argument("--bucket", help=f"model store bucket (default locally: {DEFAULT_BUCKET})")
        command.add_argument("--profile", help="AWS profile: use the deployed store instead of the local one")
        command.add_argument("--region", help="AWS region: use the deployed store instead of the local one")
        command.set_defaults(run=run)

    args = parser.parse_args(argv)
    if getattr(args, "cdk_arguments", None) and args.cdk_arguments[0] == "--":
        args.cdk_arguments = args.cdk_arguments[1:]
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
        print(f"error: this is a bug in slimserve {__version__}, not a mistake of yours: please report it with the "
              "traceback above and the command you ran", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
