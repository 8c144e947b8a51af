"""Reader for dlib's binary serialisation of a DNN (`net_type` saved with `dlib::serialize`).

Only what dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) holds:
input_rgb_image_sized, con, bn_con / affine, relu, max_pool, avg_pool, add_prev, fc, tag/skip and
loss_metric. Written from dlib's format as documented by its (Boost-licensed) sources, not copied:

- integers (dlib/serialize.h pack_int): one control byte, low nibble = number of little-endian
  magnitude bytes that follow, bit 0x80 = negative; zero is the control byte 0 with no bytes.
- floats and doubles outside tensors (dlib/float_details.h): an integer mantissa m then an integer
  exponent e, value m * 2**e (e = 32000/32001/32002 mean +inf/-inf/NaN).
- strings: integer length then the bytes; bools: the ASCII byte '1' or '0'.
- tensors (dlib/cuda/tensor.h): integer version 2, integers n, k, nr, nc, then n*k*nr*nc
  little-endian float32; alias_tensor (a view into a layer's `params`): version 1 and the 4 sizes.
- a network is written outermost first: the loss layer, then each `add_layer` writes its version
  and recurses into its sub-network *before* writing its own layer (version string first) and
  cached state, so the layers' details come out input first. Tag and skip layers write only a
  version and their sub-network: which tag an `add_prev` or `skip` names is not in the file (it
  lives in the C++ type), so a caller must know the wiring; `read_network` returns the layers in
  input-to-output order with a "tag" entry where each tag or skip sits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DlibFormatError(ValueError):
    """The bytes are not what this reader expects at that offset."""


@dataclass(frozen=True)
class Layer:
    kind: str  # the layer's version string ("con_6", "bn_con2", "relu_2", ...) or "tag" for tag/skip
    fields: dict[str, Any] = field(default_factory=dict)  # numbers, bools and float32 numpy arrays


@dataclass(frozen=True)
class Network:
    loss: Layer
    input: Layer
    layers: list[Layer]  # input to output order


class _Stream:
    """A cursor over the file's bytes with dlib's primitive decoders."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of data at byte {self.pos} (wanted {n} bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte {control:#04x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def real(self) -> float:
        if self.data[self.pos : self.pos + 1] and self.data[self.pos] & 0x70:
            raise DlibFormatError(f"old ASCII float encoding at byte {self.pos} is not supported")
        mantissa, exponent = self.integer(), self.integer()
        special = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
        return special[exponent] if exponent in special else float(np.ldexp(float(mantissa), exponent))

    def string(self) -> str:
        return self._take(self.integer()).decode("ascii")

    def peek_string(self) -> str | None:
        """The string starting here if one plausibly does (length then printable ASCII), else None."""
        start = self.pos
        try:
            text = self.string()
        except (DlibFormatError, UnicodeDecodeError):
            text = None
        self.pos = start
        return text if text and text.isprintable() else None

    def boolean(self) -> bool:
        byte = self._take(1)
        if byte not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {byte!r} at byte {self.pos - 1}")
        return byte == b"1"

    def tensor(self) -> np.ndarray:
        if (version := self.integer()) != 2:
            raise DlibFormatError(f"tensor version {version} at byte {self.pos}, expected 2")
        shape = tuple(self.integer() for _ in range(4))  # (n, k, nr, nc)
        count = int(np.prod(shape))
        values = np.frombuffer(self._take(4 * count), dtype="<f4", count=count)
        return values.astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, ...]:
        if (version := self.integer()) != 1:
            raise DlibFormatError(f"alias_tensor version {version} at byte {self.pos}, expected 1")
        return tuple(self.integer() for _ in range(4))


def _multipliers(s: _Stream) -> dict[str, float]:
    names = ("learning_rate_mult", "weight_decay_mult", "bias_learning_rate_mult", "bias_weight_decay_mult")
    return {name: s.real() for name in names}


