"""XGBoost, LightGBM and CatBoost models to ONNX: their scikit-learn estimators (pickled, or inside a pipeline),
their boosters, and their native files (.json/.ubj, .txt, .cbm).

XGBoost's and LightGBM's estimators convert through skl2onnx with onnxmltools' converters registered for them, so
a pipeline around them is one graph; a LightGBM booster goes through onnxmltools directly. CatBoost exports ONNX
itself (its own converter, numeric features only); at the end of a Pipeline, the steps before it go through
skl2onnx and the two graphs are joined.
"""

import tempfile
from pathlib import Path

import numpy as np

from slimserve.modeltools.convert import ConvertError, OnnxResult, converter_failed, rename_io, require
from slimserve.modeltools.samples import Samples

# onnxmltools' own converters write ai.onnx up to opset 15 (it refuses a higher target).
ONNXMLTOOLS_OPSET = 15
# A Pipeline ending in CatBoost: skl2onnx's opset for the steps before it (CatBoost's export names ai.onnx.ml only).
CATBOOST_PIPELINE_OPSET = 17


# The boosting estimators skl2onnx converts with onnxmltools' converters: (library, estimator, skl2onnx alias).
SKLEARN_ESTIMATORS = (
    ("xgboost", "XGBClassifier", "XGBoostXGBClassifier"),
    ("xgboost", "XGBRegressor", "XGBoostXGBRegressor"),
    ("lightgbm", "LGBMClassifier", "LightGbmLGBMClassifier"),
    ("lightgbm", "LGBMRegressor", "LightGbmLGBMRegressor"),
)


def register_sklearn_converters() -> None:
    """onnxmltools' XGBoost and LightGBM converters, registered with skl2onnx for the libraries installed."""
    import importlib

    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    try:
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
    except ImportError:
        return  # no onnxmltools: a boosting estimator then gets skl2onnx's refusal, which names it
    converters = {"xgboost": convert_xgboost, "lightgbm": convert_lightgbm}
    for library, estimator, alias in SKLEARN_ESTIMATORS:
        try:
            estimator_class = getattr(importlib.import_module(library), estimator)
        except ImportError:
            continue
        if estimator.endswith("Classifier"):
            shapes = calculate_linear_classifier_output_shapes
            options = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
        else:
            shapes, options = calculate_linear_regressor_output_shapes, {"split": None}
        update_registered_converter(estimator_class, alias, shapes, converters[library], options=options)


def xgboost_estimator(model, source):
    """An XGBoost booster or native file (.json, .ubj) as the scikit-learn estimator its objective makes it."""
    import json

    xgboost = require("xgboost", source, "converting a XGBoost model", "xgboost 'slimserve[boosting]'")
    booster = model if isinstance(model, xgboost.Booster) else xgboost.Booster()
    if booster is not model:
        try:
            booster.load_model(str(model))
        except xgboost.core.XGBoostError as error:
            raise ConvertError(f"{source}: XGBoost cannot load it: {str(error).splitlines()[0]}") from None
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    kind = objective.split(":")[0]
    if kind not in ("binary", "multi", "reg"):
        raise ConvertError(
            f"{source}: an XGBoost model with objective {objective!r}; convert takes classifiers "
            "(binary:*, multi:*) and regressors (reg:*)"
        )
    estimator = xgboost.XGBRegressor() if kind == "reg" else xgboost.XGBClassifier()
    estimator.load_model(bytearray(booster.save_raw("ubj")))
    return estimator


def lightgbm_to_onnx(model, samples: Samples, source) -> OnnxResult:
    """A LightGBM booster or its native text file: `label` and `probabilities`, or `predictions`."""
    convert_lightgbm = require(
        "onnxmltools", source, "converting a LightGBM booster", "'slimserve[boosting]'"
    ).convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    lightgbm = require("lightgbm", source, "converting a LightGBM model", "lightgbm 'slimserve[boosting]'")
    if isinstance(model, lightgbm.Booster):
        booster = model
    else:
        try:
            booster = lightgbm.Booster(model_file=str(model))
        except lightgbm.basic.LightGBMError as error:
            raise ConvertError(f"{source}: LightGBM cannot load it: {error}") from None
    features = _numeric_rows(samples, booster.num_feature(), source)
    objective = booster.dump_model(num_iteration=1)["objective"].split()[0]
    try:
        model_proto = convert_lightgbm(
            booster,
            initial_types=[("features", FloatTensorType([None, features.shape[1]]))],
            target_opset=ONNXMLTOOLS_OPSET,
            zipmap=False,
        )
    except Exception as error:  # onnxmltools raises many kinds; the booster is what it refuses
        raise converter_failed(source, f"a LightGBM booster ({objective})", "onnxmltools", error) from None
    answers = np.asarray(booster.predict(features))
    if objective in ("binary", "multiclass", "multiclassova"):
        probabilities = np.column_stack([1 - answers, answers]) if answers.ndim == 1 else answers
        expected = {"label": probabilities.argmax(axis=1), "probabilities": probabilities}
    else:
        rename_io(model_proto, {"variable": "predictions"})
        expected = {"predictions": answers.reshape(len(features), -1)}
    return OnnxResult(model_proto, {"features": features}, expected)


