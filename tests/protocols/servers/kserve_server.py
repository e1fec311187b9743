"""KServe's Python model server (runs in KServe's own venv): the same toy model as
tests/support/model_server.py, prediction = bias + sum of the inputs, over v1 and v2, REST and gRPC.

    python kserve_server.py --name fraud --bias 100 --http_port 8080 --grpc_port 8081
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from kserve import InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import generate_uuid


class SumModel(Model):
    def __init__(self, name: str, bias: float) -> None:
        super().__init__(name)
        self.bias = bias
        self.ready = True

    def predict(self, payload: Any, headers: dict[str, str] | None = None, response_headers: Any = None) -> Any:
        if isinstance(payload, InferRequest):  # v2, REST or gRPC
            total = sum(float(np.asarray(tensor.as_numpy()).sum()) for tensor in payload.inputs)
            outputs = [
                _output("score", total + self.bias),
                _output("confidence", 0.75),
            ]
            return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or generate_uuid())
        if isinstance(payload, bytes | str):  # v1 sent without a JSON content type
            payload = json.loads(payload)
        total = float(np.asarray(payload["instances"], dtype=np.float64).sum())  # v1
        return {"predictions": [total + self.bias]}


def _output(name: str, value: float) -> Any:
    from kserve import InferOutput

    output = InferOutput(name=name, shape=[1], datatype="FP64")
    output.set_data_from_numpy(np.array([value], dtype=np.float64), binary_data=False)
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[__import__("kserve").model_server.parser])
    parser.add_argument("--name", default="fraud")
    parser.add_argument("--bias", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=True).start(
        [SumModel(args.name, args.bias)]
    )
