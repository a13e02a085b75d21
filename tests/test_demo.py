"""`make demo`'s main job, checked: the local stack answers real clients with the runtime's own outputs."""

import io

import pytest
from support import ROOT

from slimserve.cli.demo import run_demo
from slimserve.config import load_config

pytestmark = pytest.mark.slow


def test_demo_serves_both_example_models_through_the_local_stack():
    out = io.StringIO()
    assert run_demo(load_config(ROOT / "slimserve.toml"), out) == 0
    text = out.getvalue()
    assert text.count("JSON and binary answers equal to the runtime's own: True") == 2
    assert "held-out accuracy through the local stack: 0.978 on 45 samples" in text
    assert "held-out accuracy through the local stack: 0.973 on 450 samples" in text
    assert "  first 3 predictions (tritonclient, binary): [2, 2, 0]\n  first 3 predictions (TF Serving rows): [2, 2, 0]" in text
    assert text.count("Init Duration") >= 2
    assert text.endswith("local stack stopped: gateway, workers, serving programs and S3\n")


def test_demo_serves_a_sagemaker_model_beside_its_lambda_twin():
    out = io.StringIO()
    assert run_demo(load_config(ROOT / "examples" / "with-sagemaker.toml"), out) == 0
    text = out.getvalue()
    assert "== iris-gpu (onnx, SageMaker serving program) at http://" in text
    assert text.count("JSON and binary answers equal to the runtime's own: True") == 2
    assert text.count("held-out accuracy through the local stack: 0.978 on 45 samples") == 2