def _details(s: _Stream) -> Layer:
    """One layer's details, dispatched on the version string that starts them."""
    kind = s.string()
    f: dict[str, Any] = {}
    if kind in ("con_4", "con_5", "con_6"):
        f["params"], f["num_filters"] = s.tensor(), s.integer()
        for name in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            f[name] = s.integer()
        f["filters"], f["biases"] = s.alias(), s.alias()
        f |= _multipliers(s)
        f["use_bias"] = s.boolean() if kind != "con_4" else True
        f["use_relu"] = s.boolean() if kind == "con_6" else False
    elif kind == "bn_con2":
        f["params"], f["gamma"], f["beta"] = s.tensor(), s.alias(), s.alias()
        for name in ("means", "invstds", "running_means", "running_variances"):
            f[name] = s.tensor()
        f["num_updates"], f["running_stats_window_size"] = s.integer(), s.integer()
        f |= _multipliers(s)
        f["eps"] = s.real()
    elif kind in ("affine_", "affine_2"):
        f["params"], f["gamma"], f["beta"], f["mode"] = s.tensor(), s.alias(), s.alias(), s.integer()
        f["disabled"] = s.boolean() if kind == "affine_2" else False
    elif kind in ("relu_", "relu_2"):
        f["disabled"] = s.boolean() if kind == "relu_2" else False
    elif kind in ("max_pool_2", "avg_pool_2"):
        for name in ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x"):
            f[name] = s.integer()
    elif kind in ("fc_2", "fc_3"):
        f["num_outputs"], f["num_inputs"] = s.integer(), s.integer()
        f["params"], f["weights"], f["biases"], f["bias_mode"] = s.tensor(), s.alias(), s.alias(), s.integer()
        f |= _multipliers(s)
        f["use_bias"] = s.boolean() if kind == "fc_3" else True
    elif kind == "input_rgb_image_sized":
        f["avg_red"], f["avg_green"], f["avg_blue"] = s.real(), s.real(), s.real()
        f["nr"], f["nc"] = s.integer(), s.integer()
    elif kind == "loss_metric_2":
        f["margin"], f["distance_threshold"] = s.real(), s.real()
    elif kind not in ("add_prev_", "loss_metric_"):
        raise DlibFormatError(f"layer type {kind!r} (ending at byte {s.pos}) is not supported")
    return Layer(kind, f)


def _add_layer_state(s: _Stream, version: int, *, over_input: bool) -> None:
    """Skip the training state an add_layer writes after its details (flags, cached tensors)."""
    s.boolean(), s.boolean(), s.boolean()  # setup called, gradient stale, output disabled
    s.tensor(), s.tensor(), s.tensor()  # x_grad, cached_output, params_grad (grad_final over the input)
    if over_input and version >= 3:
        s.integer()  # sample expansion factor


def read_network(path: str | Path) -> Network:
    """Parse a dlib `add_loss_layer<...>` network file into its loss, input and layers."""
    s = _Stream(Path(path).read_bytes())
    if (version := s.integer()) != 1:
        raise DlibFormatError(f"loss layer version {version}, expected 1")
    loss = _details(s)
    headers = []  # outermost first: 2 = add_layer, 1 = tag or skip; last one wraps the input
    while True:
        headers.append(s.integer())
        if (peek := s.peek_string()) is not None and peek.startswith("input"):
            break
        if headers[-1] not in (1, 2) or len(headers) > 10_000:
            raise DlibFormatError(f"unexpected layer header {headers[-1]} at byte {s.pos}")
    if headers[-1] not in (2, 3):
        raise DlibFormatError(f"input add_layer version {headers[-1]}, expected 2 or 3 (tag on input?)")
    input_layer = _details(s)
    layers = [_details(s)]
    _add_layer_state(s, headers[-1], over_input=True)
    for header in reversed(headers[:-1]):
        if header == 1:
            layers.append(Layer("tag"))
        else:
            layers.append(_details(s))
            _add_layer_state(s, header, over_input=False)
    if s.pos != len(s.data):
        raise DlibFormatError(f"{len(s.data) - s.pos} bytes left after the network")
    return Network(loss=loss, input=input_layer, layers=layers)
