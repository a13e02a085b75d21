"""A bounded load test on loopback: 32 clients for 30 s against the local stack, every answer checked.

Nothing here is timed against a target: the test asserts that every request got the right answer and
no 5xx, and that the workers' memory stays flat; it writes the throughput, p50/p99 and RSS figures to
build/load-report.json and prints them (README, "Limits and guarantees").
"""

import http.client
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support import ROOT, running_stack

pytestmark = pytest.mark.slow

CLIENTS = 32
SECONDS = float(os.environ.get("SLIMSERVE_LOAD_SECONDS", "30"))
RSS_GROWTH_MB = 10  # flat: an allocator's slack, not a leak


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(ROOT / "slimserve.toml", tmp_path_factory.mktemp("load")) as running:
        yield running


def requests_for(iris, digits, iris_test_split, digits_test_split) -> list[tuple[str, bytes, list]]:
    """(path, body, expected labels): one and several rows of each model, answers from the runtimes themselves."""
    cases = []
    for name, runtime, (test_x, _), input_name in [("iris", iris, iris_test_split, "features"), ("digits", digits, digits_test_split, "pixels")]:
        for rows in (slice(0, 1), slice(3, 7), slice(10, 11)):
            data = test_x[rows]
            expected = runtime.run({input_name: data}, ["label"] if name == "iris" else [runtime.signature.outputs[0].name])
            labels = next(iter(expected.values()))
            labels = labels.tolist() if name == "iris" else labels.argmax(axis=1).tolist()
            body = json.dumps({"inputs": [{"name": input_name, "shape": list(data.shape), "datatype": "FP32", "data": data.ravel().tolist()}]})
            cases.append((f"/v2/models/{name}/infer", body.encode(), labels))
    return cases


def labels_of(model: str, answer: dict) -> list:
    if model == "iris":
        return next(output for output in answer["outputs"] if output["name"] == "label")["data"]
    output = answer["outputs"][0]
    return np.asarray(output["data"]).reshape(output["shape"]).argmax(axis=1).tolist()


def test_32_clients_for_30_seconds_get_every_answer_right_and_memory_stays_flat(stack, iris, digits, iris_test_split, digits_test_split):
    cases = requests_for(iris, digits, iris_test_split, digits_test_split)
    host, port = stack.gateway.server_address[:2]
    headers = {"Content-Type": "application/json", "x-api-key": stack.gateway.api_key}
    latencies, failures, sent = [], [], [0]
    lock = threading.Lock()

    def client(index: int, deadline: float | None, count: int | None = None) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        done = 0
        while (deadline is not None and time.monotonic() < deadline) or (count is not None and done < count):
            path, body, expected = cases[(index + done) % len(cases)]
            started = time.perf_counter()
            try:
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                status, answer = response.status, response.read()
            except OSError as error:
                status, answer = 0, str(error).encode()
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=60)
            elapsed = (time.perf_counter() - started) * 1000
            done += 1
            with lock:
                sent[0] += 1
                if status != 200 or labels_of(path.split("/")[3], json.loads(answer)) != expected:
                    failures.append((status, path, answer[:200]))
                else:
                    latencies.append(elapsed)
        connection.close()

    def run(deadline: float | None, count: int | None = None) -> None:
        threads = [threading.Thread(target=client, args=(i, deadline, count)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(None, count=4)  # every environment started and warm before memory is measured
    workers = {worker.process.pid: worker for versions in stack.versions.values() for pool in versions.pools.values()
               for worker in pool.workers}
    start_rss = {pid: rss_mb(pid) for pid in workers}
    latencies.clear()
    sent[0] = 0
    started = time.monotonic()
    run(started + SECONDS)
    elapsed = time.monotonic() - started
    end_rss = {pid: rss_mb(pid) for pid in start_rss if workers[pid].alive}

    report = {
        "clients": CLIENTS, "seconds": round(elapsed, 1), "requests": sent[0], "answered_right": len(latencies),
        "wrong_or_failed": len(failures), "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies else None,
        "workers": len(start_rss), "rss_start_mb": round(sum(start_rss.values()), 1), "rss_end_mb": round(sum(end_rss.values()), 1),
        "max_worker_growth_mb": round(max(end_rss[pid] - start_rss[pid] for pid in end_rss), 2),
    }
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "load-report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    assert failures == [] and report["answered_right"] == report["requests"] > 0, failures[:5]
    assert set(end_rss) == set(start_rss), "a worker died under load"
    assert report["max_worker_growth_mb"] <= RSS_GROWTH_MB, report
