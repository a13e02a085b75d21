"""The bench's model as a BentoML user tuning for throughput serves it: one process like the serving program,
ONNX Runtime in the service with the serving program's settings, adaptive batching on, no access log line per
request. `bentoml serve bentoml_peer:OnnxPeer` from this folder; BENCH_MODEL_PATH, BENCH_MAX_BATCH_SIZE."""

import os

import bentoml
import numpy as np
import onnxruntime


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class OnnxPeer:
    def __init__(self):
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(os.environ["BENCH_MODEL_PATH"], options,
                                                    providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=int(os.environ["BENCH_MAX_BATCH_SIZE"]))
    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: features.astype(np.float32)})[0]
