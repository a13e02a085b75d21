"""`slimserve.toml`, parsed once into frozen, typed objects.

Every error names the file, the key path (`models.iris.memory_mb`), what was
expected and what was found, so neither the CLI nor `cdk synth` ever shows a
stack trace for a config mistake.
"""

import difflib
import math
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from slimserve.errors import UserError
from slimserve.lambda_handlers.contract import FORMATS
from slimserve.modelfiles import ModelFilesError, UnreadableModel, model_file, model_files

DEFAULT_CONFIG = "slimserve.toml"
MODEL_NAME = re.compile(r"[a-z][a-z0-9-]{0,39}")
VERSION_REF = re.compile(r"[A-Za-z0-9_.-]{1,64}")
INSTANCE_TYPE = re.compile(r"ml\.(?P<family>[a-z0-9]+)\.(?P<size>[a-z0-9]+)")
INSTANCE_FAMILIES = (
    "g4dn",
    "g5",
    "g6",
    "g6e",
    "p3",
    "p4d",
    "p5",
    "inf2",  # accelerators
    "c5",
    "c6i",
    "c7i",
    "m5",
    "m6i",
    "m7i",
    "r5",  # CPU, for models too large for Lambda
)
# Families whose ML storage is local NVMe instance store, encrypted by the hardware: SageMaker refuses a KmsKeyId
# for them. The others keep it on an EBS volume, which the model store's key encrypts.
INSTANCE_STORE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p4d", "p5")
EBS_FAMILIES = tuple(family for family in INSTANCE_FAMILIES if family not in INSTANCE_STORE_FAMILIES)
API_GATEWAY_TIMEOUT_S = 29
# REST API resources a model's routes take (stacks/api.py); API Gateway allows 300 per API by
# default, and the server's own routes take 8 of them
API_RESOURCES_PER_MODEL = {"lambda": 6, "sagemaker": 14}
API_RESOURCES_FOR_MODELS = 292
# a SageMaker model adds about 45 resources to the app's own stack, which CloudFormation caps at 500
MAX_SAGEMAKER_MODELS = 8
# What a Lambda model needs to load (README, "Model size"): the function streams the model to /tmp, then the runtime
# loads it from there. Memory: Python, numpy, the runtime and the handler, plus ONNX Runtime's peak while it builds a
# session from a file (1.47x the weights on a 192 MiB MLP; from bytes it was 3.0x). /tmp: the model, with headroom.
LAMBDA_BASE_MB = 128
LAMBDA_LOAD_FACTOR = 1.5
EPHEMERAL_HEADROOM = 1.1
LAMBDA_MAX_MB = 10240  # Lambda's most memory and ephemeral storage
SAGEMAKER_TIMEOUT_RANGE_S = (60, 3600)  # ModelDataDownload and ContainerStartupHealthCheck timeouts


NESTED_TABLES = ("alarms", "sagemaker")  # a model's table of one of these merges with [defaults]'s key by key


def model_name_problem(name: str) -> str | None:
    """What is wrong with a model name (it appears in URLs and resource names), or None: one rule for the config
    and the registry."""
    if MODEL_NAME.fullmatch(name):
        return None
    return (
        f"model name {name!r} must be lowercase letters, digits and '-', starting with a letter, at most 40 characters"
    )


class ConfigError(UserError, ValueError):
    pass


def _choice(*allowed):
    return lambda v: isinstance(v, str) and v in allowed, "one of " + ", ".join(repr(a) for a in allowed)


def _int_range(low, high=None):
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)  # noqa: E731
    return ok, f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"


