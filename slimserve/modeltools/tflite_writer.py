"""Write a dense ReLU network as a TFLite flatbuffer without TensorFlow.

LiteRT ships the TFLite schema's generated Python object API; building a `ModelT`
and packing it gives a file any TFLite interpreter loads.
"""

from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl


@dataclass(frozen=True)
class DenseLayer:
    weights: np.ndarray  # (inputs, outputs), as scikit-learn stores coefs_
    bias: np.ndarray
    relu: bool


def dense_network_to_tflite(layers: list[DenseLayer], input_name: str, output_name: str, softmax: bool = True) -> bytes:
    """One FULLY_CONNECTED op per layer, optional SOFTMAX; the batch dimension is dynamic."""
    buffers = [tfl.BufferT()]  # buffer 0 is the empty sentinel every TFLite file starts with
    tensors: list = []

    def add_tensor(name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        tensor = tfl.TensorT()
        tensor.name = name
        tensor.type = tfl.TensorType.FLOAT32
        tensor.shape = shape
        tensor.shapeSignature = [-1, *shape[1:]] if data is None else shape
        if data is None:
            tensor.buffer = 0
        else:
            buffer = tfl.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data, np.float32).tobytes(), np.uint8)
            buffers.append(buffer)
            tensor.buffer = len(buffers) - 1
        tensors.append(tensor)
        return len(tensors) - 1

    def op_code(builtin: int) -> tfl.OperatorCodeT:
        code = tfl.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = builtin
        code.version = 1
        return code

    width = layers[0].weights.shape[0]
    current = add_tensor(input_name, [1, width])
    operators = []
    for index, layer in enumerate(layers):
        last = index == len(layers) - 1 and not softmax
        weights = add_tensor(f"dense_{index}/weights", list(layer.weights.T.shape), layer.weights.T)
        bias = add_tensor(f"dense_{index}/bias", list(layer.bias.shape), layer.bias)
        out_width = layer.weights.shape[1]
        output = add_tensor(output_name if last else f"dense_{index}/output", [1, out_width])
        options = tfl.FullyConnectedOptionsT()
        options.fusedActivationFunction = (
            tfl.ActivationFunctionType.RELU if layer.relu else tfl.ActivationFunctionType.NONE
        )
        operator = tfl.OperatorT()
        operator.opcodeIndex = 0
        operator.inputs = [current, weights, bias]
        operator.outputs = [output]
        operator.builtinOptionsType = tfl.BuiltinOptions.FullyConnectedOptions
        operator.builtinOptions = options
        operators.append(operator)
        current = output
    if softmax:
        output = add_tensor(output_name, [1, layers[-1].weights.shape[1]])
        options = tfl.SoftmaxOptionsT()
        options.beta = 1.0
        operator = tfl.OperatorT()
        operator.opcodeIndex = 1
        operator.inputs = [current]
        operator.outputs = [output]
        operator.builtinOptionsType = tfl.BuiltinOptions.SoftmaxOptions
        operator.builtinOptions = options
        operators.append(operator)
        current = output

    subgraph = tfl.SubGraphT()
    subgraph.name = "main"
    subgraph.tensors = tensors
    subgraph.inputs = [0]
    subgraph.outputs = [current]
    subgraph.operators = operators

    model = tfl.ModelT()
    model.version = 3
    model.description = "slimserve dense network"
    model.operatorCodes = [op_code(tfl.BuiltinOperator.FULLY_CONNECTED), op_code(tfl.BuiltinOperator.SOFTMAX)]
    model.subgraphs = [subgraph]
    model.buffers = buffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
