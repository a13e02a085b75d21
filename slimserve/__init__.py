"""slimserve: ONNX and TFLite models behind an API on AWS Lambda and SageMaker, from one config file."""

from importlib.metadata import version

__version__ = version("slimserve")
