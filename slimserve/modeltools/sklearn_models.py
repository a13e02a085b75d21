"""scikit-learn estimators and pipelines to ONNX through skl2onnx, and the gradient-boosting libraries' scikit-learn
estimators inside them (their converters are registered with skl2onnx, so a pipeline ending in XGBClassifier
converts as one graph).

The graph's inputs follow what the model was fitted on:
- a pipeline starting with a ColumnTransformer: one input per column, named as the column, numbers as FP32 and
  strings as BYTES, each of shape [-1, 1];
- text (a vectorizer fitted on a list of strings): one BYTES input `text` of shape [-1];
- otherwise one input `features` of shape [-1, width], FP32 (BYTES for strings).
"""

import numpy as np

from slimserve.modeltools.convert import ConvertError, OnnxResult, converter_failed, rename_io, require
from slimserve.modeltools.samples import Samples

# ONNX Runtime's StringNormalizer (lower-casing in a text vectorizer) constructs the locale the graph names, and
# fails to load the model where that locale does not exist. C.UTF-8 is the one UTF-8 locale on Lambda's Amazon
# Linux 2023 images (glibc-minimal-langpack has C, C.UTF-8 and POSIX), and C alone lower-cases no Greek or Cyrillic.
TEXT_LOCALE = "C.UTF-8"
# scikit-learn's default token_pattern, (?u)\b\w\w+\b, which skl2onnx turns into the ASCII-only [a-zA-Z0-9_]+: in
# RE2 (ONNX Runtime's Tokenizer), Python's \w is letters, numbers and the underscore; runs of two or more.
SKLEARN_TOKEN_PATTERN = r"(?u)\b\w\w+\b"
UNICODE_TOKENS = r"[\p{L}\p{N}_][\p{L}\p{N}_]+"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def sklearn_to_onnx(estimator, samples: Samples, source: str) -> OnnxResult:
    """`estimator` (fitted, read from `source`) as ONNX, with what the original predicts on `samples`."""
    from slimserve.modeltools import boosting

    to_onnx = require("skl2onnx", source, "converting a scikit-learn model", "'slimserve[examples]'").to_onnx

    boosting.register_sklearn_converters()
    initial_types, feeds, original_input = sklearn_inputs(estimator, samples, source)
    classifier = hasattr(estimator, "predict_proba")
    try:
        model = to_onnx(estimator, initial_types=initial_types, options=_options(estimator), target_opset=TARGET_OPSET)
    except Exception as error:  # skl2onnx raises many kinds; the estimator (or a step of it) is what it refuses
        raise converter_failed(source, _failing_step(estimator, error), "skl2onnx", error) from None
    transformer = not hasattr(estimator, "predict")  # the steps before an estimator converted on its own
    if transformer:  # skl2onnx names a transformer's one output by its last step ("variable", "transformed_column")
        rename_io(model, {model.graph.output[0].name: "transformed"})
    rename_io(model, {"output_label": "label", "output_probability": "probabilities", "variable": "predictions"})
    try:
        if transformer:
            transformed = estimator.transform(original_input)
            expected = {"transformed": transformed.toarray() if hasattr(transformed, "toarray") else transformed}
        elif classifier:
            expected = {
                "label": estimator.predict(original_input),
                "probabilities": estimator.predict_proba(original_input),
            }
        else:
            predictions = np.asarray(estimator.predict(original_input))
            expected = {"predictions": predictions.reshape(samples.rows, -1)}
    except Exception as error:  # the user's estimator raises what it raises on inputs it was not fitted for
        raise ConvertError(
            f"{samples.path}: {source} ({type(estimator).__name__}) cannot predict on these samples: {error}"
        ) from None
    return OnnxResult(model, feeds, expected)


def sklearn_inputs(estimator, samples: Samples, source: str):
    """skl2onnx's initial types, the ONNX feeds, and the input the estimator itself predicts on."""
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    columns = getattr(estimator, "feature_names_in_", None)
    first = estimator.steps[0][1] if hasattr(estimator, "steps") else estimator
    if columns is not None and type(first).__name__ == "ColumnTransformer":
        frame = samples.frame([str(name) for name in columns])
        types, feeds = [], {}
        for name in frame.columns:
            column = frame[name].to_numpy()
            text = column.dtype.kind in "OU" or str(frame[name].dtype) in ("category", "string", "str")
            types.append((name, StringTensorType([None, 1]) if text else FloatTensorType([None, 1])))
            feeds[name] = (column.astype(str).astype(object) if text else column.astype(np.float32)).reshape(-1, 1)
        return types, feeds, frame
    array = samples.matrix()
    text = array.dtype.kind in "UO"
    width = getattr(estimator, "n_features_in_", None)
    if text and array.ndim == 1:
        return [("text", StringTensorType([None]))], {"text": array.astype(object)}, list(array)
    if array.ndim != 2 or (width is not None and array.shape[1] != width):
        raise ConvertError(
            f"{samples.path}: expected rows of {width or 'the'} features, as {source} was fitted on, "
            f"found an array of shape {array.shape}"
        )
    if text:
        return [("features", StringTensorType([None, array.shape[1]]))], {"features": array.astype(object)}, array
    try:
        features = array.astype(np.float32)
    except ValueError as error:
        raise ConvertError(f"{samples.path}: expected numbers for {source}'s features: {error}") from None
    original = array
    if columns is not None:  # fitted on a DataFrame: its columns by name where the file names them, in the fit's order
        original = samples.frame([str(name) for name in columns])
        features = original.to_numpy(dtype=np.float32)
    return [("features", FloatTensorType([None, array.shape[1]]))], {"features": features}, original


def _options(estimator) -> dict:
    """Plain tensors out (no ZipMap of probabilities), and text vectorizers that tokenize as scikit-learn does, in
    a locale every runtime has."""
    options = {}
    for step in _steps(estimator):
        if hasattr(step, "predict_proba"):
            options[id(step)] = {"zipmap": False}
        if hasattr(step, "vocabulary_") and hasattr(step, "token_pattern"):
            text = {"locale": TEXT_LOCALE}
            if step.token_pattern == SKLEARN_TOKEN_PATTERN and step.tokenizer is None:
                text["tokenexp"] = UNICODE_TOKENS
            options[id(step)] = text
    return options


def _steps(estimator):
    """The estimator and every fitted estimator inside it (pipelines, column transformers, unions)."""
    yield estimator
    children = []
    if hasattr(estimator, "steps"):
        children = [step for _, step in estimator.steps]
    elif hasattr(estimator, "transformers_"):
        children = [step for _, step, _ in estimator.transformers_]
    elif hasattr(estimator, "transformer_list"):
        children = [step for _, step in estimator.transformer_list]
    for child in children:
        if not isinstance(child, str):  # 'drop' and 'passthrough'
            yield from _steps(child)


def _failing_step(estimator, error: Exception) -> str:
    """The estimator skl2onnx names in its error, else the outermost one."""
    text = str(error)
    for step in reversed(list(_steps(estimator))):
        if type(step).__name__ in text:
            return type(step).__name__
    return type(estimator).__name__
