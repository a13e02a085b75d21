"""A model's V2 inference request as a JSON Schema (draft 4, the one API Gateway's request models take), made from the
model's signature at synth: API Gateway refuses a JSON body with an unknown input or output name, a wrong datatype or
a wrong rank or size before Lambda or SageMaker is invoked and billed. The local gateway checks the same schema.

The schema never refuses what the core would take: it checks names, datatypes and shapes, and leaves to the core what
JSON Schema cannot say (data that fits its shape, every input given once, the values' types). Binary bodies
(application/octet-stream) pass through unchecked: API Gateway applies a model to JSON only.
"""

JSON_MEDIA_TYPE = "application/json"
SCHEMA_DRAFT = "http://json-schema.org/draft-04/schema#"
REFUSED = "request body does not fit the model's signature"
"""How the API's and the local gateway's 400 for a body the schema refuses begins."""
# API Gateway's BAD_REQUEST_BODY answer in the core's {"error": "..."} shape. escapeJavaScript escapes ' as \', which
# JSON does not allow: the replaceAll undoes it.
BAD_REQUEST_BODY_TEMPLATE = (
    '{"error": "'
    + REFUSED
    + ': $util.escapeJavaScript($context.error.validationErrorString).replaceAll("\\\\\'","\'")"}'
)


def _shape(shape: list[int]) -> dict:
    """Rank fixed, each static dimension its size, each dynamic one any size."""
    dimensions = [{"type": "integer", "minimum": 0} if size < 0 else {"enum": [size]} for size in shape]
    return {"type": "array", "minItems": len(shape), "maxItems": len(shape), "items": dimensions}


def _input(spec: dict) -> dict:
    return {
        "properties": {
            "name": {"enum": [spec["name"]]},
            "datatype": {"enum": [spec["datatype"]]},
            "shape": _shape(spec["shape"]),
        }
    }


_PARAMETERS = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}


def v2_request_schema(model: str, signature: dict) -> dict:
    """The schema of a V2 JSON request for a model whose signature (the manifest's `{"inputs": [...], "outputs":
    [...]}`, each tensor `{"name", "datatype", "shape"}` with -1 for a dynamic size) is given."""
    inputs = [_input(spec) for spec in signature["inputs"]]
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {"parameters": _PARAMETERS}}
    if len(inputs) == 1:  # a single set of properties gives API Gateway's clearest messages
        tensor["properties"] |= inputs[0]["properties"]
    else:
        tensor["properties"]["name"] = {"enum": [spec["name"] for spec in signature["inputs"]]}
        tensor["anyOf"] = inputs
    output_names = [spec["name"] for spec in signature["outputs"]]
    return {
        "$schema": SCHEMA_DRAFT,
        "title": f"{model} V2 inference request",
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "minItems": 1, "items": tensor},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"enum": output_names}, "parameters": _PARAMETERS},
                },
            },
        },
    }
