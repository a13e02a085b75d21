"""Build slim Lambda layers without Docker: pip for the target platform, then slim.

A layer is `<out>/<runtime>-py<version>-<arch>-<key>/python/...` (Lambda mounts it at
/opt/python), `<key>` a hash of everything that shapes it: a second build with nothing
changed finds the folder and does nothing, so one folder of layers serves every project
(slimserve keeps it in the user cache), and a layer in use is never rebuilt in place.
"""

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimserve.assets import layer_cache
from slimserve.errors import UserError

from .foreign import ForeignPythonUnavailable, foreign_python

HERE = Path(__file__).resolve().parent
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024  # function code plus all its layers
ARCHITECTURES = {"x86_64": "x86_64", "arm64": "aarch64"}

# Never imported by inference: tests, headers, type stubs, numpy's subpackages the
# handler does not touch, and console scripts. Each runtime adds its own below.
COMMON_DROPS = (
    "bin",
    "__pycache__",
    "*/__pycache__",
    "*.pyi",
    "*.pxd",
    "*.h",
    "*.c",
    "*/tests",
    "numpy/_core/include",
    "numpy/_core/_simd.*",  # numpy's SIMD test harness
    "numpy/_core/_multiarray_tests.*",
    "numpy/_core/lib",
    "numpy/f2py",
    "numpy/_pyinstaller",
    "numpy/typing",
    "numpy/testing",
    "numpy/random",
    "numpy/fft",
    "numpy/polynomial",
    "numpy/ma",
    "numpy/doc",
)


@dataclass(frozen=True)
class Recipe:
    requirements: str
    """File under layers/ pinning what the layer holds."""
    python_versions: tuple[str, ...]
    drops: tuple[str, ...] = ()
    """Paths (relative to python/, fnmatch patterns) removed after install."""
    smoke: str = ""
    """Python run in the target interpreter with only the layer on the path; must exit 0."""
    strip: tuple[str, ...] = ()
    """Libraries (patterns) whose unneeded symbols are stripped."""
    deployed: bool = True
    """False for what only the local runner uses: `slimserve audit` checks the deployed ones."""


RECIPES = {
    "onnx": Recipe(
        "onnx.txt",
        ("3.11", "3.12", "3.13"),
        drops=(
            "onnxruntime/capi/libonnxruntime.so*",  # the Python module links its own copy statically
            "onnxruntime/tools",
            "onnxruntime/transformers",
            "onnxruntime/quantization",
            "onnxruntime/datasets",
            # pulled in as dependencies, used only by the tools removed above
            "google",
            "protobuf-*",
            "flatbuffers",
            "flatbuffers-*",
            "packaging",
            "packaging-*",
            # onnxruntime-extensions' Python tools (they import onnx, which the layer lacks): the runtime registers
            # its operator library by path
            "onnxruntime_extensions/tools",
            "onnxruntime_extensions/onnxprocess",
            "onnxruntime_extensions/pnp",
        ),
        smoke="import numpy, onnxruntime, importlib.util, pathlib; "
        "folder = pathlib.Path(importlib.util.find_spec('onnxruntime_extensions').origin).parent; "
        "onnxruntime.SessionOptions().register_custom_ops_library(str(next(folder.glob('_extensions_pydll*'))))",
    ),
    "tflite": Recipe(
        "tflite.txt",
        ("3.12", "3.13"),
        drops=(
            "ai_edge_litert/libLiteRtWebGpuAccelerator.so",
            "ai_edge_litert/libLiteRt.so",  # the CompiledModel API; the Interpreter does not load it
            "ai_edge_litert/tools",
            "ai_edge_litert/vendors",
            "ai_edge_litert/aot",
            "ai_edge_litert/*_pb2.py",
            "ai_edge_litert/schema_py_generated.py",
            # dependencies of the converter and tools, not of the Interpreter
            "google",
            "protobuf-*",
            "ml_dtypes",
            "ml_dtypes-*",
            "tqdm",
            "tqdm-*",
            "flatbuffers",
            "flatbuffers-*",
            "backports*",
            "typing_extensions*",
        ),
        smoke="import numpy; from ai_edge_litert.interpreter import Interpreter",
        strip=("ai_edge_litert/libpywrap_litert_common.so",),
    ),
    "tflite-py311": Recipe(
        "tflite-py311.txt",
        ("3.11",),
        smoke="import numpy; from tflite_runtime.interpreter import Interpreter",
    ),
    # What Lambda's own Python runtime carries in /var/runtime (the runtime interface
    # client and boto3); the local runner puts it on the path, it is never deployed.
    "lambda-runtime": Recipe(
        "lambda-runtime.txt",
        ("3.11", "3.12", "3.13"),
        smoke="import awslambdaric.bootstrap, boto3",
        deployed=False,
    ),
}


