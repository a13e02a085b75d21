"""Models whose tensors live in external data files: one version of several files, from register to serving.

The model is an MLP of a few MB made here, saved with its weights beside it (one file in a subfolder, one
per layer otherwise), as models past protobuf's 2 GB limit must be."""

import hashlib
import json
import os
import subprocess
import urllib.request

import numpy as np
import onnx
import pytest
from aws_cdk import assertions
from onnx import helper, numpy_helper
from support import running_stack

from slimserve.config import ConfigError, load_config, parse_config
from slimserve.lambda_handlers import sagemaker_server
from slimserve.lambda_handlers.digests import LISTING, ListingError, read_listing
from slimserve.lambda_handlers.function import ModelFunction, ModelSource, ModelSourceError
from slimserve.lambda_handlers.runtimes import OnnxModel
from slimserve.modelfiles import ModelFilesError, model_files
from slimserve.registry import versions
from slimserve.registry.lock import locked_models
from slimserve.registry.versions import RegistryError
from slimserve.stacks.app import build_app

WIDTH = 768  # three 768x768 fp32 layers: 6.75 MiB of weights


def external_mlp(folder, name="mlp.onnx", layers=3):
    """x @ W1 + b1 -> Relu -> ... with every weight in external data: W1 in weights/w1.bin, the rest in one file."""
    rng = np.random.default_rng(7)
    nodes, initializers, previous = [], [], "x"
    for layer in range(1, layers + 1):
        weight = numpy_helper.from_array(rng.normal(0, 0.05, (WIDTH, WIDTH)).astype(np.float32), f"W{layer}")
        bias = numpy_helper.from_array(rng.normal(0, 0.05, (WIDTH,)).astype(np.float32), f"b{layer}")
        initializers += [weight, bias]
        out = "y" if layer == layers else f"h{layer}"
        nodes += [helper.make_node("MatMul", [previous, f"W{layer}"], [f"m{layer}"]),
                  helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}" if layer < layers else out])]
        if layer < layers:
            nodes.append(helper.make_node("Relu", [f"a{layer}"], [out]))
        previous = out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", WIDTH])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", WIDTH])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / name, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    split = onnx.load(folder / name, load_external_data=False)  # W1 moves to a file in a subfolder of its own
    (folder / "weights").mkdir(exist_ok=True)
    with open(folder / "weights.bin", "rb") as data:
        for tensor in split.graph.initializer:
            if tensor.name == "W1":
                entries = {entry.key: entry.value for entry in tensor.external_data}
                data.seek(int(entries["offset"]))
                (folder / "weights" / "w1.bin").write_bytes(data.read(int(entries["length"])))
                del tensor.external_data[:]
                for key, value in (("location", "weights/w1.bin"), ("offset", "0"), ("length", entries["length"])):
                    tensor.external_data.add(key=key, value=value)
    onnx.save(split, folder / name)
    return folder / name


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return external_mlp(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(1).normal(size=(3, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(mlp, rows):
    return OnnxModel(mlp).run({"x": rows}, ["y"])["y"]


def objects(registry) -> dict[str, dict]:
    return {item["Key"]: item for item in registry.s3.list_objects_v2(Bucket=registry.bucket)["Contents"]}


def test_the_files_are_the_model_and_the_data_it_names_and_the_digest_is_their_listings(mlp):
    files = model_files(mlp)
    assert sorted(files.stored) == ["model.onnx", "weights.bin", "weights/w1.bin"]
    assert files.size == sum(path.stat().st_size for path in files.stored.values()) > 3 * WIDTH * WIDTH * 4
    sha256sum = subprocess.run(["sha256sum", "mlp.onnx", "weights.bin", "weights/w1.bin"], cwd=mlp.parent, capture_output=True,
                               text=True, check=True).stdout.replace("mlp.onnx", "model.onnx")
    listing = "".join(sorted(sha256sum.splitlines(keepends=True), key=lambda line: line.split("  ")[1]))
    assert files.listing.decode() == listing
    assert files.sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert model_files(mlp.parent) == files  # the folder names its one model file


def test_register_uploads_file_by_file_in_parts_with_progress_and_the_listing_before_the_manifest(registry, mlp, monkeypatch):
    monkeypatch.setattr(versions, "MULTIPART_BYTES", 5 * 2**20)  # S3's smallest part: weights.bin goes in two
    progress = []
    version, new = registry.register(mlp, "mlp", progress=lambda *call: progress.append(call))
    files = model_files(mlp)
    assert (new, version.files, version.size, version.sha256) == (True, 3, files.size, files.sha256)
    folder = f"models/mlp/{files.sha256}/"
    stored = objects(registry)
    assert sorted(stored) == sorted(folder + name for name in ["model.onnx", "weights.bin", "weights/w1.bin", LISTING, "manifest.json"])
    assert stored[folder + "weights.bin"]["ETag"].endswith('-2"')  # a multipart upload of two parts
    body = registry.s3.get_object(Bucket=registry.bucket, Key=folder + LISTING)["Body"].read()
    assert body == files.listing
    finals = {name: (sent, size) for name, sent, size in progress if sent == size}
    assert finals == {name: (path.stat().st_size,) * 2 for name, path in files.stored.items()}
    sent = [sent for name, sent, _ in progress if name == "weights.bin"]
    assert sent == sorted(sent) and len(sent) > 1  # it grows as the parts go
    manifest = json.loads(registry.s3.get_object(Bucket=registry.bucket, Key=folder + "manifest.json")["Body"].read())
    assert manifest["files"] == [{"name": name, "sha256": files.sha256s[name], "size": path.stat().st_size}
                                 for name, path in files.stored.items()]
    assert registry.register(mlp.parent, "mlp") == (version, False)  # the same files again, named by their folder


def test_a_downloaded_version_answers_as_the_runtime_and_sha256sum_checks_it(registry, mlp, rows, expected, tmp_path):
    registry.register(mlp, "mlp")
    path = registry.download("mlp", "1", tmp_path / "copy")
    assert path == tmp_path / "copy" / "model.onnx"
    np.testing.assert_array_equal(OnnxModel(path).run({"x": rows}, ["y"])["y"], expected)
    check = subprocess.run(["sha256sum", "-c", LISTING], cwd=path.parent, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 3


def tamper(registry, key: str) -> None:
    data = bytearray(registry.s3.get_object(Bucket=registry.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 1
    registry.s3.put_object(Bucket=registry.bucket, Key=key, Body=bytes(data))


@pytest.mark.parametrize("name", ["weights.bin", "weights/w1.bin", LISTING])
def test_a_tampered_file_is_refused_on_fetch_by_the_registry_and_the_function(registry, mlp, name, tmp_path, monkeypatch,
                                                                              s3_store):
    version, _ = registry.register(mlp, "mlp")
    key = f"models/mlp/{version.sha256}/{name}"
    tamper(registry, key)
    expected = (version.sha256 if name == LISTING else model_files(mlp).sha256s[name])
    message = rf"sha256 of s3://{registry.bucket}/{key} is [0-9a-f]{{64}}, expected {expected}; refusing to serve it$"
    with pytest.raises(RegistryError, match=rf"^model 'mlp' version 1: {message}"):
        registry.download("mlp", "1", tmp_path / "copy")
    for variable, value in s3_store.environment.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    served = ModelFunction(version.environment(registry.bucket))
    assert served.model.failure is not None and served.model.failure.startswith(f"sha256 of s3://{registry.bucket}/{key}")
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing stays in ephemeral storage


def test_the_function_streams_every_file_and_loads_the_model_from_beside_its_data(registry, mlp, rows, expected, s3_store,
                                                                                   monkeypatch, tmp_path):
    version, _ = registry.register(mlp, "mlp")
    for variable, value in s3_store.environment.items():
        monkeypatch.setenv(variable, value)
    environment = version.environment(registry.bucket)
    assert environment["SLIMSERVE_MODEL_LISTING"] == f"models/mlp/{version.sha256}/{LISTING}"
    source = ModelSource.from_environment(environment)
    with source.verified_file(str(tmp_path)) as path:
        assert sorted(os.path.relpath(os.path.join(root, f), os.path.dirname(path)) for root, _, names in
                      os.walk(os.path.dirname(path)) for f in names) == [LISTING, "model.onnx", "weights.bin", "weights/w1.bin"]
    assert list(tmp_path.iterdir()) == []
    served = ModelFunction(environment)
    np.testing.assert_array_equal(served.model.runtime.run({"x": rows}, ["y"])["y"], expected)


def test_the_sagemaker_program_checks_every_file_in_its_model_folder(registry, mlp, rows, expected, tmp_path):
    version, _ = registry.register(mlp, "mlp")
    folder = registry.download("mlp", "1", tmp_path / "model").parent
    environ = {"SM_MODEL_DIR": str(folder), "SLIMSERVE_MODEL_NAME": "mlp", "SLIMSERVE_MODEL_SHA256": version.sha256}
    served = sagemaker_server.load(environ)
    np.testing.assert_array_equal(served.runtime.run({"x": rows}, ["y"])["y"], expected)
    data = bytearray((folder / "weights" / "w1.bin").read_bytes())
    data[0] ^= 1
    (folder / "weights" / "w1.bin").write_bytes(bytes(data))
    failed = sagemaker_server.load(environ)
    assert failed.failure == (f"sha256 of {folder}/weights/w1.bin is {hashlib.sha256(data).hexdigest()}, expected "
                              f"{model_files(mlp).sha256s['weights/w1.bin']}; refusing to serve it")


@pytest.mark.parametrize("listing, problem", [
    (b"", "no files listed"),
    (b"abc  model.onnx\n", "line 1: 'abc' is not a sha256"),
    (b"%s model.onnx\n" % (b"0" * 64), "line 1: expected '<sha256>  <name>'"),
    (b"%s  ../escape.bin\n" % (b"0" * 64), "line 1: expected a relative path inside the model's folder"),
    (b"%s  /etc/passwd\n" % (b"0" * 64), "line 1: expected a relative path inside the model's folder"),
    (b"%s  a\n%s  a\n" % (b"0" * 64, b"1" * 64), "line 2: 'a' is listed twice"),
])
def test_a_listing_that_names_files_outside_its_folder_or_does_not_parse_is_refused(listing, problem):
    with pytest.raises(ListingError, match=f"^{problem}$"):
        read_listing(listing)


def test_a_listing_that_verifies_but_escapes_is_refused_before_anything_is_written(registry, s3_store, monkeypatch, tmp_path):
    """A store written by hand: the listing hashes to the digest the function was given, but names ../ paths."""
    listing = b"%s  ../../escape.bin\n%s  model.onnx\n" % (b"0" * 64, b"1" * 64)
    digest = hashlib.sha256(listing).hexdigest()
    registry.s3.put_object(Bucket=registry.bucket, Key=f"models/x/{digest}/{LISTING}", Body=listing)
    for variable, value in s3_store.environment.items():
        monkeypatch.setenv(variable, value)
    source = ModelSource("x", "1", "onnx", digest, registry.bucket, f"models/x/{digest}/model.onnx",
                         listing=f"models/x/{digest}/{LISTING}")
    with pytest.raises(ModelSourceError, match=rf"^s3://{registry.bucket}/models/x/{digest}/{LISTING}: line 1: expected a "
                                               r"relative path inside the model's folder$"):
        source.download(str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists() and not (tmp_path / "escape.bin").exists()


def test_external_data_through_a_symlink_out_of_the_folder_is_refused(tmp_path, mlp):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "model"
    external_mlp(folder)
    (folder / "weights.bin").rename(outside / "weights.bin")
    (folder / "weights.bin").symlink_to(outside / "weights.bin")
    with pytest.raises(ModelFilesError, match=r"tensor 'b1' keeps its data at 'weights.bin', outside the model's folder"):
        model_files(folder / "mlp.onnx")


@pytest.mark.parametrize("contents, found", [([], "none"), (["a.onnx", "b.onnx"], "a.onnx, b.onnx")])
def test_a_folder_artifact_must_hold_one_model(tmp_path, contents, found):
    (tmp_path / "model").mkdir()
    for name in contents:
        (tmp_path / "model" / name).write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"m": {"format": "onnx", "artifact": "model"}}}, tmp_path / "slimserve.toml")
    assert str(caught.value) == (f"{tmp_path}/slimserve.toml: models.m.artifact: {tmp_path}/model: expected a folder holding "
                                 f"one model file (.onnx, .tflite), found {found}")


def test_the_lambda_fit_counts_the_data_files(mlp):
    with pytest.raises(ConfigError, match=r"^.*models.m.memory_mb: the model is 9 MiB: expected at least 142 "):
        parse_config({"models": {"m": {"format": "onnx", "artifact": str(mlp.parent), "memory_mb": 128}}},
                     mlp.parent.parent / "slimserve.toml")


def config_file(folder, mlp, name="mlp") -> "os.PathLike":
    """Models `name` on Lambda and `name`-sm on SageMaker. Each test names its own: the moto servers of one process
    share their buckets."""
    config = folder / "slimserve.toml"
    config.write_text(f'[app]\nname = "ext"\n\n[defaults]\nauth = "none"\n\n[models.{name}]\nformat = "onnx"\n'
                      f'artifact = "{mlp.parent}"\n\n[models.{name}-sm]\nformat = "onnx"\nartifact = "{mlp}"\n'
                      'target = "sagemaker"\n')
    return config


def test_synth_uploads_the_folder_and_points_the_function_at_its_listing(tmp_path, mlp):
    config = load_config(config_file(tmp_path, mlp))
    stack = build_app(config).node.find_child("ext")
    digest = model_files(mlp).sha256
    staged = tmp_path / "build" / "model-upload" / "ext" / "models" / "mlp" / digest
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == [
        LISTING, "manifest.json", "model.onnx", "weights.bin", "weights/w1.bin"]
    shard = assertions.Template.from_stack(stack.shards[0])
    (function,) = [f for f in shard.find_resources("AWS::Lambda::Function").values()
                   if f["Properties"]["Environment"]["Variables"].get("SLIMSERVE_MODEL_NAME") == "mlp"]
    variables = function["Properties"]["Environment"]["Variables"]
    assert (variables["SLIMSERVE_MODEL_SHA256"], variables["SLIMSERVE_MODEL_LISTING"]) == (digest, f"models/mlp/{digest}/{LISTING}")
    reads = [s["Resource"] for p in shard.find_resources("AWS::IAM::Policy").values()
             for s in p["Properties"]["PolicyDocument"]["Statement"] if s["Action"] == "s3:GetObject"]
    assert [r["Fn::Join"][1][1] for r in reads] == [f"/models/mlp/{digest}/*"]  # its own version's folder, nothing more


@pytest.mark.slow
def test_both_targets_serve_it_on_the_local_stack_as_the_runtime_answers(tmp_path, mlp, rows, expected):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(rows.shape),
                                   "data": rows.flatten().tolist()}]}).encode()
    with running_stack(config_file(tmp_path, mlp), tmp_path / "work") as stack:
        for name in ("mlp", "mlp-sm"):
            request = urllib.request.Request(f"{stack.gateway.url}/v2/models/{name}/infer", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                (output,) = json.loads(response.read())["outputs"]
            np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(rows.shape), expected)
        model_dir = tmp_path / "work" / "mlp-sm-model-1"
        assert sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()) == [
            LISTING, "model.onnx", "weights.bin", "weights/w1.bin"]


