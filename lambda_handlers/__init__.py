"""The runtime: what runs inside a Lambda function and the SageMaker serving image.

Standard library, numpy and the model runtime only; modules import each other relatively, so
the same folder is the top-level package `lambda_handlers` in a function and the image.

- shared by every front door: contract (what the deploy side agrees on), core (routing,
  limits, errors), v2 and tfserving (the protocols), datatypes, tensors, jsoncodec, errors,
  runtimes (ONNX Runtime, LiteRT), telemetry (logs and EMF metrics), wire (HTTP servers)
- Lambda only: handler (the entry point), function (one model per function), events
- SageMaker only: sagemaker_server (the serving program), batching
"""