class LayerBuildError(UserError):
    pass


@dataclass
class LayerBuild:
    runtime: str
    python_version: str
    architecture: str
    path: str
    """The folder Lambda mounts at /opt: it holds python/."""
    key: str
    naive_bytes: int
    slim_bytes: int
    files: int
    pyc: str
    """"unchecked-hash" when compiled for the target Python, else why not."""
    stripped: str
    smoke: str
    """"passed", or why it could not run here."""
    built_seconds: float
    cached: bool = field(default=False, compare=False)

    @property
    def python_path(self) -> Path:
        return Path(self.path) / "python"


def find_python(version: str) -> str | None:
    """An interpreter of `version` on this machine: on PATH, or under pyenv."""
    candidates = [shutil.which(f"python{version}")]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(str(p) for p in pyenv_root.glob(f"versions/{version}.*/bin/python{version}"))
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def layer_key(runtime: str, python_version: str, architecture: str) -> str:
    """What a build of this layer depends on, hashed: the cache key, and the CDK asset hash."""
    recipe = RECIPES[runtime]
    digest = hashlib.sha256()
    for part in (
        runtime,
        python_version,
        architecture,
        (HERE / recipe.requirements).read_text(),
        Path(__file__).read_text(),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _pip_install(requirements: Path, target: Path, python_version: str, architecture: str) -> None:
    machine = ARCHITECTURES[architecture]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-warn-conflicts",
        "--target",
        str(target),
        "--implementation",
        "cp",
        "--python-version",
        python_version,
        "--only-binary=:all:",
        "--no-compile",
        # wheels of ONNX Runtime and LiteRT are tagged 2_27/2_28: without these pip quietly picks old releases
        "--platform",
        f"manylinux_2_28_{machine}",
        "--platform",
        f"manylinux_2_27_{machine}",
        "--platform",
        f"manylinux2014_{machine}",
        "--platform",
        f"manylinux_2_17_{machine}",
        "-r",
        str(requirements),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = "\n".join(line for line in result.stderr.splitlines() if "is ignored: it is neither" not in line)
        raise LayerBuildError(
            f"pip could not install {requirements.name} for python{python_version} {architecture}:\n{detail}"
        )


def _drop(root: Path, patterns: tuple[str, ...]) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts)):
        relative = path.relative_to(root).as_posix()
        if path.exists() and any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _strip(root: Path, patterns: tuple[str, ...], checkable: bool) -> str:
    """Drop symbols loading never needs from the named libraries, where the smoke test can prove they still load.

    Only named ones: wheels repaired by auditwheel carry patchelf-edited libraries that
    stripping breaks ("ELF load command address/offset not page-aligned", seen with numpy).
    """
    strip = shutil.which("llvm-strip") or shutil.which("strip")  # llvm-strip reads every architecture's ELF
    if not patterns:
        return "nothing to strip"
    if strip is None:
        return "not stripped: no strip tool"
    if not checkable:
        return "not stripped: the result could not be loaded here to check it"
    stripped = []
    for library in root.rglob("*.so*"):
        relative = library.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
            subprocess.run([strip, "--strip-unneeded", str(library)], check=True, capture_output=True)
            stripped.append(relative)
    return "stripped " + ", ".join(stripped)


def _compile(root: Path, python: str | None, python_version: str) -> str:
    """Bytecode for the target Python, unchecked: Lambda's filesystem is read-only and never changes."""
    if python is None:
        return f"not compiled: no python{python_version} here (imports will be slower on Lambda)"
    code = (
        "import compileall, py_compile, sys; ok = compileall.compile_dir(sys.argv[1], quiet=1, workers=0, "
        "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH); sys.exit(0 if ok else 1)"
    )
    result = subprocess.run([python, "-c", code, str(root)], capture_output=True, text=True)
    return (
        "unchecked-hash" if result.returncode == 0 else f"compile failed: {result.stdout[-500:]}{result.stderr[-500:]}"
    )


