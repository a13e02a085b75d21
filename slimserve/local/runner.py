"""Run Lambda functions locally the way Lambda does.

Each worker is a separate process of the Lambda runtime's Python with only the
function's folder, its layer and the runtime's own packages (awslambdaric, boto3)
on the path, no site-packages. AWS's runtime interface client drives the handler
over the Lambda Runtime API, served here one endpoint per worker. Memory and
timeout are enforced, cold and warm starts are real, and errors read as Lambda's.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from slimserve.assets import HANDLER
from slimserve.lambda_handlers import wire
from slimserve.lambda_handlers.contract import MAX_BODY_BYTES
from slimserve.lambda_handlers.errors import PayloadTooLarge
from slimserve.layers.builder import find_python

RUNTIME_API = "/2018-06-01/runtime"
# what Lambda records for a function's response past its payload limit
RESPONSE_TOO_LARGE = {
    "errorMessage": f"Response payload size exceeded maximum allowed payload size ({MAX_BODY_BYTES} bytes).",
    "errorType": "Function.ResponseSizeTooLarge",
}

# PR_SET_PDEATHSIG fires when the *thread* that started a child ends, not the process:
# workers are started from this one long-lived thread, never from a request's thread.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-spawner")


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    python: str
    """The interpreter workers run: the Lambda runtime's Python."""
    task_root: Path
    """The function's code, as Lambda unpacks it into /var/task."""
    layer: Path
    """The layer's python/ folder (Lambda's /opt/python)."""
    runtime_dir: Path
    """awslambdaric and boto3 (Lambda's /var/runtime)."""
    environment: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 1024
    timeout_s: float = 10.0
    concurrency: int = 10
    handler: str = HANDLER
    log_path: Path | None = None


@dataclass
class Invocation:
    request_id: str
    event: bytes
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    picked_up: float | None = None
    response: bytes | None = None
    error: dict | None = None


@dataclass(frozen=True)
class InvocationResult:
    request_id: str
    payload: dict | None
    """The handler's return value; None when the invocation failed."""
    error: dict | None
    """Lambda's error object: errorMessage, errorType."""
    duration_ms: float
    init_ms: float | None
    """Set when this invocation paid for a cold start."""
    max_memory_mb: float


def lambda_python(version: str = "3.12") -> tuple[str, str, str]:
    """The interpreter workers run, its version, and a sentence saying which and why."""
    python = find_python(version)
    if python:
        return python, version, f"workers run python{version} ({python}), as Lambda's python{version} runtime"
    current = f"{sys.version_info.major}.{sys.version_info.minor}"
    return sys.executable, current, f"python{version} is not installed here; workers run this python{current} instead"


class _RuntimeApi(wire.Server):
    """The Lambda Runtime API for one worker: hands out its invocations, takes their results."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):  # a worker killed mid-call is expected
            super().handle_error(request, client_address)

    def __init__(self, worker: "Worker"):
        self.worker = worker
        super().__init__(("127.0.0.1", 0), _RuntimeApiHandler)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _RuntimeApiHandler(wire.Handler):
    def do_GET(self):
        if self.path != f"{RUNTIME_API}/invocation/next":
            return self.reply(404)
        invocation = self.server.worker.next_invocation()
        spec = self.server.worker.spec
        self.reply(
            200,
            invocation.event,
            {
                "Content-Type": "application/json",
                "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                "Lambda-Runtime-Deadline-Ms": str(int(invocation.deadline * 1000)),
                "Lambda-Runtime-Invoked-Function-Arn": f"arn:aws:lambda:us-east-1:000000000000:function:{spec.name}",
                "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};Sampled=0",
            },
        )

    def do_POST(self):
        try:
            body, too_large = self.read_body(MAX_BODY_BYTES), None
        except PayloadTooLarge:
            body, too_large = b"", dict(RESPONSE_TOO_LARGE)
        worker = self.server.worker
        if self.path == f"{RUNTIME_API}/init/error":
            worker.fail_init(_error(body))
        elif self.path.startswith(f"{RUNTIME_API}/invocation/") and self.path.endswith("/response"):
            worker.complete(self.path.split("/")[-2], response=body, error=too_large)
        elif self.path.startswith(f"{RUNTIME_API}/invocation/") and self.path.endswith("/error"):
            worker.complete(self.path.split("/")[-2], error=_error(body))
        else:
            return self.reply(404)
        self.reply(202, b'{"status":"OK"}', {"Content-Type": "application/json"})


def _error(body: bytes) -> dict:
    try:
        error = json.loads(body)
    except ValueError:
        error = {"errorMessage": body.decode(errors="replace")}
    return {"errorMessage": error.get("errorMessage", ""), "errorType": error.get("errorType", "Unknown")}


class Worker:
    """One execution environment: a process that initialises once, then serves invocations one at a time."""

    def __init__(self, spec: FunctionSpec, log_file):
        self.spec = spec
        self.api = _RuntimeApi(self)
        threading.Thread(target=self.api.serve_forever, daemon=True).start()
        self.pending: "queue.Queue[Invocation]" = queue.Queue(maxsize=1)
        self.current: Invocation | None = None
        self.started = time.perf_counter()
        self.init_ms: float | None = None
        self.init_error: dict | None = None
        self.max_rss_mb = 0.0
        self.process = spawn(
            [spec.python, "-S", "-m", "awslambdaric", spec.handler], spec.task_root, self._environment(), log_file
        )
        threading.Thread(target=self._watch, daemon=True).start()

    def _environment(self) -> dict[str, str]:
        spec = self.spec
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "PYTHONPATH": os.pathsep.join(str(p) for p in (spec.task_root, spec.layer, spec.runtime_dir)),
            "LAMBDA_TASK_ROOT": str(spec.task_root),
            "LAMBDA_RUNTIME_DIR": str(spec.runtime_dir),
            "_HANDLER": spec.handler,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_python{Path(spec.python).name.removeprefix('python')}",
            "AWS_LAMBDA_RUNTIME_API": self.api.address,
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex,
            "AWS_REGION": spec.environment.get("AWS_DEFAULT_REGION", "us-east-1"),
            **spec.environment,
        }

    # called by the Runtime API threads

    def next_invocation(self) -> Invocation:
        if self.init_ms is None:
            self.init_ms = (time.perf_counter() - self.started) * 1000
        self.current = self.pending.get()
        self.current.picked_up = time.perf_counter()
        return self.current

    def fail_init(self, error: dict) -> None:
        self.init_error = error

    def complete(self, request_id: str, response: bytes | None = None, error: dict | None = None) -> None:
        invocation = self.current
        if invocation is not None and invocation.request_id == request_id:
            invocation.response, invocation.error = response, error
            invocation.done.set()

    # called by the pool

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def invoke(self, event: bytes) -> InvocationResult:
        cold = self.init_ms is None
        invocation = Invocation(str(uuid.uuid4()), event, time.time() + self.spec.timeout_s)
        started = time.perf_counter()
        self.pending.put(invocation)
        while not invocation.done.wait(0.01):
            if self.init_error is not None:
                invocation.error = self.init_error
                break
            if not self.alive:
                invocation.error = {
                    "errorMessage": f"Runtime exited with error: {_exit_text(self.process.returncode)}",
                    "errorType": "Runtime.ExitError",
                }
                break
            if time.time() > invocation.deadline:
                invocation.error = {
                    "errorMessage": f"Task timed out after {self.spec.timeout_s:.2f} seconds",
                    "errorType": "Sandbox.Timedout",
                }
                break
        duration = (time.perf_counter() - (invocation.picked_up or started)) * 1000
        if invocation.error is not None:
            self.stop()  # Lambda discards an environment after an init error, a crash or a timeout
        payload = None
        if invocation.error is None:
            try:
                payload = json.loads(invocation.response)
            except ValueError:
                invocation.error = {
                    "errorMessage": "the handler's response is not JSON",
                    "errorType": "Runtime.InvalidResponse",
                }
        return InvocationResult(
            invocation.request_id, payload, invocation.error, duration, self.init_ms if cold else None, self.max_rss_mb
        )

    def _watch(self) -> None:
        """Lambda's memory limit: the environment dies once it uses more than its memory size."""
        status = Path(f"/proc/{self.process.pid}/status")
        while self.alive:
            try:
                rss_kb = next(
                    int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:")
                )
            except (OSError, StopIteration, ValueError):
                rss_kb = 0
            self.max_rss_mb = max(self.max_rss_mb, rss_kb / 1024)
            if rss_kb / 1024 > self.spec.memory_mb:
                self.stop()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.alive:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self.api.shutdown()
        self.api.server_close()


