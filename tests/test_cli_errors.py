"""The CLI from a user's side: a taken port, a local stack that is not running, a bug: one line or a clear report,
never a hang."""

import hashlib
import socket
import subprocess
import sys

import pytest
from conftest import MODELS

from slimserve.cli import main
from slimserve.local_s3 import free_port


@pytest.fixture
def project(tmp_path):
    main(["init", str(tmp_path / "proj"), "--model", str(MODELS / "iris.onnx")])
    return tmp_path / "proj"


def slimserve(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimserve", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag, instead", [
    ("--s3-port", "pass a free port, or leave --s3-port out to take any free one"),
    ("--port", "pass another with --port"),
])
def test_serve_on_a_taken_port_says_which_and_exits(project, flag, instead):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        other = "--port" if flag == "--s3-port" else "--s3-port"
        result = slimserve("serve", flag, str(port), other, str(free_port()), cwd=project)
    assert (result.returncode, result.stderr) == (2, f"error: {flag} {port}: cannot listen on 127.0.0.1:{port} (Address "
                                                     f"already in use; another program, or another `slimserve serve`, has "
                                                     f"it): {instead}\n")
    assert not (project / "build" / "local" / "stack.json").exists()


def test_registry_commands_without_a_running_stack_say_what_to_start(project):
    result = slimserve("versions", "iris", cwd=project)
    assert (result.returncode, result.stderr) == (2, "error: no local stack of slimserve.toml is running: start one with "
                                                     "`slimserve serve` (in another terminal), or pass --endpoint-url, or "
                                                     "--profile/--region and --bucket for the deployed store\n")
    port = free_port()
    result = slimserve("versions", "iris", "--endpoint-url", f"http://127.0.0.1:{port}", cwd=project)
    assert (result.returncode, result.stderr) == (2, f"error: the local store at http://127.0.0.1:{port}: nothing answers "
                                                     "there; is the local stack running (`slimserve serve`)?\n")


def test_registry_commands_find_the_projects_running_stack_on_its_free_s3_port(project):
    server = subprocess.Popen([sys.executable, "-m", "slimserve", "serve", "--port", str(free_port())], cwd=project,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if line.startswith("ready"):
                break
        state = project / "build" / "local" / "stack.json"
        assert state.is_file()
        versions = slimserve("versions", "iris", cwd=project)
        assert versions.returncode == 0, versions.stderr
        sha256 = hashlib.sha256((project / "models" / "iris.onnx").read_bytes()).hexdigest()
        assert versions.stdout.splitlines()[1].split()[:3] == ["1", sha256[:12], "onnx"]
        aliased = slimserve("alias", "iris", "prod", "1", cwd=project)
        assert aliased.stdout == "iris: alias prod now points at version 1 (new alias)\n"
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert not state.exists()  # the stack says it is gone


def test_a_layer_build_error_is_a_user_error(capsys):
    assert main(["layer", "--runtime", "pytorch"]) == 2
    assert capsys.readouterr().err == ("error: unknown layer runtime 'pytorch': expected one of onnx, tflite, tflite-py311, "
                                       "lambda-runtime\n")


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from slimserve import __version__, cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_check", broken)
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "ZeroDivisionError: division by zero" in err
    assert err.endswith(f"error: this is a bug in slimserve {__version__}, not a mistake of yours: please report it with "
                        "the traceback above and the command you ran\n")
