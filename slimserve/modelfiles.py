"""A model artifact as a config or `register` names it: a model file with the external data files it names.

`artifact` is a .onnx or .tflite file, or a folder holding exactly one. An ONNX model may keep tensors in
external data files (past protobuf's 2 GB limit it must): they belong to the model, under the names the
model gives them, and must lie inside the model's folder. A model with such files is stored as a folder
named by its listing's digest (lambda_handlers/digests.py); a model of one file keeps the layout and sha256
it always had.
"""

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from slimserve.errors import UserError
from slimserve.lambda_handlers.contract import FORMATS
from slimserve.lambda_handlers.digests import CHUNK_BYTES, file_sha256, listing_bytes, name_problem

PROTOBUF_LIMIT = 2**31 - 1  # the most bytes one protobuf message, an ONNX file, can hold
EXTERNAL_DATA_BYTES = 1536 * 2**20
"""Weights past this size are written to an external data file beside the model (protobuf caps one file at 2 GB, and
the graph needs room too): torch.onnx's own threshold, which `convert` and `optimize` follow."""
MANIFEST = "manifest.json"
"""What the store keeps beside a version's files: its number, signature, sizes, source."""


class ModelFilesError(UserError):
    """An artifact that names no model, or external data that cannot go with it; the message names the file."""


class UnreadableModel(ModelFilesError):
    """A model file that does not parse: whether it names external data cannot be known."""


@dataclass(frozen=True)
class ModelFiles:
    path: Path
    """The model file."""
    format: str
    data: tuple[str, ...] = ()
    """The external data files, as the model names them: relative to its folder."""

    @property
    def stored(self) -> dict[str, Path]:
        """{name in the version's folder: file here}: the model file as model.<format>, data files as named."""
        return {f"model.{self.format}": self.path, **{name: self.path.parent / name for name in self.data}}

    @property
    def size(self) -> int:
        return sum(path.stat().st_size for path in self.stored.values())

    @cached_property
    def sha256s(self) -> dict[str, str]:
        """Each stored file's sha256, read once."""
        return {name: file_sha256(path) for name, path in self.stored.items()}

    @cached_property
    def signature(self):
        """The model's inputs and outputs, from a session loaded as serving loads it (from its path, external data
        beside it) and dropped after: loading a multi-gigabyte model takes seconds, so once. A ModelLoadError says why
        it does not load."""
        from slimserve.lambda_handlers.runtimes import load_model  # numpy and a runtime: not for a config's load

        return load_model(self.path, self.format).signature

    @property
    def listing(self) -> bytes | None:
        """The version's listing, where it has several files."""
        return listing_bytes(self.sha256s) if self.data else None

    @property
    def sha256(self) -> str:
        """The version's digest: the model file's sha256, or its listing's where it has several files."""
        listing = self.listing
        return hashlib.sha256(listing).hexdigest() if listing else self.sha256s[f"model.{self.format}"]


def model_files(path: Path) -> ModelFiles:
    """The artifact's model file and the external data files it names, checked to lie inside its folder."""
    path = model_file(path)
    model_format = path.suffix.lstrip(".").lower()
    data = _external_data(path) if model_format == "onnx" else ()
    return ModelFiles(path, model_format, data)


def model_file(path: Path) -> Path:
    """The artifact's model file: itself, or the one a folder holds."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lstrip(".") in FORMATS and p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise ModelFilesError(
                f"{path}: expected a folder holding one model file ({', '.join('.' + f for f in FORMATS)}), "
                f"found {names}"
            )
        path = found[0]
    if not path.is_file():
        raise ModelFilesError(f"{path}: no such file")
    return path


def _external_data(path: Path) -> tuple[str, ...]:
    """The files an ONNX model keeps tensors in, as it names them. A tensor in external data must name its file under
    the key `location`: a model without those bytes names none, and is not parsed (a config check would otherwise
    read a 1.9 GB model into memory to learn that)."""
    size = path.stat().st_size
    if size > PROTOBUF_LIMIT:
        raise UnreadableModel(
            f"{path}: not a loadable onnx model: {size} bytes, past protobuf's 2 GB limit for one file; weights that "
            "large belong in external data files beside it"
        )
    if not _contains(path, b"location"):
        return ()
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as error:  # onnx raises protobuf's DecodeError and others
        raise UnreadableModel(f"{path}: not a loadable onnx model: {error}") from None
    folder = path.parent.resolve()
    names: dict[str, None] = {}
    # onnx has no public "every tensor, subgraphs included"; its own helper is the definition that loading uses
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or folder not in target.parents:
            raise ModelFilesError(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the model's "
                f"folder {folder}; refusing to read it"
            )
        if not target.is_file():
            raise ModelFilesError(
                f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which does not exist"
            )
        name = target.relative_to(folder).as_posix()
        problem = name_problem(name)
        if problem is None and name in (MANIFEST, "model.onnx"):
            problem = f"{name} is a name the model store gives its own files"
        if problem:
            raise ModelFilesError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}: {problem}")
        names[name] = None
    return tuple(names)


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the file holds `needle`, read a chunk at a time."""
    with path.open("rb") as file:
        tail = b""
        while chunk := file.read(CHUNK_BYTES):
            if needle in tail + chunk[: len(needle) - 1] or needle in chunk:
                return True
            tail = chunk[-(len(needle) - 1) :]
    return False
