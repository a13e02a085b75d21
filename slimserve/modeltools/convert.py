"""Trained models to ONNX or TFLite, checked against the original on sample inputs before anything is written.

scikit-learn estimators and pipelines go through skl2onnx; PyTorch modules through
torch.onnx.export with a dynamic batch axis. Keras models go to TFLite through
TensorFlow's converter, which only the optional `tensorflow` extra installs.
"""

import contextlib
import dataclasses
import inspect
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimserve.errors import UserError
from slimserve.lambda_handlers.runtimes import ModelLoadError, OnnxModel, TfliteModel
from slimserve.modelfiles import EXTERNAL_DATA_BYTES, model_files

TARGET_OPSET = 17
# torch.onnx's dynamo exporter writes opset 18; asked for less, it converts down and logs where it cannot.
TORCH_OPSET = 18
DEFAULT_TOLERANCE = 1e-4
# The longest text a tokenizer in the graph keeps where neither --max-length nor a checkpoint's positions say less.
DEFAULT_MAX_LENGTH = 512
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
    notes: tuple[str, ...] = ()
    """What else the check measured, a sentence each (the pixels of --image against Pillow's)."""


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


@dataclass(frozen=True)
class OnnxResult:
    """A converter's graph, the feeds that check it (the samples as its inputs take them) and what the original
    framework answered on the same samples, by output name."""

    model: object
    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    notes: tuple[str, ...] = ()


def first_sentence(error: Exception, limit: int = 300) -> str:
    """The first sentence of what a library said, on one line and at most `limit` characters (its type's name where
    it said nothing): converters and loaders write pages."""
    reason = " ".join(str(error).split()).split(". ")[0] or type(error).__name__
    return reason if len(reason) <= limit else f"{reason[:limit]}…"


def converter_failed(source, what: str, converter: str, error: Exception) -> ConvertError:
    """One line for a converter's refusal: the file, the estimator or operator, the converter and its version."""
    from importlib import metadata

    if type(error).__name__ in ("MissingShapeCalculator", "MissingConverter"):
        reason = "it has no converter for it"
    else:
        reason = first_sentence(error)
    return ConvertError(
        f"{source}: {converter} {metadata.version(converter)} cannot convert {what}: {reason}; "
        f"replace it with a step {converter} supports, or convert it yourself and give convert the .onnx"
    )


def _check(
    model: OnnxModel | TfliteModel,
    feeds: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    out: Path,
    tolerance: float,
) -> tuple[float, float | None]:
    """Max |diff| and label agreement of `model`, loaded in the runtime that will serve it, so the check is the
    served behaviour; a ConvertError past the tolerance (relative to the value where its size is past 1)."""
    got = model.run(feeds, list(expected))
    max_diff, max_relative, agreement = 0.0, 0.0, None
    for name, reference in expected.items():
        reference = np.asarray(reference)
        answer = got[name].reshape(reference.shape)
        if reference.dtype.kind == "f":
            diff = np.abs(answer.astype(np.float64) - reference)
            max_diff = max(max_diff, float(diff.max()))
            max_relative = max(max_relative, float((diff / np.maximum(1.0, np.abs(reference))).max()))
        else:  # labels: numbers, booleans (skl2onnx writes them as 0 and 1) or strings, as the client reads them
            answer, reference = (a.astype(np.int64) if a.dtype == bool else a for a in (answer, reference))
            same = float((answer.astype(str) == reference.astype(str)).mean())
            agreement = same if agreement is None else min(agreement, same)
    if max_relative > tolerance or (agreement is not None and agreement < 1.0):
        found = f"max |diff| {max_diff:.3g}" + (f" ({max_relative:.3g} relative)" if max_relative != max_diff else "")
        found += f" (tolerance {tolerance:g})" + (f", labels agree on {agreement:.2%}" if agreement is not None else "")
        raise ConvertError(
            f"{out}: not written: the {FORMAT_NAMES[model.format]} model disagrees with the original "
            f"on the samples: {found}"
        )
    return max_diff, agreement


