"""Checkpoint -> ONNX -> TensorRT -> Triton model repository.

One stage per module: `wrappers` (uint8 NHWC wrappers around E and G), `to_onnx` (export, graph
hygiene, parity with PyTorch), `to_tensorrt` (FP16 engines where TensorRT exists; torch-free),
`repository` (Triton layout and config.pbtxt for each platform profile, avatar add/remove) and
`command` (`talkinghead export`). Only `repository` and `to_tensorrt` run without torch.
"""
