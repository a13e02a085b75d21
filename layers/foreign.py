"""A Python of another architecture to smoke-test layers with: Debian's own packages, unpacked, run under qemu-user.

No root, no chroot, no Docker: the packages a Python needs are resolved from Debian's
signed index, checked against it, unpacked into a folder of the user cache, and the
interpreter runs as `qemu-<machine>-static -L <root> <root>/usr/bin/python3.X`, so the
loader and every library it opens come from that folder. Debian ships one Python per
release; a version no release ships cannot be run, and the build says so.

The folder also models what Lambda's arm64 machine shows a process, where qemu would
show this machine's instead: a Graviton2 /proc/cpuinfo (with this machine's x86 one,
ONNX Runtime's cpuinfo finds no processor and crashes at import), and a
/sys/devices/system/cpu whose processor lists cannot be read, as on Lambda (ONNX
Runtime issues 10038 and 15650 report releases that abort there; the pinned one only warns).
"""

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from slimserve.assets import cache_dir

DEBIAN_RELEASES = {"3.11": "bookworm", "3.13": "trixie"}
"""The Python each Debian release ships: the only versions this can run."""
MIRROR_VARIABLE = "SLIMSERVE_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBIAN_ARCHITECTURES = {"aarch64": "arm64", "x86_64": "amd64"}
# libstdc++ and libgcc: every runtime's wheels link them and expect the system's copy
ROOT_PACKAGES = ("python{version}-minimal", "libpython{version}-stdlib", "libstdc++6", "libgcc-s1")
LAMBDA_ARM64_PROCESSOR = """\
processor\t: {number}
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""
"""One Graviton2 (Neoverse N1) core as Linux lists it: Lambda's arm64 functions run on Graviton2."""
# Present in every real system, needed by no library a layer loads: not worth their download
SKIPPED = {"debconf", "perl-base", "tzdata", "media-types", "netbase", "dpkg", "readline-common", "libgdbm-compat4t64"}


class ForeignPythonUnavailable(Exception):
    """Why a layer of another architecture cannot be run here: the smoke test reports it and goes on."""


def foreign_python(version: str, machine: str, log=None) -> tuple[list[str], str]:
    """The command that runs python`version` for `machine` here, unpacking its Debian packages on first use,
    and how it runs, in words."""
    release = DEBIAN_RELEASES.get(version)
    if release is None:
        shipped = ", ".join(f"{v} ({r})" for v, r in DEBIAN_RELEASES.items())
        raise ForeignPythonUnavailable(f"no {machine} python{version} to run it with (Debian ships {shipped})")
    qemu = shutil.which(f"qemu-{machine}-static") or shutil.which(f"qemu-{machine}")
    if qemu is None:
        raise ForeignPythonUnavailable(
            f"no qemu-{machine}-static here (Debian and Ubuntu: apt-get install qemu-user-static)"
        )
    architecture = DEBIAN_ARCHITECTURES[machine]
    root = cache_dir() / "sysroots" / f"debian-{release}-{architecture}"
    if not (root / ".complete").exists():
        if log:
            log(f"unpacking Debian {release}'s {architecture} python{version} into {root} (once)")
        _unpack_sysroot(root, release, version, architecture)
    command = [qemu, "-L", str(root), str(root / "usr" / "bin" / f"python{version}")]
    return command, f"under {Path(qemu).name}, with Debian {release}'s python{version}"