def catboost_to_onnx(model, samples: Samples, source) -> OnnxResult:
    """A CatBoost model (estimator or native .cbm file), exported by CatBoost itself."""
    import onnx

    catboost = require("catboost", source, "converting a CatBoost model", "catboost 'slimserve[boosting]'")
    if not isinstance(model, catboost.CatBoost):
        path, model = model, catboost.CatBoost()
        try:
            model.load_model(str(path))
        except catboost.CatBoostError as error:
            raise ConvertError(f"{source}: CatBoost cannot load it: {error}") from None
    features = _numeric_rows(samples, len(model.feature_names_), source)
    classifier = model.get_all_params()["loss_function"] in (
        "Logloss",
        "CrossEntropy",
        "MultiClass",
        "MultiClassOneVsAll",
    )
    with tempfile.TemporaryDirectory() as folder:
        exported = Path(folder) / "model.onnx"
        try:
            model.save_model(str(exported), format="onnx")
        except catboost.CatBoostError as error:
            raise converter_failed(source, type(model).__name__, "catboost", error) from None
        model_proto = onnx.load(str(exported))
    _drop_zipmap(model_proto)
    if classifier:
        probabilities = model.predict(features, prediction_type="Probability")
        expected = {
            "label": model.predict(features, prediction_type="Class").reshape(-1),
            "probabilities": probabilities,
        }
    else:
        _declare_output(model_proto, "predictions", ["N", 1])  # CatBoost declares [N], and answers [N, 1]
        expected = {"predictions": np.asarray(model.predict(features)).reshape(len(features), -1)}
    return OnnxResult(model_proto, {"features": features}, expected)


def ends_in_catboost(model) -> bool:
    steps = getattr(model, "steps", None)
    return bool(steps) and type(steps[-1][1]).__module__.split(".")[0] == "catboost"


def catboost_pipeline_to_onnx(pipeline, samples: Samples, source) -> OnnxResult:
    """A scikit-learn Pipeline ending in a CatBoost estimator, which skl2onnx has no converter for: the steps
    before it through skl2onnx, the estimator through CatBoost's own export on what they answer, joined into one
    graph that answers what the pipeline itself predicts."""
    from onnx import compose, helper

    from slimserve.modeltools.sklearn_models import sklearn_inputs, sklearn_to_onnx

    front = sklearn_to_onnx(pipeline[:-1], samples, str(source))
    transformed = Samples(samples.path, {"": np.asarray(front.expected["transformed"], dtype=np.float32)})
    final = catboost_to_onnx(pipeline.steps[-1][1], transformed, source)
    # one set of opsets for both: every domain either uses (com.microsoft's text tokenizer too), at the highest
    # version; CatBoost's ops are the same up to ai.onnx.ml 3, and it names no ai.onnx version
    versions = {"": CATBOOST_PIPELINE_OPSET, "ai.onnx.ml": 3}
    for part in (front.model, final.model):
        for opset in part.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    ir_version = max(front.model.ir_version, final.model.ir_version)
    for part in (front.model, final.model):
        del part.opset_import[:]
        part.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())
        part.ir_version = ir_version
    merged = compose.merge_models(front.model, final.model, io_map=[("transformed", "features")], prefix2="catboost_")
    rename_io(merged, {f"catboost_{name}": name for name in final.expected})
    original = sklearn_inputs(pipeline, samples, str(source))[2]
    if "label" in final.expected:
        expected = {"label": pipeline.predict(original).reshape(-1), "probabilities": pipeline.predict_proba(original)}
    else:
        expected = {"predictions": np.asarray(pipeline.predict(original)).reshape(samples.rows, -1)}
    return OnnxResult(merged, front.feeds, expected)


def _drop_zipmap(model) -> None:
    """CatBoost's probabilities come as a ZipMap (a sequence of maps, which no protocol carries): the tensor under
    it becomes the `probabilities` output."""
    from onnx import TensorProto, helper

    graph = model.graph
    for node in list(graph.node):
        if node.op_type == "ZipMap":
            graph.node.remove(node)
            for output in list(graph.output):
                if output.name == node.output[0]:
                    graph.output.remove(output)
            graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, ["N", None]))
            rename_io(model, {node.input[0]: "probabilities"})


def _declare_output(model, name: str, shape: list) -> None:
    from onnx import helper

    for index, output in enumerate(model.graph.output):
        if output.name == name:
            elem_type = output.type.tensor_type.elem_type
            model.graph.output[index].CopyFrom(helper.make_tensor_value_info(name, elem_type, shape))


def _numeric_rows(samples: Samples, width: int, source) -> np.ndarray:
    rows = samples.matrix()
    if rows.ndim != 2 or rows.shape[1] != width or rows.dtype.kind not in "biuf":
        raise ConvertError(
            f"{samples.path}: expected rows of {width} numeric features, as {source} was trained on, "
            f"found an array of shape {rows.shape} ({rows.dtype})"
        )
    return rows.astype(np.float32)
