"""The inference API's OpenAPI 3 contract, generated from the core's route table.

The same table routes requests in the core and declares the SageMaker models' routes in
the stacks, so the document, the handler and the deployed API cannot drift apart (the
tests hold the stacks' Lambda routes to it too). The local gateway serves it at
`/openapi.json`.
"""

from slimserve.contract.apigw import MAX_BODY_BYTES as GATEWAY_MAX_BODY_BYTES
from slimserve.lambda_handlers.contract import (
    MAX_BODY_BYTES,
    RAW_IMAGE_MEDIA_TYPES,
    RAW_TEXT_MEDIA_TYPE,
    ROUTES,
    SERVER_NAME,
    SERVER_VERSION,
)
from slimserve.lambda_handlers.datatypes import V2_TO_NUMPY
from slimserve.lambda_handlers.jsoncodec import MAX_JSON_DEPTH

_ERROR = {"$ref": "#/components/schemas/Error"}
_GATEWAY_ERROR = {"$ref": "#/components/schemas/GatewayError"}
_TENSOR_DATA = {
    "description": 'flat or nested, row-major; {"b64": ...} strings for BYTES in TF Serving',
    "oneOf": [{"type": "array"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}],
}

SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "description": "names the input, what was expected and what was found",
    },
    "GatewayError": {
        "type": "object",
        "required": ["message"],
        "properties": {"message": {"type": "string"}},
        "description": "API Gateway's own answers: missing key (403), body too large (413), timeouts (504)",
    },
    "Parameters": {"type": "object", "additionalProperties": True},
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": sorted(V2_TO_NUMPY)},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
            "data": _TENSOR_DATA,
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": {"$ref": "#/components/schemas/Parameters"}},
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/RequestOutput"}},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/Parameters"},
            "data": {"type": "array"},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/ResponseOutput"}},
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "description": "-1: dynamic"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string", "enum": [SERVER_NAME]},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "PredictRequest": {
        "type": "object",
        "description": "exactly one of instances (row format) or inputs (columnar)",
        "properties": {"signature_name": {"type": "string"}, "instances": {"type": "array"}, "inputs": {}},
    },
    "PredictResponse": {"type": "object", "properties": {"predictions": {"type": "array"}, "outputs": {}}},
    "Status": {"type": "object"},
}

