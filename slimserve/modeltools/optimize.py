"""Make a model smaller or faster, and refuse a result that answers differently or runs slower.

ONNX models are optimized by ONNX Runtime: graph fusions, dynamic int8 (weights only), static int8 (weights and
activations, calibrated on the samples, as QDQ pairs that ONNX Runtime fuses into integer kernels) and fp16. A
TFLite model's weights are fixed when TensorFlow converts it, so int8 and fp16 TFLite models are converted anew from
the Keras source (the optional `tensorflow` extra) and measured against the float32 TFLite model `slimserve convert`
writes.

Every result is measured against the original on the user's own samples, each model in a session with the same
options: size; median latency over interleaved runs, enough of them to be stable; max and mean absolute difference of
the float outputs; top-1 agreement of class scores and labels; and, given true labels, accuracy. A result is written
only if it passes the gate on every count (`Gate`); the refusal names each count it failed.
"""

import contextlib
import logging
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
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
)
from slimserve.modeltools.samples import model_feeds

LEVELS = ("graph", "int8", "int8-static", "fp16", "auto")
ONNX_LEVELS = LEVELS[:-1]
"""What `auto` tries, in this order; it writes the fastest that passes the gate (the smaller where two tie)."""
KERAS_LEVELS = ("int8", "fp16")
DEFAULT_TOLERANCE = 0.01
DEFAULT_MIN_AGREEMENT = 0.995
SAME_SPEED = 0.03
"""Medians within this fraction of each other are the same speed: runs on a shared machine vary by about that."""
MIN_RUNS, MIN_SECONDS, MAX_SECONDS = 20, 1.0, 30.0
"""Latency: at least MIN_RUNS runs of each model and MIN_SECONDS of timing, interleaved so that the machine's drift
falls on both alike; a slow model stops at MAX_SECONDS."""
CALIBRATION_BATCH = 16


class OptimizeError(UserError):
    """An optimization that cannot run, or whose result is refused; the message says why and by how much."""


