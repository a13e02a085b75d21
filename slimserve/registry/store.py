"""The model store's layout: every version under its sha256, beside a manifest.

    models/<name>/<sha256>/model.<onnx|tflite>
    models/<name>/<sha256>/manifest.json

Content addressing makes a version immutable: the key names the bytes.
"""

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimserve.lambda_handlers.contract import model_environment
from slimserve.lambda_handlers.runtimes import load_model

if TYPE_CHECKING:
    from slimserve.config import ModelConfig


@dataclass(frozen=True)
class StoredModel:
    name: str
    model_format: str
    bucket: str
    key: str
    sha256: str
    size: int
    version: str = "1"
    """The registry's number for these bytes; "1" for a model deployed from its file."""
    signature: dict | None = None
    """The manifest's signature (`{"inputs": [...], "outputs": [...]}`), which the API checks JSON requests against;
    None where it is not known (a lock written before locks recorded it): the API then leaves every check to the
    model."""

    @property
    def folder(self) -> str:
        """The version's folder in the store (`models/<name>/<sha256>/`): SageMaker mounts it whole."""
        return model_folder(self.name, self.sha256)

    def environment(self) -> dict[str, str]:
        """What a Lambda function serving this model needs to find and verify it."""
        return model_environment(
            self.name, self.version, self.model_format, self.sha256, bucket=self.bucket, key=self.key
        )


def file_environment(path: Path) -> dict[str, str]:
    """The same, for a model read from a local file (benchmarks, the SageMaker container): named by its stem."""
    path = Path(path)
    return model_environment(
        path.stem, "1", path.suffix.lstrip("."), hashlib.sha256(path.read_bytes()).hexdigest(), path=str(path)
    )


MANIFEST = "manifest.json"


def model_folder(name: str, sha256: str) -> str:
    return f"models/{name}/{sha256}/"


def model_key(name: str, sha256: str, model_format: str) -> str:
    return f"{model_folder(name, sha256)}model.{model_format}"


def manifest_key(name: str, sha256: str) -> str:
    return f"{model_folder(name, sha256)}{MANIFEST}"


def manifest(name: str, model_format: str, data: bytes, source: str, **details) -> dict:
    """What the store says about a version's bytes; `details` (version, created, ...) come from the registry."""
    signature = load_model(data, model_format).signature
    return {
        "name": name,
        "format": model_format,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "source": source,
        **details,
        "signature": {
            "inputs": [spec.describe() for spec in signature.inputs],
            "outputs": [spec.describe() for spec in signature.outputs],
        },
    }


def stage_uploads(models: "list[ModelConfig]", staging: Path, bucket: str) -> dict[str, StoredModel]:
    """The models' files laid out under `staging` as the store holds them, for a deploy to upload: the keys and
    manifests the registry writes, without a creation time or version number, so that the same bytes give the same
    asset on every synth."""
    shutil.rmtree(staging, ignore_errors=True)
    stored = {}
    for model in models:
        data = Path(model.artifact).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        key = model_key(model.name, sha256, model.format)
        target = staging / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        described = manifest(model.name, model.format, data, Path(model.artifact).name)
        (target.parent / MANIFEST).write_text(json.dumps(described, indent=2))
        stored[model.name] = StoredModel(
            model.name, model.format, bucket, key, sha256, len(data), signature=described["signature"]
        )
    return stored