# what each route answers with success, and its request body if any
_OPERATIONS = {
    "live": ("server is live", {"type": "object", "properties": {"live": {"type": "boolean"}}}, None),
    "server_ready": (
        "every model is ready (503 with the reasons otherwise)",
        {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        None,
    ),
    "server_metadata": ("server metadata", {"$ref": "#/components/schemas/ServerMetadata"}, None),
    "v2_metadata": (
        "model metadata: inputs and outputs with datatypes and shapes",
        {"$ref": "#/components/schemas/ModelMetadata"},
        None,
    ),
    "v2_ready": (
        "the model is ready (503 with the reason otherwise)",
        {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
        None,
    ),
    "v2_infer": (
        "inference (Open Inference Protocol V2, JSON or the binary tensor extension)",
        {"$ref": "#/components/schemas/InferenceResponse"},
        "#/components/schemas/InferenceRequest",
    ),
    "tfs_status": ("model status (TF Serving)", {"$ref": "#/components/schemas/Status"}, None),
    "tfs_metadata": ("signature def (TF Serving)", {"$ref": "#/components/schemas/Status"}, None),
    "tfs_predict": (
        "prediction (TF Serving REST)",
        {"$ref": "#/components/schemas/PredictResponse"},
        "#/components/schemas/PredictRequest",
    ),
}

_NAME_PATTERN = "^[A-Za-z0-9_.-]+$"
_VERSION_PARAMETER = {
    "name": "model_version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": _NAME_PATTERN},
}
_API_KEY = {
    "name": "x-api-key",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "the API key, for models with auth = 'api_key'",
}


def _responses(action: str, success: dict) -> dict:
    error = {"application/json": {"schema": _ERROR}}
    responses = {"200": {"description": "success", "content": {"application/json": {"schema": success}}}}
    if action == "v2_infer":
        responses["200"]["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
        responses["200"]["headers"] = {
            "Inference-Header-Content-Length": {
                "schema": {"type": "integer"},
                "description": "with binary outputs: the JSON header's length in bytes",
            }
        }
    if "{model}" in next(template for _, template, name in ROUTES if name == action):
        responses |= {
            "400": {
                "description": "bad request: malformed or too-deep JSON, unknown or missing inputs, wrong datatype, "
                "shape or element count, bad binary lengths, unsupported Content-Encoding, malformed chunked framing; "
                "a V2 JSON body that does not fit the model's signature, refused by the API before the model runs",
                "content": error,
            },
            "403": {
                "description": "missing or wrong API key",
                "content": {"application/json": {"schema": _GATEWAY_ERROR}},
            },
            "404": {"description": "unknown model, version or route", "content": error},
            "413": {
                "description": f"body over {MAX_BODY_BYTES} bytes at the model "
                f"({GATEWAY_MAX_BODY_BYTES} at the gateway)",
                "content": error,
            },
            "503": {"description": "the model is not loaded, with the reason", "content": error},
        }
    elif action == "server_ready":
        responses["503"] = {"description": "some model is not ready, with the reasons", "content": error}
    return responses


def _operation(method: str, action: str, versioned: bool, models: list[str] | None) -> dict:
    summary, success, request_schema = _OPERATIONS[action]
    template = next(template for _, template, name in ROUTES if name == action)
    name = {
        "name": "model_name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": models} if models else {"type": "string", "pattern": _NAME_PATTERN},
    }
    parameters = ([name] + ([_VERSION_PARAMETER] if versioned else []) + [_API_KEY]) if "{model}" in template else []
    operation = {
        "operationId": f"{action}{'_version' if versioned else ''}",
        "summary": summary,
        "parameters": parameters,
        "responses": _responses(action, success),
    }
    if request_schema:
        content = {"application/json": {"schema": {"$ref": request_schema}}}
        if action == "v2_infer":
            content["application/octet-stream"] = {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "a JSON header, then the tensors' bytes; or, with Inference-Header-Content-Length "
                    "0, the bytes of a one-input model's input alone (a raw binary request)",
                }
            }
            content[RAW_TEXT_MEDIA_TYPE] = {
                "schema": {"type": "string", "description": "the one text of a model whose one input is BYTES"}
            }
            for media_type in RAW_IMAGE_MEDIA_TYPES:
                content[media_type] = {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "the one image of a model converted with --image (its one input is BYTES)",
                    }
                }
            operation["parameters"] = operation["parameters"] + [
                {
                    "name": "Inference-Header-Content-Length",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "the JSON header's length, for the binary tensor extension; 0: no header",
                }
            ]
        operation["requestBody"] = {"required": True, "content": content}
    return operation


def openapi_document(server_url: str | None = None, models: list[str] | None = None) -> dict:
    """The whole contract; `server_url` where the document is served from, `models` the names it serves."""
    paths: dict[str, dict] = {}
    for method, template, action in ROUTES:
        variants = [(template, False)]
        if "{model}" in template:
            variants = [
                (template.replace("{model}", "{model_name}"), False),
                (template.replace("{model}", "{model_name}/versions/{model_version}"), True),
            ]
        for path, versioned in variants:
            paths.setdefault(path, {})[method.lower()] = _operation(method, action, versioned, models)
    document = {
        "openapi": "3.0.3",
        "info": {
            "title": f"{SERVER_NAME} inference API",
            "version": SERVER_VERSION,
            "description": "Open Inference Protocol V2 (REST, with the binary tensor extension) and TF Serving REST, "
            f"for every model. JSON nests at most {MAX_JSON_DEPTH} levels; bodies are limited to "
            f"{MAX_BODY_BYTES} bytes at the model and {GATEWAY_MAX_BODY_BYTES} at the API.",
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document
