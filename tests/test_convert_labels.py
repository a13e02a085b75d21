"""--labels: class names and scores inside the graph, composed onto a conversion or onto an existing .onnx, so a
client gets a label and its score from the model itself."""

import joblib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import call, convert_error

from slimserve.cli import main
from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.runtimes import OnnxModel

IRIS = ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def iris_model(tmp_path_factory):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("iris")
    features, labels = load_iris(return_X_y=True)
    classifier = LogisticRegression(max_iter=1000).fit(features, labels)
    joblib.dump(classifier, folder / "iris.joblib")
    np.save(folder / "iris.npy", features)
    (folder / "labels.txt").write_text("\n".join(IRIS) + "\n")
    return folder, classifier, features


def test_a_classifier_answers_with_its_class_names_and_scores_through_the_api(iris_model, tmp_path, capsys):
    folder, classifier, features = iris_model
    out = tmp_path / "iris.onnx"
    assert main(["convert", str(folder / "iris.joblib"), "--samples", str(folder / "iris.npy"), "--out", str(out),
                 "--labels", str(folder / "labels.txt"), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: checked on 150 samples, ")
    model = OnnxModel(out)
    assert [(spec.name, spec.datatype, spec.shape) for spec in model.signature.outputs] == [
        ("label", "INT64", (-1,)), ("probabilities", "FP32", (-1, 3)), ("class_name", "BYTES", (-1, 2)),
        ("class_score", "FP32", (-1, 2))]
    core = InferenceCore([ServedModel("iris", "1", runtime=model)])
    rows = features[::10].astype(np.float32)
    body = {"inputs": [{"name": "features", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}],
            "outputs": [{"name": "class_name"}, {"name": "class_score"}]}
    status, answer, _ = call(core, "POST", "/v2/models/iris/infer", body)
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    best = np.argsort(-classifier.predict_proba(rows), axis=1)[:, :2]
    assert outputs["class_name"]["shape"] == [len(rows), 2]
    assert outputs["class_name"]["data"] == np.asarray(IRIS)[best].ravel().tolist()
    np.testing.assert_allclose(np.reshape(outputs["class_score"]["data"], (-1, 2)),
                               np.take_along_axis(classifier.predict_proba(rows), best, axis=1), rtol=1e-5)


def logits_onnx(path, weights: np.ndarray):
    """A linear layer with no softmax: the scores it outputs are logits, as most networks' are."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weights"], ["logits"])], "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", weights.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weights.shape[1]])],
        [numpy_helper.from_array(weights, "weights")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_an_existing_onnx_of_logits_gets_their_softmax(tmp_path, capsys):
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 3)).astype(np.float32)
    logits_onnx(tmp_path / "linear.onnx", weights)
    rows = rng.normal(size=(20, 4)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird")  # no final newline
    assert main(["convert", str(tmp_path / "linear.onnx"), "--samples", str(tmp_path / "rows.npy"),
                 "--out", str(tmp_path / "labelled.onnx"), "--labels", str(tmp_path / "labels.txt")]) == 0
    got = OnnxModel(tmp_path / "labelled.onnx").run({"input": rows}, ["logits", "class_name", "class_score"])
    logits = rows.astype(np.float64) @ weights
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got["logits"], logits, rtol=1e-5)
    assert got["class_name"].ravel().tolist() == np.asarray(["cat", "dog", "bird"])[logits.argmax(axis=1)].tolist()
    np.testing.assert_allclose(got["class_score"].ravel(), softmax.max(axis=1), rtol=1e-5)


def test_labels_that_do_not_fit_the_model_are_one_line(iris_model, tmp_path, capsys):
    folder, _, _ = iris_model
    convert = [folder / "iris.joblib", "--samples", folder / "iris.npy", "--out", tmp_path / "m.onnx"]
    (tmp_path / "two.txt").write_text("setosa\nversicolor\n")
    assert convert_error(capsys, *convert, "--labels", tmp_path / "two.txt") == (
        f"error: --labels {tmp_path}/two.txt: expected one float output of shape (rows, 2), one score per label; "
        "found none among the model's outputs on the samples: label (150,), probabilities (150, 3)\n")
    (tmp_path / "gap.txt").write_text("setosa\n\nvirginica\n")
    assert convert_error(capsys, *convert, "--labels", tmp_path / "gap.txt") == (
        f"error: --labels {tmp_path}/gap.txt: expected one label per line, in the order of the model's classes; "
        "line 2 is empty\n")
    assert convert_error(capsys, *convert, "--labels", tmp_path / "nope.txt") == (
        f"error: --labels {tmp_path}/nope.txt: no such file\n")
    assert convert_error(capsys, *convert, "--labels", folder / "labels.txt", "--top-k", "4") == (
        f"error: --top-k 4: expected 1 to 3, the number of labels in {folder}/labels.txt\n")
    assert convert_error(capsys, *convert, "--top-k", "2") == (
        "error: --top-k: names the best classes of --labels (or of a classifier checkpoint), none is given\n")
    assert not (tmp_path / "m.onnx").exists()


def test_an_onnx_model_without_labels_is_refused(tmp_path, capsys):
    logits_onnx(tmp_path / "linear.onnx", np.eye(2, dtype=np.float32))
    np.save(tmp_path / "rows.npy", np.eye(2, dtype=np.float32))
    assert convert_error(capsys, tmp_path / "linear.onnx", "--samples", tmp_path / "rows.npy", "--out", tmp_path / "x.onnx") == (
        f"error: {tmp_path}/linear.onnx: already an ONNX model: give --image, --tokenizer or --labels to add processing to its graph\n")
