"""One project, one store, nothing lost: a second stack of a running project is refused, and no order of starts,
stops, kills and registrations loses a registered version or an alias. Each stack runs in a process of its own, as
users run them: moto's backends are shared within a process, and only a real process shows what a kill leaves."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest
from support import MODELS, ROOT

from bench.project import infer, serving
from slimserve.local.s3 import local_client
from slimserve.local.state import running_state
from slimserve.registry.versions import Registry

pytestmark = pytest.mark.slow
SLIMSERVE = [sys.executable, "-m", "slimserve"]


def retrained(path, text: str):
    """iris.onnx with other bytes: a new version of the same model."""
    model = onnx.load(MODELS / "iris.onnx")
    model.doc_string = text
    onnx.save(model, path)
    return path


@pytest.fixture
def project(tmp_path):
    from slimserve.cli import main

    assert main(["init", str(tmp_path / "proj"), "--model", str(MODELS / "iris.onnx")]) == 0
    return tmp_path / "proj"


def cli(project, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([*SLIMSERVE, *args], cwd=project, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == status, result.stderr[-3000:]
    return result


def listed(project) -> list[str]:
    return [line.split()[0] for line in cli(project, "versions", "iris").stdout.splitlines()[1:]]


def test_a_second_stack_of_a_running_project_is_refused_and_the_first_keeps_its_store(project, tmp_path):
    """The issue's orders: a second `serve` on another port, and `demo` while serving; each used to leave `versions`
    blind to the running stack, or drop a version registered meanwhile when it stopped."""
    with serving(SLIMSERVE, project / "slimserve.toml") as (port, key):
        state = running_state(project / "build" / "local")
        second = cli(project, "serve", "--port", "0", status=2)
        assert second.stderr == (
            f"error: slimserve.toml: its local stack is already running (process {state['pid']}, serving at "
            f"http://127.0.0.1:{port}): one stack per project keeps one store. Use that one (register, alias and "
            "versions find it themselves), or stop it first\n")
        cli(project, "register", str(retrained(tmp_path / "iris-v2.onnx", "v2")), "--name", "iris")
        demo = cli(project, "demo")  # a store of its own, in build/local/demo
        assert "JSON and binary answers equal to the runtime's own: True" in demo.stdout
        assert listed(project) == ["1", "2"]  # the running stack is still found, with what it was told
        cli(project, "alias", "iris", "live", "2")
    with serving(SLIMSERVE, project / "slimserve.toml") as (port, key):
        assert listed(project) == ["1", "2"]
        assert "live since" in cli(project, "versions", "iris").stdout.splitlines()[2]


def test_a_killed_stack_loses_nothing_it_was_told(project, tmp_path):
    """SIGKILL, to the stack and everything it started: what `register` and `alias` were told is there after."""
    config = project / "slimserve.toml"
    stack = subprocess.Popen([*SLIMSERVE, "serve", "--port", "0"], cwd=project, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in stack.stdout:
            if line.startswith("ready"):
                break
        cli(project, "register", str(retrained(tmp_path / "iris-v2.onnx", "v2")), "--name", "iris")
        cli(project, "alias", "iris", "live", "2")
    finally:
        os.killpg(stack.pid, signal.SIGKILL)
        stack.wait()
    assert running_state(project / "build" / "local") is None  # the kernel let the lock go with the process
    flower = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
    with serving(SLIMSERVE, config) as (port, key):
        assert listed(project) == ["1", "2"]
        deadline = time.monotonic() + 10
        while (answer := infer(port, key, "iris", flower))["model_version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.2)  # the stack reads live at most once a second
        assert answer["model_version"] == "2"


# The project's store as `slimserve serve` holds it (the lock, then the store written through to its folder), without
# the layers and workers. Each store is a process forked from one that has imported moto already (a second to import),
# so that every order below takes a second or two, not a minute; it exits as a stack does: stopped (SIGTERM), killed
# (SIGKILL), or refused (status 2).
STORES = """
import os, signal, sys, threading
from pathlib import Path
from moto.moto_server import werkzeug_app  # noqa: F401  imported once, before any fork
from slimserve.local.s3 import local_client
local_client("http://127.0.0.1:9")  # boto3's S3 model, loaded once too
from slimserve.errors import UserError
from slimserve.local.s3 import local_s3
from slimserve.local.state import claim_project, write_state

