"""The local stack: layers, a local S3, a Lambda-faithful runner per Lambda model, the SageMaker serving
program per SageMaker model, and a gateway in front."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from slimserve.assets import LAMBDA_PACKAGE, function_bundle
from slimserve.config import AppConfig, ModelConfig
from slimserve.lambda_handlers.contract import (
    LOADING,
    MODEL_VERSION,
    SAGEMAKER_MODEL_DIR,
    SAGEMAKER_PORT,
    SERVER_HOST,
    endpoint_routes,
    model_environment,
)
from slimserve.layers.builder import build_layer
from slimserve.local.gateway import EndpointRoute, LocalGateway, Route
from slimserve.local.runner import FunctionPool, FunctionSpec, lambda_python, spawn
from slimserve.local.s3 import claim_port, free_port, local_s3
from slimserve.local.state import claim_project, write_state
from slimserve.registry.versions import LIVE_ALIAS, Registry, RegistryError, Version

LAMBDA_PYTHON = "3.12"


def layer_runtime(model_format: str, python_version: str) -> str:
    """Which layer a model needs: LiteRT from python3.12 on, tflite-runtime before."""
    if model_format == "tflite" and python_version == "3.11":
        return "tflite-py311"
    return model_format


class ModelVersions:
    """Every registered version of a model, each in functions of its own started on first use, as Lambda versions are.

    Requests without a version go to the version the registry's `live` alias names (looked up at most once a
    second), or to the config's version while there is no such alias.
    """

    ALIAS_TTL_S = 1.0

    def __init__(self, registry: Registry, name: str, default: Version, make_pool: Callable[[Version], FunctionPool]):
        self.registry, self.name, self.make_pool = registry, name, make_pool
        self.default = default.number
        self.pools = {default.number: make_pool(default)}
        self.lock = threading.Lock()
        self.live: tuple[float, int | None] = (0.0, None)

    def _live(self) -> int:
        checked, number = self.live
        if time.monotonic() - checked > self.ALIAS_TTL_S:
            try:
                number = self.registry.alias(self.name, LIVE_ALIAS)["version"]
            except RegistryError:
                number = None
            self.live = (time.monotonic(), number)
        return number or self.default

    def pick(self, ref: str | None) -> tuple[FunctionPool, int]:
        try:
            version = self.registry.version(self.name, ref) if ref is not None else None
        except RegistryError as error:
            raise LookupError(str(error)) from None
        number = version.number if version else self._live()
        with self.lock:
            if number not in self.pools:
                self.pools[number] = self.make_pool(version or self.registry.version(self.name, str(number)))
            return self.pools[number], number

    def close(self) -> None:
        with self.lock:
            pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            pool.close()


class LocalEndpoint:
    """A SageMaker model's serving program in a process, as SageMaker runs the container: the version's files
    copied from the store into a model folder of its own, the port from SAGEMAKER_BIND_TO_PORT, CPU only.
    A program that exits unasked is started again on the same port, as SageMaker replaces a failed container."""

    START_TIMEOUT_S = 60.0

    def __init__(self, name: str, version: Version, model_dir: Path, work_dir: Path, code: Path, log=print):
        """`model_dir` holds the version's files as the store does; `code` holds the lambda_handlers package, as
        /opt/slimserve does in the image; `work_dir` is absolute."""
        self.name, self.log, self.code = name, log, code
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = work_dir / f"{name}.log"
        self.environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(code),
            "PYTHONUNBUFFERED": "1",
            SAGEMAKER_PORT: str(port),
            SERVER_HOST: "127.0.0.1",
            SAGEMAKER_MODEL_DIR: str(model_dir),
            **model_environment(name, str(version.number), version.format, version.sha256),
        }
        self.closing = threading.Event()
        self.healthy = threading.Event()
        """Set while the program is up and past `loading`: SageMaker routes nothing to a container before that."""
        self.restarts = 0
        self._start()
        threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True).start()

    def _start(self) -> None:
        self.healthy.clear()
        with open(self.log_path, "ab") as log_file:
            self.process = spawn(
                [sys.executable, "-m", f"{LAMBDA_PACKAGE}.sagemaker_server", "serve"],
                self.code,
                self.environment,
                log_file,
            )
        self._wait_until_up()
        self.healthy.set()

    def _wait_until_up(self) -> None:
        """Up means /ping answers other than `loading`: a model that failed to load answers 503 with its reason, as
        on SageMaker."""
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: the serving program exited ({self.process.returncode}); see {self.log_path}"
                )
            try:
                urllib.request.urlopen(f"{self.url}/ping", timeout=1).close()
                return
            except urllib.error.HTTPError as error:
                if json.loads(error.read() or b"{}").get("error") != LOADING:
                    return
                time.sleep(0.05)
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError(
            f"{self.name}: the serving program did not answer /ping within {self.START_TIMEOUT_S:.0f} s; "
            f"see {self.log_path}"
        )

    def _watch(self) -> None:
        while not self.closing.is_set():
            code = self.process.wait()
            if self.closing.is_set():
                return
            self.restarts += 1
            self.log(f"{self.name}: the serving program exited ({code}); starting it again (restart {self.restarts})")
            try:
                self._start()
            except RuntimeError as error:
                self.log(str(error))
                return

    def close(self) -> None:
        """SIGTERM, as SageMaker stops a container: requests in flight finish first."""
        self.closing.set()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class EndpointVersions:
    """A SageMaker model's serving program, moved to the version the `live` alias names as a deploy moves an
    endpoint, blue/green: the new version's program starts beside the old one, requests go to it once it answers
    /ping, and the old one then stops, answering what it has in flight first. A version that cannot start is logged
    and the old one keeps serving."""

    def __init__(self, model: ModelConfig, version: Version, registry: Registry, work_dir: Path, code: Path, log):
        self.model, self.registry, self.work_dir, self.code, self.log = model, registry, work_dir, code, log
        self.default = version.number
        self.failed: set[int] = set()
        self.closing = threading.Event()
        self.endpoint, self.route = self._start(version)

    def _start(self, version: Version) -> tuple[LocalEndpoint, EndpointRoute]:
        name = self.model.name
        model_dir = self.work_dir / f"{name}-model-{version.number}"
        shutil.rmtree(model_dir, ignore_errors=True)  # as SageMaker mounts one version's folder, nothing else
        self.registry.download(name, str(version.number), model_dir)
        endpoint = LocalEndpoint(name, version, model_dir, self.work_dir, self.code, self.log)
        self.log(
            f"{name}: SageMaker serving program on the CPU at {endpoint.url} (version {version.number}), "
            f"logs in {endpoint.log_path}"
        )
        route = EndpointRoute(
            endpoint.url,
            frozenset(endpoint_routes(name, str(version.number))),
            api_key_required=self.model.auth == "api_key",
            version=str(version.number),
            signature=version.signature,
            healthy=endpoint.healthy.is_set,
        )
        return endpoint, route

    def follow(self, switch: Callable[[EndpointRoute], None]) -> None:
        """From now on, move to `live`'s version when it changes; `switch` puts a new route in the gateway."""
        threading.Thread(target=self._follow, args=(switch,), name=f"{self.model.name}-follow", daemon=True).start()

    def _follow(self, switch: Callable[[EndpointRoute], None]) -> None:
        while not self.closing.wait(ModelVersions.ALIAS_TTL_S):
            try:
                number = self.registry.alias(self.model.name, LIVE_ALIAS)["version"]
            except RegistryError:
                number = self.default
            except Exception as error:  # the store unreachable or its alias unreadable: the old version serves on
                self.log(f"{self.model.name}: cannot read the {LIVE_ALIAS} alias ({error}); serving on as before")
                continue
            if str(number) == self.route.version or number in self.failed:
                continue
            try:
                endpoint, route = self._start(self.registry.version(self.model.name, str(number)))
            except (RegistryError, RuntimeError) as error:
                self.failed.add(number)
                self.log(
                    f"{self.model.name}: version {number} not started ({error}); version {self.route.version} serves on"
                )
                continue
            old = self.endpoint
            self.endpoint, self.route = endpoint, route
            switch(route)
            old.close()
            shutil.rmtree(old.environment[SAGEMAKER_MODEL_DIR], ignore_errors=True)
            self.log(f"{self.model.name}: now serving version {number} (was {old.environment[MODEL_VERSION]})")
            if self.closing.is_set():
                endpoint.close()

    def close(self) -> None:
        self.closing.set()
        self.endpoint.close()


