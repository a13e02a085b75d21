"""How a model version's bytes are named: one sha256, for one file or for several.

A version of one file is named by that file's sha256. A version of several files (an ONNX model whose
tensors live in external data files beside it) is named by the sha256 of its listing, `files.sha256`:

    <sha256 of the file>  <name>\\n     one line per file, sorted by name

The names are relative to the version's folder, `/`-separated. It is what `sha256sum` prints, so in a
downloaded folder `sha256sum -c files.sha256` checks every file and `sha256sum files.sha256` gives the
version's digest: one digest covers every file's name and bytes, and each file is checked on its own.
"""

import hashlib

LISTING = "files.sha256"
CHUNK_BYTES = 8 * 1024 * 1024  # what a stream or hash holds at a time
_HEX = frozenset("0123456789abcdef")


class ListingError(ValueError):
    """A listing that does not parse, or names a file outside its folder; the message says which line."""


def sha256_of_chunks(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path) -> str:
    """A file's sha256, read a chunk at a time (a model may not fit in memory twice)."""
    with open(path, "rb") as file:
        return sha256_of_chunks(iter(lambda: file.read(CHUNK_BYTES), b""))


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a file of a version's folder, or None: it must stay inside the folder."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or "\n" in name or any(p in ("", ".", "..") for p in parts):
        return "expected a relative path inside the model's folder"
    if name == LISTING:
        return f"{LISTING} is the version's listing"
    return None


def listing_bytes(files: dict[str, str]) -> bytes:
    """The listing of a version's files, {name: sha256}."""
    return "".join(f"{files[name]}  {name}\n" for name in sorted(files)).encode()


def read_listing(data: bytes) -> dict[str, str]:
    """The {name: sha256} a listing names; a ListingError for a line that is not `<sha256>  <safe name>`."""
    files: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        sha256, separator, name = line.partition("  ")
        problem = name_problem(name) if separator else "expected '<sha256>  <name>'"
        if problem is None and (len(sha256) != 64 or not _HEX.issuperset(sha256)):
            problem = f"{sha256[:70]!r} is not a sha256"
        if problem is None and name in files:
            problem = f"{name!r} is listed twice"
        if problem:
            raise ListingError(f"line {number}: {problem}")
        files[name] = sha256
    if not files:
        raise ListingError("no files listed")
    return files