def _check_and_write(
    model: OnnxModel | TfliteModel,
    model_bytes: bytes,
    feeds: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    out: Path,
    tolerance: float,
) -> Conversion:
    """`model` is `model_bytes` loaded: checked, then written."""
    max_diff, agreement = _check(model, feeds, expected, out, tolerance)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model_bytes)
    return Conversion(str(out), max_diff, agreement, len(next(iter(feeds.values()))))


def check_and_save_onnx(result: OnnxResult, out: Path, tolerance: float) -> Conversion:
    """A converter's graph, tidied (one opset per domain, a dynamic batch on every output), checked in ONNX
    Runtime on the samples and written to `out`."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConvertError(f"{out}: this model converts to ONNX: expected an output path ending in .onnx")
    clean_opset_imports(result.model)
    _dynamic_batch_outputs(result.model)
    onnx_bytes = result.model.SerializeToString()
    try:
        model = OnnxModel(onnx_bytes)
    except ModelLoadError as error:
        raise ConvertError(f"{out}: not written: the converted model does not load: {error}") from None
    conversion = _check_and_write(model, onnx_bytes, result.feeds, result.expected, out, tolerance)
    return dataclasses.replace(conversion, notes=result.notes)


def _dynamic_batch_outputs(model) -> None:
    """Outputs whose first dimension a converter fixed (LightGBM's label at 1): ONNX Runtime would warn on every
    batch of another size, so the first dimension is the batch's, as the inputs have it."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"


def convert_sklearn(
    estimator, samples, out: Path, tolerance: float = DEFAULT_TOLERANCE, source: str | None = None
) -> Conversion:
    """A fitted estimator or pipeline; `samples` a Samples or an array of rows. Classifiers give `label` and
    `probabilities` tensors, regressors `predictions`."""
    from slimserve.modeltools.samples import Samples
    from slimserve.modeltools.sklearn_models import sklearn_to_onnx

    if not isinstance(samples, Samples):
        samples = Samples(Path("the samples"), {"": np.asarray(samples)})
    result = sklearn_to_onnx(estimator, samples, source or str(out))
    return check_and_save_onnx(result, out, tolerance)


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


def rename_io(model, names: dict[str, str]) -> None:
    """Give the graph's inputs and outputs names a client can guess; inner names stay."""
    graph = model.graph
    io_names = {value.name for value in [*graph.input, *graph.output]}
    names = {old: new for old, new in names.items() if old in io_names}
    for value in [*graph.input, *graph.output]:
        value.name = names.get(value.name, value.name)
    _rename_in_nodes(graph, names)


def _rename_in_nodes(graph, names: dict[str, str]) -> None:
    """Every use of the renamed values, in subgraphs (a Loop's body reads the outer graph's inputs) too."""
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                _rename_in_nodes(subgraph, names)


def convert_torch(
    module, samples: np.ndarray, out: Path, tolerance: float = DEFAULT_TOLERANCE, external_data: bool = False
) -> Conversion:
    """An nn.Module of one float input, exported with its batch dimension dynamic (see export_torch)."""
    return export_torch(
        module, {"input": np.asarray(samples, dtype=np.float32)}, ("output",), out, tolerance, external_data
    )


def export_torch(
    module,
    feeds: dict[str, np.ndarray],
    output_names: tuple[str, ...],
    out: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    external_data: bool = False,
    sequence_inputs: tuple[str, ...] = (),
    source=None,
) -> Conversion:
    """An nn.Module taking `feeds` in their order, exported with the batch dimension of every input dynamic (and
    the second one of `sequence_inputs`, token ids); checked on the feeds in eval mode, as loaded from the files
    written. Weights past EXTERNAL_DATA_BYTES (or any, with `external_data`) go to `<out>.data` beside it. What
    fails names `source` (the user's checkpoint, where `out` is a scratch file), else `out`."""
    import torch

    source = source or out

    module = module.eval()
    tensors = [torch.from_numpy(values) for values in feeds.values()]
    shapes = ", ".join(f"{name} {values.shape}" for name, values in feeds.items())
    try:
        with torch.no_grad():
            answers = module(*tensors)
    except Exception as error:  # torch raises many kinds; the samples (or the module) are what is at fault
        raise ConvertError(f"{source}: the module cannot run on the samples ({shapes}): {error}") from None
    answers = answers if isinstance(answers, tuple) else (answers,)
    expected = {name: answer.numpy() for name, answer in zip(output_names, answers)}
    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    # a batch (or a sequence) of 1 would be specialized away: the example has two of each
    example = tuple(torch.cat([tensor[:2]] * 2)[:2] for tensor in tensors)
    dynamic = tuple({0: batch, 1: sequence} if name in sequence_inputs else {0: batch} for name in feeds)
    parameters = inspect.signature(module.forward).parameters.values()
    if any(parameter.kind == parameter.VAR_POSITIONAL for parameter in parameters):
        dynamic = (dynamic,)  # torch.export gives a forward(*tensors) the shapes of all as one parameter's
    try:
        with _exporter_quiet():
            program = torch.onnx.export(
                module,
                example,
                input_names=list(feeds),
                output_names=list(output_names),
                dynamic_shapes=dynamic,
                opset_version=TORCH_OPSET,
                dynamo=True,
                verbose=False,
            )
    except Exception as error:  # torch raises many kinds; the module is what is at fault
        raise ConvertError(f"{source}: torch.onnx.export failed: {error}") from None
    out = Path(out)
    with staged(out) as path:
        # torch writes external data past 1536 MiB of weights by itself: EXTERNAL_DATA_BYTES is that threshold
        program.save(path, external_data=external_data)
        max_diff, agreement = _check(OnnxModel(path), feeds, expected, source, tolerance)
        data_files = model_files(path).data
    return Conversion(str(out), max_diff, agreement, len(tensors[0]), data_files)


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """torch.onnx's exporter logs and warns about its own workings (optional torchvision operators, deprecations):
    nothing a user can act on, a dozen lines each export. What fails is raised, and said in one line."""
    import logging
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


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


def convert_keras(model, samples: np.ndarray, out: Path, tolerance: float = DEFAULT_TOLERANCE) -> Conversion:
    """A Keras model (from `load_keras`) to TFLite, checked with LiteRT, the runtime that serves it."""
    out = Path(out)
    if out.suffix != ".tflite":
        raise ConvertError(f"{out}: a Keras model converts to TFLite: expected an output path ending in .tflite")
    samples = np.asarray(samples, dtype=np.float32)
    expected = np.asarray(model.predict(samples, verbose=0))
    tflite_bytes = keras_to_tflite(model, out)
    tflite = TfliteModel(tflite_bytes)
    feeds = {tflite.signature.inputs[0].name: samples}
    return _check_and_write(tflite, tflite_bytes, feeds, {tflite.signature.outputs[0].name: expected}, out, tolerance)


# What each model file is, by its name; a Hugging Face checkpoint is a folder.
FILE_KINDS = {
    ".joblib": "pickle",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".pt": "torch",
    ".pth": "torch",
    ".keras": "keras",
    ".h5": "keras",
    ".json": "xgboost",
    ".ubj": "xgboost",
    ".txt": "lightgbm",
    ".cbm": "catboost",
    ".onnx": "onnx",
}
EXPECTED_FILES = (
    "a scikit-learn, XGBoost, LightGBM or CatBoost model (.joblib, .pkl), an XGBoost (.json, .ubj), LightGBM (.txt) "
    "or CatBoost (.cbm) file, a saved PyTorch module (.pt, .pth), a Keras model (.keras, .h5), an ONNX model to "
    "process (.onnx) or a Hugging Face checkpoint folder (with --task)"
)


@dataclass(frozen=True)
class Processing:
    """What to compose onto the converted graph (`--image`, `--tokenizer`, `--labels`); nothing by default."""

    labels: Path | None = None
    top_k: int = 1
    tokenizer: Path | None = None
    max_length: int | None = None
    """Tokens kept of each text; None: DEFAULT_MAX_LENGTH, or a checkpoint's max_position_embeddings where less."""
    image: str | None = None
    mean: str | None = None
    std: str | None = None
    class_names: tuple[str, ...] = ()
    """The classes' names where no --labels file gives them (a Hugging Face checkpoint's id2label)."""

    def __bool__(self) -> bool:
        return any(option is not None for option in (self.labels, self.tokenizer, self.image)) or bool(self.class_names)

    def text_tokenizer(self):
        from slimserve.modeltools.processing import graph_tokenizer

        max_length = self.max_length or DEFAULT_MAX_LENGTH
        return graph_tokenizer(self.tokenizer, max_length) if self.tokenizer else None

    def image_input(self):
        from slimserve.modeltools.processing import ImageInput

        return ImageInput(self.image, self.mean, self.std) if self.image else None

    def apply(self, result: OnnxResult, samples, source) -> OnnxResult:
        from slimserve.modeltools import processing

        tokenizer, image = self.text_tokenizer(), self.image_input()
        if tokenizer is not None:
            result = processing.with_tokenizer(result, tokenizer, samples.matrix(), source)
        if image is not None:
            result = processing.with_image(result, image, samples, source)
        if self.labels is not None:
            result = processing.with_labels(result, processing.read_labels(self.labels), self.top_k, self.labels)
        elif self.class_names:
            result = processing.with_labels(result, list(self.class_names), self.top_k, f"{source}/config.json")
        return result


def convert_file(
    source: Path,
    samples_path: Path,
    out: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    external_data: bool = False,
    processing: Processing = Processing(),
    task: str | None = None,
) -> Conversion:
    """The user's model file (or Hugging Face checkpoint folder, for `task`), converted by the converter of its
    kind, with `processing` composed onto it, and checked on the samples against the original."""
    from slimserve.modeltools import huggingface
    from slimserve.modeltools.processing import read_images
    from slimserve.modeltools.samples import read_samples

    source, out = Path(source), Path(out)
    if external_data and (processing or source.is_dir()):
        raise ConvertError(
            "--external-data: a model with its processing in the graph (--image, --tokenizer, --labels, a "
            "checkpoint's tokenizer) is written as one file"
        )
    if source.is_dir():
        return huggingface.convert_checkpoint(source, task, Path(samples_path), out, tolerance, processing)
    if task is not None:
        found = "a file" if source.exists() else "not there"
        raise ConvertError(f"--task {task}: is for a Hugging Face checkpoint folder; {source} is {found}")
    kind = FILE_KINDS.get(source.suffix.lower())
    if kind is None:
        raise ConvertError(f"{source}: expected {EXPECTED_FILES}")
    if not source.is_file():
        raise ConvertError(f"{source}: no such model file")
    if external_data and kind != "torch":
        raise ConvertError(f"--external-data: {source} is not a PyTorch module; only their weights can be that large")
    if kind == "onnx" and not processing:
        raise ConvertError(
            f"{source}: already an ONNX model: give --image, --tokenizer or --labels to add processing to its graph"
        )
    raw_input = "--image" if processing.image else "--tokenizer" if processing.tokenizer else None
    if processing.image and processing.tokenizer:
        raise ConvertError("--image, --tokenizer: a model takes one kind of raw input; give one of them")
    if raw_input and kind not in ("onnx", "torch"):
        raise ConvertError(
            f"{raw_input}: {source} takes its input as it was fitted; decoding or tokenizing in the graph is for a "
            "model that takes tensors (an .onnx, or a PyTorch module)"
        )
    image = processing.image_input()
    samples = read_samples(samples_path) if image is None else read_images(samples_path)
    if kind == "keras":
        if processing:
            raise ConvertError(f"--labels: {source} converts to TFLite; labels in the graph are for ONNX models")
        return convert_keras(load_keras(source), _float_rows(samples), out, tolerance)
    if kind == "torch":
        module = _load_torch(source)
        rows = _float_rows(samples) if image is None else image.pixels(samples, "NCHW")  # PyTorch's own layout
        if not processing:
            return convert_torch(module, rows, out, tolerance, external_data=external_data)
        with tempfile.TemporaryDirectory() as folder:  # the module's ONNX, checked against it, then processed
            exported = Path(folder) / out.name
            convert_torch(module, rows, exported, tolerance)
            result = existing_onnx(exported, samples, processing)
            return check_and_save_onnx(processing.apply(result, samples, source), out, tolerance)
    if out.suffix == ".tflite":
        raise ConvertError(f"{out}: a {source.suffix} model converts to ONNX: expected an output path ending in .onnx")
    result = existing_onnx(source, samples, processing) if kind == "onnx" else _to_onnx(kind, source, samples)
    return check_and_save_onnx(processing.apply(result, samples, source), out, tolerance)


def _to_onnx(kind: str, source: Path, samples) -> OnnxResult:
    from slimserve.modeltools import boosting
    from slimserve.modeltools.sklearn_models import sklearn_to_onnx

    model = _load_pickle(source) if kind == "pickle" else source
    library = type(model).__module__.split(".")[0] if kind == "pickle" else kind
    booster = kind != "pickle" or type(model).__name__ == "Booster"  # a native file is a booster's
    if library == "catboost":
        return boosting.catboost_to_onnx(model, samples, source)
    if boosting.ends_in_catboost(model):
        return boosting.catboost_pipeline_to_onnx(model, samples, source)
    if library == "lightgbm" and booster:
        return boosting.lightgbm_to_onnx(model, samples, source)
    if library == "xgboost" and booster:
        model = boosting.xgboost_estimator(model, source)
    if not hasattr(model, "predict"):
        raise ConvertError(f"{source}: holds a {type(model).__name__}, not a fitted model: expected {EXPECTED_FILES}")
    return sklearn_to_onnx(model, samples, str(source))


def existing_onnx(source: Path, samples, processing: Processing) -> OnnxResult:
    """An ONNX model as it is, with its own answers on the samples (texts tokenized by the tokenizer itself where
    it takes token ids) as what processing must keep."""
    import onnx

    from slimserve.modeltools.samples import model_feeds

    try:
        runtime = OnnxModel(source)
    except ModelLoadError as error:
        raise ConvertError(f"{source}: {error}") from None
    tokenizer, image = processing.text_tokenizer(), processing.image_input()
    if tokenizer is not None:
        feeds = tokenizer.model_feeds(samples.matrix(), runtime.signature, source)
    elif image is not None:
        feeds = image.model_feeds(samples, runtime.signature, source)
    else:
        feeds = model_feeds(samples.path, runtime.signature)
    outputs = [spec.name for spec in runtime.signature.outputs]
    return OnnxResult(onnx.load(str(source)), feeds, runtime.run(feeds, outputs))


def require(module: str, source, needs: str, install: str):
    """`module` imported, or a ConvertError naming what to install: an optional part of slimserve, or the user's own
    library that reads their file."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConvertError(
            f"{source}: {needs} needs {module.split('.')[0]}, which is not installed: pip install {install}"
        ) from None


def _load_pickle(source: Path):
    """The user's own trained model, on their own machine: loading it is theirs to trust; it is never served as is."""
    joblib = require("joblib", source, "reading a pickled model", "'slimserve[examples]'")
    try:
        return joblib.load(source)
    except ModuleNotFoundError as error:
        raise ConvertError(
            f"{source}: the model needs the module {error.name!r}, which is not installed: install the library "
            "it was trained with"
        ) from None
    except Exception as error:  # unpickling raises whatever the pickled classes raise
        raise ConvertError(f"{source}: cannot load it with joblib: {error}") from None


def _load_torch(source: Path):
    torch = require("torch", source, "converting a PyTorch module", "'slimserve[torch]'")
    try:
        return torch.load(source, weights_only=False)  # the user's own module: theirs to trust, never served as is
    except Exception as error:  # torch raises many kinds for a damaged or foreign file
        raise ConvertError(f"{source}: PyTorch cannot load it: {error}") from None


def _float_rows(samples) -> np.ndarray:
    rows = samples.matrix()
    if rows.dtype.kind not in "biuf":
        raise ConvertError(f"{samples.path}: expected numbers for a tensor model, found {rows.dtype} values")
    return rows.astype(np.float32)
