"""Trained models to ONNX or TFLite, checked against the original on sample inputs before anything is written.

scikit-learn estimators and pipelines go through skl2onnx; PyTorch modules through
torch.onnx.export with a dynamic batch axis. Keras models go to TFLite through
TensorFlow's converter, which only the optional `tensorflow` extra installs.
"""

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.errors import UserError
from slimserve.lambda_handlers.runtimes import OnnxModel, TfliteModel
from slimserve.modelfiles import EXTERNAL_DATA_BYTES, model_files

TARGET_OPSET = 17
# What each saved Keras format starts with: a .keras file is a zip archive, an .h5 file HDF5.
KERAS_MAGIC = {".keras": b"PK\x03\x04", ".h5": b"\x89HDF\r\n\x1a\n"}
KERAS_SUFFIXES = tuple(KERAS_MAGIC)
TENSORFLOW_EXTRA = "pip install 'slimserve[tensorflow]'"
FORMAT_NAMES = {"onnx": "ONNX", "tflite": "TFLite"}


class ConvertError(UserError):
    """A model that cannot be converted, or whose conversion disagrees with it; the message says how."""


@dataclass(frozen=True)
class Conversion:
    path: str
    max_abs_diff: float
    label_agreement: float | None
    samples: int
    data_files: tuple[str, ...] = ()
    """External data files written beside the model, as it names them."""


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Where to write `out`: a path in a folder of its own beside it. What is written there (the model, its external
    data files) moves into place when the block ends without an error; otherwise nothing is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as folder:
        yield Path(folder) / out.name
        for path in sorted(Path(folder).iterdir()):
            path.replace(out.parent / path.name)


def save_onnx(model, path: Path, external: bool = False) -> None:
    """`model` (an onnx.ModelProto) at `path`, its weights in `<name>.data` beside it where asked or where they pass
    EXTERNAL_DATA_BYTES; below that, one self-contained file."""
    import onnx

    tensors = onnx.external_data_helper._get_all_tensors(model)  # onnx's own definition of every tensor
    external = external or sum(len(tensor.raw_data) for tensor in tensors) > EXTERNAL_DATA_BYTES
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # a model read back from there holds its data now; a stale file must not stay
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name)


def _check(
    model: OnnxModel | TfliteModel,
    expected: dict[str, np.ndarray],
    samples: np.ndarray,
    out: Path,
    tolerance: float,
) -> tuple[float, float | None]:
    """Max |diff| and label agreement of `model`, loaded in the runtime that will serve it, so the check is the
    served behaviour; a ConvertError past the tolerance."""
    got = model.run({model.signature.inputs[0].name: samples}, list(expected))
    max_diff, agreement = 0.0, None
    for name, reference in expected.items():
        if reference.dtype.kind == "f":
            max_diff = max(max_diff, float(np.abs(got[name].astype(np.float64) - reference).max()))
        else:
            agreement = float((got[name] == reference).mean())
    if max_diff > tolerance or (agreement is not None and agreement < 1.0):
        found = f"max |diff| {max_diff:.3g} (tolerance {tolerance:g})" + (
            f", labels agree on {agreement:.2%}" if agreement is not None else ""
        )
        raise ConvertError(
            f"{out}: not written: the {FORMAT_NAMES[model.format]} model disagrees with the original "
            f"on the samples: {found}"
        )
    return max_diff, agreement


def _check_and_write(
    model: OnnxModel | TfliteModel,
    model_bytes: bytes,
    expected: dict[str, np.ndarray],
    samples: np.ndarray,
    out: Path,
    tolerance: float,
) -> Conversion:
    """`model` is `model_bytes` loaded: checked, then written."""
    max_diff, agreement = _check(model, expected, samples, out, tolerance)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model_bytes)
    return Conversion(str(out), max_diff, agreement, len(samples))


def convert_sklearn(estimator, samples: np.ndarray, out: Path, tolerance: float = 1e-4) -> Conversion:
    """A fitted estimator or pipeline; classifiers give `label` and `probabilities` tensors."""
    from skl2onnx import to_onnx
    from skl2onnx.common.exceptions import MissingShapeCalculator

    samples = np.asarray(samples, dtype=np.float32)
    classifier = hasattr(estimator, "predict_proba")
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = {id(final): {"zipmap": False}} if classifier else None
    try:
        model = to_onnx(estimator, samples[:1], options=options, target_opset=TARGET_OPSET)
    except MissingShapeCalculator as error:
        raise ConvertError(f"{out}: skl2onnx cannot convert {type(final).__name__}: {error}") from None
    names = {"X": "features", "output_label": "label", "output_probability": "probabilities", "variable": "predictions"}
    _rename(model, names)
    clean_opset_imports(model)
    if classifier:
        expected = {"label": estimator.predict(samples), "probabilities": estimator.predict_proba(samples)}
    else:
        expected = {"predictions": np.asarray(estimator.predict(samples)).reshape(len(samples), -1)}
    onnx_bytes = model.SerializeToString()
    return _check_and_write(OnnxModel(onnx_bytes), onnx_bytes, expected, samples, Path(out), tolerance)


