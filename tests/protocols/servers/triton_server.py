"""Triton Inference Server as nvidia-pytriton packages it (runs in pytriton's own venv, on a Python whose
threading Triton's Python backend understands: Debian's): the same toy model as
tests/support/model_server.py, prediction = bias + sum of the inputs, over HTTP and gRPC.

    python triton_server.py --bias 100 --http-port 8000 --grpc-port 8001 --metrics-port 8002 --workspace DIR
"""

from __future__ import annotations

import argparse

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

parser = argparse.ArgumentParser()
parser.add_argument("--name", default="fraud")
parser.add_argument("--bias", type=float, default=0.0)
parser.add_argument("--http-port", type=int, required=True)
parser.add_argument("--grpc-port", type=int, required=True)
parser.add_argument("--metrics-port", type=int, required=True)
parser.add_argument("--workspace", required=True)
args = parser.parse_args()


@batch
def infer(x: np.ndarray) -> dict[str, np.ndarray]:
    total = x.astype(np.float64).sum(axis=1, keepdims=True) + args.bias
    return {"score": total, "confidence": np.full_like(total, 0.75)}


config = TritonConfig(
    http_address="127.0.0.1",
    http_port=args.http_port,
    grpc_address="127.0.0.1",
    grpc_port=args.grpc_port,
    metrics_port=args.metrics_port,
)
with Triton(config=config, workspace=args.workspace) as triton:
    triton.bind(
        model_name=args.name,
        infer_func=infer,
        inputs=[Tensor(name="x", dtype=np.float64, shape=(-1,))],
        outputs=[
            Tensor(name="score", dtype=np.float64, shape=(1,)),
            Tensor(name="confidence", dtype=np.float64, shape=(1,)),
        ],
        config=ModelConfig(max_batch_size=64),
    )
    triton.serve()
