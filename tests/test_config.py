"""slimserve.toml: parsed once into typed objects; every error names file, key, expected and found."""

from pathlib import Path

import pytest
from support import ROOT

from slimserve.cli import main
from slimserve.config import (
    Alarms,
    ConfigError,
    SageMakerSettings,
    load_config,
    parse_config,
)

MODEL = '''
[models.iris]
format = "onnx"
artifact = "iris.onnx"
'''


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "iris.onnx").write_bytes(b"onnx")
    (tmp_path / "digits.tflite").write_bytes(b"tflite")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "slimserve.toml"
    path.write_text(text)
    return path


def error_of(folder: Path, text: str) -> str:
    path = write(folder, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value).removeprefix(f"{path}: ")


def test_example_config_parses_with_defaults():
    config = load_config(ROOT / "slimserve.toml")
    assert config.name == "slimserve-demo" and config.model_store_encryption == "kms"
    assert [m.name for m in config.models] == ["iris", "digits"]
    iris = config.model("iris")
    assert (iris.format, iris.target, iris.memory_mb, iris.timeout_s, iris.architecture, iris.auth) == ("onnx", "lambda", 512, 10, "x86_64", "api_key")
    assert iris.artifact == ROOT / "examples/models/iris.onnx"
    assert iris.alarms == Alarms(error_rate_percent=1.0, p99_latency_ms=300)
    assert iris.sagemaker is None and iris.provisioned_concurrency == 0


def test_minimal_model_gets_every_default(folder):
    model = load_config(write(folder, MODEL)).model("iris")
    assert (model.target, model.memory_mb, model.timeout_s, model.architecture, model.ephemeral_storage_mb,
            model.reserved_concurrency, model.provisioned_concurrency, model.auth, model.alarms) == (
        "lambda", 1024, 10, "x86_64", 512, None, 0, "api_key", Alarms())


def test_defaults_table_applies_to_every_model_and_models_override_it(folder):
    config = load_config(write(folder, '[defaults]\nmemory_mb = 2048\narchitecture = "arm64"\n' + MODEL + 'memory_mb = 256\n'
                                       '[models.digits]\nformat = "tflite"\nartifact = "digits.tflite"\n'))
    assert (config.model("iris").memory_mb, config.model("iris").architecture) == (256, "arm64")
    assert (config.model("digits").memory_mb, config.model("digits").architecture) == (2048, "arm64")


def test_version_numbers_and_aliases_are_kept_as_references(folder):
    assert load_config(write(folder, MODEL + "version = 3\n")).model("iris").version == "3"
    assert load_config(write(folder, MODEL + 'version = "prod"\n')).model("iris").version == "prod"
    assert load_config(write(folder, MODEL)).model("iris").version is None


def test_sagemaker_target_gets_instance_defaults(folder):
    model = load_config(write(folder, MODEL + 'target = "sagemaker"\n')).model("iris")
    assert model.sagemaker == SageMakerSettings(instance_type="ml.g5.xlarge", initial_instance_count=1, min_instances=1, max_instances=2)
    model = load_config(write(folder, MODEL + 'target = "sagemaker"\n[models.iris.sagemaker]\ninstance_type = "ml.g6.2xlarge"\nmax_instances = 4\n')).model("iris")
    assert (model.sagemaker.instance_type, model.sagemaker.max_instances) == ("ml.g6.2xlarge", 4)


