"""convert on the models teams bring first, each saved as its user saves it: scikit-learn's HistGradientBoosting,
text and mixed-column pipelines, XGBoost, LightGBM and CatBoost (pickled and in their own files). Each converted
model answers as its framework does on the samples: labels identical, values within 1e-4 relative."""

import csv

import joblib
import numpy as np
import pytest
from support import call, convert_error

from slimserve.cli import main
from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.runtimes import OnnxModel

# Texts in several scripts: scikit-learn tokenizes and lower-cases Unicode, so the graph must too.
REVIEWS = ["a great movie, loved it", "awful film and a boring mess", "Café très bon, j'ai adoré",
           "ΣΟΦΙΑ: ένα υπέροχο έργο", "Ужасный фильм", "great great fun", "boring, awful, ÉNORME ennui", "loved the café"]
SENTIMENT = [1, 0, 1, 1, 0, 1, 0, 1]


@pytest.fixture(scope="module")
def cancer():
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer(return_X_y=True)


@pytest.fixture(scope="module")
def diabetes():
    from sklearn.datasets import load_diabetes

    return load_diabetes(return_X_y=True)


def converted(tmp_path, model_file, samples, capsys) -> OnnxModel:
    out = tmp_path / "model.onnx"
    assert main(["convert", str(model_file), "--samples", str(samples), "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert printed.out.startswith(f"wrote {out}: checked on ") and printed.err == ""
    return OnnxModel(out)


def assert_classifies_as(model: OnnxModel, feeds: dict, labels, probabilities):
    got = model.run(feeds, ["label", "probabilities"])
    np.testing.assert_array_equal(got["label"].reshape(-1), np.asarray(labels).reshape(-1))
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-4, atol=1e-6)


def assert_predicts_as(model: OnnxModel, feeds: dict, values):
    got = model.run(feeds, ["predictions"])["predictions"]
    np.testing.assert_allclose(got.reshape(-1), np.asarray(values).reshape(-1), rtol=1e-4, atol=1e-4)


def test_hist_gradient_boosting_classifier_with_missing_values(cancer, tmp_path, capsys):
    from sklearn.ensemble import HistGradientBoostingClassifier

    features, labels = cancer
    features = features.copy()
    features[::5, 2] = np.nan  # missing values take the branch the training chose for them
    boosted = HistGradientBoostingClassifier(max_iter=40, random_state=0).fit(features, labels)
    joblib.dump(boosted, tmp_path / "boosted.joblib")
    np.save(tmp_path / "samples.npy", features[:80])
    model = converted(tmp_path, tmp_path / "boosted.joblib", tmp_path / "samples.npy", capsys)
    rows = features.astype(np.float32)
    assert_classifies_as(model, {"features": rows}, boosted.predict(features), boosted.predict_proba(features))


def test_hist_gradient_boosting_regressor(diabetes, tmp_path, capsys):
    from sklearn.ensemble import HistGradientBoostingRegressor

    features, targets = diabetes
    boosted = HistGradientBoostingRegressor(max_iter=40, random_state=0).fit(features, targets)
    joblib.dump(boosted, tmp_path / "boosted.joblib")
    np.save(tmp_path / "samples.npy", features[:50])
    model = converted(tmp_path, tmp_path / "boosted.joblib", tmp_path / "samples.npy", capsys)
    assert model.signature.outputs[0].shape == (-1, 1)
    assert_predicts_as(model, {"features": features.astype(np.float32)}, boosted.predict(features))


def test_a_text_pipeline_takes_strings_in_any_script_and_the_served_model_answers_as_scikit_learn(tmp_path, capsys):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(C=10)).fit(REVIEWS, SENTIMENT)
    joblib.dump(pipeline, tmp_path / "sentiment.joblib")
    np.save(tmp_path / "reviews.npy", np.array(REVIEWS))  # a unicode array: no pickle
    model = converted(tmp_path, tmp_path / "sentiment.joblib", tmp_path / "reviews.npy", capsys)
    assert [(spec.name, spec.datatype, spec.shape) for spec in model.signature.inputs] == [("text", "BYTES", (-1,))]
    core = InferenceCore([ServedModel("sentiment", "1", runtime=model)])
    body = {"inputs": [{"name": "text", "shape": [len(REVIEWS)], "datatype": "BYTES", "data": REVIEWS}]}
    status, answer, _ = call(core, "POST", "/v2/models/sentiment/infer", body)
    assert status == 200, answer
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert outputs["label"]["data"] == pipeline.predict(REVIEWS).tolist()
    np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (-1, 2)), pipeline.predict_proba(REVIEWS),
                               rtol=1e-4, atol=1e-6)