def _target_python(python: str | None, python_version: str, architecture: str, log=None) -> tuple[list[str], str] | str:
    """The command that runs the layer's Python here (this machine's own, or another architecture's under qemu)
    and how it runs, in words; else why there is none."""
    machine = ARCHITECTURES[architecture]
    if machine == os.uname().machine:
        return ([python], "") if python else f"no python{python_version} here"
    try:
        return foreign_python(python_version, machine, log)
    except ForeignPythonUnavailable as reason:
        return f"{architecture} layer on a {os.uname().machine} machine, {reason}"


def _smoke(root: Path, recipe: Recipe, target: tuple[list[str], str] | str) -> str:
    if isinstance(target, str):
        return f"not run: {target}"
    command, how = target
    result = subprocess.run(
        [*command, "-S", "-c", recipe.smoke],
        env={"PYTHONPATH": str(root), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise LayerBuildError(
            f"the slimmed layer fails its smoke test ({recipe.smoke}){' ' + how if how else ''}:\n"
            f"{result.stderr[-2000:]}"
        )
    return f"passed {how}".strip()


def build_layer(
    runtime: str,
    python_version: str = "3.12",
    architecture: str = "x86_64",
    out: Path | None = None,
    function_bytes: int = 0,
    log=None,
) -> LayerBuild:
    """The layer under `out` (default: the user cache's layers, shared by every project), built if missing."""
    if runtime not in RECIPES:
        raise LayerBuildError(f"unknown layer runtime {runtime!r}: expected one of {', '.join(RECIPES)}")
    recipe = RECIPES[runtime]
    if python_version not in recipe.python_versions:
        raise LayerBuildError(
            f"the {runtime} layer supports python {', '.join(recipe.python_versions)}, not {python_version}"
        )
    if architecture not in ARCHITECTURES:
        raise LayerBuildError(f"unknown architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")

    key = layer_key(runtime, python_version, architecture)
    folder = Path(out or layer_cache()) / f"{runtime}-py{python_version}-{architecture}-{key[:12]}"
    cached = _cached(folder, key, function_bytes, runtime)
    if cached:
        return cached
    if log:
        log(f"building the {runtime} layer for python{python_version} {architecture} into {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        return _build(runtime, recipe, python_version, architecture, key, folder, staging, function_bytes, log)
    finally:
        shutil.rmtree(
            staging, ignore_errors=True
        )  # a failed build never leaves a half layer where a good one is expected


def _cached(folder: Path, key: str, function_bytes: int, runtime: str) -> LayerBuild | None:
    stamp = folder / "layer.json"
    if not stamp.exists():
        return None
    build = LayerBuild(**json.loads(stamp.read_text()))
    if build.key != key:
        return None
    build.cached = True
    _check_limit(build.slim_bytes + function_bytes, runtime)
    return build


def _build(
    runtime: str,
    recipe: Recipe,
    python_version: str,
    architecture: str,
    key: str,
    folder: Path,
    staging: Path,
    function_bytes: int,
    log,
) -> LayerBuild:
    started = time.perf_counter()
    site = staging / "python"
    _pip_install(HERE / recipe.requirements, site, python_version, architecture)
    naive = tree_bytes(site)
    _drop(site, COMMON_DROPS + recipe.drops)
    python = find_python(python_version)
    target = _target_python(python, python_version, architecture, log)
    stripped = _strip(site, recipe.strip, checkable=not isinstance(target, str))
    pyc = _compile(site, python, python_version)
    smoke = _smoke(site, recipe, target)
    slim = tree_bytes(site)
    _check_limit(slim + function_bytes, runtime)

    build = LayerBuild(
        runtime,
        python_version,
        architecture,
        str(folder.resolve()),
        key,
        naive,
        slim,
        sum(1 for f in site.rglob("*") if f.is_file()),
        pyc,
        stripped,
        smoke,
        round(time.perf_counter() - started, 1),
    )
    (staging / "layer.json").write_text(json.dumps({k: v for k, v in asdict(build).items() if k != "cached"}, indent=2))
    try:
        staging.rename(folder)
    except OSError:  # another process built the same layer meanwhile: same key, same contents
        return _cached(folder, key, function_bytes, runtime) or build
    return build


def _check_limit(total: int, runtime: str) -> None:
    if total > LAMBDA_UNZIPPED_LIMIT:
        raise LayerBuildError(
            f"the {runtime} layer plus function code is {total / 2**20:.1f} MiB unzipped; "
            f"Lambda allows {LAMBDA_UNZIPPED_LIMIT / 2**20:.0f} MiB"
        )
