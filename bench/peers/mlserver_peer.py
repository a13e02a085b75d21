"""The bench's model on MLServer (Seldon): a custom runtime around an ONNX Runtime session with the serving
program's settings, behind MLServer's V2 front end and adaptive batching. `mlserver start` loads it from the
folder bench/serving.py writes (settings.json, model-settings.json naming `mlserver_peer.OnnxPeer`)."""

import numpy as np
import onnxruntime
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxPeer(MLModel):
    async def load(self) -> bool:
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(self.settings.parameters.uri, options,
                                                    providers=["CPUExecutionProvider"])
        (self.input,), (self.output,) = self.session.get_inputs(), self.session.get_outputs()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        features = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        result = self.session.run(None, {self.input.name: features})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self.output.name, result)])