def test_the_text_vectorizer_lower_cases_in_a_locale_lambda_has():
    """ONNX Runtime refuses to load a graph naming a locale the machine lacks; Lambda's AL2023 has C.UTF-8."""
    import onnx
    from onnx import helper
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.pipeline import make_pipeline

    from slimserve.modeltools.samples import Samples
    from slimserve.modeltools.sklearn_models import sklearn_to_onnx

    pipeline = make_pipeline(CountVectorizer(), MultinomialNB()).fit(REVIEWS, SENTIMENT)
    result = sklearn_to_onnx(pipeline, Samples(None, {"": np.array(REVIEWS)}), "counts")
    (normalizer,) = [node for node in result.model.graph.node if node.op_type == "StringNormalizer"]
    assert {a.name: helper.get_attribute_value(a) for a in normalizer.attribute}["locale"] == b"C.UTF-8"
    onnx.checker.check_model(result.model)


@pytest.mark.parametrize("final", ["logistic", "catboost"])
def test_a_column_transformer_of_numeric_categorical_and_text_columns_from_csv(tmp_path, capsys, final):
    """The same columns into a LogisticRegression (one skl2onnx graph) or a CatBoostClassifier (joined with
    CatBoost's own export)."""
    import catboost
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    rows = 120
    table = pd.DataFrame({"age": rng.normal(40, 12, rows).round(1), "city": rng.choice(["Paris", "Lyon", "Nîmes"], rows),
                          "review": rng.choice(REVIEWS, rows)})
    churned = ((table.age > 45) ^ (table.city == "Nîmes")).astype(int)
    columns = ColumnTransformer([("age", StandardScaler(), ["age"]), ("city", OneHotEncoder(handle_unknown="ignore"), ["city"]),
                                 ("review", TfidfVectorizer(), "review")])
    estimator = (LogisticRegression() if final == "logistic"
                 else catboost.CatBoostClassifier(iterations=30, verbose=0, random_seed=0, allow_writing_files=False))
    pipeline = make_pipeline(columns, estimator).fit(table, churned)
    joblib.dump(pipeline, tmp_path / "churn.joblib")
    table.to_csv(tmp_path / "customers.csv", index=False, quoting=csv.QUOTE_NONNUMERIC)
    model = converted(tmp_path, tmp_path / "churn.joblib", tmp_path / "customers.csv", capsys)
    assert [(spec.name, spec.datatype, spec.shape) for spec in model.signature.inputs] == [
        ("age", "FP32", (-1, 1)), ("city", "BYTES", (-1, 1)), ("review", "BYTES", (-1, 1))]
    feeds = {"age": table[["age"]].to_numpy(np.float32), "city": table[["city"]].to_numpy(object),
             "review": table[["review"]].to_numpy(object)}
    assert_classifies_as(model, feeds, pipeline.predict(table), pipeline.predict_proba(table))


