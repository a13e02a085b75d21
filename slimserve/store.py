"""The model store's layout: every version under its sha256, beside a manifest.

    models/<name>/<sha256>/model.<onnx|tflite>
    models/<name>/<sha256>/manifest.json

Content addressing makes a version immutable: the key names the bytes.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lambda_handlers.runtimes import load_model

from .config import ModelConfig


@dataclass(frozen=True)
class StoredModel:
    name: str
    model_format: str
    bucket: str
    key: str
    sha256: str
    size: int

    def environment(self, version: str = "1") -> dict[str, str]:
        """What a Lambda function serving this model needs to find and verify it."""
        return {
            "SLIMSERVE_MODEL_NAME": self.name,
            "SLIMSERVE_MODEL_VERSION": version,
            "SLIMSERVE_MODEL_FORMAT": self.model_format,
            "SLIMSERVE_MODEL_BUCKET": self.bucket,
            "SLIMSERVE_MODEL_KEY": self.key,
            "SLIMSERVE_MODEL_SHA256": self.sha256,
        }


def model_key(name: str, sha256: str, model_format: str) -> str:
    return f"models/{name}/{sha256}/model.{model_format}"


def manifest(model: ModelConfig, data: bytes, sha256: str, stamped: bool = True) -> dict:
    """What the store says about a version; unstamped (no `created`) where uploads must be reproducible."""
    signature = load_model(data, model.format).signature
    stamp = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} if stamped else {}
    return {
        "name": model.name,
        "format": model.format,
        "sha256": sha256,
        "size": len(data),
        "source": Path(model.artifact).name,
        **stamp,
        "signature": {
            "inputs": [spec.describe() for spec in signature.inputs],
            "outputs": [spec.describe() for spec in signature.outputs],
        },
    }


def upload_model(s3, bucket: str, model: ModelConfig) -> StoredModel:
    data = Path(model.artifact).read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    key = model_key(model.name, sha256, model.format)
    s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
    s3.put_object(
        Bucket=bucket,
        Key=key.rsplit("/", 1)[0] + "/manifest.json",
        Body=json.dumps(manifest(model, data, sha256), indent=2).encode(),
        ContentType="application/json",
    )
    return StoredModel(model.name, model.format, bucket, key, sha256, len(data))
