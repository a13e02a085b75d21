"""Make a model smaller or faster, and refuse the result if it drifts from the original.

ONNX models are optimized by ONNX Runtime. A TFLite model's weights are fixed when
TensorFlow converts it, so int8 and fp16 TFLite models are converted anew from the
Keras source (the optional `tensorflow` extra) and measured against the float32 TFLite
model `slimserve convert` writes. Every level is measured against the original on the
user's own samples: size, median latency, max and mean absolute difference of each
float output, and top-1 agreement for class scores. A result past the tolerance is
never written.
"""

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slimserve.errors import UserError
from slimserve.lambda_handlers.runtimes import ModelLoadError, OnnxModel, TfliteModel
from slimserve.modelfiles import EXTERNAL_DATA_BYTES, model_files
from slimserve.modeltools.convert import (
    KERAS_SUFFIXES,
    TENSORFLOW_EXTRA,
    ConvertError,
    clean_opset_imports,
    keras_to_tflite,
    load_keras,
    save_onnx,
    staged,
)
from slimserve.modeltools.samples import model_feeds

LEVELS = ("graph", "int8", "fp16")
KERAS_LEVELS = ("int8", "fp16")
LATENCY_RUNS = 50


class OptimizeError(UserError):
    """An optimization that cannot run, or whose result is refused; the message says why and by how much."""


@dataclass(frozen=True)
class Measurement:
    label: str
    size: int
    median_ms: float
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None


