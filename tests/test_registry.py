"""The registry against moto's S3: idempotent versions, aliases, rollback, tamper detection, refusals."""

import pickle
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from support import MODELS

from slimserve.registry.versions import Registry, RegistryError


def keys(registry) -> list[str]:
    return [item["Key"] for item in registry.s3.list_objects_v2(Bucket=registry.bucket).get("Contents", [])]


def test_same_bytes_twice_make_one_version(registry):
    first, new = registry.register(MODELS / "iris.onnx", "iris")
    again, new_again = registry.register(MODELS / "iris.onnx", "iris")
    assert (first.number, new, again, new_again) == (1, True, first, False)
    assert first.key == f"models/iris/{first.sha256}/model.onnx"
    assert len(keys(registry)) == 2  # the model and its manifest


def test_versions_aliases_and_rollback(registry, tmp_path):
    v1, _ = registry.register(MODELS / "iris.onnx", "m")
    other = tmp_path / "retrained.onnx"
    model = onnx.load(MODELS / "iris.onnx")
    model.doc_string = "retrained"  # different bytes, same graph
    onnx.save(model, other)
    v2, _ = registry.register(other, "m")
    assert [v.number for v in registry.versions("m")] == [1, 2] and v2.source == "retrained.onnx"
    assert registry.set_alias("m", "prod", "1") == (None, 1)
    assert registry.set_alias("m", "prod", v2.sha256[:12]) == (1, 2)
    assert registry.version("m", "prod") == v2
    assert registry.rollback("m", "prod") == (2, 1)
    assert registry.version("m", "prod") == v1
    with pytest.raises(RegistryError, match=r"^alias 'prod' of model 'm' points at version 1 and has no earlier version in its "
                                            r"history; nothing to roll back to$"):
        registry.rollback("m", "prod")
    with pytest.raises(RegistryError, match=r"^model 'm' has no version '7'; versions: 1, 2$"):
        registry.set_alias("m", "prod", "7")
    with pytest.raises(RegistryError, match=r"^model 'm' has no alias 'canary'$"):
        registry.version("m", "canary")


def test_download_verifies_and_detects_tampering(registry, tmp_path):
    version, _ = registry.register(MODELS / "iris.onnx", "iris")
    assert registry.download("iris", "1", tmp_path / "good").read_bytes() == (MODELS / "iris.onnx").read_bytes()
    registry.s3.put_object(Bucket=registry.bucket, Key=version.key, Body=b"tampered" + (MODELS / "iris.onnx").read_bytes())
    with pytest.raises(RegistryError, match=rf"^model 'iris' version 1: sha256 of s3://{registry.bucket}/{version.key} is "
                                            rf"[0-9a-f]{{64}}, expected {version.sha256}; refusing to serve it$"):
        registry.download("iris", "1", tmp_path / "bad")


