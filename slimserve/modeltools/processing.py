"""Post-processing inside the graph, composed onto any ONNX result of `convert` (or a user's own .onnx): the one
artifact then answers with meaningful outputs the same way on Lambda, on SageMaker and locally.

`--labels labels.txt` adds, beside the raw outputs, `class_name` (BYTES) and `class_score` (FP32), each of shape
[-1, K]: the K best classes (`--top-k`, default 1) and their scores, best first. The scores are the model's class
output where it already holds probabilities (rows of values in [0, 1] summing to 1, as a classifier's
`probabilities`), and its softmax where it holds logits.
"""

from pathlib import Path

import numpy as np

from slimserve.modeltools.convert import ConvertError, OnnxResult

CLASS_NAME = "class_name"
CLASS_SCORE = "class_score"
# How far a row of probabilities may sum from 1 and still be taken as probabilities (float32 rounding).
PROBABILITY_SUM_TOLERANCE = 1e-4


def read_labels(path: Path) -> list[str]:
    """One label per line, in the order of the model's classes; a final newline is no label."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConvertError(f"--labels {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"--labels {path}: cannot read it as UTF-8 text: {error}") from None
    empty = [number for number, line in enumerate(lines, start=1) if not line.strip()]
    if empty or not lines:
        where = f"line {empty[0]} is empty" if empty else "it is empty"
        raise ConvertError(
            f"--labels {path}: expected one label per line, in the order of the model's classes; {where}"
        )
    return [line.strip() for line in lines]


def with_labels(result: OnnxResult, labels: list[str], top_k: int, labels_path: Path) -> OnnxResult:
    """`result` with `class_name` and `class_score` added to its graph and to what the original answers."""
    from onnx import TensorProto, helper, numpy_helper

    scores_output = _class_output(result, len(labels), labels_path)
    if not 1 <= top_k <= len(labels):
        raise ConvertError(f"--top-k {top_k}: expected 1 to {len(labels)}, the number of labels in {labels_path}")
    reference = np.asarray(result.expected[scores_output], dtype=np.float64)
    probabilities = _are_probabilities(reference)
    graph = result.model.graph
    scores = scores_output
    if not probabilities:
        scores = f"{scores_output}_softmax"
        graph.node.append(helper.make_node("Softmax", [scores_output], [scores], axis=-1))
        reference = np.exp(reference - reference.max(axis=1, keepdims=True))
        reference /= reference.sum(axis=1, keepdims=True)
    names = numpy_helper.from_array(np.array([label.encode() for label in labels], dtype=object), "class_names")
    top_k_tensor = numpy_helper.from_array(np.array([top_k], dtype=np.int64), "class_top_k")
    graph.initializer.extend([names, top_k_tensor])
    graph.node.extend(
        [
            helper.make_node("TopK", [scores, "class_top_k"], [CLASS_SCORE, "class_index"], axis=-1),
            helper.make_node("Gather", ["class_names", "class_index"], [CLASS_NAME]),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info(CLASS_NAME, TensorProto.STRING, ["N", top_k]),
            helper.make_tensor_value_info(CLASS_SCORE, TensorProto.FLOAT, ["N", top_k]),
        ]
    )
    best = np.argsort(-reference, axis=1, kind="stable")[:, :top_k]
    expected = {
        **result.expected,
        CLASS_NAME: np.asarray(labels, dtype=object)[best],
        CLASS_SCORE: np.take_along_axis(reference, best, axis=1),
    }
    return OnnxResult(result.model, result.feeds, expected)


def _class_output(result: OnnxResult, classes: int, labels_path: Path) -> str:
    """The float output of one score per class: `probabilities` where a converter wrote it, else the only one."""
    candidates = [
        name
        for name, values in result.expected.items()
        if np.asarray(values).dtype.kind == "f" and np.ndim(values) == 2 and np.shape(values)[1] == classes
    ]
    if "probabilities" in candidates:
        return "probabilities"
    if len(candidates) == 1:
        return candidates[0]
    outputs = ", ".join(f"{name} {tuple(np.shape(values))}" for name, values in result.expected.items())
    found = "several" if candidates else "none"
    raise ConvertError(
        f"--labels {labels_path}: expected one float output of shape (rows, {classes}), one score per label; "
        f"found {found} among the model's outputs on the samples: {outputs}"
    )


def _are_probabilities(scores: np.ndarray) -> bool:
    return bool(
        (scores >= 0).all()
        and (scores <= 1).all()
        and np.allclose(scores.sum(axis=1), 1.0, atol=PROBABILITY_SUM_TOLERANCE)
    )
