"""Sample inputs from a user's file, for `convert` and `optimize` to check a model on.

- `.npy`: one array, numbers or unicode strings (never pickled objects: a file of samples runs no code);
- `.npz`: named arrays, one per input or column;
- `.csv`: a header row of column names; a column whose every value parses as a number is float64, any other
  column holds strings, so a table of numeric, categorical and text columns reads as the user trained on it.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.errors import UserError
from slimserve.lambda_handlers.datatypes import V2_TO_NUMPY
from slimserve.lambda_handlers.tensors import shape_text

SUFFIXES = (".npy", ".npz", ".csv")


class SamplesError(UserError):
    """A samples file that cannot be read, or that does not fit the model; the message names the file."""


@dataclass(frozen=True)
class Samples:
    path: Path
    arrays: dict[str, np.ndarray]
    """The named arrays or columns, in the file's order; a .npy holds one, named ''."""

    @property
    def named(self) -> bool:
        return "" not in self.arrays

    @property
    def rows(self) -> int:
        return len(next(iter(self.arrays.values())))

    def matrix(self) -> np.ndarray:
        """One array for a model with one input: the .npy's, or the columns side by side where all are numbers or
        all are strings."""
        if not self.named:
            return self.arrays[""]
        kinds = {_kind(array) for array in self.arrays.values()}
        if len(kinds) > 1:
            raise SamplesError(
                f"{self.path}: the columns mix numbers and strings; a model with one input needs one kind "
                f"(a pipeline fitted on a DataFrame takes each column by name)"
            )
        return np.column_stack(list(self.arrays.values()))

    def frame(self, columns: list[str]):
        """A pandas DataFrame of `columns`, as a pipeline fitted on one (feature_names_in_) wants its input."""
        import pandas as pd  # the user fitted their model on a DataFrame: pandas is theirs

        missing = [name for name in columns if name not in self.arrays]
        if missing and not self.named and self.arrays[""].ndim == 2 and self.arrays[""].shape[1] == len(columns):
            return pd.DataFrame(self.arrays[""], columns=columns)
        if missing:
            raise SamplesError(
                f"{self.path}: no samples for column {missing[0]!r}, which the model was fitted on; "
                f"the file has {', '.join(repr(name) for name in self.arrays if name) or 'one unnamed array'}"
            )
        return pd.DataFrame({name: self.arrays[name] for name in columns})


def _kind(array: np.ndarray) -> str:
    return "text" if array.dtype.kind in "UO" else "number"


def read_samples(path: Path) -> Samples:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        found = "folder" if path.is_dir() else path.suffix or "file"
        raise SamplesError(f"{path}: expected samples in a .npy, .npz or .csv file, found a {found}")
    if not path.is_file():
        raise SamplesError(f"{path}: no such samples file")
    arrays = _read_csv(path) if path.suffix == ".csv" else _read_numpy(path)
    lengths = {name: len(array) for name, array in arrays.items() if array.ndim}
    if not lengths or len(lengths) != len(arrays) or min(lengths.values()) == 0:
        raise SamplesError(f"{path}: expected at least one sample in every array, found {_shapes(arrays)}")
    if len(set(lengths.values())) > 1:
        raise SamplesError(f"{path}: every array needs one row per sample, found {_shapes(arrays)}")
    return Samples(path, arrays)


def _shapes(arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name or 'an array'} of shape {array.shape}" for name, array in arrays.items()) or "none"


NUMPY_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}


def _read_numpy(path: Path) -> dict[str, np.ndarray]:
    with path.open("rb") as file:
        head = file.read(len(NUMPY_MAGIC[path.suffix]))
    if head != NUMPY_MAGIC[path.suffix]:
        raise SamplesError(
            f"{path}: not a numpy {path.suffix} file: it starts with {head!r}, not {NUMPY_MAGIC[path.suffix]!r}"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise SamplesError(
                f"{path}: holds Python objects, which would need pickle to load: save numbers or strings "
                "(np.asarray(texts, dtype=str)), or a .csv"
            ) from None
        raise SamplesError(f"{path}: not a numpy {path.suffix} file: {error}") from None
    except OSError as error:
        raise SamplesError(f"{path}: not a numpy {path.suffix} file: {error}") from None
    if isinstance(loaded, np.ndarray):
        return {"": loaded}
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SamplesError(f"{path}: cannot read it as UTF-8 CSV: {error}") from None
    if len(rows) < 2:
        raise SamplesError(f"{path}: expected a header row of column names and at least one row of samples")
    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header) or not all(header):
        raise SamplesError(f"{path}: the header row needs distinct, non-empty column names, found {header}")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise SamplesError(
                f"{path}, line {number}: expected {len(header)} values, as the header has, found {len(row)}"
            )
    return {name: _column([row[index] for row in body]) for index, name in enumerate(header)}


def _column(values: list[str]) -> np.ndarray:
    try:
        return np.array([float(value) for value in values])
    except ValueError:
        return np.array(values, dtype=str)


def model_feeds(path: Path, signature) -> dict[str, np.ndarray]:
    """The samples in `path` as a model of `signature` takes them: a .npy feeds its only input; a .npz or .csv
    names each input."""
    samples = read_samples(path)
    specs = signature.inputs
    if not samples.named:
        if len(specs) != 1:
            raise SamplesError(
                f"{path}: the model takes {len(specs)} inputs; give a .npz with one array per input name"
            )
        return {specs[0].name: _fit(path, specs[0], samples.arrays[""])}
    missing = [s.name for s in specs if s.name not in samples.arrays]
    if missing:
        raise SamplesError(f"{path}: no samples for input {missing[0]!r}; the file has {', '.join(samples.arrays)}")
    return {spec.name: _fit(path, spec, samples.arrays[spec.name]) for spec in specs}


def _fit(path: Path, spec, array: np.ndarray) -> np.ndarray:
    """The samples for one input, checked against its shape and cast to its datatype where no value changes kind;
    a column (of a .csv) feeds an input of one value per row."""
    if array.ndim == 1 and len(spec.shape) == 2 and spec.shape[1] in (1, -1):
        array = array.reshape(-1, 1)
    if not spec.shape_matches(array.shape):
        raise SamplesError(
            f"{path}: expected samples for input {spec.name!r} of shape {shape_text(spec.shape)} (-1 is any "
            f"size), found shape {shape_text(array.shape)}"
        )
    dtype = V2_TO_NUMPY[spec.datatype]
    if array.dtype != dtype and not np.can_cast(array.dtype, dtype, "same_kind"):
        raise SamplesError(
            f"{path}: expected samples for input {spec.name!r} of datatype {spec.datatype}, found {array.dtype}"
        )
    return array.astype(dtype, copy=False)
