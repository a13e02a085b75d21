"""The CLI from a user's side: a taken port, a local stack that is not running, a bug: one line or a clear report,
never a hang."""

import hashlib
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from support import MODELS

from slimserve.cli import main
from slimserve.local.s3 import free_port


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


@pytest.mark.slow
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
        aliased = slimserve("alias", "iris", "live", "1", cwd=project)
        assert aliased.stdout.splitlines()[0] == "iris: alias live already points at version 1"  # the config's
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert not state.exists()  # the stack says it is gone


def test_a_layer_build_error_is_a_user_error(capsys):
    assert main(["layer", "--runtime", "pytorch"]) == 2
    assert capsys.readouterr().err == ("error: unknown layer runtime 'pytorch': expected one of onnx, tflite, tflite-py311, "
                                       "lambda-runtime\n")


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from slimserve import __version__
    from slimserve.cli import project

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(project, "_check", broken)
    assert main(["check"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "ZeroDivisionError: division by zero" in err
    assert err.endswith(f"error: this is a bug in slimserve {__version__}, not a mistake of yours: please report it with "
                        "the traceback above and the command you ran\n")


@pytest.fixture(scope="module")
def cancer(tmp_path_factory):
    """A scikit-learn classifier of the user's own (30 features), its samples, and another data set's (13)."""
    import joblib
    from sklearn.datasets import load_breast_cancer, load_wine
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("cancer")
    features, labels = load_breast_cancer(return_X_y=True)
    estimator = LogisticRegression(max_iter=5000).fit(features, labels)
    joblib.dump(estimator, folder / "cancer.joblib")
    np.save(folder / "cancer.npy", features[:50].astype(np.float32))
    np.save(folder / "wine.npy", load_wine(return_X_y=True)[0][:50].astype(np.float32))
    return folder, estimator


def test_convert_refuses_missing_or_misshapen_samples_in_one_line(cancer, capsys):
    folder, _ = cancer
    out = str(folder / "out.onnx")
    assert main(["convert", str(folder / "cancer.joblib"), "--samples", str(folder / "nope.npy"), "--out", out]) == 2
    assert capsys.readouterr().err == f"error: {folder}/nope.npy: no such samples file\n"
    assert main(["convert", str(folder / "cancer.joblib"), "--samples", str(folder / "wine.npy"), "--out", out]) == 2
    assert capsys.readouterr().err == (f"error: {folder}/wine.npy: expected rows of 30 features, as "
                                       f"{folder}/cancer.joblib was fitted on, found an array of shape (50, 13)\n")
    assert not (folder / "out.onnx").exists()


def test_optimize_refuses_a_zipmap_model_and_misshapen_samples_in_one_line(cancer, capsys):
    from skl2onnx import to_onnx

    folder, estimator = cancer
    samples = folder / "cancer.npy"
    zipmap = folder / "zipmap.onnx"  # skl2onnx's default classifier output: a sequence of maps, which nothing serves
    zipmap.write_bytes(to_onnx(estimator, np.load(samples)[:1]).SerializeToString())
    assert main(["optimize", str(zipmap), "--level", "int8", "--samples", str(samples)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {zipmap}: ONNX Runtime cannot load it: ") and err.count("\n") == 1
    assert main(["convert", str(folder / "cancer.joblib"), "--samples", str(samples), "--out", str(folder / "c.onnx")]) == 0
    capsys.readouterr()
    assert main(["optimize", str(folder / "c.onnx"), "--level", "int8", "--samples", str(folder / "wine.npy")]) == 2
    assert capsys.readouterr().err == (f"error: {folder}/wine.npy: expected samples for input 'features' of shape [-1, 30] "
                                       "(-1 is any size), found shape [50, 13]\n")


def test_check_and_synth_refuse_a_file_that_is_not_a_model_naming_the_key(tmp_path):
    (tmp_path / "model.onnx").write_bytes(bytes(range(256)) * 16)
    (tmp_path / "slimserve.toml").write_text('[models.noise]\nformat = "onnx"\nartifact = "model.onnx"\n')
    for command in ("check", "synth"):
        result = slimserve(command, "--config", str(tmp_path / "slimserve.toml"), cwd=tmp_path)
        assert result.returncode == 2 and result.stdout == "", command
        assert result.stderr.startswith(f"error: {tmp_path}/slimserve.toml: models.noise.artifact: {tmp_path}/model.onnx: "
                                         "not a loadable onnx model: "), result.stderr
        assert result.stderr.count("\n") == 1


def test_int8_takes_models_that_import_the_default_opset_twice(cancer, capsys):
    """skl2onnx writes the default domain twice; `convert` cleans that, and `optimize` copes with files from elsewhere."""
    import onnx
    from skl2onnx import to_onnx

    folder, estimator = cancer
    samples = folder / "cancer.npy"
    raw = to_onnx(estimator, np.load(samples)[:1], options={id(estimator): {"zipmap": False}}, target_opset=17)
    assert [opset.domain for opset in raw.opset_import].count("") == 2
    (folder / "raw.onnx").write_bytes(raw.SerializeToString())
    assert main(["convert", str(folder / "cancer.joblib"), "--samples", str(samples), "--out", str(folder / "clean.onnx")]) == 0
    assert sorted((o.domain, o.version) for o in onnx.load(folder / "clean.onnx").opset_import) == [("", 17), ("ai.onnx.ml", 1)]
    for model in ("raw.onnx", "clean.onnx"):
        code = main(["optimize", str(folder / model), "--level", "int8", "--samples", str(samples), "--tolerance", "1", "--force"])
        assert (code, capsys.readouterr().err) == (0, ""), model
        assert (folder / model.replace(".onnx", ".int8.onnx")).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("options, expected", [(["--api-key", "from-the-flag"], "from-the-flag"), ([], "from-the-environment")])
def test_serve_takes_a_pinned_api_key(project, options, expected):
    from bench.project import infer, serving

    flower = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
    environment = {**os.environ, "SLIMSERVE_API_KEY": "from-the-environment"}
    config = project / "slimserve.toml"
    config.write_text(config.read_text().replace('auth = "iam"', 'auth = "api_key"'))  # a model that asks for the key
    with serving([sys.executable, "-m", "slimserve"], project / "slimserve.toml", environment, options) as (port, key):
        assert key == expected
        assert infer(port, key, "iris", flower)["outputs"][0]["data"] == [0]


def test_a_result_larger_and_no_faster_is_written_only_when_forced(tmp_path, monkeypatch, capsys):
    from slimserve.modeltools import optimize

    # as fast as each other, always
    monkeypatch.setattr(optimize, "_median_ms", lambda models, samples, outputs: ([1.0] * len(models), 20))
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).random((20, 4), dtype=np.float32))
    model, out = str(MODELS / "iris.onnx"), tmp_path / "iris.fp16.onnx"
    arguments = ["optimize", model, "--level", "fp16", "--samples", str(tmp_path / "rows.npy"), "--out", str(out)]
    assert main(arguments) == 2
    assert capsys.readouterr().err.splitlines()[0] == (f"error: {out}: not written: the fp16 model is 256% of the original's "
                                                       "size and no faster (1.000 against 1.000 ms; --force writes it)")
    assert not out.exists()
    assert main([*arguments, "--force"]) == 0
    assert out.stat().st_size > (MODELS / "iris.onnx").stat().st_size


def test_a_port_a_stopped_server_left_in_time_wait_is_free_to_claim():
    """A clean stop leaves the accepted connections in TIME_WAIT; the servers bind with SO_REUSEADDR, so may we."""
    import socket
    import threading

    from slimserve.local.s3 import claim_port, free_port

    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    accepted = threading.Thread(target=lambda: server.accept()[0].close())
    accepted.start()
    client = socket.create_connection(("127.0.0.1", port))
    accepted.join()  # the server side closes first: its end of the connection waits in TIME_WAIT
    server.close()
    client.close()
    claim_port("127.0.0.1", port, "--port", "pick another")
