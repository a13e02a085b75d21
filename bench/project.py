"""A user's own project, from the installed wheel: install, init + check + synth, and time to the first local answer,
beside the same steps inside the clone."""

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from slimserve.local_s3 import free_port

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = "runtime,local,cdk"
SLOWER_THAN_CLONE = 1.25  # "no step slower than inside the clone", with room for this machine's noise
IRIS_REQUEST = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def build_wheel(out: Path) -> Path:
    """The wheel, built from a copy of the tree (tracked and new files) so that nothing is written into the clone."""
    source = out / "source"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(out / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (out / "dist").glob("slimserve-*.whl")
    return wheel


def install_wheel(wheel: Path, venv: Path, *also: str) -> Path:
    """A fresh venv with the wheel and its user extras, at the versions the clone's venv runs; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-c", str(ROOT / "requirements.lock"),
                    f"{wheel}[{EXTRAS}]", *also], check=True, capture_output=True)
    return venv / "bin"


def _timed(command: list[str], cwd: Path, environment: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=environment, check=True, capture_output=True)
    return time.perf_counter() - started


@contextlib.contextmanager
def serving(slimserve: list[str], config: Path) -> Iterator[tuple[int, str]]:
    """`slimserve serve` of a config on free ports, run from its folder, until the `with` ends: (port, API key)."""
    port = free_port()
    server = subprocess.Popen([*slimserve, "serve", "--config", str(config), "--port", str(port), "--s3-port", str(free_port())],
                              cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("API key"):
                yield port, line.split()[-1]
                return
        raise RuntimeError(f"slimserve serve of {config} exited ({server.wait()}):\n{''.join(lines)[-3000:]}")
    finally:
        server.terminate()
        server.communicate(timeout=60)


def infer(port: int, key: str, model: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json.dumps(body).encode(),
                                     {"x-api-key": key, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def first_answer_s(slimserve: list[str], config: Path, model: str, body: dict) -> float:
    """`slimserve serve` started -> the first answer from a model's V2 infer route."""
    started = time.perf_counter()
    with serving(slimserve, config) as (port, key):
        while True:
            try:
                infer(port, key, model, body)
                return time.perf_counter() - started
            except OSError:
                time.sleep(0.02)


def project_times(runs: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        wheel = build_wheel(folder)
        started = time.perf_counter()
        bin_ = install_wheel(wheel, folder / "venv")
        install_s = time.perf_counter() - started
        slimserve = [str(bin_ / "slimserve")]
        clone = [sys.executable, "-m", "slimserve"]
        clone_config = ROOT / "slimserve.toml"
        steps = {"project": [], "clone": []}
        answers = {"project cold": [], "project": [], "clone": []}
        for run in range(runs):
            project = folder / f"project-{run}"
            steps["project"].append(sum(_timed([*slimserve, *command], folder if command[0] == "init" else project)
                                        for command in (["init", str(project), "--model", str(ROOT / "examples/models/iris.onnx")],
                                                        ["check"], ["synth"])))
            steps["clone"].append(sum(_timed([*clone, command, "--config", str(clone_config)], ROOT) for command in ("check", "synth")))
            answers["project cold"].append(first_answer_s(slimserve, project / "slimserve.toml", "iris", IRIS_REQUEST))
            answers["project"].append(first_answer_s(slimserve, project / "slimserve.toml", "iris", IRIS_REQUEST))
            answers["clone"].append(first_answer_s(clone, clone_config, "iris", IRIS_REQUEST))
        step, step_clone = statistics.median(steps["project"]), statistics.median(steps["clone"])
        cold, warm, warm_clone = (statistics.median(answers[key]) for key in ("project cold", "project", "clone"))
        rows.append(("new project: pip install of the wheel (packages cached)", install_s, "report",
                     f"extras {EXTRAS}, pinned by requirements.lock", True, "s"))
        rows.append(("new project: init + check + synth", step, f"<= {SLOWER_THAN_CLONE}x the clone's check + synth",
                     f"clone {step_clone:.1f} s ({step / step_clone:.2f}x)", step <= SLOWER_THAN_CLONE * step_clone, "s"))
        rows.append(("new project: serve to first answer, first time (builds its layers)", cold, "report",
                     f"clone, layers built: {warm_clone:.1f} s", True, "s"))
        rows.append(("new project: serve to first answer, layers built", warm, f"<= {SLOWER_THAN_CLONE}x the clone's",
                     f"clone {warm_clone:.1f} s ({warm / warm_clone:.2f}x)", warm <= SLOWER_THAN_CLONE * warm_clone, "s"))
        total = install_s + steps["project"][0] + answers["project cold"][0]
        rows.append(("new project: pip install -> first local answer", total, "report",
                     "install, init + check + synth, first serve (the clone's serve starts 2 models, the project's 1)",
                     True, "s"))
    return rows