def test_the_cli_registers_it_with_progress_locks_it_and_checks_its_size(s3_store, mlp, tmp_path, monkeypatch, capsys):
    from slimserve.cli import main
    from slimserve.cli import registry as cli_registry

    monkeypatch.setattr(cli_registry, "MULTIPART_BYTES", 5 * 2**20)
    monkeypatch.setattr(versions, "MULTIPART_BYTES", 5 * 2**20)
    s3_store.client().create_bucket(Bucket="ext-cli")
    where = ["--endpoint-url", s3_store.endpoint, "--bucket", "ext-cli"]
    files = model_files(mlp)
    assert main(["register", str(mlp.parent), "--name", "mlp", "--new", *where]) == 0
    captured = capsys.readouterr()
    assert captured.out == (f"registered mlp version 1: sha256 {files.sha256}, 3 files, 9.0 MiB, "
                            f"models/mlp/{files.sha256}/model.onnx\n")
    size = (mlp.parent / "weights.bin").stat().st_size
    tenths = [int(line.split(": ")[1].split("%")[0]) for line in captured.err.splitlines()]
    assert captured.err.splitlines()[-1] == f"uploading weights.bin: 100% of {size / 2**20:.1f} MiB"
    assert tenths == sorted(tenths) and len(tenths) >= 2  # weights/w1.bin (2.2 MiB) is under the part size: no lines
    config = tmp_path / "slimserve.toml"
    config.write_text(f'[models.mlp]\nformat = "onnx"\nartifact = "{mlp}"\nversion = "1"\n')
    assert main(["lock", "--config", str(config), *where]) == 0
    entry = json.loads(config.with_suffix(".lock").read_text())["models"]["mlp"]
    assert (entry["sha256"], entry["files"], entry["size"]) == (files.sha256, 3, files.size)
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    assert f"  mlp: onnx {mlp} (3 files, 9.0 MiB) -> lambda (1024 MB x86_64)" in capsys.readouterr().out
    monkeypatch.setenv("SLIMSERVE_ALLOW_LOCAL_LOCK", "1")
    locked = locked_models(load_config(config), "deployed-store")["mlp"]
    assert locked.environment()["SLIMSERVE_MODEL_LISTING"] == f"models/mlp/{files.sha256}/{LISTING}"