def clean_opset_imports(model) -> None:
    """One opset import per domain ('' and 'ai.onnx' are the same one), the newest kept: skl2onnx can write the
    default domain twice, which ONNX Runtime's quantizer refuses ('Failed to find proper ai.onnx domain')."""
    from onnx import helper

    newest = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        newest[domain] = max(newest.get(domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in newest.items())


def _rename(model, names: dict[str, str]) -> None:
    """Give the graph's inputs and outputs names a client can guess; inner names stay."""
    graph = model.graph
    io_names = {value.name for value in [*graph.input, *graph.output]}
    names = {old: new for old, new in names.items() if old in io_names}
    for value in [*graph.input, *graph.output]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]


def convert_torch(
    module,
    samples: np.ndarray,
    out: Path,
    tolerance: float = 1e-4,
    input_name: str = "input",
    output_name: str = "output",
    external_data: bool = False,
) -> Conversion:
    """An nn.Module exported with its batch dimension dynamic; checked on `samples` in eval mode, as loaded from the
    files written. Weights past EXTERNAL_DATA_BYTES (or any, with `external_data`) go to `<out>.data` beside it."""
    import torch

    module = module.eval()
    samples = np.asarray(samples, dtype=np.float32)
    tensor = torch.from_numpy(samples)
    try:
        with torch.no_grad():
            expected = module(tensor).numpy()
    except Exception as error:  # torch raises many kinds; the samples (or the module) are what is at fault
        raise ConvertError(f"{out}: the module cannot run on the samples of shape {samples.shape}: {error}") from None
    batch = torch.export.Dim("batch", min=1)
    example = tensor[:2] if len(tensor) >= 2 else torch.cat([tensor[:1]] * 2)  # a batch of 1 would be specialized away
    try:
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            opset_version=TARGET_OPSET,
            dynamo=True,
            verbose=False,
        )
    except Exception as error:  # torch raises many kinds; the module is what is at fault
        raise ConvertError(f"{out}: torch.onnx.export failed: {error}") from None
    out = Path(out)
    with staged(out) as path:
        # torch writes external data past 1536 MiB of weights by itself: EXTERNAL_DATA_BYTES is that threshold
        program.save(path, external_data=external_data)
        max_diff, agreement = _check(OnnxModel(path), {output_name: expected}, samples, out, tolerance)
        data_files = model_files(path).data
    return Conversion(str(out), max_diff, agreement, len(samples), data_files)


def load_keras(path: Path):
    """A saved Keras model; a corrupt file is refused before TensorFlow, which is optional and slow to import."""
    path = Path(path)
    magic = KERAS_MAGIC[path.suffix]
    try:
        with path.open("rb") as file:
            head = file.read(len(magic))
    except OSError as error:
        raise ConvertError(f"{path}: cannot read the Keras model: {error.strerror}") from None
    if head != magic:
        raise ConvertError(
            f"{path}: not a Keras model: a {path.suffix} file starts with {magic!r}, this one with {head!r}"
        )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up notes would bury the CLI's output
    try:
        import tensorflow as tf
    except ImportError:
        raise ConvertError(
            f"{path}: converting a Keras model needs TensorFlow, which is not installed: {TENSORFLOW_EXTRA}"
        ) from None
    try:
        model = tf.keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many kinds for a damaged archive; the file is what is at fault
        raise ConvertError(f"{path}: Keras cannot load it: {error}") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConvertError(
            f"{path}: expected a Keras model with one input and one output, "
            f"found {len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    return model


def keras_to_tflite(model, named: Path, quantization: str | None = None) -> bytes:
    """TFLite keeping the Keras input's dynamic batch; `quantization` "int8" stores weights as int8
    (dynamic range), "fp16" as float16; inputs and outputs stay float32 either way. Errors name `named`."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantization:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the temporary SavedModel's endpoints
            return converter.convert()
    except Exception as error:  # the converter raises many kinds; the model is what is at fault
        raise ConvertError(f"{named}: TensorFlow's TFLite converter failed: {error}") from None


def convert_keras(model, samples: np.ndarray, out: Path, tolerance: float = 1e-4) -> Conversion:
    """A Keras model (from `load_keras`) to TFLite, checked with LiteRT, the runtime that serves it."""
    out = Path(out)
    if out.suffix != ".tflite":
        raise ConvertError(f"{out}: a Keras model converts to TFLite: expected an output path ending in .tflite")
    samples = np.asarray(samples, dtype=np.float32)
    expected = np.asarray(model.predict(samples, verbose=0))
    tflite_bytes = keras_to_tflite(model, out)
    tflite = TfliteModel(tflite_bytes)
    return _check_and_write(tflite, tflite_bytes, {tflite.signature.outputs[0].name: expected}, samples, out, tolerance)
