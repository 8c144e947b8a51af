"""Triton python-backend model: runs the `model.onnx` beside it with ONNX Runtime.

Copied as `<model>/<version>/model.py` by the `python` profile of `talkinghead export`. It stands
in for the onnxruntime_onnx / tensorrt_plan platforms where Triton has only the python backend
(the server bundled with nvidia-pytriton). Requests that Triton's dynamic batcher hands over
together run as one ONNX Runtime call, concatenated along the batch axis and split afterwards.
Each instance (a stub process of its own) runs ONNX Runtime on its share of the cores: the core
count over the config's instance count (the generator runs in two on the CPU profile, a thread
each on 2 cores), or TALKINGHEAD_ORT_THREADS.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        # Each instance (a process of its own) on its share of the cores, unless told otherwise.
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
        share = max(1, len(os.sched_getaffinity(0)) // max(1, instances))
        options.intra_op_num_threads = int(os.environ.get("TALKINGHEAD_ORT_THREADS") or 0) or share
        options.inter_op_num_threads = 1
        # Denormal floats flushed to zero: the generator on real faces ran 3x slower without
        # (facekit/engines.py DENORMALS; this file is copied alone, so it cannot import that).
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        feeds: dict[str, list[np.ndarray]] = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            for name in self.inputs:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(len(feeds[self.inputs[0]][-1]))
        try:
            merged = {name: np.concatenate(parts) for name, parts in feeds.items()}
            results = self.session.run(self.outputs, merged)
        except Exception as err:
            error = pb_utils.TritonError(f"onnxruntime: {err}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size]))
                for name, out in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