@pytest.mark.parametrize("text, message", [
    (MODEL + "memroy_mb = 512\n", "models.iris.memroy_mb: unknown key (did you mean 'memory_mb'?); expected one of alarms, architecture, artifact, auth, deployment, ephemeral_storage_mb, format, memory_mb, provisioned_concurrency, reserved_concurrency, sagemaker, snapstart, target, timeout_s, version"),
    (MODEL + 'version = 0\n', "models.iris.version: expected a version number >= 1, a sha256 prefix or an alias (letters, digits, '.', '_', '-'), found 0"),
    (MODEL + 'version = "my prod"\n', "models.iris.version: expected a version number >= 1, a sha256 prefix or an alias (letters, digits, '.', '_', '-'), found 'my prod'"),
    ("[defaults]\nversion = 'prod'\n" + MODEL, "defaults.version: unknown key; expected one of alarms, architecture, auth, deployment, ephemeral_storage_mb, memory_mb, provisioned_concurrency, reserved_concurrency, sagemaker, snapstart, target, timeout_s"),
    (MODEL + 'memory_mb = "big"\n', "models.iris.memory_mb: expected an integer between 128 and 10240, found 'big'"),
    (MODEL + "memory_mb = 64\n", "models.iris.memory_mb: expected an integer between 128 and 10240, found 64"),
    (MODEL + "timeout_s = 60\n", "models.iris.timeout_s: expected an integer between 1 and 29, found 60"),
    (MODEL + 'architecture = "arm"\n', "models.iris.architecture: expected one of 'x86_64', 'arm64', found 'arm'"),
    (MODEL + 'target = "ec2"\n', "models.iris.target: expected one of 'lambda', 'sagemaker', found 'ec2'"),
    (MODEL + 'auth = "cognito"\n', "models.iris.auth: expected one of 'none', 'api_key', 'iam', found 'cognito'"),
    (MODEL + "reserved_concurrency = 0\n", "models.iris.reserved_concurrency: expected an integer >= 1, found 0"),
    (MODEL + "reserved_concurrency = 2\nprovisioned_concurrency = 5\n", "models.iris.provisioned_concurrency: expected at most reserved_concurrency (2), found 5"),
    (MODEL + "memory_mb = true\n", "models.iris.memory_mb: expected an integer between 128 and 10240, found True"),
    (MODEL + "[models.iris.alarms]\np99_latency_ms = 0\n", "models.iris.alarms.p99_latency_ms: expected a number > 0 and <= 900000, found 0"),
    (MODEL + "[models.iris.alarms]\nlatency = 5\n", "models.iris.alarms.latency: unknown key (did you mean 'p99_latency_ms'?); expected one of error_rate_percent, gpu_utilization_percent, p99_latency_ms, server_errors, throttles"),
    (MODEL.replace('"onnx"', '"pickle"'), "models.iris.format: expected one of 'onnx', 'tflite', found 'pickle'"),
    (MODEL.replace('"iris.onnx"', '"digits.tflite"'), "models.iris.artifact: expected a .onnx file for format 'onnx', found 'digits.tflite'"),
    (MODEL.replace('"iris.onnx"', '"missing.onnx"'), "models.iris.artifact: model file {folder}/missing.onnx does not exist"),
    ('[models.iris]\nartifact = "iris.onnx"\n', "models.iris.format: missing; every model needs a format and an artifact"),
    ('[models.Iris_Model]\nformat = "onnx"\nartifact = "iris.onnx"\n', "models.Iris_Model: model name 'Iris_Model' must be lowercase letters, digits and '-', starting with a letter, at most 40 characters"),
    (MODEL + '[models.iris.sagemaker]\ninstance_type = "ml.g5.xlarge"\n', "models.iris.sagemaker: only applies to target 'sagemaker', but target is 'lambda'"),
    (MODEL + 'target = "sagemaker"\n[models.iris.sagemaker]\ninstance_type = "g5.xlarge"\n', "models.iris.sagemaker.instance_type: expected an instance type like 'ml.g5.xlarge', found 'g5.xlarge'"),
    (MODEL + 'target = "sagemaker"\n[models.iris.sagemaker]\ninstance_type = "ml.x9.huge"\n', "models.iris.sagemaker.instance_type: expected an instance family among g4dn, g5, g6, g6e, p3, p4d, p5, inf2, c5, c6i, c7i, m5, m6i, m7i, r5, found 'ml.x9.huge'"),
    (MODEL + 'target = "sagemaker"\n[models.iris.sagemaker]\nmin_instances = 3\n', "models.iris.sagemaker: expected min_instances <= initial_instance_count <= max_instances, found 3, 1, 2"),
    (MODEL + 'target = "sagemaker"\n[models.iris.sagemaker]\nimage = "latest"\n', "models.iris.sagemaker.image: expected a container image URI like '123456789012.dkr.ecr.eu-west-1.amazonaws.com/slimserve:1', found 'latest'"),
    ('[models.digits]\nformat = "tflite"\nartifact = "digits.tflite"\ntarget = "sagemaker"\n', "models.digits.format: target 'sagemaker' serves ONNX models, found 'tflite'"),
    ("[app]\nregion = 'mars-1'\n" + MODEL, "app.region: expected an AWS region like 'eu-west-1', found 'mars-1'"),
    ("[app]\naccount = '12345'\n" + MODEL, "app.account: expected a 12-digit AWS account ID, found '12345'"),
    ("[app]\nencryption = 'kms'\n" + MODEL, "app.encryption: unknown key (did you mean 'log_encryption'?); expected one of account, alarm_email, log_encryption, log_retention_days, model_store_encryption, name, region, throttle_burst, throttle_rate"),
    ("[app]\nstore_encryption = 'kms'\n" + MODEL, "app.store_encryption: unknown key (did you mean 'model_store_encryption'?); expected one of account, alarm_email, log_encryption, log_retention_days, model_store_encryption, name, region, throttle_burst, throttle_rate"),
    ("[app]\nlog_retention_days = 10\n" + MODEL, "app.log_retention_days: expected one of 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653 (CloudWatch's retention periods), found 10"),
    (MODEL + "snapstart = 1\n", "models.iris.snapstart: expected true or false, found 1"),
    ("[app]\nname = 'demo'\n", "models: expected at least one [models.NAME] table, found none"),
    ("modles = 1\n" + MODEL, "modles: unknown key (did you mean 'models'?); expected one of app, defaults, models"),
    ("models = 3\n", "models: expected a table, found 3"),
    ("[defaults]\nformat = 'onnx'\n" + MODEL, "defaults.format: unknown key; expected one of alarms, architecture, auth, deployment, ephemeral_storage_mb, memory_mb, provisioned_concurrency, reserved_concurrency, sagemaker, snapstart, target, timeout_s"),
    ("[models.iris\n", "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 13)"),
])
def test_errors_name_the_key_what_was_expected_and_what_was_found(folder, text, message):
    assert error_of(folder, text) == message.format(folder=folder)


