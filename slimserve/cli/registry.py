"""Registry commands: register, versions, alias, rollback and lock, on the running local stack's store or,
with --profile/--region, the deployed one."""

import sys
from pathlib import Path

from slimserve.config import AppConfig, load_config, model_name_problem
from slimserve.errors import UserError
from slimserve.local.s3 import DEFAULT_BUCKET
from slimserve.local.state import running_state
from slimserve.registry.versions import LIVE_ALIAS, MULTIPART_BYTES, Version

from .common import add_config, files_text, size_text


def add_commands(commands) -> None:
    for name, run, text, positionals in [
        (
            "register",
            _register,
            "upload a model version under its sha256 with a manifest",
            [("model", "the .onnx or .tflite file, or a folder holding one (with its external data)")],
        ),
        ("versions", _versions, "list a model's versions", []),
        (
            "alias",
            _alias,
            "point an alias (prod, canary, ...) at a version",
            [("alias", "alias name"), ("version", "number, sha256 prefix or alias")],
        ),
        ("rollback", _rollback, "point an alias back where it was", []),
        ("lock", _lock, "resolve the config's model versions into its lock file, for synth", []),
    ]:
        command = commands.add_parser(name, help=text)
        add_config(command, "config file; its running local stack is the default store")
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
            command.add_argument("--new", action="store_true", help="register a model the config does not name (yet)")
            command.add_argument(
                "--allow-signature-change",
                action="store_true",
                help="register a version whose inputs differ from those of the version served now",
            )
        command.add_argument(
            "--endpoint-url", help="S3 endpoint (default: the S3 of this project's running local stack)"
        )
        command.add_argument("--bucket", help=f"model store bucket (default locally: {DEFAULT_BUCKET})")
        command.add_argument("--profile", help="AWS profile: use the deployed store instead of the local one")
        command.add_argument("--region", help="AWS region: use the deployed store instead of the local one")
        command.set_defaults(run=run)


def _config(args) -> AppConfig | None:
    """The config, read once per command; None where it does not exist and the store is named outright
    (--endpoint-url, or --profile/--region), which needs no config."""
    if not Path(args.config).exists() and (args.endpoint_url or args.profile or args.region):
        return None
    return load_config(args.config)


def _configured(config: AppConfig | None, name: str):
    """The config's model of that name, or None."""
    return next((model for model in config.models if model.name == name), None) if config else None


def _model_names(config: AppConfig | None) -> list[str]:
    return [model.name for model in config.models] if config else []


def _registry(args, config: AppConfig | None):
    """The registry on the local stack's S3 unless --profile/--region name an AWS account."""
    import boto3

    from slimserve.local.s3 import local_client
    from slimserve.registry.versions import Registry

    if args.profile or args.region:
        if not args.bucket:
            raise UserError("--bucket: name the model store's bucket (the stack output ModelStoreBucket)")
        session = boto3.Session(profile_name=args.profile, region_name=args.region)
        return _reachable(
            Registry(session.client("s3"), args.bucket, deployed=True), f"the bucket {args.bucket} in your AWS account"
        )
    endpoint, bucket = args.endpoint_url, args.bucket
    if endpoint is None:
        assert config is not None  # _config reads it wherever no store is named
        state = running_state(config.local_dir)
        if state is None:
            raise UserError(
                f"no local stack of {args.config} is running: start one with `slimserve serve` (in another terminal), "
                "or pass --endpoint-url, or --profile/--region and --bucket for the deployed store"
            )
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
        raise UserError(
            f"{where}: --bucket {registry.bucket}: {error.response['Error'].get('Message') or error}"
        ) from None
    return registry


def _lock(args) -> int:
    from slimserve.registry.lock import lock_path, write_lock

    config = load_config(args.config)
    resolved = write_lock(config, _registry(args, config))
    for name, version in resolved.items():
        print(f"{name}: {config.model(name).version!r} is version {version.number} (sha256 {version.sha256})")
    print(f"wrote {lock_path(config)}: {len(resolved)} of {len(config.models)} models deploy a registered version")
    return 0


class UploadProgress:
    """Tells on stderr how far each file of MULTIPART_BYTES or more has gone, a line every tenth: large models take
    minutes, and a silent upload looks hung."""

    def __init__(self):
        self.shown: dict[str, int] = {}

    def __call__(self, name: str, sent: int, size: int) -> None:
        if size < MULTIPART_BYTES:
            return
        tenth = sent * 10 // size
        if tenth > self.shown.get(name, 0):
            self.shown[name] = tenth
            print(f"uploading {name}: {tenth * 10}% of {size_text(size)}", file=sys.stderr, flush=True)