class GateRefused(OptimizeError):
    """Every result failed the gate; `report` holds what was measured."""

    def __init__(self, message: str, report: "Report"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Gate:
    """What a result must meet to be written. A classifier's is its classes (`min_agreement`); its scores are held to
    a `tolerance` only where one is given, since how far a score may move depends on its scale (logits, probabilities).
    Other models' values are held to `tolerance`, DEFAULT_TOLERANCE where none is given. `force` writes a result that
    is slower, or larger and no faster."""

    tolerance: float | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    force: bool = False

    def value_tolerance(self, classifier: bool) -> float | None:
        """The largest output difference accepted; None: not gated (a classifier, no tolerance given)."""
        return self.tolerance if self.tolerance is not None or classifier else DEFAULT_TOLERANCE


@dataclass(frozen=True)
class Measurement:
    label: str
    size: int
    median_ms: float
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None
    accuracy: float | None = None
    refused: tuple[str, ...] = ()
    """Each count of the gate it failed, said in words; empty: it passed."""


@dataclass(frozen=True)
class Report:
    level: str
    gate: Gate
    original: Measurement
    candidates: tuple[Measurement, ...]
    written: str | None
    runs: int
    """How many timed runs each model's median latency is of: all are timed together."""
    chosen: str | None = None
    """The level written: the fastest that passed (the smaller where two are the same speed)."""

    @property
    def optimized(self) -> Measurement:
        """The result written; where none was, the fastest."""
        by_speed = sorted(self.candidates, key=lambda m: m.median_ms)
        return next((m for m in self.candidates if m.label == self.chosen), by_speed[0])

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        headers = ("", "size", "median latency", "max |diff|", "mean |diff|", "top-1 agreement", "accuracy", "gate")
        rows = [headers]
        for m in (self.original, *self.candidates):
            verdict = (
                ""
                if m is self.original
                else "refused"
                if m.refused
                else "written"
                if m.label == self.chosen
                else "passed"
            )
            rows.append(
                (
                    m.label,
                    f"{m.size:,} B",
                    f"{m.median_ms:.3f} ms",
                    f"{m.max_abs_diff:.3g}",
                    f"{m.mean_abs_diff:.3g}",
                    "-" if m.top1_agreement is None else f"{m.top1_agreement:.2%}",
                    "-" if m.accuracy is None else f"{m.accuracy:.2%}",
                    verdict,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
        return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def _median_ms(models: list, samples: dict, outputs: list[str]) -> tuple[list[float], int]:
    """Each model's median latency in ms, timed in interleaved runs (after one untimed run each), and the runs."""
    for model in models:
        model.run(samples, outputs)
    times: list[list[float]] = [[] for _ in models]
    started = time.perf_counter()
    while True:
        for model, taken in zip(models, times):
            begun = time.perf_counter()
            model.run(samples, outputs)
            taken.append(time.perf_counter() - begun)
        elapsed = time.perf_counter() - started
        if (len(times[0]) >= MIN_RUNS and elapsed >= MIN_SECONDS) or elapsed >= MAX_SECONDS:
            return [statistics.median(taken) * 1000 for taken in times], len(times[0])


SCORE_NAMES = re.compile(r"logit|score|prob|class", re.IGNORECASE)
"""A 2-D float output named like this holds class scores: the model is a classifier. Another 2-D output (a
regressor's several targets, an embedding) holds values, gated by their difference."""


def _labels(results: dict[str, np.ndarray], scores_named: bool = True) -> np.ndarray | None:
    """The classes a model's outputs name: a label output (integers or strings, one per sample) where it has one,
    else the best of the first 2-D float output of class scores (any 2-D float output, where `scores_named` is off:
    true labels were given, so the model is a classifier)."""
    for value in results.values():
        if value.ndim == 1 and value.dtype.kind in "iuUSO":
            return value
    for name, value in results.items():
        if value.dtype.kind == "f" and value.ndim == 2 and value.shape[1] > 1:
            if not scores_named or SCORE_NAMES.search(name):
                return value.argmax(axis=1)
    return None


def _compare(reference: dict, results: dict, scores_named: bool) -> tuple[float, float, float | None]:
    """Max and mean absolute difference over float outputs; top-1 agreement of the classes they name."""
    diffs = []
    for name, expected in reference.items():
        if expected.dtype.kind == "f":
            difference = np.abs(results[name].astype(np.float64) - expected.astype(np.float64))
            diffs.append((float(difference.max()), float(difference.mean())))
    expected_labels, labels = _labels(reference, scores_named), _labels(results, scores_named)
    agreement = None if expected_labels is None else float((labels == expected_labels).mean())
    if not diffs:
        return 0.0, 0.0, agreement
    return max(d[0] for d in diffs), statistics.mean(d[1] for d in diffs), agreement


def _read_targets(path: Path, reference: dict, samples: int) -> np.ndarray:
    """The true labels of --targets, one per sample, of the kind the model names its classes by."""
    try:
        targets = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise OptimizeError(f"--targets {path}: not a numpy .npy file of labels: {error}") from None
    labels = _labels(reference, scores_named=False)
    if labels is None:
        raise OptimizeError(
            f"--targets {path}: the model has neither a label output nor class scores to compare true labels with"
        )
    if targets.ndim != 1 or len(targets) != samples:
        raise OptimizeError(
            f"--targets {path}: expected one label per sample ({samples}), found shape {list(targets.shape)}"
        )
    if (targets.dtype.kind in "iu") != (labels.dtype.kind in "iu"):
        raise OptimizeError(
            f"--targets {path}: expected labels like the model's ({labels.dtype}), found {targets.dtype}"
        )
    return targets


def _transform(source: Path, level: str, target: Path, samples: dict) -> None:
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
    elif level in ("int8", "int8-static"):
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

        model = onnx.load(str(source))
        clean_opset_imports(model)  # models from skl2onnx may import the default domain twice
        weights = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
        # int8 weights are a quarter of fp32's: the quantizer writes a data file only when asked
        external = weights // 4 > EXTERNAL_DATA_BYTES
        with _quiet_root_logger():
            if level == "int8":
                quantize_dynamic(model, str(target), weight_type=QuantType.QInt8, use_external_data_format=external)
            else:
                # QDQ with unsigned activations and per-channel signed weights: the form ONNX Runtime's CPU kernels
                # run as integer arithmetic (onnxruntime.ai/docs/performance/model-optimizations/quantization.html)
                quantize_static(
                    model,
                    str(target),
                    _Calibration(samples),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    use_external_data_format=external,
                )
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # inputs and outputs stay float32, so clients and the signature do not change; shape inference serializes
        # the model, which protobuf refuses past 2 GB, and the conversion does not need it
        model = onnx.load(str(source))
        large = model_files(source).size > EXTERNAL_DATA_BYTES
        save_onnx(convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large), target)


@contextlib.contextmanager
def _quiet_root_logger():
    """The quantizers advise pre-processing through the root logger, a line on stderr before slimserve's own
    answer; what slimserve measures afterwards is the answer."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Calibration:
    """The samples, CALIBRATION_BATCH rows at a time, as ONNX Runtime's static quantizer reads them (a
    CalibrationDataReader): the ranges of the activations come from the user's own inputs."""

    def __init__(self, samples: dict[str, np.ndarray]):
        rows = len(next(iter(samples.values())))
        self.batches = iter(
            [
                {name: array[i : i + CALIBRATION_BATCH] for name, array in samples.items()}
                for i in range(0, rows, CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict | None:
        return next(self.batches, None)


@dataclass(frozen=True)
class _Job:
    """What the caller asked for: the level, the samples (and true labels) and gate that judge it, and where the
    result goes."""

    level: str
    samples_path: Path
    gate: Gate
    out: Path
    targets_path: Path | None


def optimize(
    model_path: Path,
    level: str,
    samples_path: Path,
    tolerance: float | None,
    out: Path,
    force: bool = False,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    targets: Path | None = None,
) -> Report:
    """`tolerance` None: the Gate's default; `force` writes a result that is slower, or larger and no faster, too;
    `targets`: a .npy of the samples' true labels, for accuracy."""
    model_path, out = Path(model_path), Path(out)
    if level not in LEVELS:
        raise OptimizeError(f"unknown level {level!r}: expected one of {', '.join(LEVELS)}")
    if tolerance is not None and tolerance < 0:
        raise OptimizeError(f"--tolerance must be >= 0, got {tolerance}")
    if not 0 <= min_agreement <= 1:
        raise OptimizeError(f"--min-agreement must be between 0 and 1, got {min_agreement}")
    if model_path.suffix == ".tflite":
        raise OptimizeError(
            f"{model_path}: a TFLite model is served as it is: its weights were fixed when TensorFlow converted it, "
            "and neither slimserve nor TensorFlow's converter reads a .tflite back. For an int8 or fp16 TFLite model, "
            f"optimize its Keras source (.keras, .h5) with the tensorflow extra: {TENSORFLOW_EXTRA}"
        )
    if out.resolve() == model_path.resolve():
        raise OptimizeError(f"--out {out}: is the model itself; write the result beside it (leave --out out)")
    job = _Job(level, Path(samples_path), Gate(tolerance, min_agreement, force), out, targets and Path(targets))
    if model_path.suffix in KERAS_SUFFIXES:
        return _optimize_keras(model_path, job)
    if model_path.suffix != ".onnx":
        raise OptimizeError(f"{model_path}: expected an .onnx model or a Keras model (.keras, .h5)")
    try:
        original = OnnxModel(model_path)
    except ModelLoadError as error:
        raise OptimizeError(f"{model_path}: ONNX Runtime cannot load it: {error}") from None
    samples = model_feeds(job.samples_path, original.signature)
    levels = ONNX_LEVELS if level == "auto" else (level,)
    out.parent.mkdir(parents=True, exist_ok=True)
    # each result (and its data file) in a folder of its own beside `out`; the one written moves into place only
    # once the gate passes it, and the folder goes with the rest
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as folder:
        candidates = {}
        for each in levels:
            path = Path(folder) / each / out.name
            path.parent.mkdir()
            try:
                _transform(model_path, each, path, samples)
                candidates[each] = (OnnxModel(path), model_files(path).size)
            except Exception as error:  # the optimizers raise many kinds; the model is what is at fault
                if level != "auto":
                    raise OptimizeError(f"{model_path}: {each} optimization failed: {error}") from None
        report = _gate(job, samples, original, model_files(model_path).size, candidates)
        for path in sorted((Path(folder) / str(report.chosen)).iterdir()):
            path.replace(out.parent / path.name)
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
    original = TfliteModel(original_bytes)
    samples = model_feeds(job.samples_path, original.signature)
    report = _gate(
        job, samples, original, len(original_bytes), {job.level: (TfliteModel(candidate_bytes), len(candidate_bytes))}
    )
    job.out.parent.mkdir(parents=True, exist_ok=True)
    job.out.write_bytes(candidate_bytes)
    return report


def _gate(job: _Job, samples: dict, original, original_size: int, candidates: dict) -> Report:
    """Measure the original and each candidate ({level: (model, size)}) on the samples, all timed together; the
    report, with the fastest candidate that passes the gate written (the smaller where two tie), or an OptimizeError
    naming each count every candidate failed."""
    gate, out = job.gate, job.out
    outputs = [spec.name for spec in original.signature.outputs]
    reference = original.run(samples, outputs)
    targets = None if job.targets_path is None else _read_targets(job.targets_path, reference, _rows(samples))
    models = [original, *(model for model, _ in candidates.values())]
    latencies, runs = _median_ms(models, samples, outputs)
    original_ms, candidate_ms = latencies[0], dict(zip(candidates, latencies[1:]))

    def accuracy(results: dict) -> float | None:
        return None if targets is None else float((_labels(results, scores_named=False) == targets).mean())

    original_accuracy = accuracy(reference)
    measured = Measurement(
        "original",
        original_size,
        original_ms,
        0.0,
        0.0,
        1.0 if _labels(reference, targets is None) is not None else None,
        original_accuracy,
    )
    results = []
    for level, (model, size) in candidates.items():
        answers = model.run(samples, outputs)
        max_diff, mean_diff, agreement = _compare(reference, answers, scores_named=targets is None)
        result = Measurement(level, size, candidate_ms[level], max_diff, mean_diff, agreement, accuracy(answers))
        results.append(replace(result, refused=_failed(gate, measured, result)))
    passed = sorted(
        (m for m in results if not m.refused), key=lambda m: (round(m.median_ms / original_ms / SAME_SPEED), m.size)
    )
    report = Report(job.level, gate, measured, tuple(results), str(out) if passed else None, runs)
    if passed:
        return replace(report, chosen=passed[0].label)
    reasons = "; ".join(f"the {m.label} model {', and '.join(m.refused)}" for m in results)
    reasons = reasons or f"no {job.level} model could be made"
    hint = _hint(job, results) if isinstance(original, OnnxModel) else ""
    raise GateRefused(f"{out}: not written: {reasons}{hint}\n{report.table()}", report)


def _rows(samples: dict) -> int:
    return len(next(iter(samples.values())))


def _failed(gate: Gate, original: Measurement, result: Measurement) -> tuple[str, ...]:
    """Each count of the gate `result` fails, in words that say by how much and which option moves the line."""
    failed = []
    tolerance = gate.value_tolerance(classifier=result.top1_agreement is not None)
    if tolerance is not None and result.max_abs_diff > tolerance:
        failed.append(
            f"differs from the original by up to {result.max_abs_diff:.3g} on the samples, "
            f"{result.max_abs_diff - tolerance:.3g} past the tolerance {tolerance:g} (--tolerance)"
        )
    if result.top1_agreement is not None and result.top1_agreement < gate.min_agreement:
        failed.append(
            f"names the original's class for {result.top1_agreement:.2%} of the samples, under "
            f"{gate.min_agreement:.2%} (--min-agreement)"
        )
    if result.accuracy is not None and original.accuracy is not None:
        drop = original.accuracy - result.accuracy
        if drop > 1 - gate.min_agreement + 1e-12:
            failed.append(
                f"is {drop:.2%} less accurate on --targets ({result.accuracy:.2%} against {original.accuracy:.2%}), "
                f"more than the {1 - gate.min_agreement:.2%} --min-agreement allows"
            )
    ratio = result.median_ms / original.median_ms
    if not gate.force and ratio > 1 + SAME_SPEED:
        failed.append(
            f"is {ratio:.2f}x slower ({result.median_ms:.3f} against {original.median_ms:.3f} ms; --force writes it)"
        )
    elif not gate.force and result.size >= original.size and ratio > 1 - SAME_SPEED:
        failed.append(
            f"is {result.size / original.size:.0%} of the original's size and no faster "
            f"({result.median_ms:.3f} against {original.median_ms:.3f} ms; --force writes it)"
        )
    return tuple(failed)


def _hint(job: _Job, results: list[Measurement]) -> str:
    """What may win where dynamic int8 lost on speed."""
    if job.level == "int8" and any("slower" in reason for m in results for reason in m.refused):
        return (
            ". Dynamic int8 quantizes the weights alone and converts activations on every run, which makes "
            "convolutions slower on most CPUs: --level int8-static calibrates them on the samples, and --level auto "
            "tries every level and writes the fastest that passes"
        )
    return ""
