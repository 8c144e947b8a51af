"""Triton python-backend model: runs the `model.onnx` beside it with ONNX Runtime.

Copied as `<model>/<version>/model.py` by the `python` profile of `talkinghead export`. It stands
in for the onnxruntime_onnx / tensorrt_plan platforms where Triton has only the python backend
(the server bundled with nvidia-pytriton). Requests that Triton's dynamic batcher hands over
together run as one ONNX Runtime call, concatenated along the batch axis and split afterwards.
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
        threads = int(os.environ.get("TALKINGHEAD_ORT_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
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