def models(lambda_count: int, sagemaker_count: int) -> str:
    lambdas = "".join(f'[models.m{i}]\nformat = "onnx"\nartifact = "iris.onnx"\n' for i in range(lambda_count))
    return lambdas + "".join(f'[models.s{i}]\nformat = "onnx"\nartifact = "iris.onnx"\ntarget = "sagemaker"\n'
                             for i in range(sagemaker_count))


def test_more_routes_than_one_rest_api_holds(folder):
    assert len(load_config(write(folder, models(30, 8))).models) == 38  # 30 x 6 + 8 x 14 = 292: the most there is
    assert error_of(folder, models(31, 8)) == (
        "models: expected routes that fit one REST API (292 resources for models under API Gateway's default 300; a Lambda "
        "model takes 6, a SageMaker model 14), found 31 Lambda and 8 SageMaker models taking 298; split them across apps")
    assert error_of(folder, models(49, 0)).endswith("found 49 Lambda and 0 SageMaker models taking 294; split them across apps")


def test_more_sagemaker_models_than_one_stack_holds(folder):
    assert error_of(folder, models(0, 9)) == (
        "models: expected at most 8 SageMaker models in one app (each adds about 45 resources to its stack, which "
        "CloudFormation caps at 500), found 9; split them across apps")


def test_a_missing_config_file_is_named_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/nope.toml: no such config file$"):
        load_config(tmp_path / "nope.toml")


