"""The layer builder: slim, cached, smoke-tested in the target Python, and bounded by Lambda's limit."""

import json
from pathlib import Path

import pytest
from support import ROOT

from slimserve.layers import builder
from slimserve.layers.builder import LayerBuildError, build_layer

LAYERS = ROOT / "build" / "layers"


@pytest.fixture(scope="module")
def onnx_layer():
    python = builder.find_python("3.12")
    return build_layer("onnx", "3.12" if python else "3.11", out=LAYERS)


def test_layer_is_slim_compiled_and_reported(onnx_layer):
    site = onnx_layer.python_path
    assert onnx_layer.slim_bytes == builder.tree_bytes(site) < onnx_layer.naive_bytes * 0.7
    assert onnx_layer.slim_bytes <= 100 * 2**20  # with onnxruntime-extensions (about 7 MiB) since convert's processing
    assert (site / "onnxruntime_extensions").is_dir() and not (site / "onnxruntime_extensions" / "tools").exists()
    assert (site / "onnxruntime" / "capi").is_dir() and not list((site / "onnxruntime" / "capi").glob("libonnxruntime.so*"))
    assert not (site / "onnxruntime" / "transformers").exists() and not (site / "numpy" / "_core" / "tests").exists()
    assert list((site / "numpy" / "__pycache__").glob(f"*.cpython-{onnx_layer.python_version.replace('.', '')}.pyc"))
    report = json.loads((Path(onnx_layer.path) / "layer.json").read_text())
    assert report["slim_bytes"] == onnx_layer.slim_bytes and report["key"] == onnx_layer.key
    if builder.find_python(onnx_layer.python_version):
        assert (onnx_layer.pyc, onnx_layer.smoke) == ("unchecked-hash", "passed")


def test_second_build_with_nothing_changed_does_nothing(onnx_layer):
    stamp = Path(onnx_layer.path) / "layer.json"
    before = stamp.stat().st_mtime_ns
    again = build_layer("onnx", onnx_layer.python_version, out=LAYERS)
    assert again.cached and again.key == onnx_layer.key and stamp.stat().st_mtime_ns == before


def test_function_plus_layer_past_lambdas_limit_is_refused(onnx_layer):
    with pytest.raises(LayerBuildError, match=r"^the onnx layer plus function code is 2\d\d\.\d MiB unzipped; Lambda allows 250 MiB$"):
        build_layer("onnx", onnx_layer.python_version, out=LAYERS, function_bytes=180 * 2**20)


