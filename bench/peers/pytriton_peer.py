"""The bench's model on Triton Inference Server through PyTriton: Triton's own HTTP front end and dynamic batcher,
and ONNX Runtime in the bound Python function, with the serving program's session settings.

Run by the PyTriton venv's Python: BENCH_MODEL_PATH, BENCH_MAX_BATCH_SIZE, BENCH_PORT (HTTP), BENCH_GRPC_PORT,
BENCH_METRICS_PORT, BENCH_PROVIDERS (ONNX Runtime's, comma-separated; on CUDA with the serving program's heuristic
convolution search).
"""

import os

import numpy as np
import onnxruntime
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

options = onnxruntime.SessionOptions()
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
providers = [(name, {"cudnn_conv_algo_search": "HEURISTIC"}) if name == "CUDAExecutionProvider" else name
             for name in os.environ["BENCH_PROVIDERS"].split(",")]
session = onnxruntime.InferenceSession(os.environ["BENCH_MODEL_PATH"], options, providers=providers)
(model_input,), (model_output,) = session.get_inputs(), session.get_outputs()


@batch
def infer(**inputs):
    return {model_output.name: session.run(None, {model_input.name: inputs[model_input.name]})[0]}


config = TritonConfig(http_address="127.0.0.1", http_port=int(os.environ["BENCH_PORT"]), grpc_address="127.0.0.1",
                      grpc_port=int(os.environ["BENCH_GRPC_PORT"]), metrics_port=int(os.environ["BENCH_METRICS_PORT"]),
                      log_verbose=0)
with Triton(config=config) as triton:
    triton.bind(
        model_name="mlp",
        infer_func=infer,
        inputs=[Tensor(name=model_input.name, dtype=np.float32, shape=tuple(model_input.shape[1:]))],
        outputs=[Tensor(name=model_output.name, dtype=np.float32, shape=tuple(model_output.shape[1:]))],
        # a queue delay of 0: 2000 us halved the 1-client rate here and gained nothing at 32 clients
        config=ModelConfig(max_batch_size=int(os.environ["BENCH_MAX_BATCH_SIZE"]),
                           batcher=DynamicBatcher(max_queue_delay_microseconds=0)),
        strict=True,
    )
    triton.serve()
