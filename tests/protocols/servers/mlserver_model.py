"""An MLServer custom runtime (runs in MLServer's own venv, started with `mlserver start <folder>`): the same
toy model as tests/support/model_server.py, prediction = bias + sum of the inputs, confidence 0.75."""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class SumModel(MLModel):
    async def load(self) -> bool:
        self.bias = float(self.settings.parameters.extra["bias"])  # type: ignore[union-attr, index]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        total = sum(float(np.asarray(NumpyCodec.decode_input(tensor)).sum()) for tensor in payload.inputs)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output("score", np.array([total + self.bias], dtype=np.float64)),
                NumpyCodec.encode_output("confidence", np.array([0.75], dtype=np.float64)),
                # Makes the JSON answer larger than 1 KB, beyond which MLServer gzips it for clients that accept it.
                NumpyCodec.encode_output("embedding", np.linspace(0, 1, 64)),
            ],
        )