def spawn(command: list[str], cwd: Path, environment: dict[str, str], log_file) -> subprocess.Popen:
    """A child that dies with us: in its own process group (killing it leaves nothing behind), and killed by
    the kernel if this process dies first."""
    return _SPAWNER.submit(
        subprocess.Popen,
        command,
        cwd=cwd,
        env=environment,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    ).result()


def _die_with_parent() -> None:
    """Linux's PR_SET_PDEATHSIG: if the runner itself dies, the kernel kills its workers too."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal: {signal.Signals(-code).name.removeprefix('SIG').lower()}"
    return f"exit status {code}"


class FunctionPool:
    """The execution environments of one function: reused while warm, started on demand up to its concurrency."""

    def __init__(self, spec: FunctionSpec, report=None):
        self.spec = spec
        self.report = report or (lambda line: None)
        self.idle: list[Worker] = []
        self.workers: list[Worker] = []
        self.lock = threading.Condition()
        self.log_file = open(spec.log_path, "ab") if spec.log_path else subprocess.DEVNULL
        self.closed = False

    def _acquire(self) -> Worker:
        with self.lock:
            while True:
                if self.closed:
                    raise RuntimeError(f"function {self.spec.name} is stopped")
                self.workers = [w for w in self.workers if w.alive]
                self.idle = [w for w in self.idle if w.alive]
                if self.idle:
                    return self.idle.pop()
                if len(self.workers) < self.spec.concurrency:
                    worker = Worker(self.spec, self.log_file)
                    self.workers.append(worker)
                    return worker
                self.lock.wait(0.05)  # all environments busy: queue, as a caller retrying a throttle would

    def invoke(self, event: dict) -> InvocationResult:
        worker = self._acquire()
        try:
            result = worker.invoke(json.dumps(event).encode())
        finally:
            with self.lock:
                if worker.alive:
                    self.idle.append(worker)
                self.lock.notify()
        init = f"\tInit Duration: {result.init_ms:.2f} ms" if result.init_ms is not None else ""
        self.report(
            f"REPORT RequestId: {result.request_id}\tFunction: {self.spec.name}\tDuration: {result.duration_ms:.2f} ms"
            f"\tMemory Size: {self.spec.memory_mb} MB\tMax Memory Used: {result.max_memory_mb:.0f} MB{init}"
            + (f"\tError: {result.error['errorType']}: {result.error['errorMessage']}" if result.error else "")
        )
        return result

    def close(self) -> None:
        with self.lock:
            self.closed = True
            workers, self.workers, self.idle = self.workers, [], []
        for worker in workers:
            worker.stop()
        if self.log_file is not subprocess.DEVNULL:
            self.log_file.close()
