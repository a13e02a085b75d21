"""What the serving code and the side that deploys it (the stacks, the local stack, the registry) agree on, written
once: the routes, how the API names a route to a SageMaker endpoint, the environment a model is served from, and the
metrics the handler emits. Standard library only: the stacks import this module, never the serving code.
"""

from .errors import InferenceError, ModelNotReady, RuntimeFailure

SERVER_NAME = "slimserve"
SERVER_VERSION = "0.1.0"
MAX_BODY_BYTES = 6 * 1024 * 1024  # Lambda's synchronous invocation payload limit
FORMATS = ("onnx", "tflite")
"""The model formats served, each also its file suffix (model.onnx, model.tflite)."""

# Every route of both protocols, once: the core matches them, the API declares them for SageMaker
# models, and the OpenAPI document describes them. `{model}` stands for a model's name, optionally
# followed by `/versions/{version}`.
ROUTES = [
    ("GET", "/v2/health/live", "live"),
    ("GET", "/v2/health/ready", "server_ready"),
    ("GET", "/v2", "server_metadata"),
    ("GET", "/v2/models/{model}", "v2_metadata"),
    ("GET", "/v2/models/{model}/ready", "v2_ready"),
    ("POST", "/v2/models/{model}/infer", "v2_infer"),
    ("GET", "/v1/models/{model}", "tfs_status"),
    ("GET", "/v1/models/{model}/metadata", "tfs_metadata"),
    ("POST", "/v1/models/{model}:predict", "tfs_predict"),
]


# A body of one of these types to POST /v2/models/{model}/infer is itself the value of the model's one BYTES input: a
# client with a text or an image posts it as it is, with no JSON around it. Each type names what its body is.
RAW_TEXT_MEDIA_TYPE = "text/plain"
RAW_IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png")
RAW_MEDIA_TYPES = {RAW_TEXT_MEDIA_TYPE: "text", **dict.fromkeys(RAW_IMAGE_MEDIA_TYPES, "image")}


def model_routes(name: str, version: str | None = None) -> list[tuple[str, str]]:
    """A model's (method, path) pairs, unversioned or for one version."""
    model = name if version is None else f"{name}/versions/{version}"
    return [(method, template.replace("{model}", model)) for method, template, _ in ROUTES if "{model}" in template]


# SageMaker's InvokeEndpoint carries one free-form header to the container: the API puts the route in it.
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
ROUTE_ATTRIBUTE = "slimserve-route"


def route_attribute(method: str, path: str) -> str:
    return f"{ROUTE_ATTRIBUTE}={method} {path}"


def endpoint_routes(name: str, version: str) -> list[tuple[str, str]]:
    """The (method, path) pairs the API sends to a model's endpoint: unversioned, and for the one version it serves."""
    return model_routes(name) + model_routes(name, version)


# The environment a model is served from: where its bytes are and what they must hash to.
MODEL_NAME = "SLIMSERVE_MODEL_NAME"
MODEL_VERSION = "SLIMSERVE_MODEL_VERSION"
MODEL_FORMAT = "SLIMSERVE_MODEL_FORMAT"
MODEL_SHA256 = "SLIMSERVE_MODEL_SHA256"
MODEL_BUCKET = "SLIMSERVE_MODEL_BUCKET"
MODEL_KEY = "SLIMSERVE_MODEL_KEY"
MODEL_PATH = "SLIMSERVE_MODEL_PATH"
MODEL_LISTING = "SLIMSERVE_MODEL_LISTING"
"""Set for a version of several files (digests.py): its listing's S3 key or path, beside the model file."""
METRICS_NAMESPACE_VARIABLE = "SLIMSERVE_METRICS_NAMESPACE"
# The SageMaker serving program's address and model folder: SageMaker's own names, and ours for the host.
SAGEMAKER_PORT = "SAGEMAKER_BIND_TO_PORT"
SAGEMAKER_MODEL_DIR = "SM_MODEL_DIR"
SERVER_HOST = "SLIMSERVE_HOST"
MODEL_DIR = "/opt/ml/model"
LOADING = "loading"
"""The reason the serving program's /ping (503) and every request give while its model loads."""


def model_environment(
    name: str,
    version: str,
    model_format: str,
    sha256: str,
    *,
    bucket: str | None = None,
    key: str | None = None,
    path: str | None = None,
    listing: str | None = None,
) -> dict[str, str]:
    """What a function or container serving this model needs to find and verify it: an S3 object or a file, and
    the listing of the version's files where it has several."""
    environment = {MODEL_NAME: name, MODEL_VERSION: version, MODEL_FORMAT: model_format, MODEL_SHA256: sha256}
    if bucket is not None and key is not None:
        environment |= {MODEL_BUCKET: bucket, MODEL_KEY: key}
    if path is not None:
        environment[MODEL_PATH] = path
    if listing is not None:
        environment[MODEL_LISTING] = listing
    return environment


# The handler's CloudWatch metrics (Embedded Metric Format), by name and unit: the stacks graph and alarm on them.
METRICS_NAMESPACE = "Slimserve"
REQUESTS, ERRORS, COLD_START = "Requests", "Errors", "ColdStart"
REQUEST_LATENCY, INFERENCE_LATENCY = "RequestLatency", "InferenceLatency"
MODEL_LOAD_TIME, MODEL_LOAD_FAILURES = "ModelLoadTime", "ModelLoadFailures"
METRIC_UNITS = {
    REQUESTS: "Count",
    ERRORS: "Count",
    COLD_START: "Count",
    REQUEST_LATENCY: "Milliseconds",
    INFERENCE_LATENCY: "Milliseconds",
    MODEL_LOAD_TIME: "Milliseconds",
    MODEL_LOAD_FAILURES: "Count",
}
# Errors are also counted by ErrorKind; these are the server's fault, and page.
SERVER_ERROR_KINDS = (RuntimeFailure.kind, InferenceError.kind, ModelNotReady.kind)
