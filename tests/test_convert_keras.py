"""convert and optimize: Keras to TFLite through the optional `tensorflow` extra.

TensorFlow lives in its own venv (`make test` builds .venv-tensorflow and names its python
in SLIMSERVE_TENSORFLOW_PYTHON): the round trips run the CLI there, and the TFLite files
they write are checked here with slimserve's own TfliteModel, the runtime that serves them.
"""

import subprocess
import sys
import zipfile

import numpy as np
import pytest
from support import run_in_extra_venv

from slimserve.cli import main
from slimserve.lambda_handlers.runtimes import TfliteModel
from slimserve.modeltools.convert import ConvertError, convert_keras, load_keras
from slimserve.modeltools.optimize import OptimizeError, optimize

pytestmark = pytest.mark.slow

# Trains a small conv net on the digits the test saved, and saves it with its predictions.
TRAIN_SCRIPT = """
import sys, numpy as np, keras
folder = sys.argv[1]
keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((8, 8, 1), name="pixels"),
    keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
    keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(np.load(f"{folder}/train_x.npy"), np.load(f"{folder}/train_y.npy"), epochs=5, batch_size=32, verbose=0)
model.save(f"{folder}/digits.keras")
model.save(f"{folder}/digits.h5")
np.save(f"{folder}/expected.npy", model.predict(np.load(f"{folder}/samples.npy"), verbose=0))
"""


def run_in_tensorflow_venv(*args: str) -> subprocess.CompletedProcess:
    return run_in_extra_venv("tensorflow", *args)


@pytest.fixture(scope="module")
def digits_keras(tmp_path_factory):
    """A trained Keras conv net on the digits, its test samples and Keras's predictions on them."""
    from slimserve.modeltools.examples import digits_split

    folder = tmp_path_factory.mktemp("keras")
    train_x, test_x, train_y, test_y = digits_split()
    np.save(folder / "train_x.npy", (train_x / 16).reshape(-1, 8, 8, 1))
    np.save(folder / "train_y.npy", train_y)
    np.save(folder / "samples.npy", (test_x / 16).reshape(-1, 8, 8, 1))
    trained = run_in_tensorflow_venv("-c", TRAIN_SCRIPT, str(folder))
    assert trained.returncode == 0, trained.stderr
    return folder, test_y


def cli_in_tensorflow_venv(*args: str) -> subprocess.CompletedProcess:
    return run_in_tensorflow_venv("-m", "slimserve", *map(str, args))