def store(work):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with claim_project(work, Path("slimserve.toml")), local_s3(keep=work / "store") as s3:
            write_state(work, "-", s3.endpoint, s3.bucket)
            stop.wait()
    except UserError as error:
        print("refused", os.getpid(), error, flush=True)
        return 2
    return 0

for line in sys.stdin:  # no thread runs here: a fork copies only the thread that forks
    command, argument = line.split()
    if command == "wait":
        pid, status = os.waitpid(int(argument), 0)
        print("exit", pid, os.waitstatus_to_exitcode(status), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os._exit(store(Path(argument)))
    print("started", pid, flush=True)
"""
STEPS = ("register", "alias", "kill", "stop")
"""After each, a second store of the project is started too, and must be refused."""


class Stores:
    """The forking process, and the stores of one project it starts."""

    def __init__(self, work):
        self.work, self.unread, self.client = work, [], None
        self.process = subprocess.Popen([sys.executable, "-c", STORES], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def _line(self, kind: str, pid: int | None = None) -> list[str]:
        """The next line of `kind` (about `pid`); the lines read past meanwhile wait for their turn: a child may say
        it was refused before its parent has said it started."""
        while True:
            for words in self.unread:
                if words[0] == kind and (pid is None or int(words[1]) == pid):
                    self.unread.remove(words)
                    return words
            line = self.process.stdout.readline()
            assert line, "the forking process ended"
            self.unread.append(line.split(" ", 2))

    def _send(self, command: str, argument) -> None:
        self.process.stdin.write(f"{command} {argument}\n")
        self.process.stdin.flush()

    def start(self) -> int:
        self._send("start", self.work)
        pid = int(self._line("started")[1])
        deadline = time.monotonic() + 30
        while (state := running_state(self.work)) is None or state["pid"] != pid:
            assert time.monotonic() < deadline, "the store did not come up"
            time.sleep(0.02)
        return pid

    def refused(self) -> str:
        """A second store of the project: its one line, once it has exited with status 2."""
        self._send("start", self.work)
        pid = int(self._line("started")[1])
        line = self._line("refused", pid)[2].strip()
        self._send("wait", pid)
        assert self._line("exit", pid)[2].strip() == "2"
        return line

    def end(self, pid: int, how: signal.Signals) -> None:
        os.kill(pid, how)
        self._send("wait", pid)
        assert int(self._line("exit", pid)[2]) == (0 if how == signal.SIGTERM else -how)

    def registry(self) -> Registry:
        state = running_state(self.work)
        if self.client is None or self.client.meta.endpoint_url != state["s3_endpoint"]:
            self.client = local_client(state["s3_endpoint"])
        return Registry(self.client, state["bucket"])

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.mark.parametrize("order", list(itertools.permutations(STEPS)), ids="-".join)
def test_no_order_of_starts_stops_kills_and_registrations_loses_a_version(tmp_path, order):
    versions = [retrained(tmp_path / f"v{n}.onnx", f"v{n}") for n in (1, 2)]
    stores = Stores(tmp_path / "work")
    pid, registered, live = stores.start(), 0, None
    try:
        for step in order:
            if step == "register":
                for path in versions:
                    registered = stores.registry().register(path, "iris")[0].number
            elif step == "alias":
                registry = stores.registry()
                target = registered or registry.register(versions[0], "iris")[0].number
                live = registry.set_alias("iris", "live", str(target))[1]
                registered = max(registered, live)
            else:
                stores.end(pid, signal.SIGKILL if step == "kill" else signal.SIGTERM)
                pid = stores.start()
            assert stores.refused().startswith(
                f"slimserve.toml: its local stack is already running (process {pid}, serving at -)")
            assert running_state(tmp_path / "work")["pid"] == pid  # the refused one hid nothing
            registry = stores.registry()
            assert [v.number for v in registry.versions("iris")] == list(range(1, registered + 1)), order
            assert (registry.alias("iris", "live")["version"] if live else None) == live
        stores.end(pid, signal.SIGKILL)
    finally:
        stores.close()
    saved = tmp_path / "work" / "store" / "models" / "iris"
    assert len(list(saved.glob("*/manifest.json"))) == registered
    assert [p for p in (tmp_path / "work").rglob("*.partial")] == []
    if live:
        assert json.loads((saved / "aliases" / "live.json").read_text())["version"] == live
