"""`python -m bench.profile_serving`: where the serving program's CPU goes under 32 clients, by stage.

The serving bench's MLP, batching on, 32 keep-alive clients. py-spy samples every Python thread of the program
and each sample counts for the stage of its deepest frame that names one (STAGES); py-spy samples some threads
that wait in the kernel too, and those samples count for no stage. The CPU of the program's other threads, ONNX Runtime's own pool, comes from /proc. Needs
py-spy (the test extra) and, on Linux, ptrace rights over a child process (root, or ptrace_scope 0).
"""

import argparse
import collections
import linecache
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from . import serving
from .table import print_table

# (stage, what a frame's function or source line looks like), tried from the deepest frame up: the first frame
# that matches one decides the sample's stage.
WAITING = "waiting (select, a queue or a condition)"
STAGES = [
    (WAITING, r"select \(|Condition\.wait|Event\.wait|Queue\.get"),
    ("runtime (ONNX Runtime's run)", r"Session\.run|OnnxModel\.run|TfliteModel\.run"),
    ("batch assembly and split", r"\(.*batching\.py:"),
    ("body copy (join the pieces)", r'b"".join\(incoming\.body\)'),
    ("JSON decode and tensor building", r"jsoncodec\.py.*|json_to_array|parse_infer|_read_tensors|\(.*v2\.py:.*parse|_structure|_depth"),
    ("encode (JSON body, HTTP head)", r"encode_infer|dumps|array_to_json|_head \("),
    ("send (socket write)", r"Transport\.write|sock_send|\.send\("),
    ("receive (socket read)", r"_read_ready|recv"),
    ("HTTP parsing (llhttp and its callbacks)", r"on_url|on_header|on_headers_complete|on_message_begin|on_body|on_message_complete|data_received"),
    ("metrics (Prometheus)", r"prometheus"),
    ("handoffs between threads", r"hand_back|_drain|call_soon_threadsafe|_write_to_self|_read_from_self|\(.*queue\.py:|submit"),
    ("routing and checks (the core)", r"\(.*(core|datatypes|sagemaker_server)\.py:"),
    ("event loop", r"asyncio"),
]


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = re.search(r"\((.+):(\d+)\)$", frame)
        source = linecache.getline(match[1], int(match[2])).strip() if match else ""
        for stage, pattern in STAGES:
            if re.search(pattern, frame) or (source and re.search(pattern, source)):
                return stage
    return "other"


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """Each thread's user and system CPU seconds so far, by thread id."""
    return {thread: seconds for thread, (_, seconds) in serving.proc_stats(f"{pid}/task/*/stat").items()}


def profile(seconds: float, concurrency: int = 32) -> list[tuple]:
    spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if spy is None:
        raise SystemExit("bench.profile_serving: py-spy not found; pip install py-spy (it is in the test extra)")
    model = serving.mlp_onnx(serving.BUILD / "mlp.onnx")
    inputs = np.random.default_rng(1).random((serving.DISTINCT_INPUTS, serving.MLP_WIDTHS[0]), dtype=np.float32)
    contender = serving.slimserve_contender("slimserve, batching on", model, serving.MAX_BATCH_SIZE)
    requests = [contender.http_request(row[np.newaxis]) for row in inputs]
    raw = serving.BUILD / "serving-profile.txt"
    with serving.running(contender):
        pid = contender.pid
        serving.drive(contender.port, requests, concurrency, 2)  # warm
        before = thread_cpu_seconds(pid)
        recorder = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                                     "--threads", "--format", "raw", "--nonblocking", "--output", str(raw)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load = threading.Thread(target=serving.drive, args=(contender.port, requests, concurrency, seconds + 2))
        load.start()
        if recorder.wait() != 0:
            raise SystemExit(f"bench.profile_serving: py-spy failed: {recorder.stderr.read().strip()[-300:]}")
        after = thread_cpu_seconds(pid)
        load.join()
    samples: collections.Counter[str] = collections.Counter()
    python_threads: set[int] = set()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        python_threads.add(int(re.search(r"\((\d+)\)", frames[0])[1]))
        samples[stage_of(frames[1:])] += int(count)
    used = {thread: after[thread] - before.get(thread, 0.0) for thread in after}
    python_cpu = sum(used.get(thread, 0.0) for thread in python_threads)
    native_cpu = sum(cpu for thread, cpu in used.items() if thread not in python_threads)
    samples.pop(WAITING, None)
    total_samples = sum(samples.values())
    rows = [(stage, python_cpu * count / total_samples / seconds, "report", f"{count / total_samples:.1%} of the Python "
             "threads' busy samples", True, "cores") for stage, count in samples.most_common()]
    rows.append(("ONNX Runtime's own pool threads", native_cpu / seconds, "report", "from /proc, not sampled", True, "cores"))
    rows.append(("the whole program", (python_cpu + native_cpu) / seconds, "report", f"{concurrency} clients, "
                 f"{seconds:g} s; py-spy at 200 Hz", True, "cores"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_serving")
    parser.add_argument("--seconds", type=float, default=10, help="how long py-spy samples")
    args = parser.parse_args()
    print_table(profile(args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
