"""Every requirements*.lock installs from the public PyPI alone, and each says what its venv needs.

pip on a developer's machine may also read local wheel folders and indexes (`pip config list`): a lock can
install there and fail everywhere else, as `torch==2.13.0+cpu` did. Here pip runs with every config file and
PIP_* variable switched off, against https://pypi.org/simple only, as `--dry-run --no-deps`: every pin must
exist there as a wheel for this platform and Python (or as source, for the few pins PyPI has only so), and
nothing is installed. (pypi.org serves wheel metadata on its own, so pip fetches little; an index without it
makes pip download the wheels, still without installing.)
"""

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import ROOT

from slimserve.layers.builder import find_python

pytestmark = pytest.mark.slow

PYPI = "https://pypi.org/simple"
LOCKS = sorted(ROOT.glob("requirements*.lock"))
# The Python each lock is for (the venv the Makefile builds with it): python3.11, but LocalStack's.
LOCK_PYTHON = {lock.name: "3.11" for lock in LOCKS} | {"requirements-localstack.lock": "3.13"}
# Pins PyPI has only as source (pip builds them on install); every other pin must be a wheel.
SOURCE_ONLY = {"requirements-localstack.lock": {"airspeed-ext", "crontab", "jsonpath-rw"}}
# What each .in resolves into, and the locks installed along with it (`make lock` constrains it with them).
IN_FILES = {
    "requirements.in": ["requirements.lock"],
    "requirements-test.in": ["requirements.lock", "requirements-test.lock"],
    "requirements-torch.in": ["requirements-torch.lock"],
}
# Kept out of the main venv: PyTorch has .venv-torch, and `make demo` runs no test tool.
NOT_FOR_THE_DEMO = {"torch", "onnxscript", "pytest", "hypothesis", "schemathesis", "atheris"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def lock_lines(lock) -> list[str]:
    lines = (line.strip() for line in lock.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pins(lock) -> dict[str, str]:
    """Canonical name -> version; every line must be a bare `name==version`."""
    pinned = {}
    for line in lock_lines(lock):
        match = PIN.match(line)
        assert match, f"{lock.name}: not a bare name==version pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pinned, f"{lock.name}: {name} pinned twice"
        pinned[name] = match[2]
    return pinned


def public_pip_env() -> dict[str, str]:
    """The environment with no pip configuration left: no config file, no PIP_* variable but the CA bundle."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.exists(cert):  # a CA bundle says whom to trust, not where packages come from
        env["PIP_CERT"] = cert
    return env


def python_for(lock) -> str:
    version = LOCK_PYTHON[lock.name]
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    python = find_python(version)
    if python is None:
        pytest.fail(f"{lock.name} is for python{version}, which is not installed here (on PATH or under pyenv)")
    return python


def test_every_lock_has_a_python():
    assert [lock.name for lock in LOCKS if lock.name not in LOCK_PYTHON] == []
    assert {"requirements.lock", "requirements-test.lock", "requirements-torch.lock"} <= {lock.name for lock in LOCKS}


def test_no_pin_carries_a_local_version_label():
    # `torch==2.13.0+cpu` is a build no public index serves; `torch==2.13.0` matches a local +cpu wheel anyway
    assert [f"{lock.name}: {line}" for lock in LOCKS for line in lock_lines(lock) if "+" in line] == []


def test_pip_configuration_is_switched_off():
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], env=public_pip_env(),
                            capture_output=True, text=True, check=True).stdout
    sources = [line for line in listed.splitlines()
               if re.search(r"index|find-links|constraint|requirement|no-index|trusted-host", line.split("=")[0])]
    assert sources == []


@pytest.mark.parametrize("lock", LOCKS, ids=lambda lock: lock.name)
def test_every_pin_resolves_from_pypi_alone(lock, tmp_path):
    pinned = pins(lock)
    report = tmp_path / "report.json"
    command = [python_for(lock), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
               "--prefer-binary", "--quiet", "--index-url", PYPI, "--report", str(report), "-r", str(lock)]
    result = subprocess.run(command, env=public_pip_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    install = json.loads(report.read_text())["install"]
    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in install}
    assert resolved == pinned
    sources = {canonicalize_name(item["metadata"]["name"]) for item in install if not item["download_info"]["url"].endswith(".whl")}
    assert sources == SOURCE_ONLY.get(lock.name, set())
    hosts = {item["download_info"]["url"].split("/")[2] for item in install}
    assert hosts == {"files.pythonhosted.org"}


def test_test_lock_only_adds_to_the_main_lock():
    # installed together, requirements-test.lock cannot change a version requirements.lock pins
    assert set(pins(ROOT / "requirements.lock")) & set(pins(ROOT / "requirements-test.lock")) == set()


def test_main_lock_has_no_torch_and_no_test_tools():
    assert set(pins(ROOT / "requirements.lock")) & NOT_FOR_THE_DEMO == set()


def test_torch_lock_agrees_with_the_main_venv():
    # requirements.lock (and requirements-test.lock) constrain requirements-torch.lock: shared pins are equal
    main = pins(ROOT / "requirements.lock") | pins(ROOT / "requirements-test.lock")
    torch = pins(ROOT / "requirements-torch.lock")
    differing = {name: (main[name], pin) for name, pin in torch.items() if name in main and main[name] != pin}
    assert differing == {}
    assert torch["torch"] == "2.13.0"


def top_level_requirements(in_file) -> list[Requirement]:
    """The .in file's requirements, `-e .[extras]` expanded from pyproject.toml (and an extra that names others,
    `slimserve[torch,text]`, expanded in turn)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def expanded(extras) -> list[Requirement]:
        requirements = []
        for extra in extras:
            for requirement in map(Requirement, project["optional-dependencies"][extra]):
                requirements += expanded(requirement.extras) if requirement.name == project["name"] else [requirement]
        return requirements

    requirements = []
    for line in lock_lines(in_file):
        editable = re.fullmatch(r"-e\s+\.(?:\[([\w,\s-]*)\])?", line)
        if editable:
            extras = [extra.strip() for extra in (editable[1] or "").split(",") if extra.strip()]
            requirements += [Requirement(text) for text in project["dependencies"]] + expanded(extras)
        else:
            requirements.append(Requirement(line))
    return requirements


@pytest.mark.parametrize("in_file", sorted(IN_FILES), ids=str)
def test_lock_pins_what_its_in_file_asks_for(in_file):
    pinned = {}
    for lock in IN_FILES[in_file]:
        pinned |= pins(ROOT / lock)
    environment = default_environment() | {"python_version": "3.11", "python_full_version": "3.11.0"}
    unmet = []
    for requirement in top_level_requirements(ROOT / in_file):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name not in pinned or not requirement.specifier.contains(pinned[name], prereleases=True):
            unmet.append(f"{requirement} (pinned: {pinned.get(name)})")
    assert unmet == []
