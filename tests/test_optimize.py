"""optimize: ONNX Runtime graph optimization, int8 and fp16, measured against the original and gated."""

import numpy as np
import pytest
from support import MODELS

from slimserve.lambda_handlers.runtimes import OnnxModel
from slimserve.modeltools.optimize import OptimizeError, optimize
from slimserve.modeltools.samples import SamplesError


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    """The digits task as an ONNX MLP wide enough that its weights, not its graph, make up its size."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    from slimserve.modeltools.examples import SEED, digits_split

    train_x, test_x, train_y, test_y = digits_split()
    mlp = MLPClassifier(hidden_layer_sizes=(128,), max_iter=400, random_state=SEED).fit(train_x / 16, train_y)
    folder = tmp_path_factory.mktemp("digits")
    model = to_onnx(mlp, (train_x[:1] / 16).astype(np.float32), options={id(mlp): {"zipmap": False}}, target_opset=17)
    (folder / "digits.onnx").write_bytes(model.SerializeToString())
    np.save(folder / "samples.npy", (test_x / 16).astype(np.float32))
    return folder, test_y


def accuracy(path, samples, labels) -> float:
    model = OnnxModel(path)
    return float((model.run({model.signature.inputs[0].name: samples}, ["label"])["label"] == labels).mean())


def test_int8_is_a_third_of_the_size_within_tolerance(digits_onnx):
    folder, labels = digits_onnx
    report = optimize(folder / "digits.onnx", "int8", folder / "samples.npy", tolerance=0.05, out=folder / "digits.int8.onnx")
    assert report.optimized.size <= 0.35 * report.original.size, report.table()
    assert report.optimized.max_abs_diff <= 0.05 and report.optimized.top1_agreement >= 0.98
    samples = np.load(folder / "samples.npy")
    drop = accuracy(folder / "digits.onnx", samples, labels) - accuracy(folder / "digits.int8.onnx", samples, labels)
    print(f"\nint8 digits: {report.optimized.size} of {report.original.size} bytes, accuracy drop {drop:+.4f}\n{report.table()}")
    assert drop <= 0.01


def test_too_tight_a_tolerance_is_refused_and_nothing_is_written(digits_onnx):
    folder, _ = digits_onnx
    out = folder / "refused.onnx"
    with pytest.raises(OptimizeError) as caught:
        optimize(folder / "digits.onnx", "int8", folder / "samples.npy", tolerance=1e-9, out=out)
    first_line = str(caught.value).splitlines()[0]
    assert first_line.startswith(f"{out}: not written: the int8 model differs from the original by up to ")
    assert first_line.endswith(" past the tolerance 1e-09")
    assert not out.exists()


@pytest.mark.parametrize("level, tolerance", [("graph", 1e-5), ("fp16", 5e-3)])
def test_graph_and_fp16_levels_keep_the_signature(digits_onnx, level, tolerance):
    folder, _ = digits_onnx
    out = folder / f"digits.{level}.onnx"
    # forced: on a model this small, graph and fp16 may come out larger and no faster, which alone refuses them
    report = optimize(folder / "digits.onnx", level, folder / "samples.npy", tolerance=tolerance, out=out, force=True)
    assert report.written == str(out) and report.optimized.max_abs_diff <= tolerance
    assert OnnxModel(out).signature == OnnxModel(folder / "digits.onnx").signature


def test_tflite_and_bad_samples_are_refused_with_the_reason(digits_onnx, tmp_path):
    folder, _ = digits_onnx
    with pytest.raises(OptimizeError) as caught:
        optimize(MODELS / "digits.tflite", "int8", folder / "samples.npy", 0.01, tmp_path / "x.tflite")
    assert str(caught.value) == (
        f"{MODELS / 'digits.tflite'}: a TFLite model is served as it is: its weights were fixed when TensorFlow converted it, "
        "and neither slimserve nor TensorFlow's converter reads a .tflite back. For an int8 or fp16 TFLite model, optimize "
        "its Keras source (.keras, .h5) with the tensorflow extra: pip install 'slimserve[tensorflow]'")
    (tmp_path / "samples.npy").write_bytes(b"not numpy")
    with pytest.raises(SamplesError, match=rf"^{tmp_path}/samples.npy: not a numpy .npy file: "):
        optimize(folder / "digits.onnx", "int8", tmp_path / "samples.npy", 0.01, tmp_path / "x.onnx")
    with pytest.raises(OptimizeError, match=r"^unknown level 'int4': expected one of graph, int8, fp16$"):
        optimize(folder / "digits.onnx", "int4", folder / "samples.npy", 0.01, tmp_path / "x.onnx")


def test_cli_prints_the_table_and_refuses_with_exit_2(digits_onnx, capsys):
    from slimserve.cli import main

    folder, _ = digits_onnx
    out = folder / "cli.int8.onnx"
    assert main(["optimize", str(folder / "digits.onnx"), "--level", "int8", "--samples", str(folder / "samples.npy"),
                 "--tolerance", "0.05", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["size", "median", "latency", "max", "|diff|", "mean", "|diff|", "top-1", "agreement"]
    assert lines[-1].startswith(f"wrote {out} (") and out.exists()
    assert main(["optimize", str(folder / "digits.onnx"), "--level", "int8", "--samples", str(folder / "samples.npy"),
                 "--tolerance", "0", "--out", str(folder / "no.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {folder / 'no.onnx'}: not written: the int8 model differs")
    assert not (folder / "no.onnx").exists()
