"""`make demo`'s main job, checked: every model answers through the handler with the runtime's own outputs."""

import io

from conftest import ROOT

from slimserve.config import load_config
from slimserve.demo import run_demo


def test_demo_runs_both_example_models_through_the_handler(capsys):
    out = io.StringIO()
    assert run_demo(load_config(ROOT / "slimserve.toml"), out) == 0
    text = out.getvalue()
    assert text.count("handler outputs equal to the runtime's own: True") == 2
    assert "held-out accuracy through the handler: 0.978" in text
    assert "held-out accuracy through the handler: 0.973" in text
    assert "  first 3 predictions (V2 binary): [2, 2, 0]\n  first 3 predictions (TF Serving rows): [2, 2, 0]" in text
    assert "V2 JSON request id echoed: 'demo-1'" in text
