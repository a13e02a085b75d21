"""Throughput and latency of the SageMaker serving program under concurrent clients, beside its peers: Triton
Inference Server (through PyTriton), MLServer and BentoML, each in a venv of its own (bench/peers/).

Every contender serves the same ONNX file with ONNX Runtime at the same settings (threads by the cores, no spinning)
on loopback and gets the same closed-loop load: N clients on persistent connections, each sending its next request
when the last answer came. The client is kept cheap while the clock runs (pre-encoded requests, raw HTTP/1.1 on
asyncio); answers are kept and checked against onnxruntime's own output afterwards. The CPU each server's processes
used during a run is read from /proc.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from slimserve.local.s3 import free_port
from slimserve.registry.store import file_environment

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
PEERS = Path(__file__).resolve().parent / "peers"
BENTOML_BIN = ROOT / ".venv-bentoml" / "bin"
PYTRITON_BIN = ROOT / ".venv-pytriton" / "bin"
MLSERVER_BIN = ROOT / ".venv-mlserver" / "bin"
CONCURRENCIES = (1, 8, 32)
MAX_BATCH_SIZE = 32
DISTINCT_INPUTS = 64
MLP_WIDTHS = (256, 2048, 2048, 2048, 2048, 10)  # ~1 ms a row alone, ~0.1 ms a row in a batch of 32, on a laptop-class core

def mlp_onnx(path: Path, widths: tuple[int, ...] = MLP_WIDTHS) -> Path:
    """A dense ReLU network with a dynamic batch axis: memory-bound alone, so batching pays, as it does for real models."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "features"
    for layer, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        weights += [numpy_helper.from_array((rng.normal(0, 1, (fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32), f"w{layer}"),
                    numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{layer}")]
        nodes.append(helper.make_node("Gemm", [previous, f"w{layer}", f"b{layer}"], [f"dense{layer}"]))
        previous = f"dense{layer}"
        if layer < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [previous], [f"relu{layer}"]))
            previous = f"relu{layer}"
    nodes.append(helper.make_node("Softmax", [previous], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", widths[-1]])],
        initializer=weights,
    )
    return write_model(graph, path)


def write_model(graph, path: Path) -> Path:
    """An opset-17 model of `graph` at `path`, the same bytes on every run."""
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@dataclass
class Contender:
    """A server process, how to ask it for one row, and how to read its answer."""

    name: str
    command: list[str]
    environment: dict[str, str]
    port: int
    path: str
    encode: Callable[[np.ndarray], tuple[bytes, dict[str, str]]]  # one input row -> body, headers
    decode: Callable[[bytes], np.ndarray]
    ready_path: str = "/ping"
    cwd: Path = ROOT
    stats: bool = False  # serves GET /stats (requests and runtime calls)
    pid: int = 0  # the server process's, set while it runs

    def http_request(self, row: np.ndarray) -> bytes:
        body, headers = self.encode(row)
        fields = {"Host": f"127.0.0.1:{self.port}", **headers, "Content-Length": str(len(body))}
        head = f"POST {self.path} HTTP/1.1\r\n" + "".join(f"{key}: {value}\r\n" for key, value in fields.items()) + "\r\n"
        return head.encode() + body


JSON_HEADERS = {"Content-Type": "application/json"}


def v2_json_request(name: str) -> Callable[[np.ndarray], tuple[bytes, dict[str, str]]]:
    def encode(row: np.ndarray) -> tuple[bytes, dict[str, str]]:
        tensor = {"name": name, "shape": list(row.shape), "datatype": "FP32", "data": row.ravel()}
        return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY), JSON_HEADERS
    return encode


def v2_json_output(body: bytes) -> np.ndarray:
    output = orjson.loads(body)["outputs"][0]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def slimserve_contender(name: str, model: Path, max_batch_size: int, encode=None) -> Contender:
    """The serving program as SageMaker runs it, V2 JSON requests unless told; max_batch_size 1 turns batching off."""
    port = free_port()
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keeps a runtime installed aside
    environment = {**os.environ, "PYTHONPATH": python_path, "SAGEMAKER_BIND_TO_PORT": str(port), "SLIMSERVE_HOST": "127.0.0.1",
                   **file_environment(model), "SLIMSERVE_MAX_BATCH_SIZE": str(max_batch_size)}
    return Contender(name, [sys.executable, "-m", "lambda_handlers.sagemaker_server"], environment, port, "/invocations",
                     encode or v2_json_request(_onnx_input_name(model)), v2_json_output, stats=True)


def bentoml_contender(model: Path) -> Contender:
    """BentoML's current API: one service, onnxruntime inside, adaptive batching to the same batch size."""
    port = free_port()
    environment = {**os.environ, "BENCH_MODEL_PATH": str(model), "BENCH_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
                   "BENTOML_HOME": str(BUILD / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "True"}
    command = [str(BENTOML_BIN / "bentoml"), "serve", "bentoml_peer:OnnxPeer", "--host", "127.0.0.1", "--port", str(port)]
    return Contender("BentoML (adaptive batching)", command, environment, port, "/predict",
                     lambda row: (orjson.dumps({"features": row}, option=orjson.OPT_SERIALIZE_NUMPY), JSON_HEADERS),
                     lambda body: np.asarray(orjson.loads(body), np.float32), ready_path="/readyz", cwd=PEERS)


def pytriton_contender(model: Path, python: str = str(PYTRITON_BIN / "python"),
                       providers: str = "CPUExecutionProvider") -> Contender:
    """Triton's own server (PyTriton's wheel ships `tritonserver`) with its dynamic batcher, V2 JSON requests.

    Triton's Python backend stub links the libpython of the interpreter it was built for (this machine's Debian
    python3.11, 3.11.2) and runs the venv's standard library (3.11.7), whose resource tracker calls an RLock method
    3.11.2 lacks. Pointing the loader at the venv interpreter's own libpython makes them one Python again.
    """
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    library = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    environment = {**os.environ, "BENCH_MODEL_PATH": str(model), "BENCH_MAX_BATCH_SIZE": str(MAX_BATCH_SIZE),
                   "BENCH_PORT": str(port), "BENCH_GRPC_PORT": str(grpc_port), "BENCH_METRICS_PORT": str(metrics_port),
                   "BENCH_PROVIDERS": providers,
                   "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [library, os.environ.get("LD_LIBRARY_PATH")]))}
    return Contender("Triton via PyTriton (dynamic batching)", [python, str(PEERS / "pytriton_peer.py")],
                     environment, port, "/v2/models/mlp/infer", v2_json_request(_onnx_input_name(model)), v2_json_output,
                     ready_path="/v2/models/mlp/ready")


def mlserver_contender(model: Path, folder: Path = BUILD / "mlserver") -> Contender:
    """MLServer in one process (its best setting here) with adaptive batching waiting up to 1 ms, V2 JSON requests."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS / "mlserver_peer.py", folder)
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (folder / "settings.json").write_text(orjson.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_port": metrics_port,
        "parallel_workers": 0, "debug": False}).decode())
    (folder / "model-settings.json").write_text(orjson.dumps({
        "name": "mlp", "implementation": "mlserver_peer.OnnxPeer", "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": 0.001, "parameters": {"uri": str(model)}}).decode())
    return Contender("MLServer (adaptive batching)", [str(MLSERVER_BIN / "mlserver"), "start", str(folder)], dict(os.environ),
                     port, "/v2/models/mlp/infer", v2_json_request(_onnx_input_name(model)), v2_json_output,
                     ready_path="/v2/models/mlp/ready", cwd=folder)


def _onnx_input_name(model: Path) -> str:
    import onnx

    return onnx.load(model, load_external_data=False).graph.input[0].name


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


@contextlib.contextmanager
def running(contender: Contender, startup_s: float = 120) -> Iterator[Path]:
    """The contender's process, up and healthy; its output goes to a log file (yielded) and its process group ends after."""
    BUILD.mkdir(parents=True, exist_ok=True)
    log_path = BUILD / f"{''.join(c if c.isalnum() else '-' for c in contender.name)}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(contender.command, env=contender.environment, cwd=contender.cwd, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    contender.pid = process.pid
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{contender.name} exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                _get(f"http://127.0.0.1:{contender.port}{contender.ready_path}")
                break
            except OSError:  # not listening yet, or not ready (BentoML answers 503 while its service starts)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{contender.name} not ready after {startup_s:.0f} s: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
        yield log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Answer:
    seconds: float
    input_index: int
    status: int  # 0: the connection failed
    body: bytes


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lowered = head.lower()
    start = lowered.index(b"content-length:") + len(b"content-length:")
    length = int(lowered[start:lowered.index(b"\r\n", start)])
    return status, await reader.readexactly(length)


async def _client(port: int, requests: list[bytes], first: int, stop_at: float, answers: list[Answer]) -> None:
    """One closed-loop client on one keep-alive connection; reconnects after a failure, which counts as an error."""
    index = first
    connection = None
    while (started := time.perf_counter()) < stop_at:
        input_index = index % len(requests)
        try:
            connection = connection or await asyncio.open_connection("127.0.0.1", port)
            status, body = await _exchange(*connection, requests[input_index])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
            status, body, connection = 0, repr(error).encode(), None
        answers.append(Answer(time.perf_counter() - started, input_index, status, body))
        index += 1
    if connection:
        connection[1].close()


def drive(port: int, requests: list[bytes], concurrency: int, duration_s: float) -> tuple[list[Answer], float]:
    """`concurrency` clients for `duration_s`: every answer, and the seconds until the last one came."""
    async def run() -> float:
        started = time.perf_counter()
        stop_at = started + duration_s
        clients = (_client(port, requests, client * 7, stop_at, answers) for client in range(concurrency))  # each its own input order
        await asyncio.gather(*clients)
        return time.perf_counter() - started

    answers: list[Answer] = []
    return answers, asyncio.run(run())


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `fraction` of all values at or below it."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def is_correct(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> bool:
    """Same shape, and every value within `tolerance` of the reference, relative to the value or to the output's scale."""
    if actual.shape != expected.shape:
        return False
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return bool(np.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale))


@dataclass
class RunSummary:
    throughput: float  # correct answers per second
    p50_ms: float
    p99_ms: float
    wrong: int
    errors: int


def summarize(answers: list[Answer], elapsed_s: float, decode: Callable[[bytes], np.ndarray],
              expected: list[np.ndarray], tolerance: float) -> RunSummary:
    """Throughput counts correct answers only; latency percentiles are over every request, failed ones included."""
    errors = wrong = 0
    for answer in answers:
        if answer.status != 200:
            errors += 1
            continue
        try:
            actual = decode(answer.body)
        except (ValueError, KeyError, TypeError, IndexError):
            wrong += 1
            continue
        wrong += not is_correct(actual, expected[answer.input_index], tolerance)
    latencies = [answer.seconds * 1000 for answer in answers] or [float("nan")]
    correct = len(answers) - errors - wrong
    return RunSummary(correct / elapsed_s, percentile(latencies, 0.5), percentile(latencies, 0.99), wrong, errors)


@dataclass
class Cell:
    """One contender at one concurrency, over every round."""

    runs: list[RunSummary] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)  # CPU seconds the server's processes used per second of run
    extras: list[float] = field(default_factory=list)  # a per-run side measure (GPU utilization), when there is one
    rows_per_call: list[float] = field(default_factory=list)  # requests per runtime call, where the server counts them

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def failures(self) -> tuple[int, int]:
        return sum(run.wrong for run in self.runs), sum(run.errors for run in self.runs)


def _runtime_counts(contender: Contender) -> tuple[int, int]:
    stats = orjson.loads(_get(f"http://127.0.0.1:{contender.port}/stats"))
    return stats["requests"], stats["runtime_calls"]


def measure(contenders: list[Contender], inputs: np.ndarray, expected: list[np.ndarray], duration_s: float, rounds: int,
            concurrencies=CONCURRENCIES, tolerance: float = 1e-4, during_run=contextlib.nullcontext
            ) -> dict[tuple[str, int], Cell]:
    """Every contender at every concurrency, interleaved, `rounds` times; each run preceded by a short warm-up.

    `during_run()` is entered around each timed run; what it yields, a list, gets one number appended (GPU utilization).
    """
    cells = {(contender.name, concurrency): Cell() for contender in contenders for concurrency in concurrencies}
    requests = {contender.name: [contender.http_request(row[np.newaxis]) for row in inputs] for contender in contenders}
    for _ in range(rounds):
        for concurrency in concurrencies:
            for contender in contenders:
                cell = cells[contender.name, concurrency]
                drive(contender.port, requests[contender.name], concurrency, min(1.0, duration_s / 4))
                before = _runtime_counts(contender) if contender.stats else None
                cpu_before = tree_cpu_seconds(contender.pid)
                with during_run() as samples:
                    answers, elapsed = drive(contender.port, requests[contender.name], concurrency, duration_s)
                cell.cores.append((tree_cpu_seconds(contender.pid) - cpu_before) / elapsed)
                if samples is not None:
                    cell.extras.append(statistics.mean(samples) if samples else float("nan"))
                if before:
                    after = _runtime_counts(contender)
                    cell.rows_per_call.append((after[0] - before[0]) / max(1, after[1] - before[1]))
                cell.runs.append(summarize(answers, elapsed, contender.decode, expected, tolerance))
    return cells


def proc_stats(pattern: str) -> dict[int, tuple[int, float]]:
    """For each /proc stat file the glob `pattern` finds (processes, or one process's threads), by its id: the
    parent's id and the user and system CPU seconds so far."""
    ticks, stats = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob(pattern):
        with contextlib.suppress(OSError):  # gone since the glob
            fields = stat.read_text().rpartition(")")[2].split()  # after the command name, which may hold spaces
            stats[int(stat.parent.name)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks
    return stats


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of the live processes descended from `root` (itself included); a peer's workers may sit in
    sessions of their own (BentoML's do), so the tree, not the process group."""
    stats = proc_stats("[0-9]*/stat")
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, (parent, _) in stats.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(stats[pid][1] for pid in tree if pid in stats)


def reference_outputs(model: Path, inputs: np.ndarray) -> list[np.ndarray]:
    """onnxruntime's own answer for each input row alone, on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: row[np.newaxis]})[0] for row in inputs]


def cell_row(contender: str, concurrency: int, cell: Cell, extra: str = "") -> tuple:
    wrong, errors = cell.failures()
    batching = f"; {statistics.median(cell.rows_per_call):.1f} rows per runtime call" if cell.rows_per_call else ""
    cores = f"; {statistics.median(cell.cores):.2f} cores" if cell.cores else ""
    context = (f"p50 {cell.median('p50_ms'):.2f} ms, p99 {cell.median('p99_ms'):.2f} ms; "
               f"{wrong} wrong, {errors} errors{batching}{cores}{extra}")
    return (f"{contender}, {concurrency} clients", cell.median("throughput"), "every answer right", context,
            wrong == 0 and errors == 0, "req/s")


def serving_throughput(duration_s: float, rounds: int = 3) -> list[tuple]:
    """The MLP at 1, 8 and 32 clients with every contender and the targets; then a model too small to cost anything
    at 32 clients, where what is measured is each server's own work per request."""
    context = f"median of {rounds} interleaved {duration_s:g} s runs"
    rows, cells, ours, peers = _serve_and_measure(MLP_WIDTHS, "mlp", duration_s, rounds, CONCURRENCIES, unbatched=True)
    rows += peer_ratios(cells, ours, peers, f"MLP {MLP_WIDTHS}, {context}")
    tiny_rows, cells, ours, peers = _serve_and_measure(TINY_WIDTHS, "tiny", duration_s, rounds, CONCURRENCIES[-1:])
    most = CONCURRENCIES[-1]
    best = best_peer(cells, peers, most)
    ratio = cells[ours, most].median("throughput") / cells[best, most].median("throughput")
    return rows + tiny_rows + [(f"tiny model, {most} clients: slimserve batched / best peer throughput", ratio, "report",
                                f"best peer {best}; MLP {TINY_WIDTHS}, {context}", True, "x")]


TINY_WIDTHS = (256, 16, 10)  # microseconds a batch: the server's own work is all there is to measure


def _serve_and_measure(widths: tuple[int, ...], label: str, duration_s: float, rounds: int, concurrencies,
                       unbatched: bool = False) -> tuple[list[tuple], dict[tuple[str, int], Cell], str, list[str]]:
    """Every contender serving the MLP of `widths`: the rows, the cells, our batched contender's name and the peers'."""
    model = mlp_onnx(BUILD / f"{label}.onnx", widths)
    inputs = np.random.default_rng(1).random((DISTINCT_INPUTS, widths[0]), dtype=np.float32)
    expected = reference_outputs(model, inputs)
    prefix = "" if widths == MLP_WIDTHS else f"{label} model: "
    batched = slimserve_contender(f"{prefix}slimserve, batching on", model, MAX_BATCH_SIZE)
    peers = [pytriton_contender(model), mlserver_contender(model), bentoml_contender(model)]
    for peer in peers:
        peer.name = prefix + peer.name
    contenders = [batched, *([slimserve_contender("slimserve, batching off", model, 1)] if unbatched else []), *peers]
    with contextlib.ExitStack() as stack:
        for contender in contenders:
            stack.enter_context(running(contender))
        cells = measure(contenders, inputs, expected, duration_s, rounds, concurrencies)
    rows = [cell_row(name, concurrency, cell) for (name, concurrency), cell in cells.items()]
    return rows, cells, batched.name, [peer.name for peer in peers]


def best_peer(cells: dict[tuple[str, int], Cell], peers: list[str], concurrency: int) -> str:
    """The peer with the most throughput at `concurrency`."""
    return max(peers, key=lambda peer: cells[peer, concurrency].median("throughput"))


def peer_ratios(cells: dict[tuple[str, int], Cell], ours: str, peers: list[str], context: str) -> list[tuple]:
    """The targets against the best peer: at the most clients, throughput >= 1.5x its and p99 no worse; at one
    client, p50 no worse than the lowest peer p50. Every peer's ratio is reported too."""
    most, fewest = CONCURRENCIES[-1], CONCURRENCIES[0]
    ours_most, ours_fewest = cells[ours, most], cells[ours, fewest]
    rows = [(f"serving {most} clients: slimserve batched / {peer} throughput", ours_most.median("throughput")
             / cells[peer, most].median("throughput"), "report", f"{ours_most.median('throughput'):.0f} vs "
             f"{cells[peer, most].median('throughput'):.0f} req/s", True, "x") for peer in peers]
    best = best_peer(cells, peers, most)
    ratio = ours_most.median("throughput") / cells[best, most].median("throughput")
    quickest = min(peers, key=lambda peer: cells[peer, fewest].median("p50_ms"))
    return rows + [
        (f"serving {most} clients: slimserve batched / best peer throughput", ratio, ">= 1.5x",
         f"best peer {best}; {context}", ratio >= 1.5, "x"),
        (f"serving {most} clients: slimserve batched p99", ours_most.median("p99_ms"),
         f"<= {best}'s {cells[best, most].median('p99_ms'):.2f} ms", f"p50 {ours_most.median('p50_ms'):.2f} ms",
         ours_most.median("p99_ms") <= cells[best, most].median("p99_ms"), "ms"),
        (f"serving {fewest} client: slimserve batched p50", ours_fewest.median("p50_ms"),
         f"<= {quickest}'s {cells[quickest, fewest].median('p50_ms'):.2f} ms", "the lowest peer p50 at one client",
         ours_fewest.median("p50_ms") <= cells[quickest, fewest].median("p50_ms"), "ms"),
    ]