def test_manifest_says_what_the_version_is(registry):
    version, _ = registry.register(MODELS / "digits.tflite", "digits", report={"level": "none"})
    manifest = registry.s3.get_object(Bucket=registry.bucket, Key=version.key.rsplit("/", 1)[0] + "/manifest.json")["Body"].read()
    manifest = __import__("json").loads(manifest)
    assert {k: manifest[k] for k in ("name", "version", "format", "size", "source", "optimization")} == {
        "name": "digits", "version": 1, "format": "tflite", "size": (MODELS / "digits.tflite").stat().st_size,
        "source": "digits.tflite", "optimization": {"level": "none"}}
    assert manifest["signature"]["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert len(manifest["git_commit"] or "x" * 40) == 40 and manifest["created"].endswith("Z")


def dense_model() -> onnx.ModelProto:
    """y = x @ W + b with W and b as initializers: tensors that can live in external files."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])], initializer=[weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save_split(model: onnx.ModelProto, path) -> None:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)


def _external_outside(tmp_path):
    model = dense_model()
    (tmp_path / "model").mkdir()
    save_split(model, tmp_path / "model" / "escape.onnx")
    shutil.move(tmp_path / "model" / "weights.bin", tmp_path / "weights.bin")
    escaped = onnx.load(tmp_path / "model" / "escape.onnx", load_external_data=False)
    for tensor in escaped.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(escaped, tmp_path / "model" / "escape.onnx")
    return tmp_path / "model" / "escape.onnx"


@pytest.mark.parametrize("case", ["unknown format", "pickle file", "pickle inside .onnx", "external data outside", "corrupt file"])
def test_bad_models_are_refused_by_name_and_nothing_is_uploaded(registry, tmp_path, case):
    if case == "unknown format":
        path, message = tmp_path / "model.h5", "unknown model format '.h5'; expected one of .onnx, .tflite (onnx, tflite)"
        path.write_bytes(b"HDF5")
    elif case == "pickle file":
        path, message = tmp_path / "model.pkl", ("looks like a pickle; slimserve serves only ONNX and TFLite files, never "
                                                 "pickle (unpickling runs arbitrary code): convert it first")
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif case == "pickle inside .onnx":
        path, message = tmp_path / "model.onnx", ("looks like a pickle; slimserve serves only ONNX and TFLite files, never "
                                                  "pickle (unpickling runs arbitrary code): convert it first")
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif case == "external data outside":
        path = _external_outside(tmp_path)
        tensor = onnx.load(path, load_external_data=False).graph.initializer[0].name
        message = (f"tensor {tensor!r} keeps its data at '../weights.bin', outside the model's folder "
                   f"{path.parent.resolve()}; refusing to read it")
    else:
        path = tmp_path / "model.onnx"
        path.write_bytes(b"\x08\x07" + bytes(range(200)))
        message = None
    with pytest.raises(RegistryError) as caught:
        registry.register(path, "bad")
    if message is None:
        assert str(caught.value).startswith(f"{path}: not a loadable onnx model: ")
    else:
        assert str(caught.value) == f"{path}: {message}"
    assert keys(registry) == []


def test_cli_register_versions_alias_rollback(s3_store, tmp_path, capsys):
    from slimserve.cli import main

    s3_store.client().create_bucket(Bucket="cli-store")
    where = ["--endpoint-url", s3_store.endpoint, "--bucket", "cli-store"]
    other = tmp_path / "iris-v2.onnx"
    model = onnx.load(MODELS / "iris.onnx")
    model.doc_string = "v2"
    onnx.save(model, other)
    assert main(["register", str(MODELS / "iris.onnx"), "--name", "iris", *where]) == 0
    assert main(["register", str(MODELS / "iris.onnx"), "--name", "iris", *where]) == 0
    assert main(["register", str(other), "--name", "iris", *where]) == 0
    assert main(["versions", "iris", *where]) == 0  # before any alias: the config's version serves
    assert main(["alias", "iris", "live", "2", *where]) == 0  # the first promotion
    assert main(["rollback", "iris", *where]) == 0  # live, the alias that serves: back to the config's version
    assert main(["rollback", "iris", *where]) == 2  # nothing earlier, and never forward to 2
    assert main(["versions", "iris", *where]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    sha = load_sha(MODELS / "iris.onnx")
    assert out[0] == f"registered iris version 1: sha256 {sha}, 1 file, 0.6 KiB, models/iris/{sha}/model.onnx"
    assert out[1] == f"iris: these bytes are already version 1 (sha256 {sha}); nothing uploaded"
    assert out[2].startswith("registered iris version 2: ")
    assert out[3].split() == ["version", "sha256", "format", "bytes", "created", "source", "aliases"]
    assert out[4].split()[:4] == ["1", sha[:12], "onnx", "637"]
    assert out[4].endswith("iris.onnx                 live (the config's; no alias yet)")
    assert out[5].endswith("iris-v2.onnx              -")
    serves = ('  in the local store: a running local stack serves it within a second; a deployed API serves it once a '
              'config with version = "live" is locked (slimserve lock) and deployed')
    assert out[6:10] == ["iris: alias live now points at version 2 (was version 1)", serves,
                         "iris: alias live rolled back from version 2 to version 1", serves]
    assert captured.err == ("error: alias 'live' of model 'iris' points at version 1 and has no earlier version in its "
                            "history; nothing to roll back to\n")
    assert re.fullmatch(r".*iris\.onnx {17}live since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", out[11]), out[11]
    assert out[12].endswith("iris-v2.onnx              -")
    assert main(["alias", "iris", "prod", "2", *where]) == 0
    assert main(["versions", "iris", *where]) == 0
    assert main(["versions", "irsi", *where]) == 0  # a typo: nothing registered, and the config's names shown
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "irsi: no registered versions (the config's models: iris, digits)"
    assert out[1] == (
        '  in the local store: a running local stack serves the live alias, not this one; a deployed API serves it once a '
        'config with version = "prod" is locked (slimserve lock) and deployed')
    assert re.fullmatch(r".*iris-v2\.onnx {14}prod since \S+Z", out[4]), out[4]


def test_cli_errors_are_one_line(s3_store, tmp_path, capsys):
    from slimserve.cli import main

    s3_store.client().create_bucket(Bucket="cli-errors")
    (tmp_path / "model.pkl").write_bytes(pickle.dumps([1]))
    where = ["--endpoint-url", s3_store.endpoint, "--bucket", "cli-errors"]
    assert main(["register", str(MODELS / "iris.onnx"), "--name", "irsi", *where]) == 2  # a typo creates no model
    assert main(["register", str(tmp_path / "model.pkl"), "--name", "x", "--new", *where]) == 2
    assert main(["rollback", "x", *where]) == 2
    assert main(["versions", "x", "--region", "eu-west-1"]) == 2
    assert keys(Registry(s3_store.client(), "cli-errors")) == []
    assert capsys.readouterr().err.splitlines() == [
        "error: --name irsi: slimserve.toml has no model 'irsi' (its models: iris, digits); --new registers a model the "
        "config does not name yet",
        f"error: {tmp_path / 'model.pkl'}: looks like a pickle; slimserve serves only ONNX and TFLite files, never pickle "
        "(unpickling runs arbitrary code): convert it first",
        "error: model 'x' has no alias 'live'",
        "error: --bucket: name the model store's bucket (the stack output ModelStoreBucket)",
    ]


def load_sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_takes_the_configs_name_rule(s3_store, tmp_path, capsys):
    from slimserve.cli import main

    where = ["--endpoint-url", s3_store.endpoint, "--bucket", "cli-names"]
    s3_store.client().create_bucket(Bucket="cli-names")
    assert main(["register", str(MODELS / "iris.onnx"), "--name", "Cancer", *where]) == 2
    assert capsys.readouterr().err == ("error: --name: model name 'Cancer' must be lowercase letters, digits and '-', "
                                       "starting with a letter, at most 40 characters, as in the config\n")


def test_rollback_walks_the_alias_history_back_one_step_at_a_time(registry, tmp_path):
    numbers = []
    for text in ("a", "b", "c"):
        model = onnx.load(MODELS / "iris.onnx")
        model.doc_string = text
        onnx.save(model, tmp_path / f"{text}.onnx")
        numbers.append(registry.register(tmp_path / f"{text}.onnx", "walk")[0].number)
    for number in numbers:
        registry.set_alias("walk", "live", str(number))
    assert [registry.rollback("walk"), registry.rollback("walk")] == [(3, 2), (2, 1)]
    with pytest.raises(RegistryError, match=r"^alias 'live' of model 'walk' points at version 1 and has no earlier version "):
        registry.rollback("walk")


def test_a_version_with_other_inputs_is_refused_unless_allowed(registry, tmp_path):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    features, labels = load_wine(return_X_y=True)
    estimator = LogisticRegression(max_iter=5000).fit(features, labels)
    wine = tmp_path / "wine.onnx"
    wine.write_bytes(to_onnx(estimator, features[:1].astype("float32"), options={id(estimator): {"zipmap": False}}).SerializeToString())
    registry.register(MODELS / "iris.onnx", "flowers")
    with pytest.raises(RegistryError) as refused:
        registry.register(wine, "flowers")
    assert str(refused.value) == (f"{wine}: its inputs (X FP32 [-1, 13]) differ from those of flowers version 1 (features FP32 "
                                  "[-1, 4]), which clients are sent now; --allow-signature-change registers it anyway")
    assert [v.number for v in registry.versions("flowers")] == [1]
    version, new = registry.register(wine, "flowers", allow_signature_change=True)
    assert (version.number, new) == (2, True)


def test_register_loads_the_model_once(registry, monkeypatch):
    """A multi-gigabyte model takes seconds to load: the check that it loads and its signature share one session."""
    from slimserve.lambda_handlers import runtimes

    loads = []

    class Counted(runtimes.OnnxModel):
        def __init__(self, *args, **kwargs):
            loads.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runtimes, "OnnxModel", Counted)
    registry.register(MODELS / "iris.onnx", "iris")
    assert len(loads) == 1


def test_alias_of_a_sagemaker_model_says_what_moves_it(s3_store, tmp_path, capsys):
    from slimserve.cli import main

    s3_store.client().create_bucket(Bucket="cli-sagemaker")
    where = ["--endpoint-url", s3_store.endpoint, "--bucket", "cli-sagemaker", "--config",
             str(MODELS.parent / "with-sagemaker.toml")]
    model = onnx.load(MODELS / "iris.onnx")
    model.doc_string = "v2"
    onnx.save(model, tmp_path / "iris-v2.onnx")
    assert main(["register", str(MODELS / "iris.onnx"), "--name", "iris-gpu", *where]) == 0
    assert main(["register", str(tmp_path / "iris-v2.onnx"), "--name", "iris-gpu", *where]) == 0
    capsys.readouterr()
    assert main(["alias", "iris-gpu", "live", "2", *where]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "iris-gpu: alias live now points at version 2 (was version 1)",
        "  in the local store: a running local stack moves to it as a deploy does: it starts the version's serving "
        'program and sends requests to it once it answers /ping; a deployed API serves it once a config with version = '
        '"live" is locked (slimserve lock) and deployed, which moves the endpoint to it blue/green (rolled back on its '
        "alarms); until then the endpoint serves the version it was deployed with"]


def test_a_named_store_needs_no_config(s3_store, tmp_path, capsys):
    """--endpoint-url (or --profile/--region) names the store outright: a CI job without the project's config can
    still list and register (nothing to check a name against, so --new is not asked for)."""
    from slimserve.cli import main

    s3_store.client().create_bucket(Bucket="no-config")
    where = ["--endpoint-url", s3_store.endpoint, "--bucket", "no-config", "--config", str(tmp_path / "absent.toml")]
    assert main(["versions", "fraud", *where]) == 0
    assert main(["register", str(MODELS / "iris.onnx"), "--name", "fraud", *where]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fraud: no registered versions" and out[1].startswith("registered fraud version 1: ")
