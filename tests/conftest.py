"""The tests' fixtures; the helpers they share are in support.py."""

import hashlib

import pytest
from support import IDENTITY_TYPES, MODELS, ROOT, identity_onnx, running_stack

from slimserve import cdk_cli
from slimserve.lambda_handlers.core import InferenceCore, ServedModel
from slimserve.lambda_handlers.runtimes import OnnxModel, TfliteModel

cdk_cli.use_bundled_node()  # before any test module imports aws_cdk


@pytest.fixture(scope="session")
def iris() -> OnnxModel:
    return OnnxModel(MODELS / "iris.onnx")


@pytest.fixture(scope="session")
def digits() -> TfliteModel:
    return TfliteModel(MODELS / "digits.tflite")


@pytest.fixture(scope="session")
def identity() -> OnnxModel:
    return OnnxModel(identity_onnx(IDENTITY_TYPES))


@pytest.fixture(scope="session")
def core(iris, digits, identity) -> InferenceCore:
    return InferenceCore(
        [
            ServedModel("iris", "1", runtime=iris),
            ServedModel("digits", "1", runtime=digits),
            ServedModel("identity", "1", runtime=identity),
        ]
    )


@pytest.fixture(scope="session")
def iris_test_split():
    from slimserve.modeltools.examples import iris_split

    _, test_x, _, test_y = iris_split()
    return test_x, test_y


@pytest.fixture(scope="session")
def digits_test_split():
    from slimserve.modeltools.examples import digits_split

    _, test_x, _, test_y = digits_split()
    return test_x, test_y


@pytest.fixture(scope="session")
def s3_store():
    from slimserve.local.s3 import local_s3

    with local_s3() as store:
        yield store


@pytest.fixture
def registry(s3_store, request):
    """A registry on a bucket of this test's own in the session's S3."""
    from slimserve.registry.versions import Registry

    bucket = f"registry-{hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]}"
    client = s3_store.client()
    client.create_bucket(Bucket=bucket)
    return Registry(client, bucket)


@pytest.fixture(scope="module")
def mixed_stack(tmp_path_factory):
    """The same model on Lambda (`iris`) and on a SageMaker endpoint (`iris-gpu`), behind one gateway."""
    with running_stack(ROOT / "examples" / "with-sagemaker.toml", tmp_path_factory.mktemp("mixed")) as running:
        yield running
