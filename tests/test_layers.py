"""The layer builder: slim, cached, smoke-tested in the target Python, and bounded by Lambda's limit."""

import json
from pathlib import Path

import pytest
from conftest import ROOT

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
    assert onnx_layer.slim_bytes <= 80 * 2**20
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
