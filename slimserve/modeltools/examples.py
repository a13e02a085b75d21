"""The example models: trained here on data that ships inside scikit-learn.

iris -> ONNX (scikit-learn pipeline through skl2onnx) and handwritten digits ->
TFLite (an MLP written with the TFLite schema, no TensorFlow). Accuracy is
measured on a held-out split by the serving runtime itself, not by scikit-learn.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.lambda_handlers.runtimes import load_model

SEED = 0


@dataclass(frozen=True)
class ExampleModel:
    name: str
    path: Path
    accuracy: float
    test_inputs: np.ndarray
    test_labels: np.ndarray


def iris_split():
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    features, labels = load_iris(return_X_y=True)
    return train_test_split(features.astype(np.float32), labels, test_size=0.3, random_state=SEED, stratify=labels)


def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    return train_test_split(pixels.astype(np.float32), labels, test_size=0.25, random_state=SEED, stratify=labels)


def build_iris_onnx(path: Path) -> ExampleModel:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from slimserve.modeltools.convert import convert_sklearn

    train_x, test_x, train_y, test_y = iris_split()
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=SEED))
    pipeline.fit(train_x, train_y)
    convert_sklearn(pipeline, train_x, path)
    return _evaluate("iris", path, "onnx", test_x, test_y, "label")


def build_digits_tflite(path: Path) -> ExampleModel:
    from sklearn.neural_network import MLPClassifier

    from slimserve.modeltools.tflite_writer import DenseLayer, dense_network_to_tflite

    train_x, test_x, train_y, test_y = digits_split()
    scale = np.float32(1 / 16)  # pixels are 0..16; the scaling is folded into the first layer
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=SEED)
    mlp.fit(train_x * scale, train_y)
    layers = [
        DenseLayer(mlp.coefs_[0] * scale, mlp.intercepts_[0], relu=True),
        DenseLayer(mlp.coefs_[1], mlp.intercepts_[1], relu=False),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dense_network_to_tflite(layers, input_name="pixels", output_name="probabilities"))
    return _evaluate("digits", path, "tflite", test_x, test_y, "probabilities")


def _evaluate(name, path, model_format, test_x, test_y, output) -> ExampleModel:
    model = load_model(path, model_format)
    predicted = model.run({model.signature.inputs[0].name: test_x}, [output])[output]
    if predicted.ndim == 2:
        predicted = predicted.argmax(axis=1)
    accuracy = float((predicted == test_y).mean())
    return ExampleModel(name, path, accuracy, test_x, test_y)


def build_all(folder: Path) -> list[ExampleModel]:
    return [build_iris_onnx(folder / "iris.onnx"), build_digits_tflite(folder / "digits.tflite")]
