"""The model registry: versions in the model store under their sha256, aliases that move between them.

    models/<name>/<sha256>/model.<format>      the model, immutable (with its external data files and their
                                               listing, files.sha256, where it has any: store.py)
    models/<name>/<sha256>/manifest.json       what they are (version number, signature, sizes, source, ...)
    models/<name>/aliases/<alias>.json         which version an alias points at, and where it pointed before

A version is served only if its files still hash to the digest they are stored under.
"""

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimserve.config import model_name_problem
from slimserve.errors import UserError
from slimserve.lambda_handlers.contract import FORMATS
from slimserve.lambda_handlers.digests import LISTING
from slimserve.lambda_handlers.function import ModelSource, ModelSourceError
from slimserve.lambda_handlers.runtimes import ModelLoadError
from slimserve.modelfiles import ModelFiles, ModelFilesError, model_files
from slimserve.registry.store import MANIFEST, StoredModel, describe, manifest_key, model_key

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".sav")
SUFFIX_FORMATS = {f".{model_format}": model_format for model_format in FORMATS}
MULTIPART_BYTES = 64 * 2**20
"""Files from this size up are uploaded in parts of this size, several at once; a failed part is sent again alone."""

Progress = Callable[[str, int, int], None]
"""Called as a file uploads: (its name in the version's folder, bytes sent so far, its size)."""


class RegistryError(UserError):
    """A model that cannot be registered, or a version or alias that does not exist; the message says which."""


@dataclass(frozen=True)
class Version:
    name: str
    number: int
    sha256: str
    format: str
    size: int
    created: str
    source: str
    signature: dict | None = None
    files: int = 1

    @property
    def key(self) -> str:
        return model_key(self.name, self.sha256, self.format)

    def stored(self, bucket: str) -> StoredModel:
        return StoredModel(
            self.name,
            self.format,
            bucket,
            self.key,
            self.sha256,
            self.size,
            str(self.number),
            self.signature,
            self.files,
        )

    def environment(self, bucket: str) -> dict[str, str]:
        """What a Lambda function serving this version needs to find and verify it."""
        return self.stored(bucket).environment()

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Version":
        return cls(
            manifest["name"],
            manifest["version"],
            manifest["sha256"],
            manifest["format"],
            manifest["size"],
            manifest["created"],
            manifest["source"],
            manifest.get("signature"),
            len(manifest.get("files", [None])),  # manifests before external data had one file, unlisted
        )


def read_model(path: Path) -> ModelFiles:
    """The artifact's files, checked to load as serving loads them, or a RegistryError naming the file and why."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or (path.is_file() and _first_byte(path) == b"\x80"):
        raise RegistryError(
            f"{path}: looks like a pickle; slimserve serves only ONNX and TFLite files, never pickle "
            "(unpickling runs arbitrary code): convert it first"
        )
    if not path.is_dir() and path.suffix.lower() not in SUFFIX_FORMATS:
        raise RegistryError(
            f"{path}: unknown model format {path.suffix or '(no suffix)'!r}; expected one of "
            f"{', '.join(SUFFIX_FORMATS)} ({', '.join(FORMATS)})"
        )
    try:
        files = model_files(path)
    except ModelFilesError as error:
        raise RegistryError(str(error)) from None
    try:
        files.signature  # loads it; `describe` reuses what it read
    except ModelLoadError as error:
        raise RegistryError(f"{files.path}: not a loadable {files.format} model: {error}") from None
    return files


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(1)


def _git_commit(path: Path) -> str | None:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(path).resolve().parent, capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else None


LOCAL_STORE = "local"
"""What a lock says of versions resolved against a local store: they exist on this machine only."""
LIVE_ALIAS = "live"
"""The alias that says which version serves: a running local stack follows it within a second; a deploy serves it
once a config with `version = "live"` is locked (`slimserve lock`) and deployed."""


HISTORY = 50
"""How many earlier versions an alias remembers."""


def alias_key(name: str, alias: str) -> str:
    return f"models/{name}/aliases/{alias}.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _entry(version: int, sha256: str, since: str | None) -> dict:
    """A version as an alias's record keeps it: the number, the bytes, and since when (None: before the alias)."""
    return {"version": version, "sha256": sha256, "since": since}