def cli_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's own message; TensorFlow's C++ logging writes to the same stderr before it."""
    assert result.returncode == 2 and "error: " in result.stderr, result.stderr
    return result.stderr[result.stderr.index("error: "):]


@pytest.mark.parametrize("saved_as", [".keras", ".h5"])
def test_keras_converts_to_tflite_that_serves_batches_like_keras(digits_keras, saved_as):
    folder, labels = digits_keras
    out = folder / f"digits-{saved_as[1:]}.tflite"
    converted = cli_in_tensorflow_venv("convert", folder / f"digits{saved_as}", "--samples", folder / "samples.npy", "--out", out)
    assert converted.returncode == 0, converted.stderr
    samples, expected = np.load(folder / "samples.npy"), np.load(folder / "expected.npy")
    assert converted.stdout.startswith(f"wrote {out}: checked on {len(samples)} samples, max |diff| ")
    model = TfliteModel(out)
    assert model.signature.inputs[0].name == "serving_default_pixels:0"
    assert model.signature.inputs[0].shape == (-1, 8, 8, 1)  # the batch stays dynamic
    output = model.signature.outputs[0].name
    for rows in (1, 7, len(samples)):
        got = model.run({"serving_default_pixels:0": samples[:rows]}, [output])[output]
        np.testing.assert_allclose(got, expected[:rows], atol=1e-5)
    assert (expected.argmax(axis=1) == labels).mean() >= 0.9  # a trained model, not noise


@pytest.mark.parametrize("level, tolerance, largest_share", [("int8", 0.05, 0.4), ("fp16", 1e-3, 0.6)])
def test_keras_optimizes_to_smaller_tflite_within_the_tolerance(digits_keras, level, tolerance, largest_share):
    folder, labels = digits_keras
    # forced: on a model this small, LiteRT runs int8 and fp16 about as fast as float32, which alone refuses them
    optimized = cli_in_tensorflow_venv("optimize", folder / "digits.keras", "--level", level,
                                       "--samples", folder / "samples.npy", "--tolerance", tolerance, "--force")
    assert optimized.returncode == 0, optimized.stderr
    lines = optimized.stdout.splitlines()
    out = folder / f"digits.{level}.tflite"
    assert lines[0].split() == ["size", "median", "latency", "max", "|diff|", "mean", "|diff|", "top-1", "agreement",
                                "accuracy", "gate"]
    original_size, optimized_size = (int(line.split()[1].replace(",", "")) for line in lines[1:3])
    assert optimized_size <= largest_share * original_size, optimized.stdout
    assert lines[-1].startswith(f"wrote {out}: {level}, ")
    model = TfliteModel(out)
    output = model.signature.outputs[0].name
    scores = model.run({"serving_default_pixels:0": np.load(folder / "samples.npy")}, [output])[output]
    np.testing.assert_allclose(scores, np.load(folder / "expected.npy"), atol=tolerance)
    assert (scores.argmax(axis=1) == labels).mean() >= 0.9


def test_keras_drift_past_the_tolerance_and_a_damaged_archive_are_refused(digits_keras):
    folder, _ = digits_keras
    refused = cli_in_tensorflow_venv("optimize", folder / "digits.keras", "--level", "int8",
                                     "--samples", folder / "samples.npy", "--tolerance", 0, "--out", folder / "no.tflite")
    assert cli_error(refused).startswith(f"error: {folder / 'no.tflite'}: not written: the int8 model differs from the original by up to ")
    assert not (folder / "no.tflite").exists()
    damaged = folder / "damaged.keras"
    with zipfile.ZipFile(damaged, "w") as archive:
        archive.writestr("config.json", "{not json")
    refused = cli_in_tensorflow_venv("convert", damaged, "--samples", folder / "samples.npy", "--out", folder / "x.tflite")
    assert cli_error(refused).startswith(f"error: {damaged}: Keras cannot load it: ")
    assert not (folder / "x.tflite").exists()


@pytest.fixture
def without_tensorflow(monkeypatch):
    """`import tensorflow` fails here even where someone installed it into this venv."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)


def test_missing_extra_is_named(tmp_path, without_tensorflow, capsys):
    model = tmp_path / "model.keras"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("config.json", "{}")
    np.save(tmp_path / "samples.npy", np.zeros((2, 4), np.float32))
    expected = (f"{model}: converting a Keras model needs TensorFlow, which is not installed: "
                "pip install 'slimserve[tensorflow]'")
    with pytest.raises(ConvertError) as caught:
        load_keras(model)
    assert str(caught.value) == expected
    assert main(["convert", str(model), "--samples", str(tmp_path / "samples.npy"), "--out", str(tmp_path / "m.tflite")]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    with pytest.raises(OptimizeError) as caught:
        optimize(model, "int8", tmp_path / "samples.npy", 0.01, tmp_path / "m.int8.tflite")
    assert str(caught.value) == expected


@pytest.mark.parametrize("suffix, magic", [(".keras", b"PK\x03\x04"), (".h5", b"\x89HDF\r\n\x1a\n")])
def test_corrupt_keras_file_is_refused_naming_it(tmp_path, suffix, magic):
    corrupt, content = tmp_path / f"model{suffix}", b"\x00garbage, not a saved model"
    corrupt.write_bytes(content)
    with pytest.raises(ConvertError) as caught:
        load_keras(corrupt)
    assert str(caught.value) == f"{corrupt}: not a Keras model: a {suffix} file starts with {magic!r}, this one with {content[:len(magic)]!r}"


def test_keras_output_must_be_tflite_and_graph_level_is_for_onnx(tmp_path):
    with pytest.raises(ConvertError, match=rf"^{tmp_path}/m.onnx: a Keras model converts to TFLite: expected an output path ending in .tflite$"):
        convert_keras(None, np.zeros((1, 4), np.float32), tmp_path / "m.onnx")
    with pytest.raises(OptimizeError, match=rf"^{tmp_path}/m.keras: level 'graph' is for ONNX models; a Keras model is optimized to int8 or fp16 TFLite$"):
        optimize(tmp_path / "m.keras", "graph", tmp_path / "samples.npy", 0.01, tmp_path / "m.graph.tflite")
