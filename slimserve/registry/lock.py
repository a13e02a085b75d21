"""`slimserve.lock`: the registered versions a config deploys, resolved once so that synth needs no S3.

A model with `version = "live"` (or a number, or a sha256 prefix) deploys that version's bytes,
already in the model store, instead of uploading its artifact. `slimserve lock` asks the
registry which bytes the reference names and writes them down beside the config; synth
reads only that file, offline, and refuses a reference the file does not settle. Commit
the lock: a changed lock is a new function version, which CodeDeploy shifts traffic to.
"""

import json
import os
from pathlib import Path

from slimserve.config import AppConfig, ConfigError
from slimserve.registry.store import StoredModel
from slimserve.registry.versions import LOCAL_STORE, Registry, RegistryError, Version

ALLOW_LOCAL_LOCK = "SLIMSERVE_ALLOW_LOCAL_LOCK"
"""Set to 1, synth takes a lock resolved against a local store (a test, an emulator); otherwise it refuses it."""


def lock_path(config: AppConfig) -> Path:
    return config.path.with_suffix(".lock")


def write_lock(config: AppConfig, registry: Registry) -> dict[str, Version]:
    """Resolve every model's `version` against the registry and write the lock; nothing is written on an error."""
    resolved, entries = {}, {}
    for model in config.models:
        if model.version is None:
            continue
        try:
            version = registry.version(model.name, model.version)
        except RegistryError as error:
            raise ConfigError(f"{config.path}: models.{model.name}.version: {error}") from None
        if version.format != model.format:
            raise ConfigError(
                f"{config.path}: models.{model.name}.version: version {version.number} is a {version.format} "
                f"model, but the config says format {model.format!r}"
            )
        resolved[model.name] = version
        entries[model.name] = {
            "ref": model.version,
            "version": version.number,
            "sha256": version.sha256,
            "format": version.format,
            "size": version.size,
            "files": version.files,
            "signature": version.signature,  # the API's request check, offline at synth
        }
    lock_path(config).write_text(
        json.dumps({"store": registry.store, "models": entries}, indent=2, sort_keys=True) + "\n"
    )
    return resolved


def read_lock(config: AppConfig) -> dict:
    """The lock's store and entries ({} for a config without a lock)."""
    path = lock_path(config)
    try:
        lock = json.loads(path.read_text()) if path.exists() else {"store": None, "models": {}}
        if not {"store", "models"} <= lock.keys():
            raise KeyError("expected the keys store and models")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: not a slimserve lock ({error}); run `slimserve lock` to write it again") from None
    return lock


def locked_models(config: AppConfig, bucket: str) -> dict[str, StoredModel]:
    """The stored versions the lock settles for the models with a `version`, in the stack's `bucket`."""
    path = lock_path(config)
    lock = read_lock(config)
    entries = lock["models"]
    if entries and lock["store"] == LOCAL_STORE and os.environ.get(ALLOW_LOCAL_LOCK) != "1":
        raise ConfigError(
            f"{path}: resolved against the local store, whose versions exist on this machine only: a deployed "
            "function would find no object. Lock against the deployed store (`slimserve lock --profile P "
            f"--region R --bucket BUCKET`), or set {ALLOW_LOCAL_LOCK}=1 to synth it anyway (an emulator, a test)"
        )
    stored = {}
    for model in config.models:
        if model.version is None:
            continue
        entry = entries.get(model.name)
        if entry is None or entry.get("ref") != model.version:
            found = "nothing" if entry is None else f"a lock for {entry.get('ref')!r}"
            raise ConfigError(
                f"{config.path}: models.{model.name}.version: expected {path.name} to settle {model.version!r}, "
                f"found {found}; run `slimserve lock` to resolve it against the model store"
            )
        version = Version(
            model.name,
            entry["version"],
            entry["sha256"],
            entry["format"],
            entry["size"],
            "",
            "",
            entry.get("signature"),
            entry.get("files", 1),  # locks before external data: one file
        )
        stored[model.name] = version.stored(bucket)
    return stored
