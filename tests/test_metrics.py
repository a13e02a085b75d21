"""Prometheus metrics on the local gateway and the SageMaker serving program: scraped while a load runs, the
counters add up to the requests sent, by model, version, route and status class."""

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimserve.local.gateway import EndpointRoute

GOOD, BAD = 60, 9  # requests per model: one row each; the bad ones' data does not fill their shape (the model says so)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of GET /metrics, by name and labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def post(url: str, path: str, body: bytes, key: str) -> int:
    request = urllib.request.Request(url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "x-api-key": key})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def row_request(row, rows=1) -> bytes:
    return json.dumps({"inputs": [{"name": "features", "shape": [rows, 4], "datatype": "FP32", "data": [row.tolist()]}]}).encode()


@pytest.fixture(scope="module")
def load_run(mixed_stack, iris_test_split):
    """GOOD + BAD requests to each model from 16 clients, with the gateway and the program scraped all along."""
    gateway = mixed_stack.gateway
    program = next(route.url for route in gateway.routes.values() if isinstance(route, EndpointRoute))
    before = scrape(gateway.url), scrape(program)
    rows = iris_test_split[0]
    calls = [(model, row_request(rows[i % len(rows)])) for model in ("iris", "iris-gpu") for i in range(GOOD)]
    calls += [(model, row_request(rows[0], rows=2)) for model in ("iris", "iris-gpu") for _ in range(BAD)]
    mid_run, stop = [], threading.Event()

    def scraper():
        while not stop.is_set():
            mid_run.append((scrape(gateway.url), scrape(program)))

    thread = threading.Thread(target=scraper)
    thread.start()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda c: (c[0], post(gateway.url, f"/v2/models/{c[0]}/infer", c[1], gateway.api_key)), calls))
    stop.set()
    thread.join()
    return before, (scrape(gateway.url), scrape(program)), statuses, mid_run


def delta(before, after, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_the_load_run_was_answered_as_expected(load_run):
    _, _, statuses, mid_run = load_run
    for model in ("iris", "iris-gpu"):
        assert sorted(status for m, status in statuses if m == model) == [200] * GOOD + [400] * BAD
    assert mid_run, "no scrape finished while the load ran"


@pytest.mark.parametrize("model", ["iris", "iris-gpu"])
def test_gateway_counters_add_up_to_the_requests_sent(load_run, model):
    (gateway_before, _), (gateway_after, _), _, _ = load_run
    labels = {"model": model, "version": "1", "route": "v2_infer"}
    assert delta(gateway_before, gateway_after, "slimserve_requests_total", **labels, status_class="2xx") == GOOD
    assert delta(gateway_before, gateway_after, "slimserve_requests_total", **labels, status_class="4xx") == BAD
    assert delta(gateway_before, gateway_after, "slimserve_request_duration_seconds_count", **labels) == GOOD + BAD
    assert delta(gateway_before, gateway_after, "slimserve_request_duration_seconds_bucket", **labels, le="+Inf") == GOOD + BAD
    assert delta(gateway_before, gateway_after, "slimserve_request_duration_seconds_sum", **labels) > 0


def test_gateway_inference_times_come_from_the_functions_answers(load_run):
    (gateway_before, _), (gateway_after, _), _, _ = load_run
    lambda_model = {"model": "iris", "version": "1"}
    assert delta(gateway_before, gateway_after, "slimserve_inference_duration_seconds_count", **lambda_model) == GOOD
    # the deployed API passes InvokeEndpoint's Content-Type and custom attributes only: the program itself counts those
    assert value(gateway_after, "slimserve_inference_duration_seconds_count", model="iris-gpu", version="1") == 0


def test_the_sagemaker_program_counts_requests_batches_and_its_queue(load_run):
    (_, program_before), (_, program_after), _, mid_run = load_run
    model = {"model": "iris-gpu", "version": "1"}
    infer = {**model, "route": "v2_infer"}
    assert delta(program_before, program_after, "slimserve_requests_total", **infer, status_class="2xx") == GOOD
    assert delta(program_before, program_after, "slimserve_requests_total", **infer, status_class="4xx") == BAD
    assert delta(program_before, program_after, "slimserve_inference_duration_seconds_count", **model) == GOOD
    # one row per good request: every row went through the runtime in some batch, and the batches were fewer
    assert delta(program_before, program_after, "slimserve_batch_size_sum", **model) == GOOD
    calls = delta(program_before, program_after, "slimserve_batch_size_count", **model)
    assert 0 < calls <= GOOD
    assert value(program_after, "slimserve_queue_depth", **model) == 0
    assert all(value(program, "slimserve_queue_depth", **model) >= 0 for _, program in mid_run)
    assert value(program_after, "slimserve_model_load_failures_total", **model) == 0


def test_requests_for_no_route_count_under_none_and_unknown_models_not_at_all(mixed_stack):
    gateway = mixed_stack.gateway
    before = scrape(gateway.url)
    assert post(gateway.url, "/v2/models/iris/nowhere", b"{}", gateway.api_key) == 404
    assert post(gateway.url, "/v2/models/nobody/infer", b"{}", gateway.api_key) == 404
    after = scrape(gateway.url)
    assert delta(before, after, "slimserve_requests_total", model="iris", version="1", route="none", status_class="4xx") == 1
    assert not any(dict(labels).get("model") == "nobody" for _, labels in after)


def test_a_model_that_fails_to_load_is_counted(tmp_path):
    from test_sagemaker_server import serving

    with serving("iris.onnx", SLIMSERVE_MODEL_SHA256="0" * 64) as (_, url):
        samples = scrape(url)
    assert value(samples, "slimserve_model_load_failures_total", model="iris", version="1") == 1
    assert np.isclose(value(samples, "slimserve_requests_total", model="iris", version="1", route="v2_infer", status_class="5xx"), 0)


def test_the_grafana_dashboard_graphs_only_metrics_and_labels_the_servers_expose(load_run, mixed_stack):
    import re

    from support import ROOT

    program = next(route.url for route in mixed_stack.gateway.routes.values() if isinstance(route, EndpointRoute))
    with urllib.request.urlopen(f"{program}/metrics", timeout=30) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exposed = {family.name + suffix for family in families for suffix in suffixes[family.type]}
    labels = {"le"} | {label for family in families for sample in family.samples for label in sample.labels}
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\bslimserve_\w+", expr)}
    assert used and used <= exposed, used - exposed
    grouped = {label.strip() for expr in expressions for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
    assert grouped <= labels, grouped - labels
    assert {family.name for family in families} == {
        "slimserve_requests", "slimserve_request_duration_seconds", "slimserve_inference_duration_seconds",
        "slimserve_batch_size", "slimserve_queue_depth", "slimserve_model_load_failures"}