@dataclass(frozen=True)
class Report:
    level: str
    tolerance: float
    original: Measurement
    optimized: Measurement
    written: str | None

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("", "size", "median latency", "max |diff|", "mean |diff|", "top-1 agreement")]
        for m in (self.original, self.optimized):
            top1 = "-" if m.top1_agreement is None else f"{m.top1_agreement:.2%}"
            rows.append(
                (
                    m.label,
                    f"{m.size:,} B",
                    f"{m.median_ms:.3f} ms",
                    f"{m.max_abs_diff:.3g}",
                    f"{m.mean_abs_diff:.3g}",
                    top1,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def _median_ms(model: OnnxModel | TfliteModel, samples: dict, outputs: list[str]) -> float:
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        model.run(samples, outputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _compare(reference: dict, results: dict) -> tuple[float, float, float | None]:
    """Max and mean absolute difference over float outputs; top-1 agreement over 2-D float outputs."""
    diffs, agreements = [], []
    for name, expected in reference.items():
        got = results[name]
        if expected.dtype.kind != "f":
            continue
        difference = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        diffs.append((float(difference.max()), float(difference.mean())))
        if expected.ndim == 2 and expected.shape[1] > 1:
            agreements.append(float((got.argmax(axis=1) == expected.argmax(axis=1)).mean()))
    if not diffs:
        return 0.0, 0.0, None
    return max(d[0] for d in diffs), statistics.mean(d[1] for d in diffs), (min(agreements) if agreements else None)


def _transform(source: Path, level: str, target: Path) -> None:
    """The `level` model of `source` at `target`: external data (the source's, loaded from beside it) is written to
    `<target>.data` where the result's weights pass EXTERNAL_DATA_BYTES, and folded into one file below that."""
    import onnx
    import onnxruntime

    if level == "graph":
        options = onnxruntime.SessionOptions()
        # EXTENDED, not ALL: the saved graph must not carry fusions tied to this machine's CPU
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(target)
        # ONNX Runtime writes initializers into the model file unless told a data file (it refuses past 2 GB)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{target.name}.data"
        )
        onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        save_onnx(onnx.load(str(target)), target)  # read back with its data: one file where it fits
    elif level == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        model = onnx.load(str(source))
        clean_opset_imports(model)  # models from skl2onnx may import the default domain twice
        weights = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
        # int8 weights are a quarter of fp32's: the quantizer writes a data file only when asked
        quantize_dynamic(
            model,
            str(target),
            weight_type=QuantType.QInt8,
            use_external_data_format=weights // 4 > EXTERNAL_DATA_BYTES,
        )
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # inputs and outputs stay float32, so clients and the signature do not change; shape inference serializes
        # the model, which protobuf refuses past 2 GB, and the conversion does not need it
        model = onnx.load(str(source))
        large = model_files(source).size > EXTERNAL_DATA_BYTES
        save_onnx(convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large), target)


@dataclass(frozen=True)
class _Job:
    """What the caller asked for: the level, the samples and tolerance that gate it, and where the result goes."""

    level: str
    samples_path: Path
    tolerance: float
    out: Path
    force: bool


def optimize(
    model_path: Path, level: str, samples_path: Path, tolerance: float, out: Path, force: bool = False
) -> Report:
    """`force` writes a result that is larger and not faster than the original too."""
    model_path, out = Path(model_path), Path(out)
    if level not in LEVELS:
        raise OptimizeError(f"unknown level {level!r}: expected one of {', '.join(LEVELS)}")
    if tolerance < 0:
        raise OptimizeError(f"--tolerance must be >= 0, got {tolerance}")
    if model_path.suffix == ".tflite":
        raise OptimizeError(
            f"{model_path}: a TFLite model is served as it is: its weights were fixed when TensorFlow converted it, "
            "and neither slimserve nor TensorFlow's converter reads a .tflite back. For an int8 or fp16 TFLite model, "
            f"optimize its Keras source (.keras, .h5) with the tensorflow extra: {TENSORFLOW_EXTRA}"
        )
    job = _Job(level, Path(samples_path), tolerance, out, force)
    if model_path.suffix in KERAS_SUFFIXES:
        return _optimize_keras(model_path, job)
    if model_path.suffix != ".onnx":
        raise OptimizeError(f"{model_path}: expected an .onnx model or a Keras model (.keras, .h5)")
    try:
        original = OnnxModel(model_path)
    except ModelLoadError as error:
        raise OptimizeError(f"{model_path}: ONNX Runtime cannot load it: {error}") from None
    original_size = model_files(model_path).size
    with staged(out) as candidate_path:  # the result and its data file move into place only if the gate passes
        try:
            _transform(model_path, level, candidate_path)
        except Exception as error:  # the optimizers raise many kinds; the model is what is at fault
            raise OptimizeError(f"{model_path}: {level} optimization failed: {error}") from None
        report = _gate(job, original, original_size, OnnxModel(candidate_path), model_files(candidate_path).size)
    return report


def _optimize_keras(model_path: Path, job: _Job) -> Report:
    """The original is the float32 TFLite model, as `slimserve convert` writes it; both are run by LiteRT."""
    if job.level not in KERAS_LEVELS:
        raise OptimizeError(
            f"{model_path}: level {job.level!r} is for ONNX models; a Keras model is optimized to "
            f"{' or '.join(KERAS_LEVELS)} TFLite"
        )
    try:
        keras_model = load_keras(model_path)
        original_bytes = keras_to_tflite(keras_model, model_path)
        candidate_bytes = keras_to_tflite(keras_model, model_path, job.level)
    except ConvertError as error:
        raise OptimizeError(str(error)) from None
    report = _gate(
        job, TfliteModel(original_bytes), len(original_bytes), TfliteModel(candidate_bytes), len(candidate_bytes)
    )
    job.out.parent.mkdir(parents=True, exist_ok=True)
    job.out.write_bytes(candidate_bytes)
    return report


def _gate(job: _Job, original, original_size: int, candidate, candidate_size: int) -> Report:
    """Measure both models on the samples; the report, if the candidate stays within the tolerance and, unless
    forced, is smaller or faster (a small model's fp16 copy can be larger and slower): the caller then writes it."""
    level, tolerance, out = job.level, job.tolerance, job.out
    samples = model_feeds(job.samples_path, original.signature)
    outputs = [spec.name for spec in original.signature.outputs]
    reference = original.run(samples, outputs)
    max_diff, mean_diff, agreement = _compare(reference, candidate.run(samples, outputs))
    report = Report(
        level,
        tolerance,
        Measurement(
            "original",
            original_size,
            _median_ms(original, samples, outputs),
            0.0,
            0.0,
            1.0 if agreement is not None else None,
        ),
        Measurement(level, candidate_size, _median_ms(candidate, samples, outputs), max_diff, mean_diff, agreement),
        None,
    )
    if max_diff > tolerance:
        raise OptimizeError(
            f"{out}: not written: the {level} model differs from the original by up to {max_diff:.3g} on the samples, "
            f"{max_diff - tolerance:.3g} past the tolerance {tolerance:g}\n{report.table()}"
        )
    worse = report.optimized.size >= report.original.size and report.optimized.median_ms >= report.original.median_ms
    if worse and not job.force:
        raise OptimizeError(
            f"{out}: not written: the {level} model is {report.optimized.size / report.original.size:.0%} "
            f"of the original's size and no faster "
            f"({report.optimized.median_ms:.3f} against {report.original.median_ms:.3f} ms); "
            f"--force writes it anyway\n{report.table()}"
        )
    return Report(report.level, tolerance, report.original, report.optimized, str(out))
