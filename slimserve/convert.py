"""Trained models to ONNX, checked against the original on sample inputs before anything is written.

scikit-learn estimators and pipelines go through skl2onnx; PyTorch modules through
torch.onnx.export with a dynamic batch axis. Keras to TFLite needs the optional
`tensorflow` extra.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lambda_handlers.runtimes import OnnxModel

TARGET_OPSET = 17


class ConvertError(Exception):
    """A model that cannot be converted, or whose conversion disagrees with it; the message says how."""


@dataclass(frozen=True)
class Conversion:
    path: str
    max_abs_diff: float
    label_agreement: float | None
    samples: int


def _check_and_write(onnx_bytes: bytes, expected: dict[str, np.ndarray], samples: np.ndarray, out: Path,
                     tolerance: float) -> Conversion:
    model = OnnxModel(onnx_bytes)
    got = model.run({model.signature.inputs[0].name: samples}, list(expected))
    max_diff, agreement = 0.0, None
    for name, reference in expected.items():
        if reference.dtype.kind == "f":
            max_diff = max(max_diff, float(np.abs(got[name].astype(np.float64) - reference).max()))
        else:
            agreement = float((got[name] == reference).mean())
    if max_diff > tolerance or (agreement is not None and agreement < 1.0):
        found = f"max |diff| {max_diff:.3g} (tolerance {tolerance:g})" + (f", labels agree on {agreement:.2%}" if agreement is not None else "")
        raise ConvertError(f"{out}: not written: the ONNX model disagrees with the original on the samples: {found}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onnx_bytes)
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
    if classifier:
        expected = {"label": estimator.predict(samples), "probabilities": estimator.predict_proba(samples)}
    else:
        expected = {"predictions": np.asarray(estimator.predict(samples)).reshape(len(samples), -1)}
    return _check_and_write(model.SerializeToString(), expected, samples, Path(out), tolerance)


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


def convert_torch(module, samples: np.ndarray, out: Path, tolerance: float = 1e-4,
                  input_name: str = "input", output_name: str = "output") -> Conversion:
    """An nn.Module exported with its batch dimension dynamic; checked on `samples` in eval mode."""
    import torch

    module = module.eval()
    samples = np.asarray(samples, dtype=np.float32)
    tensor = torch.from_numpy(samples)
    with torch.no_grad():
        expected = module(tensor).numpy()
    batch = torch.export.Dim("batch", min=1)
    example = tensor[:2] if len(tensor) >= 2 else torch.cat([tensor[:1]] * 2)  # a batch of 1 would be specialized away
    try:
        program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=[output_name],
                                    dynamic_shapes=({0: batch},), opset_version=TARGET_OPSET, dynamo=True, verbose=False)
    except Exception as error:  # torch raises many kinds; the module is what is at fault
        raise ConvertError(f"{out}: torch.onnx.export failed: {error}") from None
    onnx_bytes = program.model_proto.SerializeToString()
    return _check_and_write(onnx_bytes, {output_name: expected}, samples, Path(out), tolerance)
