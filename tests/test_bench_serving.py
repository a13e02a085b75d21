"""The serving bench's own logic: percentiles, the answer check, the summary, the requests it encodes. No timings."""

import numpy as np
import orjson
import pytest

from bench import gpu, serving
from bench.serving import Answer


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]
    assert serving.percentile(values, 0.5) == 50
    assert serving.percentile(values, 0.99) == 99
    assert serving.percentile(values, 1.0) == 100
    assert serving.percentile([7.0], 0.99) == 7


def test_is_correct_within_tolerance_of_the_scale():
    expected = np.array([[0.5, 0.25, 0.0]], np.float32)
    assert serving.is_correct(expected + 1e-6, expected, 1e-4)
    assert not serving.is_correct(expected + np.array([0, 0, 1e-3], np.float32), expected, 1e-4)
    assert not serving.is_correct(expected.ravel(), expected, 1e-4)


def v2_body(values) -> bytes:
    return orjson.dumps({"outputs": [{"name": "probabilities", "shape": [1, len(values)], "datatype": "FP32", "data": values}]})


def test_summary_counts_only_correct_answers_as_throughput():
    expected = [np.array([[0.75, 0.25]], np.float32), np.array([[0.1, 0.9]], np.float32)]
    answers = [
        Answer(0.001, 0, 200, v2_body([0.75, 0.25])),
        Answer(0.002, 1, 200, v2_body([0.1, 0.9])),
        Answer(0.003, 1, 200, v2_body([0.9, 0.1])),  # another input's answer
        Answer(0.004, 0, 200, b'{"outputs": []}'),  # undecodable
        Answer(0.005, 0, 503, b'{"error": "busy"}'),
        Answer(0.006, 0, 0, b"ConnectionResetError()"),
    ]
    summary = serving.summarize(answers, 2.0, serving.v2_json_output, expected, 1e-4)
    assert (summary.throughput, summary.wrong, summary.errors) == (1.0, 2, 2)
    assert summary.p50_ms == pytest.approx(3) and summary.p99_ms == pytest.approx(6)


def test_http_request_frames_the_encoded_body():
    contender = serving.Contender("x", [], {}, 8080, "/invocations", serving.v2_json_request("features"), serving.v2_json_output)
    request = contender.http_request(np.array([[1.0, 2.0]], np.float32))
    head, body = request.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n")[0] == b"POST /invocations HTTP/1.1"
    assert b"Content-Type: application/json" in head and f"Content-Length: {len(body)}".encode() in head
    assert orjson.loads(body) == {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def test_v2_binary_request_puts_raw_floats_behind_the_header():
    image = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    body, headers = gpu.v2_binary_request("image")(image)
    length = int(headers["Inference-Header-Content-Length"])
    header = orjson.loads(body[:length])
    assert header["inputs"][0]["shape"] == [1, 1, 2, 3] and header["inputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32), image.ravel())


def test_mlp_is_the_same_bytes_every_time_and_batches(tmp_path):
    import onnxruntime

    first = serving.mlp_onnx(tmp_path / "a.onnx", (4, 8, 3)).read_bytes()
    assert serving.mlp_onnx(tmp_path / "b.onnx", (4, 8, 3)).read_bytes() == first
    session = onnxruntime.InferenceSession(first, providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    probabilities = session.run(None, {"features": rows})[0]
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize("name, reason", [(None, "no NVIDIA GPU"), ("NVIDIA H100", "no CUDAExecutionProvider")])
def test_gpu_bench_refuses_in_one_line(monkeypatch, capsys, name, reason):
    import onnxruntime

    monkeypatch.setattr(gpu, "gpu_name", lambda: name)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert gpu.main([]) == 2
    error = capsys.readouterr().err
    assert reason in error and error.count("\n") == 1