def test_cli_reports_config_errors_without_a_trace(folder, capsys):
    path = write(folder, MODEL + "memory_mb = 1\n")
    assert main(["check", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: models.iris.memory_mb: expected an integer between 128 and 10240, found 1\n"


def test_cli_check_lists_the_models(capsys):
    assert main(["check", "--config", str(ROOT / "slimserve.toml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{ROOT / 'slimserve.toml'}: app 'slimserve-demo', 2 models"
    assert out[1] == f"  iris: onnx {ROOT / 'examples/models/iris.onnx'} (1 file, 0.6 KiB) -> lambda (512 MB x86_64), auth api_key"


def sized_model(folder, megabytes: int) -> str:
    """A file of the size (sparse: nothing is written); the config checks sizes, not contents."""
    with open(folder / "big.onnx", "wb") as file:
        file.truncate(megabytes * 2**20)
    return "big.onnx"


@pytest.mark.parametrize("size_mb, settings, message", [
    (600, {}, "models.big.memory_mb: the model is 600 MiB: expected at least 1028 (128 MB for the runtime plus 1.5x the "
              "model while it loads), found 1024; raise memory_mb (up to 10240) or set target = \"sagemaker\""),
    (600, {"memory_mb": 2048}, "models.big.ephemeral_storage_mb: the model is 600 MiB: expected at least 660 (the model "
                               "streamed to /tmp before it loads, plus 10%), found 512; raise ephemeral_storage_mb "
                               "(up to 10240) or set target = \"sagemaker\""),
    (7000, {"memory_mb": 10240, "ephemeral_storage_mb": 10240},
     "models.big.memory_mb: the model is 7000 MiB: expected at least 10628 (128 MB for the runtime plus 1.5x the model "
     "while it loads), found 10240; set target = \"sagemaker\""),
])
def test_a_lambda_model_too_big_for_its_function_is_refused_naming_the_sizes(tmp_path, size_mb, settings, message):
    artifact = sized_model(tmp_path, size_mb)
    with pytest.raises(ConfigError) as error:
        parse_config({"models": {"big": {"format": "onnx", "artifact": artifact, **settings}}}, tmp_path / "slimserve.toml")
    assert str(error.value) == f"{tmp_path / 'slimserve.toml'}: {message}"


def test_a_big_model_fits_a_function_sized_for_it_or_a_sagemaker_endpoint(tmp_path):
    artifact = sized_model(tmp_path, 600)
    fitted = {"format": "onnx", "artifact": artifact, "memory_mb": 1028, "ephemeral_storage_mb": 660}
    config = parse_config({"models": {"big": fitted, "gpu": {"format": "onnx", "artifact": artifact, "target": "sagemaker"}}},
                          tmp_path / "slimserve.toml")
    assert [model.name for model in config.models] == ["big", "gpu"]


def test_nested_tables_merge_with_the_defaults_key_by_key(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    config = parse_config({
        "defaults": {"sagemaker": {"instance_type": "ml.c5.xlarge", "max_instances": 4}, "alarms": {"p99_latency_ms": 500}},
        "models": {
            "big": {"format": "onnx", "artifact": "m.onnx", "target": "sagemaker", "sagemaker": {"max_instances": 3},
                    "alarms": {"throttles": 5}},
            "other": {"format": "onnx", "artifact": "m.onnx", "target": "sagemaker"},
            "small": {"format": "onnx", "artifact": "m.onnx"},  # a Lambda model: [defaults.sagemaker] is not for it
        },
    }, tmp_path / "slimserve.toml")
    big, other, small = config.models
    assert (big.sagemaker.instance_type, big.sagemaker.max_instances) == ("ml.c5.xlarge", 3)
    assert (big.alarms.p99_latency_ms, big.alarms.throttles) == (500, 5)
    assert (other.sagemaker.instance_type, other.sagemaker.max_instances, other.alarms.p99_latency_ms) == ("ml.c5.xlarge", 4, 500)
    assert (small.target, small.sagemaker, small.alarms.p99_latency_ms) == ("lambda", None, 500)


def test_check_says_a_single_instance_endpoint_is_an_outage_when_it_fails(capsys):
    assert main(["check", "--config", str(ROOT / "examples" / "with-sagemaker.toml")]) == 0
    out = capsys.readouterr().out.splitlines()
    gpu = out.index(next(line for line in out if line.startswith("  iris-gpu: ")))
    assert out[gpu + 1] == ("    note: models.iris-gpu.sagemaker.min_instances is 1: an instance that fails is an outage until "
                            "SageMaker replaces it; 2 or more spread the endpoint across Availability Zones")
    assert sum("note:" in line for line in out) == 1  # the Lambda twin runs across Availability Zones by itself


def test_check_warns_once_that_an_api_key_meters_and_does_not_authenticate(capsys, folder):
    assert main(["check", "--config", str(ROOT / "slimserve.toml")]) == 0
    assert capsys.readouterr().err == (
        'warning: iris, digits: auth "api_key" meters and throttles callers, it does not authenticate them (every such '
        'model shares one key, sent as a plain header); auth = "iam" requires AWS credentials (README, "Authentication")\n')
    (folder / "iris.onnx").write_bytes((ROOT / "examples" / "models" / "iris.onnx").read_bytes())
    path = write(folder, MODEL + 'auth = "iam"\n')
    assert main(["check", "--config", str(path)]) == 0
    assert capsys.readouterr().err == ""


def test_a_new_project_authenticates_with_iam(tmp_path):
    from aws_cdk import assertions

    from slimserve.stacks.app import build_app

    main(["init", str(tmp_path / "proj"), "--model", str(ROOT / "examples" / "models" / "iris.onnx")])
    config = load_config(tmp_path / "proj" / "slimserve.toml")
    assert config.model("iris").auth == "iam"
    shard = build_app(config).node.find_child(config.name).shards[0]
    methods = assertions.Template.from_stack(shard).find_resources("AWS::ApiGateway::Method").values()
    assert {(m["Properties"]["AuthorizationType"], m["Properties"].get("ApiKeyRequired")) for m in methods} == {("AWS_IAM", False)}


def test_sagemaker_timeouts_outside_sagemakers_range_are_refused(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(ConfigError) as error:
        parse_config({"models": {"big": {"format": "onnx", "artifact": "m.onnx", "target": "sagemaker",
                                         "sagemaker": {"startup_timeout_s": 30}}}}, tmp_path / "slimserve.toml")
    assert str(error.value) == f"{tmp_path / 'slimserve.toml'}: models.big.sagemaker.startup_timeout_s: expected an integer between 60 and 3600, found 30"
