"""Where a function's model comes from: an S3 object is streamed to ephemeral storage and checked as it arrives,
then loaded from its path; a local file is checked where it lies. Nothing is left behind, whatever happens."""

import os
import subprocess
import sys

import numpy as np
import pytest
from support import MODELS, ROOT

from slimserve.lambda_handlers import function
from slimserve.lambda_handlers.digests import file_sha256
from slimserve.lambda_handlers.function import ModelFunction, ModelSource, ModelSourceError
from slimserve.registry.versions import Registry


@pytest.fixture(scope="module")
def stored(s3_store):
    return Registry(s3_store.client(), s3_store.bucket).register(MODELS / "iris.onnx", "iris")[0].stored(s3_store.bucket)


@pytest.fixture
def aws(monkeypatch, s3_store):
    for key, value in s3_store.environment.items():
        monkeypatch.setenv(key, value)


def test_an_s3_model_is_streamed_to_a_file_that_is_gone_once_loaded(aws, stored, tmp_path):
    source = ModelSource.from_environment(stored.environment())
    with source.verified_file(str(tmp_path)) as path:
        assert os.path.dirname(os.path.dirname(path)) == str(tmp_path) and path.endswith("/model.onnx")
        assert open(path, "rb").read() == (MODELS / "iris.onnx").read_bytes()
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_s3_object_is_refused_and_leaves_nothing(aws, s3_store, stored, tmp_path):
    client = s3_store.client()
    original = client.get_object(Bucket=stored.bucket, Key=stored.key)["Body"].read()
    client.put_object(Bucket=stored.bucket, Key=stored.key, Body=original[:-1] + b"\x00")
    try:
        source = ModelSource.from_environment(stored.environment())
        with pytest.raises(ModelSourceError, match=rf"^sha256 of s3://{stored.bucket}/{stored.key} is [0-9a-f]{{64}}, "
                                                   rf"expected {stored.sha256}; refusing to serve it$"):
            with source.verified_file(str(tmp_path)):
                pytest.fail("a file that does not verify was handed on")
    finally:
        client.put_object(Bucket=stored.bucket, Key=stored.key, Body=original)
    assert list(tmp_path.iterdir()) == []


def test_the_function_loads_its_model_from_a_path_and_answers_as_the_runtime(aws, stored, monkeypatch, iris):
    loaded_from = []
    real = function.load_model

    def recording(source, model_format):
        loaded_from.append((source, os.path.exists(source)))
        return real(source, model_format)

    monkeypatch.setattr(function, "load_model", recording)
    served = ModelFunction(stored.environment())
    ((source, existed),) = loaded_from
    assert isinstance(source, str) and existed and not os.path.exists(source)  # a path, never the bytes
    rows = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
    assert served.model.runtime.run({"features": rows}, ["label"])["label"].tolist() == iris.run({"features": rows}, ["label"])["label"].tolist()


def test_a_local_file_is_checked_where_it_lies():
    good = ModelSource("iris", "1", "onnx", file_sha256(MODELS / "iris.onnx"), path=str(MODELS / "iris.onnx"))
    with good.verified_file() as path:
        assert path == str(MODELS / "iris.onnx")
    bad = good._replace(sha256="0" * 64)
    with pytest.raises(ModelSourceError, match="refusing to serve it$"):
        bad.checked_path()
    assert os.path.exists(MODELS / "iris.onnx")  # a local file is never removed


def test_ephemeral_storage_too_small_for_the_model_is_a_load_failure_naming_it(s3_store, stored, tmp_path):
    """A file size limit stands in for a full /tmp: the write fails part way, as it would."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "from lambda_handlers.function import ModelFunction\n"
        "import os\n"
        "served = ModelFunction(os.environ)\n"
        "print(served.model.failure)\n"
    )
    env = {**os.environ, **s3_store.environment, **stored.environment(), "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    failure = result.stdout.strip().splitlines()[-1]
    assert failure.startswith(f"cannot write s3://{stored.bucket}/{stored.key} to {tmp_path}/iris-")
    assert failure.endswith(": File too large; the function's ephemeral storage must hold the model")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_s3_object_is_a_failure_naming_it_and_leaves_nothing(aws, stored, tmp_path):
    source = ModelSource.from_environment({**stored.environment(), "SLIMSERVE_MODEL_KEY": "models/iris/nowhere/model.onnx"})
    with pytest.raises(ModelSourceError, match=rf"^cannot fetch s3://{stored.bucket}/models/iris/nowhere/model.onnx: NoSuchKey"):
        with source.verified_file(str(tmp_path)):
            pytest.fail("nothing to hand on")
    assert list(tmp_path.iterdir()) == []
