"""The model store's layout: every version under its sha256, beside a manifest.

    models/<name>/<sha256>/model.<onnx|tflite>
    models/<name>/<sha256>/<external data files>    an ONNX model's, under the names it gives them
    models/<name>/<sha256>/files.sha256             where there are such files: the listing the sha256 names
    models/<name>/<sha256>/manifest.json

Content addressing makes a version immutable: the key names the bytes (lambda_handlers/digests.py).
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimserve.lambda_handlers.contract import model_environment
from slimserve.lambda_handlers.digests import LISTING, file_sha256
from slimserve.modelfiles import MANIFEST, ModelFiles, model_files

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
    files: int = 1
    """How many files the version has: more than one, and a listing names them."""

    @property
    def folder(self) -> str:
        """The version's folder in the store (`models/<name>/<sha256>/`): SageMaker mounts it whole."""
        return model_folder(self.name, self.sha256)

    @property
    def listing_key(self) -> str | None:
        return f"{self.folder}{LISTING}" if self.files > 1 else None

    def environment(self) -> dict[str, str]:
        """What a Lambda function serving this model needs to find and verify it."""
        return model_environment(
            self.name,
            self.version,
            self.model_format,
            self.sha256,
            bucket=self.bucket,
            key=self.key,
            listing=self.listing_key,
        )


def file_environment(path: Path) -> dict[str, str]:
    """The same, for a model read from a local file of its own (benchmarks): named by its stem."""
    path = Path(path)
    return model_environment(path.stem, "1", path.suffix.lstrip("."), file_sha256(path), path=str(path))


def model_folder(name: str, sha256: str) -> str:
    return f"models/{name}/{sha256}/"


def model_key(name: str, sha256: str, model_format: str) -> str:
    return f"{model_folder(name, sha256)}model.{model_format}"


def manifest_key(name: str, sha256: str) -> str:
    return f"{model_folder(name, sha256)}{MANIFEST}"


def describe(files: ModelFiles) -> dict:
    """What the store says of a version's files beside the registry's details: the format, the digest, each file
    and the signature."""
    signature = files.signature
    return {
        "format": files.format,
        "sha256": files.sha256,
        "size": files.size,
        "files": [
            {"name": name, "sha256": sha256, "size": files.stored[name].stat().st_size}
            for name, sha256 in files.sha256s.items()
        ],
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
        files = model_files(model.artifact)
        described = {"name": model.name, "source": files.path.name, **describe(files)}
        folder = staging / model_folder(model.name, files.sha256)
        for name, path in files.stored.items():  # copies: onnx refuses external data with several hard links
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / name)
        if files.listing:
            (folder / LISTING).write_bytes(files.listing)
        (folder / MANIFEST).write_text(json.dumps(described, indent=2))
        stored[model.name] = StoredModel(
            model.name,
            files.format,
            bucket,
            model_key(model.name, files.sha256, files.format),
            files.sha256,
            files.size,
            signature=described["signature"],
            files=len(files.stored),
        )
    return stored
