"""Model backends behind one interface (service.backends.base.Backend): in-process ONNX Runtime
(the default) and NVIDIA Triton over gRPC."""