class LocalStack:
    """Everything `slimserve serve` starts, stopped together by `close` (or leaving the `with`)."""

    def __init__(
        self,
        config: AppConfig,
        host: str = "127.0.0.1",
        port: int = 8080,
        log=print,
        work_dir: Path | None = None,
        api_key: str | None = None,
        s3_port: int | None = None,
    ):
        """`work_dir` (default: the project's `local_dir`) holds the functions' code, the models' folders, the logs."""
        self.config = config
        self.log = log
        self.resources = contextlib.ExitStack()
        try:
            self._start(host, port, Path(work_dir or config.local_dir).resolve(), api_key, s3_port)
        except BaseException:
            self.resources.close()
            raise

    def _start(self, host: str, port: int, work_dir: Path, api_key: str | None, s3_port: int | None) -> None:
        self.resources.enter_context(claim_project(work_dir, self.config.path))
        claim_port(host, port, "--port", "pass another with --port")  # before the slow start, not after it
        python, version, note = lambda_python(LAMBDA_PYTHON)
        self.log(note)
        runtime_dir = build_layer("lambda-runtime", version, log=self.log).python_path
        self.task_root = task_root = function_bundle(work_dir / "function", python)
        s3 = self.resources.enter_context(local_s3(port=s3_port, keep=work_dir / "store"))
        self.log(f"local S3 (moto) at {s3.endpoint}, bucket {s3.bucket}")
        self.registry = registry = Registry(s3.client(), s3.bucket)
        self.versions: dict[str, ModelVersions] = {}  # the Lambda models' functions
        self.endpoints: dict[str, EndpointVersions] = {}  # the SageMaker models' serving programs
        routes = {}
        for model in self.config.models:
            if model.target == "sagemaker":
                routes[model.name] = self._endpoint(model, work_dir)
                continue
            if model.architecture != "x86_64" and os.uname().machine == "x86_64":
                self.log(f"{model.name}: configured for {model.architecture}; runs as x86_64 here")
            layer = build_layer(layer_runtime(model.format, version), version, log=self.log)
            registered = self._deployed_version(model)
            name = f"{self.config.name}-{model.name}"

            def make_pool(version: Version, model=model, name=name, layer=layer) -> FunctionPool:
                return FunctionPool(
                    FunctionSpec(
                        name=name,
                        python=python,
                        task_root=task_root,
                        layer=layer.python_path,
                        runtime_dir=runtime_dir,
                        environment={**s3.environment, **version.environment(s3.bucket)},
                        memory_mb=model.memory_mb,
                        timeout_s=model.timeout_s,
                        concurrency=model.reserved_concurrency or 10,
                        log_path=work_dir / f"{name}.log",
                    ),
                    report=self.log,
                )

            versions = self.versions[model.name] = ModelVersions(registry, model.name, registered, make_pool)
            self.resources.callback(versions.close)
            routes[model.name] = Route(
                versions.pools[registered.number],
                api_key_required=model.auth == "api_key",
                versions=versions,
                signature=registered.signature,
            )
            self.log(
                f"{model.name}: {model.format} on layer {Path(layer.path).name} "
                f"({layer.slim_bytes / 2**20:.1f} MiB), logs in {work_dir / f'{name}.log'}"
            )
            if model.auth == "iam":
                self.log(f"{model.name}: IAM auth is not checked locally")
        self.gateway = LocalGateway(routes, host, port, api_key=api_key, log=self.log)
        self.resources.callback(self.gateway.server_close)
        write_state(work_dir, self.gateway.url, s3.endpoint, s3.bucket)

    def _deployed_version(self, model: ModelConfig) -> Version:
        """The config's artifact, registered; or the version the config names, where the local store has it."""
        registered, _ = self.registry.register(model.artifact, model.name)
        if model.version is None:
            return registered
        try:
            return self.registry.version(model.name, model.version)
        except RegistryError as error:
            self.log(
                f"{model.name}: version {model.version!r} is not in the local store ({error}); serving the artifact, "
                f"version {registered.number}"
            )
            return registered

    def _endpoint(self, model: ModelConfig, work_dir: Path) -> EndpointRoute:
        registered = self._deployed_version(model)
        endpoint = self.endpoints[model.name] = EndpointVersions(
            model, registered, self.registry, work_dir, self.task_root, self.log
        )
        self.resources.callback(endpoint.close)
        return endpoint.route

    def serve_forever(self) -> None:
        for name, endpoint in self.endpoints.items():
            endpoint.follow(lambda route, name=name: self.gateway.replace_route(name, route))
        self.gateway.serve_forever()

    def close(self) -> None:
        self.resources.close()

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