def _number_range(low, high, low_open=False):
    def ok(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return (v > low if low_open else v >= low) and v <= high

    return ok, f"a number {'>' if low_open else '>='} {low} and <= {high}"


def _choice_of_ints(*allowed):
    return lambda v: type(v) is int and v in allowed, "one of " + ", ".join(
        map(str, allowed)
    ) + " (CloudWatch's retention periods)"


# The allowed values, once: the rules below check configs against them and the stacks read them.
TARGETS = ("lambda", "sagemaker")
ARCHITECTURES = ("x86_64", "arm64")
DEPLOYMENTS = ("canary", "linear", "all_at_once")
AUTH_MODES = ("none", "api_key", "iam")
ENCRYPTIONS = ("kms", "s3-managed")
LOG_ENCRYPTIONS = ("service", "kms")
LOG_RETENTION = {
    1: "ONE_DAY",
    3: "THREE_DAYS",
    5: "FIVE_DAYS",
    7: "ONE_WEEK",
    14: "TWO_WEEKS",
    30: "ONE_MONTH",
    60: "TWO_MONTHS",
    90: "THREE_MONTHS",
    120: "FOUR_MONTHS",
    150: "FIVE_MONTHS",
    180: "SIX_MONTHS",
    365: "ONE_YEAR",
    400: "THIRTEEN_MONTHS",
    545: "EIGHTEEN_MONTHS",
    731: "TWO_YEARS",
    1096: "THREE_YEARS",
    1827: "FIVE_YEARS",
    2192: "SIX_YEARS",
    2557: "SEVEN_YEARS",
    2922: "EIGHT_YEARS",
    3288: "NINE_YEARS",
    3653: "TEN_YEARS",
}
"""CloudWatch's retention periods in days, with the name aws_cdk.aws_logs.RetentionDays gives each."""


def _bool():
    return lambda v: isinstance(v, bool), "true or false"


def _string(pattern: re.Pattern | None = None, what: str = "a non-empty string"):
    return lambda v: isinstance(v, str) and bool(v) and (pattern is None or pattern.fullmatch(v)), what


def _version_ref():
    ok = lambda v: (type(v) is int and v >= 1) or (isinstance(v, str) and VERSION_REF.fullmatch(v) is not None)  # noqa: E731
    return ok, "a version number >= 1, a sha256 prefix or an alias (letters, digits, '.', '_', '-')"


def _rule(check, default=MISSING, doc=""):
    """A dataclass field carrying its validation rule and a one-line description."""
    ok, expected = check
    kwargs = {} if default is MISSING else {"default": default}
    return field(metadata={"ok": ok, "expected": expected, "doc": doc}, **kwargs)


@dataclass(frozen=True)
class Alarms:
    error_rate_percent: float = _rule(
        _number_range(0, 100, low_open=True), 1.0, "errors as % of requests over 5 minutes"
    )
    p99_latency_ms: float = _rule(_number_range(0, 900_000, low_open=True), 1000.0, "p99 duration or latency")
    throttles: int = _rule(_int_range(0), 1, "throttled invocations in 5 minutes")
    server_errors: int = _rule(_int_range(0), 1, "5xx responses in 5 minutes")
    gpu_utilization_percent: float = _rule(_number_range(0, 100, low_open=True), 90.0, "SageMaker GPU utilization")


@dataclass(frozen=True)
class SageMakerSettings:
    instance_type: str = _rule(
        _string(INSTANCE_TYPE, "an instance type like 'ml.g5.xlarge'"), "ml.g5.xlarge", "endpoint instance type"
    )
    initial_instance_count: int = _rule(_int_range(1, 100), 1, "instances at deploy")
    min_instances: int = _rule(_int_range(1, 100), 1, "autoscaling floor")
    max_instances: int = _rule(_int_range(1, 100), 2, "autoscaling ceiling")
    invocations_per_instance: int = _rule(_int_range(1), 100, "autoscaling target, invocations per instance per minute")
    data_capture_percent: int = _rule(_int_range(0, 100), 0, "share of requests captured to the model store")
    image: str | None = _rule(
        _string(
            re.compile(r"\S+/\S+"),
            "a container image URI like '123456789012.dkr.ecr.eu-west-1.amazonaws.com/slimserve:1'",
        ),
        None,
        "the serving container's image URI",
    )
    network_isolation: bool = _rule(
        _bool(), True, "the container reaches no network (slimserve's own image needs none; an image of yours may)"
    )
    download_timeout_s: int | None = _rule(
        _int_range(*SAGEMAKER_TIMEOUT_RANGE_S),
        None,
        "ModelDataDownloadTimeoutInSeconds (unset: derived from the model's size)",
    )
    startup_timeout_s: int | None = _rule(
        _int_range(*SAGEMAKER_TIMEOUT_RANGE_S),
        None,
        "ContainerStartupHealthCheckTimeoutInSeconds (unset: derived from the model's size)",
    )

    def timeouts_s(self, size_bytes: int) -> tuple[int, int]:
        """The endpoint's download and startup timeouts for a model of `size_bytes`: the configured ones, else one
        minute to download plus one a GiB, and two minutes to start (Python, the runtime, CUDA) plus one a GiB to
        build the session from disk; within SageMaker's 60 to 3600 s."""
        gib = math.ceil(size_bytes / 2**30)
        low, high = SAGEMAKER_TIMEOUT_RANGE_S
        derived = (min(max(60 + 60 * gib, low), high), min(max(120 + 60 * gib, low), high))
        return (self.download_timeout_s or derived[0], self.startup_timeout_s or derived[1])

    @property
    def family(self) -> str:
        return INSTANCE_TYPE.fullmatch(self.instance_type)["family"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    format: str = _rule(_choice(*FORMATS), doc="model file format")
    artifact: Path = _rule(
        _string(what="a path to the model file"),
        doc="model file (or a folder holding one), relative to the config file; an ONNX model's external data files "
        "lie beside it",
    )
    target: str = _rule(_choice(*TARGETS), "lambda", "where the model runs")
    memory_mb: int = _rule(_int_range(128, LAMBDA_MAX_MB), 1024, "Lambda memory")
    timeout_s: int = _rule(_int_range(1, API_GATEWAY_TIMEOUT_S), 10, "Lambda timeout (API Gateway stops at 29 s)")
    architecture: str = _rule(_choice(*ARCHITECTURES), "x86_64", "Lambda architecture")
    ephemeral_storage_mb: int = _rule(_int_range(512, LAMBDA_MAX_MB), 512, "Lambda /tmp size")
    reserved_concurrency: int | None = _rule(_int_range(1), None, "Lambda reserved concurrency (unset: account pool)")
    provisioned_concurrency: int = _rule(_int_range(0), 0, "warm Lambda instances on the live alias")
    snapstart: bool = _rule(_bool(), False, "Lambda SnapStart on published versions")
    deployment: str = _rule(
        _choice(*DEPLOYMENTS), "canary", "how a new version takes the live alias's traffic (CodeDeploy)"
    )
    auth: str = _rule(_choice(*AUTH_MODES), "api_key", "how clients authenticate")
    version: str | None = _rule(
        _version_ref(),
        None,
        "the registered version to deploy instead of the artifact: a number, "
        "sha256 prefix or alias, resolved into slimserve.lock by `slimserve lock`",
    )
    alarms: Alarms = field(default_factory=Alarms, metadata={"doc": "alarm thresholds"})
    sagemaker: SageMakerSettings | None = field(default=None, metadata={"doc": "settings for target 'sagemaker'"})


@dataclass(frozen=True)
class AppConfig:
    path: Path
    name: str
    models: tuple[ModelConfig, ...]
    account: str | None = None
    region: str | None = None
    model_store_encryption: str = "kms"
    """The defaults of the app's keys: the stacks' props take theirs from here."""
    alarm_email: str | None = None
    log_retention_days: int = 30
    log_encryption: str = "service"
    throttle_rate: int = 100
    throttle_burst: int = 200

    @property
    def project_dir(self) -> Path:
        """The folder of the config file: slimserve keeps everything it writes for the project under it."""
        return self.path.resolve().parent

    @property
    def build_dir(self) -> Path:
        """Layers, function code, model uploads, local stack state and logs: build/ beside the config."""
        return self.project_dir / "build"

    @property
    def local_dir(self) -> Path:
        """The local stack's functions, model folders, logs, saved store and state file (build/local)."""
        return self.build_dir / "local"

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


APP_RULES = {
    "name": _string(re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}"), "letters, digits and '-', starting with a letter"),
    "account": _string(re.compile(r"\d{12}"), "a 12-digit AWS account ID"),
    "region": _string(re.compile(r"[a-z]{2}(-[a-z]+)+-\d"), "an AWS region like 'eu-west-1'"),
    "model_store_encryption": _choice(*ENCRYPTIONS),
    "alarm_email": _string(re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+"), "an email address"),
    "log_retention_days": _choice_of_ints(*LOG_RETENTION),
    "log_encryption": _choice(*LOG_ENCRYPTIONS),
    "throttle_rate": _int_range(1, 10000),
    "throttle_burst": _int_range(1, 5000),
}


class _Reader:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str):
        raise ConfigError(f"{self.path}: {where}: {message}")

    def unknown_keys(self, table: dict, allowed, where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(
                    f"{where}.{key}" if where else key,
                    f"unknown key{hint}; expected one of {', '.join(sorted(allowed))}",
                )

    def check(self, where: str, value, rule) -> None:
        ok, expected = rule
        if not ok(value):
            self.fail(where, f"expected {expected}, found {value!r}")

    def table(self, where: str, value) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected a table, found {value!r}")
        return value

    def dataclass_values(self, cls, table: dict, where: str, skip=()) -> dict:
        rules = {f.name: f for f in fields(cls) if "ok" in f.metadata}
        self.unknown_keys(table, [f.name for f in fields(cls) if f.name not in skip], where)
        for key, value in table.items():
            if key in rules:
                self.check(f"{where}.{key}", value, (rules[key].metadata["ok"], rules[key].metadata["expected"]))
        return dict(table)


def load_config(path: str | Path = DEFAULT_CONFIG) -> AppConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, path)


def parse_config(raw: dict, path: Path) -> AppConfig:
    reader = _Reader(path)
    reader.unknown_keys(raw, ["app", "defaults", "models"], "")
    app = reader.table("app", raw.get("app", {}))
    reader.unknown_keys(app, list(APP_RULES), "app")
    for key, value in app.items():
        reader.check(f"app.{key}", value, APP_RULES[key])
    defaults = reader.dataclass_values(
        ModelConfig,
        reader.table("defaults", raw.get("defaults", {})),
        "defaults",
        skip=("name", "artifact", "format", "version"),
    )
    models_table = reader.table("models", raw.get("models", {}))
    if not models_table:
        reader.fail("models", "expected at least one [models.NAME] table, found none")
    models = tuple(
        _model(reader, name, reader.table(f"models.{name}", table), defaults) for name, table in models_table.items()
    )
    counts = {target: sum(model.target == target for model in models) for target in API_RESOURCES_PER_MODEL}
    if counts["sagemaker"] > MAX_SAGEMAKER_MODELS:
        reader.fail(
            "models",
            f"expected at most {MAX_SAGEMAKER_MODELS} SageMaker models in one app (each adds about 45 "
            f"resources to its stack, which CloudFormation caps at 500), found {counts['sagemaker']}; "
            "split them across apps",
        )
    resources = sum(API_RESOURCES_PER_MODEL[target] * count for target, count in counts.items())
    if resources > API_RESOURCES_FOR_MODELS:
        reader.fail(
            "models",
            f"expected routes that fit one REST API ({API_RESOURCES_FOR_MODELS} resources for models "
            f"under API Gateway's default 300; a Lambda model takes {API_RESOURCES_PER_MODEL['lambda']}, "
            f"a SageMaker model {API_RESOURCES_PER_MODEL['sagemaker']}), found {counts['lambda']} Lambda and "
            f"{counts['sagemaker']} SageMaker models taking {resources}; split them across apps",
        )
    return AppConfig(
        path=path,
        name=app.get("name", "slimserve"),
        models=models,
        **{key: app[key] for key in APP_RULES if key in app and key != "name"},
    )


def _model(reader: _Reader, name: str, table: dict, defaults: dict) -> ModelConfig:
    where = f"models.{name}"
    if model_name_problem(name):
        reader.fail(where, model_name_problem(name))
    own = reader.dataclass_values(ModelConfig, table, where, skip=("name",))
    values = {**defaults, **own}
    for key in NESTED_TABLES:  # key by key: a model's own [sagemaker] must not drop the defaults' instance type
        if key in defaults and key in own:
            values[key] = {**reader.table(f"defaults.{key}", defaults[key]), **reader.table(f"{where}.{key}", own[key])}
    if "sagemaker" not in own and values.get("target", "lambda") != "sagemaker":
        values.pop("sagemaker", None)  # [defaults.sagemaker] is for the SageMaker models among them
    for key in ("format", "artifact"):
        if key not in values:
            reader.fail(f"{where}.{key}", "missing; every model needs a format and an artifact")

    artifact = reader.path.parent / values["artifact"]
    if artifact.is_dir():
        try:
            artifact = model_file(artifact)
        except ModelFilesError as error:
            reader.fail(f"{where}.artifact", str(error))
    suffix = {"onnx": ".onnx", "tflite": ".tflite"}[values["format"]]
    if artifact.suffix != suffix:
        reader.fail(
            f"{where}.artifact",
            f"expected a {suffix} file for format {values['format']!r}, found {values['artifact']!r}",
        )
    if not artifact.is_file():
        reader.fail(f"{where}.artifact", f"model file {artifact} does not exist")
    values["artifact"] = artifact
    if "version" in values:
        values["version"] = str(values["version"])

    alarms = Alarms(
        **reader.dataclass_values(Alarms, reader.table(f"{where}.alarms", values.get("alarms", {})), f"{where}.alarms")
    )
    values["alarms"] = alarms
    target = values.get("target", "lambda")
    if "sagemaker" in values:
        if target != "sagemaker":
            reader.fail(f"{where}.sagemaker", f"only applies to target 'sagemaker', but target is {target!r}")
        settings = reader.dataclass_values(
            SageMakerSettings, reader.table(f"{where}.sagemaker", values["sagemaker"]), f"{where}.sagemaker"
        )
        values["sagemaker"] = SageMakerSettings(**settings)
    elif target == "sagemaker":
        values["sagemaker"] = SageMakerSettings()
    if target == "sagemaker":
        _check_sagemaker(reader, where, values)

    if target == "lambda":
        _check_lambda_fit(reader, where, _model_size(reader, where, artifact), values)
    reserved = values.get("reserved_concurrency")
    provisioned = values.get("provisioned_concurrency", 0)
    if reserved is not None and provisioned > reserved:
        reader.fail(
            f"{where}.provisioned_concurrency",
            f"expected at most reserved_concurrency ({reserved}), found {provisioned}",
        )
    return ModelConfig(name=name, **values)


def _model_size(reader: _Reader, where: str, artifact: Path) -> int:
    """The model's size with its external data; a file that does not parse is left to `check` and `register` to
    refuse, which load it."""
    try:
        return model_files(artifact).size
    except UnreadableModel:
        return artifact.stat().st_size
    except ModelFilesError as error:
        reader.fail(f"{where}.artifact", str(error))


def lambda_needs_mb(size_bytes: int) -> tuple[int, int]:
    """The memory and the ephemeral storage (MB) a Lambda function needs to load a model of `size_bytes`."""
    size_mb = size_bytes / 2**20
    return math.ceil(LAMBDA_BASE_MB + LAMBDA_LOAD_FACTOR * size_mb), math.ceil(EPHEMERAL_HEADROOM * size_mb)


def _check_lambda_fit(reader: _Reader, where: str, size_bytes: int, values: dict) -> None:
    memory, storage = lambda_needs_mb(size_bytes)
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    size = f"the model is {size_bytes / 2**20:.0f} MiB"
    too_big = 'or set target = "sagemaker"'
    for key, needed, why in (
        (
            "memory_mb",
            memory,
            f"{LAMBDA_BASE_MB} MB for the runtime plus {LAMBDA_LOAD_FACTOR}x the model while it loads",
        ),
        ("ephemeral_storage_mb", storage, "the model streamed to /tmp before it loads, plus 10%"),
    ):
        found = values.get(key, defaults[key])
        if found < needed:
            fix = (
                f"raise {key} (up to {LAMBDA_MAX_MB}) {too_big}"
                if needed <= LAMBDA_MAX_MB
                else too_big.removeprefix("or ")
            )
            reader.fail(f"{where}.{key}", f"{size}: expected at least {needed} ({why}), found {found}; {fix}")


def _check_sagemaker(reader: _Reader, where: str, values: dict) -> None:
    if values["format"] != "onnx":
        reader.fail(f"{where}.format", f"target 'sagemaker' serves ONNX models, found {values['format']!r}")
    settings: SageMakerSettings = values["sagemaker"]
    if settings.family not in INSTANCE_FAMILIES:
        reader.fail(
            f"{where}.sagemaker.instance_type",
            f"expected an instance family among {', '.join(INSTANCE_FAMILIES)}, found {settings.instance_type!r}",
        )
    if not settings.min_instances <= settings.initial_instance_count <= settings.max_instances:
        reader.fail(
            f"{where}.sagemaker",
            f"expected min_instances <= initial_instance_count <= max_instances, found "
            f"{settings.min_instances}, {settings.initial_instance_count}, {settings.max_instances}",
        )
