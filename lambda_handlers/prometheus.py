"""Prometheus metrics for the servers that are not Lambda: the SageMaker serving program and the local gateway.

Lambda keeps CloudWatch's Embedded Metric Format (telemetry.py). prometheus_client is not in the Lambda layer,
and no module the Lambda handler imports imports this one (tests/test_layout.py holds both to that).
Names and labels follow Prometheus's conventions: a `slimserve_` prefix, base units (seconds), `_total` on
counters (added by prometheus_client), and labels of low cardinality (model, version, route, status class).
"""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no `_created` series beside each one: what they hold, a scraper knows from its first scrape

# From a fraction of a millisecond (a small model on the CPU) to the API's 29 s integration timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UNMATCHED = "none"
"""The route label of a request no route takes."""


class ServingMetrics:
    """One registry per server, so two servers in one process (as in the tests) count apart."""

    def __init__(self):
        self.registry = CollectorRegistry()
        model = ["model", "version"]
        self.requests = Counter(
            "slimserve_requests",
            "Requests answered, by model, version, route (the protocol action) and status class",
            [*model, "route", "status_class"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "slimserve_request_duration_seconds",
            "Time from a request's arrival to its answer",
            [*model, "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "slimserve_inference_duration_seconds",
            "Time in the runtime for one request (its batch's call, when batched)",
            model,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size",
            "Rows per runtime call",
            model,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "slimserve_queue_depth", "Requests waiting for a batch to take them", model, registry=self.registry
        )
        self.load_failures = Counter(
            "slimserve_model_load_failures", "Failed attempts to load a model", model, registry=self.registry
        )

    def request(
        self, model: str, version: str, route: str | None, status: int, seconds: float, inference_ms: float | None
    ) -> None:
        route = route or UNMATCHED
        self.requests.labels(model, version, route, f"{status // 100}xx").inc()
        self.request_seconds.labels(model, version, route).observe(seconds)
        if inference_ms is not None:
            self.inference_seconds.labels(model, version).observe(inference_ms / 1000)

    def exposition(self) -> tuple[bytes, dict[str, str]]:
        """The body and headers of GET /metrics."""
        return generate_latest(self.registry), {"Content-Type": CONTENT_TYPE_LATEST}
