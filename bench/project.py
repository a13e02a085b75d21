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

from slimserve.local.s3 import free_port

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


def install_wheel(wheel: Path, venv: Path) -> Path:
    """A fresh venv with the wheel and its user extras, at the versions the clone's venv runs; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-c", str(ROOT / "requirements.lock"),
                    f"{wheel}[{EXTRAS}]"], check=True, capture_output=True)
    return venv / "bin"


def _timed(command: list[str], cwd: Path, environment: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=environment, check=True, capture_output=True)
    return time.perf_counter() - started


@contextlib.contextmanager
def serving(slimserve: list[str], config: Path, environment: dict | None = None, options=()) -> Iterator[tuple[int, str | None]]:
    """`slimserve serve` of a config on free ports, run from its folder, until the `with` ends: (port, API key, None
    where no model asks for one)."""
    port = free_port()
    server = subprocess.Popen([*slimserve, "serve", "--config", str(config), "--port", str(port), "--s3-port", str(free_port()),
                               *options],
                              cwd=config.parent, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("ready"):
                yield port, next((seen.split()[-1] for seen in lines if seen.startswith("API key")), None)
                return
        raise RuntimeError(f"slimserve serve of {config} exited ({server.wait()}):\n{''.join(lines)[-3000:]}")
    finally:
        server.terminate()
        server.communicate(timeout=60)


def infer(port: int, key: str | None, model: str, body: dict) -> dict:
    headers = {"Content-Type": "application/json"} | ({"x-api-key": key} if key else {})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def first_answer_s(slimserve: list[str], config: Path, model: str, body: dict, environment: dict | None = None) -> float:
    """`slimserve serve` started -> the first answer from a model's V2 infer route."""
    started = time.perf_counter()
    with serving(slimserve, config, environment) as (port, key):
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
        model = str(ROOT / "examples" / "models" / "iris.onnx")

        def new_project(name: str, environment: dict) -> tuple[float, float]:
            """init + check + synth, and serve to the first answer, for a new project."""
            project = folder / name
            steps = sum(_timed([*slimserve, *command], folder if command[0] == "init" else project, environment)
                        for command in (["init", str(project), "--model", model], ["check"], ["synth"]))
            return steps, first_answer_s(slimserve, project / "slimserve.toml", "iris", IRIS_REQUEST, environment)

        # a machine where slimserve never ran: no layers, no CDK CLI in its cache (pip's and npm's caches stay warm)
        empty_cache = {**os.environ, "SLIMSERVE_CACHE_DIR": str(folder / "empty-cache")}
        cold_steps, cold_answer = new_project("first", empty_cache)
        steps = {"project": [], "clone": []}
        answers = {"project": [], "clone": []}
        for run in range(runs):
            project_steps, project_answer = new_project(f"project-{run}", dict(os.environ))
            steps["project"].append(project_steps)
            answers["project"].append(project_answer)
            steps["clone"].append(sum(_timed([*clone, command, "--config", str(clone_config)], ROOT) for command in ("check", "synth")))
            answers["clone"].append(first_answer_s(clone, clone_config, "iris", IRIS_REQUEST))
        step, step_clone = statistics.median(steps["project"]), statistics.median(steps["clone"])
        answer, answer_clone = statistics.median(answers["project"]), statistics.median(answers["clone"])
        rows.append(("new project: pip install of the wheel (packages cached)", install_s, "report",
                     f"extras {EXTRAS}, pinned by requirements.lock", True, "s"))
        rows.append(("new project: init + check + synth", step, f"<= {SLOWER_THAN_CLONE}x the clone's check + synth",
                     f"clone {step_clone:.1f} s ({step / step_clone:.2f}x)", step <= SLOWER_THAN_CLONE * step_clone, "s"))
        rows.append(("new project: serve to first answer", answer, f"<= {SLOWER_THAN_CLONE}x the clone's",
                     f"clone {answer_clone:.1f} s ({answer / answer_clone:.2f}x; the clone serves 2 models, the project 1)",
                     answer <= SLOWER_THAN_CLONE * answer_clone, "s"))
        rows.append(("first project on a machine: init + check + synth", cold_steps, "report",
                     "empty slimserve cache: builds the layers synth needs", True, "s"))
        rows.append(("first project on a machine: pip install -> first local answer", install_s + cold_steps + cold_answer,
                     "report", f"install, init + check + synth, then serve (its first answer {cold_answer:.1f} s)", True, "s"))
    return rows
