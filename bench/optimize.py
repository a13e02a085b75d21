"""Which optimize level wins on which model shape: `optimize --level auto` on an MLP and on two conv nets, each level
measured against the float32 original in the same interleaved runs, and what the gate wrote.

The models are made here: the digits MLP trained by scikit-learn, and conv nets of seeded weights (the gate compares
a result with its original, so weights need not be trained to show what quantization changes). The small conv net
reads the digits images; the larger one, 32x32 RGB.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimserve.modeltools.optimize import GateRefused, optimize

SHAPES = {
    "digits MLP 64-512-256-10": "mlp",
    "conv net 1x8x8, 16-32 channels": "small conv",
    "conv net 3x32x32, 64-128 channels": "large conv",
}


def conv_net(path: Path, channels: tuple[int, ...], image: tuple[int, int], classes: int = 10, seed: int = 0) -> None:
    """Conv (3x3) -> ReLU -> MaxPool (2x2) per entry of `channels`, then global average pooling and a dense layer
    to `classes` scores: the shape of a small image classifier, with He-initialized weights from `seed`."""
    rng = np.random.default_rng(seed)
    depth, size = image
    nodes, weights, previous, width = [], [], "image", depth
    for index, out_channels in enumerate(channels):
        kernel = rng.normal(0, (2 / (9 * width)) ** 0.5, (out_channels, width, 3, 3)).astype(np.float32)
        weights += [numpy_helper.from_array(kernel, f"w{index}"),
                    numpy_helper.from_array(rng.normal(0, 0.1, out_channels).astype(np.float32), f"b{index}")]
        nodes += [helper.make_node("Conv", [previous, f"w{index}", f"b{index}"], [f"conv{index}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]),
                  helper.make_node("MaxPool", [f"relu{index}"], [f"pool{index}"], kernel_shape=[2, 2], strides=[2, 2])]
        previous, width = f"pool{index}", out_channels
    dense = rng.normal(0, (1 / width) ** 0.5, (width, classes)).astype(np.float32)
    weights += [numpy_helper.from_array(dense, "dense"), numpy_helper.from_array(np.zeros(classes, np.float32), "bias")]
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["features"]),
              helper.make_node("Gemm", ["features", "dense", "bias"], ["scores"])]
    graph = helper.make_graph(
        nodes, "conv_net", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", depth, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def digits_images(count: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 1x8x8 images in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images[:count, None] / 16).astype(np.float32), digits.target[:count]


def digits_mlp(path: Path, hidden: tuple[int, ...] = (512, 256)) -> tuple[np.ndarray, np.ndarray]:
    """An MLP trained on the digits task, as ONNX; its held-out samples and their labels."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    from slimserve.modeltools.examples import SEED, digits_split

    train_x, test_x, train_y, test_y = digits_split()
    mlp = MLPClassifier(hidden_layer_sizes=hidden, max_iter=400, random_state=SEED).fit(train_x / 16, train_y)
    model = to_onnx(mlp, (train_x[:1] / 16).astype(np.float32), options={id(mlp): {"zipmap": False}}, target_opset=17)
    path.write_bytes(model.SerializeToString())
    return (test_x / 16).astype(np.float32), test_y


def shape_model(kind: str, folder: Path) -> tuple[Path, Path, Path | None]:
    """The model of one of SHAPES, its samples and (where known) their true labels, written into `folder`."""
    model, samples, targets = folder / f"{kind.replace(' ', '-')}.onnx", folder / "samples.npy", None
    if kind == "mlp":
        rows, labels = digits_mlp(model)
        targets = folder / "targets.npy"
        np.save(targets, labels)
    elif kind == "small conv":
        conv_net(model, (16, 32), (1, 8))
        rows, _ = digits_images()
    else:
        conv_net(model, (64, 128), (3, 32))
        rows = np.random.default_rng(1).random((32, 3, 32, 32), dtype=np.float32)
    np.save(samples, rows)
    return model, samples, targets


def levels_by_shape() -> list[tuple]:
    """A row per level and shape: its latency against the original's, and what the gate made of it."""
    rows = []
    for shape, kind in SHAPES.items():
        with tempfile.TemporaryDirectory() as folder:
            model, samples, targets = shape_model(kind, Path(folder))
            try:
                report = optimize(model, "auto", samples, None, Path(folder) / "out.onnx", targets=targets)
            except GateRefused as refused:  # nothing passed: the report has every level
                report = refused.report
            print(f"\n{shape}\n{report.table()}", file=sys.stderr)
            for level in report.candidates:
                ratio = level.median_ms / report.original.median_ms
                written = level.label == report.chosen
                top1 = "-" if level.top1_agreement is None else f"{level.top1_agreement:.2%}"
                verdict = "written" if written else f"refused: {level.refused[0]}" if level.refused else "passed"
                rows.append((f"optimize auto, {shape}: {level.label} latency", ratio, "<= 1.0x where written",
                             f"{level.size / report.original.size:.0%} of the size, top-1 {top1}; {verdict}",
                             not written or ratio <= 1.0, "x"))
    return rows
