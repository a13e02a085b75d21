"""Structured JSON log lines and CloudWatch Embedded Metric Format, written to stdout.

Lambda ships stdout to CloudWatch Logs, which turns EMF lines into metrics: no API
call on the hot path, one line per invocation.
"""

import sys
import time

from . import jsoncodec
from .contract import METRIC_UNITS


def _write(record: dict) -> None:
    sys.stdout.write(jsoncodec.dumps(record).decode() + "\n")
    sys.stdout.flush()


def log(level: str, message: str, **fields) -> None:
    _write({"timestamp": round(time.time() * 1000), "level": level, "message": message, **fields})


def metrics_record(namespace: str, model: str, values: dict, error_kind: str | None = None, **properties) -> dict:
    """One EMF record: every metric by Model, and Errors also by Model and ErrorKind."""
    directives = [
        {
            "Namespace": namespace,
            "Dimensions": [["Model"]],
            "Metrics": [{"Name": name, "Unit": METRIC_UNITS[name]} for name in values],
        }
    ]
    record = {"Model": model, **properties, **values}
    if error_kind is not None:
        directives.append(
            {
                "Namespace": namespace,
                "Dimensions": [["Model", "ErrorKind"]],
                "Metrics": [{"Name": "Errors", "Unit": "Count"}],
            }
        )
        record["ErrorKind"] = error_kind
    record["_aws"] = {"Timestamp": round(time.time() * 1000), "CloudWatchMetrics": directives}
    return record


def emit_metrics(namespace: str, model: str, values: dict, error_kind: str | None = None, **properties) -> None:
    _write(metrics_record(namespace, model, values, error_kind, **properties))
