"""The Open Inference Protocol's gRPC messages (inference.proto and the module protoc generates from it)."""