# A PyTorch MLP of a few MB saved whole, its own predictions on the samples beside it.
TORCH_MLP = """
import sys, numpy as np, torch
folder = sys.argv[1]
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                          torch.nn.Linear(512, 10))
samples = np.random.default_rng(0).random((16, 512), dtype=np.float32)
np.save(f"{folder}/samples.npy", samples)
torch.save(mlp, f"{folder}/mlp.pt")
with torch.no_grad():
    np.save(f"{folder}/expected.npy", mlp.eval()(torch.from_numpy(samples)).numpy())
"""


@pytest.mark.slow
def test_torch_convert_writes_external_data_optimize_reads_it_and_both_targets_serve_it(tmp_path, monkeypatch):
    from support import run_in_extra_venv

    from slimserve.modeltools import convert, optimize

    saved = run_in_extra_venv("torch", "-c", TORCH_MLP, str(tmp_path))
    assert saved.returncode == 0, saved.stderr[-3000:]
    out = tmp_path / "model" / "mlp.onnx"
    converted = run_in_extra_venv("torch", "-m", "slimserve", "convert", str(tmp_path / "mlp.pt"), "--samples",
                                  str(tmp_path / "samples.npy"), "--out", str(out), "--external-data")
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert converted.stdout.startswith(f"wrote {out} (weights in mlp.onnx.data): checked on 16 samples, max |diff| ")
    assert sorted(p.name for p in out.parent.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]  # no staging folder left
    assert out.stat().st_size < 64 * 1024 < (out.parent / "mlp.onnx.data").stat().st_size
    samples, expected = np.load(tmp_path / "samples.npy"), np.load(tmp_path / "expected.npy")
    np.testing.assert_allclose(OnnxModel(out).run({"input": samples}, ["output"])["output"], expected, atol=1e-5)

    size = model_files(out).size
    for level in ("fp16", "int8", "graph"):  # below EXTERNAL_DATA_BYTES each result folds into one file
        report = optimize.optimize(out, level, tmp_path / "samples.npy", 0.05, tmp_path / level / "mlp.onnx", force=True,
                                   min_agreement=0)  # random weights: classes near ties; the gate is not the point here
        assert report.original.size == size and sorted(p.name for p in (tmp_path / level).iterdir()) == ["mlp.onnx"]
        assert report.optimized.size == (tmp_path / level / "mlp.onnx").stat().st_size
    assert report.optimized.max_abs_diff < 1e-5  # the graph level changes no arithmetic
    monkeypatch.setattr(convert, "EXTERNAL_DATA_BYTES", 2**20)  # as if the fp16 weights passed the limit
    report = optimize.optimize(out, "fp16", tmp_path / "samples.npy", 0.05, tmp_path / "big-fp16" / "mlp.onnx", force=True,
                               min_agreement=0)
    assert sorted(p.name for p in (tmp_path / "big-fp16").iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    assert report.optimized.size == model_files(tmp_path / "big-fp16" / "mlp.onnx").size < 0.6 * size
    fp16 = OnnxModel(tmp_path / "big-fp16" / "mlp.onnx").run({"input": samples}, ["output"])["output"]
    np.testing.assert_allclose(fp16, expected, atol=0.05)

    with running_stack(config_file(tmp_path, out, "torch-mlp"), tmp_path / "work") as stack:
        for name in ("torch-mlp", "torch-mlp-sm"):
            request = urllib.request.Request(f"{stack.gateway.url}/v1/models/{name}:predict", method="POST",
                                             data=json.dumps({"instances": samples[:4].tolist()}).encode())
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions = np.array(json.loads(response.read())["predictions"], np.float32)
            np.testing.assert_array_equal(predictions, OnnxModel(out).run({"input": samples[:4]}, ["output"])["output"])


def test_bucket_deployment_gets_room_to_unzip_the_upload_or_refuses_it_naming_the_way_large_models_deploy(tmp_path,
                                                                                                          monkeypatch):
    from aws_cdk import App, Stack

    from slimserve.stacks import model_store
    from slimserve.stacks.model_store import ModelStore, ModelStoreProps

    staging = tmp_path / "staging" / "models"
    (staging / "big" / "abc").mkdir(parents=True)
    (staging / "small" / "def").mkdir(parents=True)
    with open(staging / "big" / "abc" / "model.onnx.data", "wb") as data:
        data.truncate(5 * 2**30)  # sparse: 5 GiB of model, no disk
    (staging / "small" / "def" / "model.onnx").write_bytes(b"x" * 2**20)
    store = ModelStore(Stack(App(), "s"), "Store", ModelStoreProps())
    with pytest.raises(ConfigError, match=r"^models that upload with the deploy \(big 5\.0 GiB, small 0\.0 GiB\) are more than "
                                          r"CDK's BucketDeployment can unzip in its function's /tmp \(at most 10240 MB: about "
                                          r"4\.5 GiB of models\): register the large ones"):
        store.add_uploads(tmp_path / "staging")
    (staging / "big" / "abc" / "model.onnx.data").unlink()
    monkeypatch.setattr(model_store, "UPLOAD_STORAGE_FACTOR", 1500)  # 2 MiB of models: as if they were 3 GB
    stack = Stack(App(), "t")
    ModelStore(stack, "Store", ModelStoreProps()).add_uploads(tmp_path / "staging")
    (handler,) = [f for f in assertions.Template.from_stack(stack).find_resources("AWS::Lambda::Function").values()
                  if "EphemeralStorage" in f["Properties"]]
    assert handler["Properties"]["EphemeralStorage"] == {"Size": 1500}


def test_init_copies_the_model_with_its_data_files_and_the_project_checks(tmp_path, mlp, capsys):
    from slimserve.cli import main

    assert main(["init", str(tmp_path / "proj"), "--model", str(mlp)]) == 0
    project = tmp_path / "proj"
    assert sorted(str(p.relative_to(project / "models")) for p in (project / "models").rglob("*") if p.is_file()) == [
        "mlp/mlp.onnx", "mlp/weights.bin", "mlp/weights/w1.bin"]
    assert load_config(project / "slimserve.toml").models[0].artifact == project / "models" / "mlp" / "mlp.onnx"
    capsys.readouterr()
    assert main(["check", "--config", str(project / "slimserve.toml")]) == 0
    assert "(3 files, 9.0 MiB)" in capsys.readouterr().out


def test_synth_leaves_the_users_model_as_onnx_reads_it(tmp_path, mlp):
    """onnx refuses external data with more than one hard link (a hard-link attack): the upload staging copies."""
    load_config(config_file(tmp_path, external_mlp(tmp_path / "own")))
    build_app(load_config(config_file(tmp_path, tmp_path / "own" / "mlp.onnx")))
    assert all(path.stat().st_nlink == 1 for path in (tmp_path / "own").rglob("*") if path.is_file())
    onnx.checker.check_model(str(tmp_path / "own" / "mlp.onnx"))