@pytest.mark.parametrize("args, message", [
    (("pytorch",), "unknown layer runtime 'pytorch': expected one of onnx, tflite, tflite-py311, lambda-runtime"),
    (("tflite", "3.11"), "the tflite layer supports python 3.12, 3.13, not 3.11"),
    (("onnx", "3.12", "sparc"), "unknown architecture 'sparc': expected one of x86_64, arm64"),
])
def test_bad_requests_name_the_problem(args, message, tmp_path):
    with pytest.raises(LayerBuildError) as caught:
        build_layer(*args, out=tmp_path)
    assert str(caught.value) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_slimming_that_breaks_imports_fails_the_build_and_leaves_no_layer(tmp_path, monkeypatch, onnx_layer):
    if not builder.find_python(onnx_layer.python_version):
        pytest.skip("needs the target python to smoke-test")
    recipe = builder.RECIPES["onnx"]
    monkeypatch.setitem(builder.RECIPES, "onnx", builder.Recipe(recipe.requirements, recipe.python_versions,
                                                                 recipe.drops + ("numpy/linalg",), recipe.smoke))
    with pytest.raises(LayerBuildError, match=r"(?s)^the slimmed layer fails its smoke test .*No module named 'numpy.linalg'"):
        build_layer("onnx", onnx_layer.python_version, out=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no layer, no staging folder


def test_cli_builds_and_prints_the_report(capsys, onnx_layer):
    from slimserve.cli import main

    assert main(["layer", "--runtime", "onnx", "--python", onnx_layer.python_version, "--out", str(LAYERS)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"onnx layer for python{onnx_layer.python_version} x86_64 (cached): {onnx_layer.path}\n")
    assert f"{onnx_layer.slim_bytes / 2**20:.1f} MiB unzipped (naive install {onnx_layer.naive_bytes / 2**20:.1f} MiB)" in out


# An arm64 layer runs here under qemu-user, with Debian's arm64 Python of the same version and a model of Lambda's
# arm64 machine (Graviton2 /proc/cpuinfo, unreadable processor lists in /sys). Debian ships python3.11 and 3.13, not
# 3.12: the recipes and pins are the same for every version, so 3.13 proves what slimming does to arm64 libraries.
ARM64_PYTHON = "3.13"
UNDER_QEMU = f"under qemu-aarch64-static, with Debian trixie's python{ARM64_PYTHON}"


@pytest.fixture(scope="module")
def arm64_layers():
    return {runtime: build_layer(runtime, ARM64_PYTHON, "arm64", out=LAYERS) for runtime in ("onnx", "tflite")}


@pytest.mark.slow
def test_arm64_layers_pass_their_smoke_test_under_qemu_and_are_stripped_where_the_recipe_says(arm64_layers):
    assert {layer.smoke for layer in arm64_layers.values()} == {f"passed {UNDER_QEMU}"}
    assert arm64_layers["tflite"].stripped == "stripped ai_edge_litert/libpywrap_litert_common.so"
    assert arm64_layers["onnx"].stripped == "nothing to strip"


@pytest.mark.slow
def test_arm64_python_debian_does_not_ship_is_reported_not_run(tmp_path):
    layer = build_layer("onnx", "3.12", "arm64", out=tmp_path)
    assert layer.smoke == ("not run: arm64 layer on a x86_64 machine, "
                           "no aarch64 python3.12 to run it with (Debian ships 3.11 (bookworm), 3.13 (trixie))")
    assert layer.stripped == "nothing to strip"


@pytest.mark.slow
def test_arm64_layer_without_qemu_says_what_to_install(tmp_path, monkeypatch):
    from slimserve.layers import foreign

    real_which = foreign.shutil.which
    monkeypatch.setattr(foreign.shutil, "which", lambda name: None if name.startswith("qemu-") else real_which(name))
    layer = build_layer("tflite", ARM64_PYTHON, "arm64", out=tmp_path)
    assert layer.smoke == ("not run: arm64 layer on a x86_64 machine, "
                           "no qemu-aarch64-static here (Debian and Ubuntu: apt-get install qemu-user-static)")
    assert layer.stripped == "not stripped: the result could not be loaded here to check it"


@pytest.mark.slow
def test_a_slimming_that_breaks_an_arm64_library_fails_the_build(tmp_path, monkeypatch, arm64_layers):
    recipe = builder.RECIPES["tflite"]
    monkeypatch.setitem(builder.RECIPES, "tflite", builder.Recipe(recipe.requirements, recipe.python_versions,
                                                                   recipe.drops + ("ai_edge_litert/libpywrap_litert_common.so",),
                                                                   recipe.smoke, recipe.strip))
    with pytest.raises(LayerBuildError, match=rf"(?s)^the slimmed layer fails its smoke test \(.*\) {UNDER_QEMU}:\n"
                                              r".*libpywrap_litert_common\.so"):
        build_layer("tflite", ARM64_PYTHON, "arm64", out=tmp_path)
    assert list(tmp_path.iterdir()) == []


ANSWER = """
import json, sys, types
from lambda_handlers.handler import handler
json.dump(handler(json.load(open(sys.argv[1])), types.SimpleNamespace(aws_request_id="arm64")), open(sys.argv[2], "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("runtime, model, path, body", [
    ("onnx", "iris.onnx", "/v2/models/iris/infer",
     {"inputs": [{"name": "features", "datatype": "FP32", "shape": [3, 4],
                  "data": [5.1, 3.5, 1.4, 0.2, 6.2, 2.9, 4.3, 1.3, 7.7, 3.0, 6.1, 2.3]}]}),
    ("tflite", "digits.tflite", "/v1/models/digits:predict", None),
])
def test_the_function_answers_on_arm64_as_on_x86_64(runtime, model, path, body, arm64_layers, digits_test_split, tmp_path):
    """The shipped function code plus the arm64 layer, on Lambda's arm64 machine as modelled: the same answers."""
    import hashlib
    import subprocess
    import types

    import numpy as np
    from support import MODELS

    from slimserve.assets import function_bundle
    from slimserve.contract.apigw import response_body, rest_event
    from slimserve.lambda_handlers.function import ModelFunction
    from slimserve.layers.foreign import foreign_python

    if body is None:
        features, _ = digits_test_split
        body = {"instances": features[:3].tolist()}
    environment = {"SLIMSERVE_MODEL_NAME": model.split(".")[0], "SLIMSERVE_MODEL_FORMAT": runtime,
                   "SLIMSERVE_MODEL_PATH": str(MODELS / model),
                   "SLIMSERVE_MODEL_SHA256": hashlib.sha256((MODELS / model).read_bytes()).hexdigest()}
    event = rest_event("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    (tmp_path / "event.json").write_text(json.dumps(event))
    bundle = function_bundle(tmp_path / "function", None)
    command, _ = foreign_python(ARM64_PYTHON, "aarch64")
    ran = subprocess.run([*command, "-c", ANSWER, str(tmp_path / "event.json"), str(tmp_path / "answer.json")],
                         env={**environment, "PYTHONPATH": f"{bundle}:{arm64_layers[runtime].python_path}",
                              "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    if runtime == "onnx":  # ONNX Runtime meets Lambda's /sys, warns and goes on (releases that aborted: its issue 10038)
        assert "Error in cpuinfo: failed to parse the list of possible processors" in ran.stderr
    on_arm64 = json.loads((tmp_path / "answer.json").read_text())
    on_x86_64 = ModelFunction(environment)(event, types.SimpleNamespace(aws_request_id="x86_64"))
    assert on_arm64["statusCode"] == on_x86_64["statusCode"] == 200
    arm64_body, x86_64_body = json.loads(response_body(on_arm64)), json.loads(response_body(on_x86_64))
    if runtime == "onnx":
        assert arm64_body["outputs"][0] == x86_64_body["outputs"][0]  # the labels
        np.testing.assert_allclose(arm64_body["outputs"][1]["data"], x86_64_body["outputs"][1]["data"], rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(arm64_body["predictions"], x86_64_body["predictions"], rtol=1e-5, atol=1e-6)
        assert np.argmax(arm64_body["predictions"], 1).tolist() == np.argmax(x86_64_body["predictions"], 1).tolist()
