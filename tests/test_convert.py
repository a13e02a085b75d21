"""convert: scikit-learn and PyTorch models to ONNX, equal to the source model before anything is written."""

import numpy as np
import pytest
from support import run_in_extra_venv

from slimserve.lambda_handlers.runtimes import OnnxModel
from slimserve.modeltools.convert import ConvertError, convert_sklearn


@pytest.fixture(scope="module")
def iris_data():
    from slimserve.modeltools.examples import iris_split

    return iris_split()


def test_sklearn_classifier_pipeline_round_trips(iris_data, tmp_path):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, test_x, train_y, _ = iris_data
    pipeline = make_pipeline(StandardScaler(), PCA(3), LogisticRegression(max_iter=500)).fit(train_x, train_y)
    result = convert_sklearn(pipeline, test_x, tmp_path / "pipeline.onnx")
    model = OnnxModel(tmp_path / "pipeline.onnx")
    assert [s.name for s in model.signature.inputs] == ["features"]
    outputs = model.run({"features": test_x}, ["label", "probabilities"])
    np.testing.assert_array_equal(outputs["label"], pipeline.predict(test_x))
    np.testing.assert_allclose(outputs["probabilities"], pipeline.predict_proba(test_x), atol=1e-5)
    assert result.label_agreement == 1.0 and result.samples == len(test_x)


def test_drift_past_the_tolerance_is_refused_and_a_looser_one_accepted(iris_data, tmp_path):
    """Trees compare float32 thresholds in ONNX and float64 in scikit-learn: a sample near a split may differ."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, test_x, train_y, _ = iris_data
    forest = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=20, random_state=0)).fit(train_x, train_y)
    with pytest.raises(ConvertError, match=rf"^{tmp_path}/forest.onnx: not written: the ONNX model disagrees with the "
                                           r"original on the samples: max \|diff\| 0.05 \(tolerance 0.0001\)"):
        convert_sklearn(forest, test_x, tmp_path / "forest.onnx")
    assert not (tmp_path / "forest.onnx").exists()
    assert convert_sklearn(forest, test_x, tmp_path / "forest.onnx", tolerance=0.1).max_abs_diff == pytest.approx(0.05)


def test_sklearn_regressor_round_trips(iris_data, tmp_path):
    from sklearn.linear_model import Ridge

    train_x, test_x, _, _ = iris_data
    ridge = Ridge().fit(train_x[:, :3], train_x[:, 3])
    convert_sklearn(ridge, test_x[:, :3], tmp_path / "ridge.onnx")
    got = OnnxModel(tmp_path / "ridge.onnx").run({"features": test_x[:, :3]}, ["predictions"])["predictions"]
    np.testing.assert_allclose(got.reshape(-1), ridge.predict(test_x[:, :3]), atol=1e-5)


def test_unconvertible_estimator_is_refused_and_nothing_written(iris_data, tmp_path):
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Custom(ClassifierMixin, BaseEstimator):
        def fit(self, x, y):
            self.classes_ = np.unique(y)
            return self

        def predict(self, x):
            return np.zeros(len(x), np.int64)

        def predict_proba(self, x):
            return np.ones((len(x), 3)) / 3

    train_x, test_x, train_y, _ = iris_data
    with pytest.raises(ConvertError, match=rf"^{tmp_path}/custom.onnx: skl2onnx \d+\.\d+\.\d+ cannot convert Custom: it has no "
                                           "converter for it; replace it with a step skl2onnx supports, or convert it "
                                           "yourself and give convert the .onnx$"):
        convert_sklearn(Custom().fit(train_x, train_y), test_x, tmp_path / "custom.onnx")
    assert not (tmp_path / "custom.onnx").exists()


# A small CNN saved whole, as a user saves one, with its own predictions on the samples.
TORCH_SCRIPT = """
import sys, numpy as np, torch
folder = sys.argv[1]
torch.manual_seed(0)
cnn = torch.nn.Sequential(
    torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10), torch.nn.Softmax(dim=1))
samples = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
np.save(f"{folder}/samples.npy", samples)
torch.save(cnn, f"{folder}/cnn.pt")
with torch.no_grad():
    np.save(f"{folder}/expected.npy", cnn.eval()(torch.from_numpy(samples)).numpy())
"""


@pytest.mark.slow
def test_small_pytorch_cnn_round_trips_through_the_cli_with_a_dynamic_batch(tmp_path):
    """PyTorch lives in its own venv (.venv-torch): the module is saved and converted there, and checked here."""
    saved = run_in_extra_venv("torch", "-c", TORCH_SCRIPT, str(tmp_path))
    assert saved.returncode == 0, saved.stderr[-3000:]
    converted = run_in_extra_venv("torch", "-m", "slimserve", "convert", str(tmp_path / "cnn.pt"), "--samples",
                                  str(tmp_path / "samples.npy"), "--out", str(tmp_path / "cnn.onnx"))
    assert converted.returncode == 0, converted.stderr[-3000:]  # torch logs its exporter warnings on stderr
    assert converted.stdout.startswith(f"wrote {tmp_path / 'cnn.onnx'}: checked on 12 samples, max |diff| ")
    model = OnnxModel(tmp_path / "cnn.onnx")
    assert model.signature.inputs[0].shape == (-1, 1, 8, 8)  # the batch stays dynamic
    samples, expected = np.load(tmp_path / "samples.npy"), np.load(tmp_path / "expected.npy")
    for batch in (1, 5, 12):
        np.testing.assert_allclose(model.run({"input": samples[:batch]}, ["output"])["output"], expected[:batch], atol=1e-5)
    digits = [f"digit {n}" for n in range(10)]
    (tmp_path / "labels.txt").write_text("\n".join(digits))
    labelled = run_in_extra_venv("torch", "-m", "slimserve", "convert", str(tmp_path / "cnn.pt"), "--samples",
                                 str(tmp_path / "samples.npy"), "--out", str(tmp_path / "named.onnx"),
                                 "--labels", str(tmp_path / "labels.txt"))
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    names = OnnxModel(tmp_path / "named.onnx").run({"input": samples}, ["class_name"])["class_name"]
    assert names.ravel().tolist() == [digits[n] for n in expected.argmax(axis=1)]  # the module's softmax, as it is


def test_cli_converts_a_saved_pipeline(iris_data, tmp_path, capsys):
    import joblib
    from sklearn.linear_model import LogisticRegression

    from slimserve.cli import main

    train_x, test_x, train_y, _ = iris_data
    joblib.dump(LogisticRegression(max_iter=500).fit(train_x, train_y), tmp_path / "model.joblib")
    np.save(tmp_path / "samples.npy", test_x)
    assert main(["convert", str(tmp_path / "model.joblib"), "--samples", str(tmp_path / "samples.npy"), "--out", str(tmp_path / "m.onnx")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'm.onnx'}: checked on 45 samples, max |diff| ")
    assert main(["convert", str(tmp_path / "samples.npy"), "--samples", str(tmp_path / "samples.npy"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'samples.npy'}: expected a scikit-learn, XGBoost, LightGBM or "
                                       "CatBoost model (.joblib, .pkl), an XGBoost (.json, .ubj), LightGBM (.txt) or "
                                       "CatBoost (.cbm) file, a saved PyTorch module (.pt, .pth), a Keras model "
                                       "(.keras, .h5), an ONNX model to process (.onnx) or a Hugging Face checkpoint "
                                       "folder (with --task)\n")
