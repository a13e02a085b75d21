"""Runtime adapters: load a model from bytes or a path and expose its signature.

Both adapters turn the runtime's view of a model into the same `Signature` and the
same `run(inputs, output_names)` call, so the protocols above never know which
runtime answers.
"""

import os
import threading
from pathlib import Path

import numpy as np

from .contract import FORMATS
from .datatypes import Signature, TensorSpec, v2_datatype
from .errors import InvalidInput
from .images import LENGTH_SUFFIX, image_inputs, pack

_ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


# The operator domains of onnxruntime-extensions: tokenizers and the like, and (in its second domain) image decoding.
EXTENSIONS_DOMAIN = "ai.onnx.contrib"
EXTENSIONS_IMAGE_DOMAIN = "com.microsoft.extensions"


class ModelLoadError(Exception):
    """The model file cannot be served; the message says why."""


def _source_label(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{len(source)} bytes>"


class OnnxModel:
    format = "onnx"
    platform = "onnxruntime_onnx"

    def __init__(
        self,
        source: bytes | str | os.PathLike,
        providers: list[str | tuple[str, dict[str, str]]] | None = None,
        spin: bool = True,
    ):
        """`spin=False` stops ONNX Runtime's idle threads from spinning for work: a server whose own
        threads share the cores gets them back (measured: half the CPU per batched call)."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = os.fspath(source) if isinstance(source, os.PathLike) else source
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = onnxruntime.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            if EXTENSIONS_DOMAIN not in str(exc) and EXTENSIONS_IMAGE_DOMAIN not in str(exc):
                raise ModelLoadError(f"ONNX Runtime cannot load {_source_label(source)}: {exc}") from None
            # pre- or post-processing in the graph (a tokenizer, image decoding): onnxruntime-extensions' operators,
            # loaded only for the models that use them, so every other model starts as fast as before
            options.register_custom_ops_library(_extensions_library(source))
            try:
                self.session = onnxruntime.InferenceSession(model, sess_options=options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own unexported exception types
                raise ModelLoadError(f"ONNX Runtime cannot load {_source_label(source)}: {exc}") from None
        # images decoded in the graph: each is one BYTES input to clients, the padded bytes and lengths to the graph
        self.images = image_inputs(self.session.get_modelmeta().custom_metadata_map)
        hidden = {f"{name}{LENGTH_SUFFIX}" for name in self.images}
        self.signature = Signature(
            inputs=tuple(
                TensorSpec(arg.name, "BYTES", (-1,)) if arg.name in self.images else self._spec(arg)
                for arg in self.session.get_inputs()
                if arg.name not in hidden
            ),
            outputs=tuple(self._spec(arg) for arg in self.session.get_outputs()),
        )

    @staticmethod
    def _spec(arg) -> TensorSpec:
        if arg.type not in _ONNX_TYPES:
            raise ModelLoadError(
                f"ONNX {arg.name!r} has type {arg.type}; only tensors can be served "
                "(for scikit-learn classifiers convert with options={'zipmap': False})"
            )
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
        return TensorSpec(arg.name, _ONNX_TYPES[arg.type], shape)

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for name, array in inputs.items():
            if name in self.images:
                feeds |= pack(name, array)
            else:
                feeds[name] = _as_text(name, array) if array.dtype == object else array
        try:
            results = self.session.run(output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            if self.images and "[ImageDecoder]" in str(exc):  # libpng's refusal of a damaged PNG
                reason = str(exc).rsplit("[ImageDecoder]: ", 1)[-1].rstrip(".")
                raise InvalidInput(f"input {self.images[0]!r}: an image the model cannot decode: {reason}") from None
            raise
        return dict(zip(output_names, results))


def _extensions_library(source) -> str:
    """The operator library's path, found without importing onnxruntime_extensions: its package imports onnx
    (half a second, and not in the Lambda layer) to give the same path."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_extensions")
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    libraries = sorted(folder.glob("_extensions_pydll*")) if folder is not None else []
    if not libraries:
        raise ModelLoadError(
            f"{_source_label(source)} uses operators of onnxruntime-extensions (pre- or post-processing in the graph), "
            "and onnxruntime-extensions is not installed"
        )
    return str(libraries[0])


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX Runtime's Python binding takes string tensors as str, so BYTES must be UTF-8."""
    try:
        return np.vectorize(lambda item: item.decode() if isinstance(item, bytes) else item, otypes=[object])(array)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input {name!r}: ONNX string tensors hold UTF-8 text; an element is not: {exc}") from None


def _tflite_interpreter_class():
    """LiteRT where installed; tflite-runtime (python3.11 layers) otherwise."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ModelLoadError(
                "no TFLite runtime: install ai-edge-litert (or tflite-runtime on python3.11)"
            ) from None
    return Interpreter


class TfliteModel:
    format = "tflite"
    platform = "tflite"

    def __init__(self, source: bytes | str | os.PathLike, num_threads: int | None = None):
        interpreter_class = _tflite_interpreter_class()
        self.runtime = interpreter_class.__module__.split(".")[0]
        try:
            if isinstance(source, (bytes, bytearray)):
                self.interpreter = interpreter_class(model_content=bytes(source), num_threads=num_threads)
            else:
                self.interpreter = interpreter_class(model_path=os.fspath(source), num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{self.runtime} cannot load {_source_label(source)}: {exc}") from None
        self._inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
        self._outputs = {d["name"]: d for d in self.interpreter.get_output_details()}
        self._shapes = {name: tuple(d["shape"]) for name, d in self._inputs.items()}
        self._lock = threading.Lock()  # one interpreter holds one set of tensors
        self.signature = Signature(
            inputs=tuple(self._spec(d) for d in self._inputs.values()),
            outputs=tuple(self._spec(d) for d in self._outputs.values()),
        )

    @staticmethod
    def _spec(detail) -> TensorSpec:
        shape = detail.get("shape_signature")
        if shape is None or len(shape) == 0:
            shape = detail["shape"]
        try:
            datatype = v2_datatype(detail["dtype"])
        except ValueError:
            raise ModelLoadError(
                f"TFLite tensor {detail['name']!r} has dtype {detail['dtype']}, which no V2 datatype covers"
            ) from None
        return TensorSpec(detail["name"], datatype, tuple(int(d) for d in shape))

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            resized = False
            for name, array in inputs.items():
                if self._shapes[name] != array.shape:
                    self.interpreter.resize_tensor_input(self._inputs[name]["index"], array.shape)
                    self._shapes[name] = array.shape
                    resized = True
            if resized:
                self.interpreter.allocate_tensors()
            for name, array in inputs.items():
                self.interpreter.set_tensor(self._inputs[name]["index"], array)
            self.interpreter.invoke()
            return {name: self.interpreter.get_tensor(self._outputs[name]["index"]) for name in output_names}


def load_model(source: bytes | str | os.PathLike, model_format: str):
    if model_format == "onnx":
        return OnnxModel(source)
    if model_format == "tflite":
        return TfliteModel(source)
    raise ModelLoadError(f"unknown model format {model_format!r}: expected one of {', '.join(FORMATS)}")