def _register(args) -> int:
    config = _config(args)
    names = _model_names(config)
    if config and args.name not in names and not args.new and model_name_problem(args.name) is None:  # else: why
        raise UserError(
            f"--name {args.name}: {config.path} has no model {args.name!r} (its models: {', '.join(names) or 'none'}); "
            "--new registers a model the config does not name yet"
        )
    version, new = _registry(args, config).register(
        Path(args.model), args.name, allow_signature_change=args.allow_signature_change, progress=UploadProgress()
    )
    if new:
        print(
            f"registered {args.name} version {version.number}: sha256 {version.sha256}, "
            f"{files_text(version.files, version.size)}, {version.key}"
        )
    else:
        print(
            f"{args.name}: these bytes are already version {version.number} (sha256 {version.sha256}); nothing uploaded"
        )
    return 0


def _served_by_config(registry, model) -> Version | None:
    """The version the config serves where the model has no `live` alias: the one its `version` names, else its
    artifact's bytes, where the store holds them."""
    from slimserve.modelfiles import model_files
    from slimserve.registry.versions import RegistryError

    if model is None:
        return None
    if model.version is not None and model.version != LIVE_ALIAS:
        try:
            return registry.version(model.name, model.version)
        except RegistryError:
            return None
    sha256 = model_files(model.artifact).sha256
    return next((v for v in registry.versions(model.name) if v.sha256 == sha256), None)


def _versions(args) -> int:
    config = _config(args)
    registry = _registry(args, config)
    versions = registry.versions(args.name)
    if not versions:
        names = _model_names(config)
        known = "" if not config or args.name in names else f" (the config's models: {', '.join(names) or 'none'})"
        print(f"{args.name}: no registered versions{known}")
        return 0
    pointing: dict[str, list[str]] = {}
    aliases = registry.aliases(args.name)
    for alias, record in sorted(aliases.items()):
        pointing.setdefault(record["sha256"], []).append(f"{alias} since {record.get('since') or '?'}")
    if (
        LIVE_ALIAS not in aliases
        and (served := _served_by_config(registry, _configured(config, args.name))) is not None
    ):
        pointing.setdefault(served.sha256, []).insert(0, f"{LIVE_ALIAS} (the config's; no alias yet)")
    print(f"{'version':>7}  {'sha256':12}  {'format':6}  {'bytes':>9}  {'created':20}  {'source':24}  aliases")
    for version in versions:
        print(
            f"{version.number:>7}  {version.sha256[:12]}  {version.format:6}  {version.size:>9}  "
            f"{version.created:20}  {version.source:24}  {', '.join(pointing.get(version.sha256, [])) or '-'}"
        )
    return 0


def _alias(args) -> int:
    config = _config(args)
    registry, model = _registry(args, config), _configured(config, args.name)
    served = _served_by_config(registry, model) if args.alias == LIVE_ALIAS else None
    before, after = registry.set_alias(args.name, args.alias, args.version, served)
    if before == after:
        print(f"{args.name}: alias {args.alias} already points at version {after}")
    else:
        was = f"was version {before}" if before is not None else "new alias"
        print(f"{args.name}: alias {args.alias} now points at version {after} ({was})")
    print(_what_serves(args, args.alias, model))
    return 0


def _what_serves(args, alias: str, model) -> str:
    """Which traffic an alias move affects: the two mechanisms, said where they act."""
    sagemaker = model is not None and model.target == "sagemaker"
    deployed = (
        f'a deployed API serves it once a config with version = "{alias}" is locked (slimserve lock) and deployed'
    )
    if sagemaker:
        deployed += (
            ", which moves the endpoint to it blue/green (rolled back on its alarms); until then the endpoint serves "
            "the version it was deployed with"
        )
    if args.profile or args.region:
        return f"  in the deployed store: {deployed}"
    if alias != LIVE_ALIAS:
        local = f"a running local stack serves the {LIVE_ALIAS} alias, not this one"
    elif sagemaker:
        local = (
            "a running local stack moves to it as a deploy does: it starts the version's serving program and sends "
            "requests to it once it answers /ping"
        )
    else:
        local = "a running local stack serves it within a second"
    return f"  in the local store: {local}; {deployed}"


def _rollback(args) -> int:
    config = _config(args)
    before, after = _registry(args, config).rollback(args.name, args.alias)
    print(f"{args.name}: alias {args.alias} rolled back from version {before} to version {after}")
    print(_what_serves(args, args.alias, _configured(config, args.name)))
    return 0
