"""`python -m bench.gpu_carry`: packs what `bench.gpu` needs on a GPU machine that reaches no package index.

The lent GPU machines have Python 3.12 with numpy, onnx and a CPU-only onnxruntime, and take at most 64 MiB of
carried files a call. This installs, for CPython 3.12 on manylinux x86_64, onnxruntime-gpu (the serving image's
pin), the serving program's other needs and PyTriton, with what they need, into one folder, packs it as tar.xz and
splits that into parts of at most 60 MiB in `.carry/` (git ignores it).
It prints the commands: one call per part copies it to /tmp/parts (kept while the machine stays warm: 30 s between
calls), and the last joins the parts, checks their sha256, unpacks them, installs slimserve from the checkout and
runs the bench. Checked here in a Python 3.12 venv holding only numpy 2 and onnx, as the machine does.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
PART_BYTES = 60 * 2**20
PUBLIC_PIP = {"PIP_CONFIG_FILE": "/dev/null"}  # PyPI alone, as the device's packages must come from there
# the serving image's pins (serving/requirements-gpu.txt) and PyTriton, with what they need (PyTriton's numpy<2 too,
# which then comes first on the path)
PACKAGES = ["onnxruntime-gpu==1.31.1", "orjson==3.13.0", "prometheus_client==0.26.0", "httptools==0.9.0",
            "nvidia-pytriton==0.7.0"]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]


def main() -> int:
    site = Path(tempfile.mkdtemp(prefix="gpu-site-"))
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platforms, "--target", str(site), *PACKAGES]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    subprocess.run(command, check=True, env=environment | PUBLIC_PIP)
    shutil.rmtree(CARRY, ignore_errors=True)
    CARRY.mkdir()
    archive = CARRY / "site.tar.xz"
    subprocess.run(["tar", "-C", str(site), "-cJf", str(archive), "."], check=True, env={"XZ_OPT": "-6 -T0"})
    shutil.rmtree(site)
    data = archive.read_bytes()
    archive.unlink()
    digest = hashlib.sha256(data).hexdigest()
    parts = [data[start:start + PART_BYTES] for start in range(0, len(data), PART_BYTES)]
    for index, part in enumerate(parts):
        (CARRY / f"part-{index}").write_bytes(part)
    print(f"{len(data) / 2**20:.0f} MiB in {len(parts)} parts under .carry/, sha256 {digest}; the device calls:")
    for index in range(len(parts)):
        print(f"  run(carry=['.carry/part-{index}'], command='mkdir -p /tmp/parts && cp .carry/part-{index} /tmp/parts/')")
    # slimserve itself installed from the checkout (its version comes from the install's metadata), and the bench run
    # from outside the checkout, so that the installed package comes first
    print("  run(command='cd /tmp/parts && test \"$(cat part-* | sha256sum | cut -d\" \" -f1)\" = " + digest
          + " && mkdir -p /tmp/site && cat part-* | xz -d | tar -x -C /tmp/site && cd - >/dev/null && python3 -m pip "
          "install -q --no-deps --no-build-isolation --no-index --target /tmp/slim . && export PYTHONPATH=/tmp/site:/tmp/slim:$PWD "
          "LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/lib/x86_64-linux-gnu && cd /tmp && "
          "PYTHONUNBUFFERED=1 python3 -m bench.gpu --seconds 4 --rounds 2 --pytriton-python python3', timeout_s=540)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