def _unpack_sysroot(root: Path, release: str, version: str, architecture: str) -> None:
    mirror = os.environ.get(MIRROR_VARIABLE, DEFAULT_MIRROR).rstrip("/")
    index = _signed_index(mirror, release, architecture)
    packages = _closure(index, [name.format(version=version) for name in ROOT_PACKAGES])
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for name in sorted(packages):
            stanza = index[name]
            deb = _download(f"{mirror}/{stanza['Filename']}")
            if hashlib.sha256(deb).hexdigest() != stanza["SHA256"]:
                raise ForeignPythonUnavailable(
                    f"{stanza['Filename']} does not match the sha256 in Debian's signed index"
                )
            _unpack_deb(deb, staging)
        for merged in ("lib", "bin", "sbin"):  # Debian's merged /usr, which a real install gets from base-files
            if not (staging / merged).exists():
                (staging / merged).symlink_to(f"usr/{merged}")
        if architecture == "arm64":
            _model_lambda_arm64(staging)
        (staging / ".complete").write_text("\n".join(sorted(packages)) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _model_lambda_arm64(root: Path) -> None:
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text("\n".join(LAMBDA_ARM64_PROCESSOR.format(number=n) for n in range(2)))
    for unreadable in ("possible", "present"):  # a folder: open() works, read() fails, as cpuinfo sees it on Lambda
        (root / "sys" / "devices" / "system" / "cpu" / unreadable).mkdir(parents=True, exist_ok=True)


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as error:
        raise ForeignPythonUnavailable(
            f"cannot download {url} ({error}); set {MIRROR_VARIABLE} to a Debian mirror you can reach"
        )


def _signed_index(mirror: str, release: str, architecture: str) -> dict[str, dict[str, str]]:
    """Debian's package index for the release, checked against its InRelease file, whose signature gpgv checks."""
    gpgv = shutil.which("gpgv")
    if gpgv is None or not KEYRING.exists():
        raise ForeignPythonUnavailable("cannot check Debian's signature: gpgv and debian-archive-keyring are needed")
    signed = _download(f"{mirror}/dists/{release}/InRelease")
    with tempfile.TemporaryDirectory() as scratch:
        release_file = Path(scratch) / "Release"
        check = subprocess.run(
            [gpgv, "--keyring", str(KEYRING), "--output", str(release_file), "-"], input=signed, capture_output=True
        )
        if check.returncode != 0:
            raise ForeignPythonUnavailable(
                f"Debian's {release} InRelease fails its signature check: "
                f"{check.stderr.decode(errors='replace').strip()[-300:]}"
            )
        release_text = release_file.read_text()
    path = f"main/binary-{architecture}/Packages.xz"
    expected = _release_sha256(release_text, path)
    compressed = _download(f"{mirror}/dists/{release}/{path}")
    if hashlib.sha256(compressed).hexdigest() != expected:
        raise ForeignPythonUnavailable(f"{path} of {release} does not match its signed Release file")
    return _parse_index(lzma.decompress(compressed).decode())


def _release_sha256(release_text: str, path: str) -> str:
    in_sha256 = False
    for line in release_text.splitlines():
        if not line.startswith(" "):
            in_sha256 = line.startswith("SHA256:")
        elif in_sha256 and line.split()[-1] == path:
            return line.split()[0]
    raise ForeignPythonUnavailable(f"Debian's Release file lists no {path}")


def _parse_index(text: str) -> dict[str, dict[str, str]]:
    """Package name -> its stanza; a virtual name (Provides) maps to the first package providing it."""
    index: dict[str, dict[str, str]] = {}
    provided: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        stanza, key = {}, None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                stanza[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                stanza[key] = value.strip()
        if "Package" in stanza:
            index.setdefault(stanza["Package"], stanza)
            for virtual in stanza.get("Provides", "").split(","):
                if virtual.strip():
                    provided.setdefault(virtual.split("(")[0].strip(), stanza)
    return {**provided, **index}


def _closure(index: dict[str, dict[str, str]], roots: list[str]) -> set[str]:
    """Every package the roots need (Depends and Pre-Depends; of alternatives, the first that exists)."""
    wanted, queue = set(), list(roots)
    while queue:
        name = queue.pop()
        if name not in index:
            raise ForeignPythonUnavailable(f"Debian's index has no package {name}")
        package = index[name]["Package"]
        if package in wanted or package in SKIPPED:
            continue
        wanted.add(package)
        for field in ("Pre-Depends", "Depends"):
            for clause in filter(None, (c.strip() for c in index[name].get(field, "").split(","))):
                names = [alternative.split("(")[0].split(":")[0].strip() for alternative in clause.split("|")]
                queue.append(next((n for n in names if n in index), names[0]))
    return wanted


def _unpack_deb(deb: bytes, root: Path) -> None:
    """A .deb is an ar archive; its data.tar.* holds the files."""
    if not deb.startswith(b"!<arch>\n"):
        raise ForeignPythonUnavailable("a downloaded package is not a Debian archive")
    offset = 8
    while offset < len(deb):
        header = deb[offset : offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
        body = deb[offset + 60 : offset + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as archive:
                archive.extractall(root, filter="tar")
            return
        offset += 60 + size + size % 2
    raise ForeignPythonUnavailable("a downloaded package has no data.tar")