def test_a_pipeline_fitted_on_a_dataframe_takes_a_csvs_columns_by_name(cancer, tmp_path, capsys):
    """The .csv's columns may come in any order: they reach the graph's `features` in the order of the fit."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = cancer
    table = pd.DataFrame(features[:, :4], columns=["radius", "texture", "perimeter", "area"])
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(table, labels)
    joblib.dump(pipeline, tmp_path / "named.joblib")
    table[["area", "radius", "perimeter", "texture"]].to_csv(tmp_path / "shuffled.csv", index=False)
    model = converted(tmp_path, tmp_path / "named.joblib", tmp_path / "shuffled.csv", capsys)
    assert_classifies_as(model, {"features": table.to_numpy(np.float32)}, pipeline.predict(table),
                         pipeline.predict_proba(table))


def test_xgboost_from_joblib_json_and_ubj(cancer, diabetes, tmp_path, capsys):
    import xgboost

    features, labels = cancer
    classifier = xgboost.XGBClassifier(n_estimators=30, max_depth=4).fit(features, labels)
    np.save(tmp_path / "samples.npy", features[:60])
    joblib.dump(classifier, tmp_path / "xgb.joblib")
    classifier.save_model(tmp_path / "xgb.json")
    classifier.get_booster().save_model(tmp_path / "booster.ubj")  # a Booster's own file, as xgb.train leaves it
    rows = features.astype(np.float32)
    for saved in ("xgb.joblib", "xgb.json", "booster.ubj"):
        model = converted(tmp_path, tmp_path / saved, tmp_path / "samples.npy", capsys)
        assert_classifies_as(model, {"features": rows}, classifier.predict(rows), classifier.predict_proba(rows))
    inputs, targets = diabetes
    regressor = xgboost.XGBRegressor(n_estimators=30).fit(inputs, targets)
    regressor.save_model(tmp_path / "xgb-regressor.json")
    np.save(tmp_path / "diabetes.npy", inputs[:40])
    model = converted(tmp_path, tmp_path / "xgb-regressor.json", tmp_path / "diabetes.npy", capsys)
    assert_predicts_as(model, {"features": inputs.astype(np.float32)}, regressor.predict(inputs.astype(np.float32)))


def test_xgboost_inside_a_scikit_learn_pipeline_is_one_graph(tmp_path, capsys):
    import xgboost
    from sklearn.datasets import load_wine
    from sklearn.feature_selection import VarianceThreshold
    from sklearn.pipeline import make_pipeline

    features, labels = load_wine(return_X_y=True)
    pipeline = make_pipeline(VarianceThreshold(0.01), xgboost.XGBClassifier(n_estimators=20)).fit(features, labels)
    joblib.dump(pipeline, tmp_path / "wine.joblib")
    np.save(tmp_path / "wine.npy", features)
    model = converted(tmp_path, tmp_path / "wine.joblib", tmp_path / "wine.npy", capsys)
    assert_classifies_as(model, {"features": features.astype(np.float32)}, pipeline.predict(features),
                         pipeline.predict_proba(features))


def test_lightgbm_from_joblib_and_its_text_file(cancer, diabetes, tmp_path, capsys):
    import lightgbm
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    classifier = lightgbm.LGBMClassifier(n_estimators=30, verbose=-1).fit(features, labels)
    joblib.dump(classifier, tmp_path / "lgbm.joblib")
    classifier.booster_.save_model(tmp_path / "lgbm.txt")
    np.save(tmp_path / "iris.npy", features)
    for saved in ("lgbm.joblib", "lgbm.txt"):
        model = converted(tmp_path, tmp_path / saved, tmp_path / "iris.npy", capsys)
        assert model.signature.outputs[0].shape == (-1,)  # LightGBM's converter fixes the label at 1 row
        assert_classifies_as(model, {"features": features.astype(np.float32)}, classifier.predict(features),
                             classifier.predict_proba(features))
    inputs, targets = diabetes
    regressor = lightgbm.LGBMRegressor(n_estimators=30, verbose=-1).fit(inputs, targets)
    regressor.booster_.save_model(tmp_path / "lgbm-regressor.txt")
    np.save(tmp_path / "diabetes.npy", inputs[:40])
    model = converted(tmp_path, tmp_path / "lgbm-regressor.txt", tmp_path / "diabetes.npy", capsys)
    assert_predicts_as(model, {"features": inputs.astype(np.float32)}, regressor.predict(inputs))


def test_catboost_from_its_cbm_file_and_joblib(diabetes, tmp_path, capsys):
    import catboost
    from sklearn.datasets import load_iris

    features, labels = load_iris(return_X_y=True)
    classifier = catboost.CatBoostClassifier(iterations=30, verbose=0, random_seed=0, allow_writing_files=False).fit(features, labels)
    classifier.save_model(str(tmp_path / "iris.cbm"))
    np.save(tmp_path / "iris.npy", features)
    model = converted(tmp_path, tmp_path / "iris.cbm", tmp_path / "iris.npy", capsys)
    rows = features.astype(np.float32)
    assert_classifies_as(model, {"features": rows}, classifier.predict(rows).reshape(-1), classifier.predict_proba(rows))
    inputs, targets = diabetes
    regressor = catboost.CatBoostRegressor(iterations=30, verbose=0, random_seed=0, allow_writing_files=False).fit(inputs, targets)
    joblib.dump(regressor, tmp_path / "regressor.joblib")
    np.save(tmp_path / "diabetes.npy", inputs[:40])
    model = converted(tmp_path, tmp_path / "regressor.joblib", tmp_path / "diabetes.npy", capsys)
    assert model.signature.outputs[0].shape == (-1, 1)
    assert_predicts_as(model, {"features": inputs.astype(np.float32)}, regressor.predict(inputs.astype(np.float32)))


@pytest.fixture(scope="module")
def saved_forest(tmp_path_factory, cancer):
    from sklearn.ensemble import RandomForestClassifier

    folder = tmp_path_factory.mktemp("forest")
    features, labels = cancer
    joblib.dump(RandomForestClassifier(n_estimators=5, random_state=0).fit(features, labels), folder / "forest.joblib")
    np.save(folder / "samples.npy", features[:20])
    return folder


def test_each_mistake_is_one_line_naming_the_file(saved_forest, tmp_path, capsys):
    folder = saved_forest
    forest, samples = folder / "forest.joblib", folder / "samples.npy"
    assert convert_error(capsys, folder / "nope.joblib", "--samples", samples, "--out", tmp_path / "m.onnx") == (
        f"error: {folder}/nope.joblib: no such model file\n")
    assert convert_error(capsys, forest, "--samples", samples, "--out", tmp_path / "m.tflite") == (
        f"error: {tmp_path}/m.tflite: a .joblib model converts to ONNX: expected an output path ending in .onnx\n")
    assert convert_error(capsys, forest, "--samples", folder / "samples.parquet", "--out", tmp_path / "m.onnx") == (
        f"error: {folder}/samples.parquet: expected samples in a .npy, .npz or .csv file, found a .parquet\n")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert convert_error(capsys, forest, "--samples", tmp_path / "objects.npy", "--out", tmp_path / "m.onnx") == (
        f"error: {tmp_path}/objects.npy: holds Python objects, which would need pickle to load: save numbers or "
        "strings (np.asarray(texts, dtype=str)), or a .csv\n")
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3\n")
    assert convert_error(capsys, forest, "--samples", tmp_path / "ragged.csv", "--out", tmp_path / "m.onnx") == (
        f"error: {tmp_path}/ragged.csv, line 3: expected 2 values, as the header has, found 1\n")
    np.savez(tmp_path / "uneven.npz", a=np.zeros((3, 2)), b=np.zeros((2, 2)))
    assert convert_error(capsys, forest, "--samples", tmp_path / "uneven.npz", "--out", tmp_path / "m.onnx") == (
        f"error: {tmp_path}/uneven.npz: every array needs one row per sample, found a of shape (3, 2), "
        "b of shape (2, 2)\n")
    assert not list(tmp_path.glob("m.*"))


def test_a_missing_boosting_library_names_what_to_install(saved_forest, tmp_path, capsys, monkeypatch):
    import sys

    (tmp_path / "model.cbm").write_bytes(b"CBM1")
    monkeypatch.setitem(sys.modules, "catboost", None)  # as if not installed: importing it raises ImportError
    assert convert_error(capsys, tmp_path / "model.cbm", "--samples", saved_forest / "samples.npy",
                         "--out", tmp_path / "m.onnx") == (
        f"error: {tmp_path}/model.cbm: converting a CatBoost model needs catboost, which is not installed: "
        "pip install catboost 'slimserve[boosting]'\n")
    monkeypatch.setitem(sys.modules, "skl2onnx", None)
    assert convert_error(capsys, saved_forest / "forest.joblib", "--samples", saved_forest / "samples.npy",
                         "--out", tmp_path / "m.onnx") == (
        f"error: {saved_forest}/forest.joblib: converting a scikit-learn model needs skl2onnx, which is not installed: "
        "pip install 'slimserve[examples]'\n")


def test_a_damaged_native_file_is_one_line(saved_forest, tmp_path, capsys):
    (tmp_path / "model.json").write_text("{not json")
    err = convert_error(capsys, tmp_path / "model.json", "--samples", saved_forest / "samples.npy", "--out", tmp_path / "m.onnx")
    assert err.startswith(f"error: {tmp_path}/model.json: XGBoost cannot load it: ")
    (tmp_path / "model.txt").write_text("not a model\n")
    err = convert_error(capsys, tmp_path / "model.txt", "--samples", saved_forest / "samples.npy", "--out", tmp_path / "m.onnx")
    assert err.startswith(f"error: {tmp_path}/model.txt: LightGBM cannot load it: ")


def test_catboost_at_the_end_of_a_pipeline_is_one_graph(cancer, diabetes, tmp_path, capsys):
    """skl2onnx has no converter for CatBoost: the steps before it go through skl2onnx, CatBoost exports itself."""
    import catboost
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = cancer
    classifier = make_pipeline(StandardScaler(), PCA(8), catboost.CatBoostClassifier(
        iterations=30, verbose=0, random_seed=0, allow_writing_files=False)).fit(features, labels)
    joblib.dump(classifier, tmp_path / "classifier.joblib")
    np.save(tmp_path / "cancer.npy", features)
    model = converted(tmp_path, tmp_path / "classifier.joblib", tmp_path / "cancer.npy", capsys)
    assert_classifies_as(model, {"features": features.astype(np.float32)}, classifier.predict(features).reshape(-1),
                         classifier.predict_proba(features))
    inputs, targets = diabetes
    regressor = make_pipeline(StandardScaler(), catboost.CatBoostRegressor(
        iterations=30, verbose=0, random_seed=0, allow_writing_files=False)).fit(inputs, targets)
    joblib.dump(regressor, tmp_path / "regressor.joblib")
    np.save(tmp_path / "diabetes.npy", inputs)
    model = converted(tmp_path, tmp_path / "regressor.joblib", tmp_path / "diabetes.npy", capsys)
    assert_predicts_as(model, {"features": inputs.astype(np.float32)}, regressor.predict(inputs))


def test_an_estimator_no_converter_takes_names_it_the_converter_and_its_version(cancer, tmp_path, capsys):
    from importlib import metadata

    import catboost
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer

    features, labels = cancer
    pipeline = make_pipeline(SplineTransformer(), catboost.CatBoostClassifier(
        iterations=3, verbose=0, allow_writing_files=False)).fit(features, labels)
    joblib.dump(pipeline, tmp_path / "pipeline.joblib")
    np.save(tmp_path / "samples.npy", features[:10])
    assert convert_error(capsys, tmp_path / "pipeline.joblib", "--samples", tmp_path / "samples.npy",
                         "--out", tmp_path / "m.onnx") == (
        f"error: {tmp_path}/pipeline.joblib: skl2onnx {metadata.version('skl2onnx')} cannot convert "
        "SplineTransformer: it has no converter for it; replace it with a step skl2onnx supports, or convert it "
        "yourself and give convert the .onnx\n")