def _inputs_text(signature: dict) -> str:
    return ", ".join(f"{i['name']} {i['datatype']} {i['shape']}" for i in signature["inputs"])


class Registry:
    def __init__(self, s3, bucket: str, deployed: bool = False):
        """`deployed`: the store of a deployed stack (its bucket in an AWS account), not a local one."""
        self.s3 = s3
        self.bucket = bucket
        self.store = f"s3://{bucket}" if deployed else LOCAL_STORE

    def _get(self, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def _put_json(self, key: str, value: dict) -> None:
        self.s3.put_object(
            Bucket=self.bucket, Key=key, Body=json.dumps(value, indent=2).encode(), ContentType="application/json"
        )

    def register(
        self,
        path: Path,
        name: str,
        report: dict | None = None,
        allow_signature_change: bool = False,
        progress: Progress | None = None,
    ) -> tuple[Version, bool]:
        """Upload a version file by file; the same files again are the same version. Returns (version, newly
        registered). A version whose inputs differ from those of the version clients are served now (`live`, else
        the newest) would break them when promoted: refused unless `allow_signature_change`."""
        if model_name_problem(name):
            raise RegistryError(f"--name: {model_name_problem(name)}, as in the config")
        files = read_model(path)
        versions = self.versions(name)
        existing = next((v for v in versions if v.sha256 == files.sha256), None)
        if existing is not None:
            return existing, False
        details = {
            "name": name,
            "version": max((v.number for v in versions), default=0) + 1,
            "created": _now(),
            "source": files.path.name,
            "git_commit": _git_commit(files.path),
            "optimization": report,
            **describe(files),
        }
        if versions and not allow_signature_change:
            self._check_inputs_unchanged(name, versions, path, details["signature"])
        self._upload(name, files, progress)
        self._put_json(manifest_key(name, files.sha256), details)  # last: a version exists once it is whole
        return Version.from_manifest(details), True

    def _upload(self, name: str, files: ModelFiles, progress: Progress | None) -> None:
        """Each file under the version's folder, in parts from MULTIPART_BYTES, with its SHA-256 checksum, which S3
        checks on arrival; the listing after the files it names."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        folder = model_key(name, files.sha256, files.format).rpartition("/")[0]
        for stored_name, path in files.stored.items():
            size, sent = path.stat().st_size, 0

            def sent_more(count: int, stored_name=stored_name, size=size) -> None:
                nonlocal sent
                sent += count
                if progress is not None:
                    progress(stored_name, sent, size)

            self.s3.upload_file(
                str(path),
                self.bucket,
                f"{folder}/{stored_name}",
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=config,
                Callback=sent_more,
            )
        if files.listing:
            self.s3.put_object(
                Bucket=self.bucket, Key=f"{folder}/{LISTING}", Body=files.listing, ChecksumAlgorithm="SHA256"
            )

    def _check_inputs_unchanged(self, name: str, versions: list[Version], path: Path, signature: dict) -> None:
        try:
            live = self.alias(name, LIVE_ALIAS)["sha256"]
        except RegistryError:
            live = None
        served = next((v for v in versions if v.sha256 == live), versions[-1])
        served_signature = json.loads(self._get(manifest_key(name, served.sha256)))["signature"]
        if served_signature["inputs"] != signature["inputs"]:
            raise RegistryError(
                f"{path}: its inputs ({_inputs_text(signature)}) differ from those of {name} version "
                f"{served.number} ({_inputs_text(served_signature)}), which clients are sent now; "
                "--allow-signature-change registers it anyway"
            )

    def versions(self, name: str) -> list[Version]:
        found = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"models/{name}/"):
            for item in page.get("Contents", []):
                if item["Key"].endswith(f"/{MANIFEST}") and "/aliases/" not in item["Key"]:
                    manifest = json.loads(self._get(item["Key"]))
                    if "version" in manifest:
                        found.append(Version.from_manifest(manifest))
        return sorted(found, key=lambda v: v.number)

    def version(self, name: str, ref: str) -> Version:
        """A version by number, by sha256 (or a unique prefix of 8+), or by alias."""
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"model {name!r} has no registered versions")
        if ref.isdigit():
            match = [v for v in versions if v.number == int(ref)]
        elif len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref):
            match = [v for v in versions if v.sha256.startswith(ref)]
        else:
            alias = self.alias(name, ref)
            match = [v for v in versions if v.sha256 == alias["sha256"]]
        if len(match) != 1:
            known = ", ".join(str(v.number) for v in versions)
            raise RegistryError(f"model {name!r} has no version {ref!r}; versions: {known}")
        return match[0]

    def alias(self, name: str, alias: str) -> dict:
        raw = self._get(alias_key(name, alias))
        if raw is None:
            raise RegistryError(f"model {name!r} has no alias {alias!r}")
        return json.loads(raw)

    def aliases(self, name: str) -> dict[str, dict]:
        """Every alias of the model, by name."""
        found = {}
        prefix = alias_key(name, "").removesuffix(".json")
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                alias = item["Key"][len(prefix) :].removesuffix(".json")
                found[alias] = self.alias(name, alias)
        return found

    def set_alias(self, name: str, alias: str, ref: str, served: Version | None = None) -> tuple[int | None, int]:
        """Point `alias` at a version; returns (previous number or None, new number). `served`: the version that
        serves in the alias's place while it does not exist yet (the config's, for `live`): the history starts with
        it, so the first promotion can be rolled back too."""
        target = self.version(name, ref)
        try:
            current = self.alias(name, alias)
        except RegistryError:
            current = None
        if current is not None and current["sha256"] == target.sha256:
            return current["version"], target.number  # already there: its history is not a step to undo
        if current is not None:
            history = [_entry(current["version"], current["sha256"], current.get("since"))] + current["history"]
        elif served is not None and served.number != target.number:
            history = [_entry(served.number, served.sha256, None)]
        else:
            history = []
        self._put_json(
            alias_key(name, alias), {**_entry(target.number, target.sha256, _now()), "history": history[:HISTORY]}
        )
        return (current["version"] if current else served.number if served else None), target.number

    def rollback(self, name: str, alias: str = LIVE_ALIAS) -> tuple[int, int]:
        """Point `alias` back at the version it pointed at before the current one, a step back in time; returns
        (from, to). The version rolled back from leaves the history: a second rollback goes further back, never to
        it (moving forward again is `alias`)."""
        current = self.alias(name, alias)
        earlier = [entry for entry in current["history"] if entry["sha256"] != current["sha256"]]
        if not earlier:
            raise RegistryError(
                f"alias {alias!r} of model {name!r} points at version {current['version']} and has no "
                "earlier version in its history; nothing to roll back to"
            )
        previous, *older = earlier
        self._put_json(
            alias_key(name, alias), {**_entry(previous["version"], previous["sha256"], _now()), "history": older}
        )
        return current["version"], previous["version"]

    def download(self, name: str, ref: str, folder: Path) -> Path:
        """The version's files in `folder` as the store holds them (its listing too), each refused unless it still
        hashes to what was registered; the model file's path."""
        version = self.version(name, ref)
        stored = version.stored(self.bucket)
        source = ModelSource(
            name,
            str(version.number),
            version.format,
            version.sha256,
            self.bucket,
            version.key,
            listing=stored.listing_key,
        )
        try:
            return Path(source.download(str(folder), self.s3))
        except ModelSourceError as error:
            raise RegistryError(f"model {name!r} version {version.number}: {error}") from None
