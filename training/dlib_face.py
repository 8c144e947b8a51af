"""dlib's face-recognition ResNet (the 128-d face descriptor behind CSIM) as a frozen PyTorch module.

Weights: `dlib_face_recognition_resnet_model_v1.dat` from the `face-recognition-models` package
(dlib's `anet_type` of examples/dnn_face_recognition_ex.cpp, 99.38% on LFW), parsed here from
dlib's own serialisation by `training.dlib_dat`; nothing is converted or cached on disk.

Layout (dlib's notation; the wiring of tags/skips is fixed by dlib's C++ type, not the file):
  input_rgb_image_sized<150>: (pixel - mean RGB) / 256
  con 32 7x7/2 (no padding), affine, relu, max_pool 3x3/2      -> stem   (B, 32, 35, 35)
  3 x res 32                                                   -> level4 (B, 32, 35, 35)
  res_down 64, 3 x res 64                                      -> level3 (B, 64, 17, 17)
  res_down 128, 2 x res 128                                    -> level2 (B, 128, 8, 8)
  res_down 256, 2 x res 256                                    -> level1 (B, 256, 4, 4)
  res_down 256                                                 -> level0 (B, 256, 2, 2)
  avg_pool_everything, fc_no_bias 128                          -> descriptor (B, 128)
res x = relu(affine(con3x3(relu(affine(con3x3(x))))) + x); res_down uses a stride-2 unpadded
first conv and adds avg_pool 2x2/2 of x. dlib's add_prev sums tensors of different shapes by
zero-padding the smaller one at the end of each axis: the extra channels of res_down, and at level1
(8 -> conv 3 vs pool 4) and level0 (4 -> conv 1 vs pool 2) the conv branch is the smaller one.

The descriptor's inputs are 150x150 chips aligned like dlib's `get_face_chip(img, shape, 150, 0.25)`;
`face_chip_theta` and `chips` (training.dlib_align, re-exported here) build them differentiably from
68-point landmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.blocks import assert_shape
from training.dlib_align import CHIP, chips, face_chip_theta
from training.dlib_dat import DlibFormatError, Layer, read_network

__all__ = ["CHIP", "LEVEL_SHAPES", "DlibFaceNet", "chips", "default_model_path", "face_chip_theta"]

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LEVEL_SHAPES = [(32, 35, 35), (32, 35, 35), (64, 17, 17), (128, 8, 8), (256, 4, 4), (256, 2, 2)]


def default_model_path() -> Path:
    from facekit.detect import face_recognition_models_dir

    return face_recognition_models_dir() / MODEL_FILE


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: a + b with the smaller zero-padded at the end of C, H and W."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class Affine(nn.Module):
    """dlib's affine layer in conv mode: a per-channel scale and shift."""

    def __init__(self, *, gamma: torch.Tensor, beta: torch.Tensor) -> None:
        super().__init__()
        self.gamma = nn.Parameter(gamma.view(1, -1, 1, 1))
        self.beta = nn.Parameter(beta.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


class Residual(nn.Module):
    """relu(affine(con(relu(affine(con(x))))) (+) skip), skip = x or avg_pool 2x2/2 of x (res_down)."""

    def __init__(self, *, body: nn.Sequential, pool: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.pool = pool or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(add_padded(self.body(x), self.pool(x)))


def _conv(layer: Layer) -> nn.Conv2d:
    f = layer.fields
    out_c, in_c, kh, kw = f["filters"]
    if f["use_relu"] or not f["use_bias"]:
        raise DlibFormatError(f"con with use_relu={f['use_relu']} use_bias={f['use_bias']} not supported")
    conv = nn.Conv2d(in_c, out_c, (kh, kw), (f["stride_y"], f["stride_x"]), (f["padding_y"], f["padding_x"]))
    params = torch.from_numpy(f["params"].reshape(-1).copy())
    conv.weight.data.copy_(params[: out_c * in_c * kh * kw].view(out_c, in_c, kh, kw))
    conv.bias.data.copy_(params[out_c * in_c * kh * kw :])  # type: ignore[union-attr]
    return conv


def _affine(layer: Layer) -> Affine:
    if layer.fields["mode"] != 0 or layer.fields["disabled"]:
        raise DlibFormatError("only enabled conv-mode affine layers are supported")
    params = torch.from_numpy(layer.fields["params"].reshape(-1).copy())
    k = params.numel() // 2
    return Affine(gamma=params[:k], beta=params[k:])


def _pool(layer: Layer, kind: type[nn.MaxPool2d] | type[nn.AvgPool2d]) -> nn.Module:
    f = layer.fields  # dlib clips windows at the border: max ignores, avg excludes the padding
    size, stride, pad = (f["nr"], f["nc"]), (f["stride_y"], f["stride_x"]), (f["padding_y"], f["padding_x"])
    if kind is nn.AvgPool2d:
        return nn.AvgPool2d(size, stride, pad, count_include_pad=False)
    return nn.MaxPool2d(size, stride, pad)


_STEM = ["con", "affine", "relu", "max_pool"]
_RES = ["tag", "con", "affine", "relu", "con", "affine", "add_prev", "relu"]
_RES_DOWN = ["tag", "con", "affine", "relu", "con", "affine", "tag", "tag", "avg_pool", "add_prev", "relu"]
_HEAD = ["avg_pool", "fc"]


def _kind(layer: Layer) -> str:
    return layer.kind.rstrip("_0123456789")


def _build(layers: list[Layer]) -> tuple[nn.Sequential, nn.ModuleList, nn.Linear]:
    """Match the file's layer sequence against dlib's anet_type and build the torch modules."""
    kinds = [_kind(layer) for layer in layers]
    if kinds[:4] != _STEM or kinds[-2:] != _HEAD:
        raise DlibFormatError(f"not dlib's face ResNet: starts {kinds[:4]}, ends {kinds[-2:]}")
    stem = nn.Sequential(_conv(layers[0]), _affine(layers[1]), nn.ReLU(), _pool(layers[3], nn.MaxPool2d))
    levels: list[list[Residual]] = [[]]
    i = 4
    while i < len(layers) - 2:
        down = kinds[i : i + len(_RES_DOWN)] == _RES_DOWN
        if not down and kinds[i : i + len(_RES)] != _RES:
            raise DlibFormatError(f"unexpected layers at {i}: {kinds[i : i + len(_RES_DOWN)]}")
        body = nn.Sequential(
            _conv(layers[i + 1]),
            _affine(layers[i + 2]),
            nn.ReLU(),
            _conv(layers[i + 4]),
            _affine(layers[i + 5]),
        )
        if down:
            levels.append([])
        levels[-1].append(Residual(body=body, pool=_pool(layers[i + 8], nn.AvgPool2d) if down else None))
        i += len(_RES_DOWN) if down else len(_RES)
    avg, fc = layers[-2].fields, layers[-1].fields
    if avg["nr"] != 0 or fc["bias_mode"] != 1:
        raise DlibFormatError("expected avg_pool_everything and fc_no_bias at the top")
    linear = nn.Linear(fc["num_inputs"], fc["num_outputs"], bias=False)
    linear.weight.data.copy_(torch.from_numpy(fc["params"].reshape(fc["num_inputs"], -1).T.copy()))
    return stem, nn.ModuleList(nn.Sequential(*level) for level in levels), linear


class DlibFaceNet(nn.Module):
    """Frozen dlib face-recognition ResNet: aligned chips (B, 3, 150, 150) in [-1, 1] -> (B, 128)."""

    mean: torch.Tensor

    def __init__(self, *, path: str | Path | None = None) -> None:
        super().__init__()
        net = read_network(path or default_model_path())
        inp = net.input.fields
        if net.input.kind != "input_rgb_image_sized" or (inp["nr"], inp["nc"]) != (CHIP, CHIP):
            raise DlibFormatError(f"expected input_rgb_image_sized<{CHIP}>, got {net.input}")
        mean = [inp["avg_red"], inp["avg_green"], inp["avg_blue"]]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem, self.levels, self.fc = _build(net.layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DlibFaceNet:
        return super().train(False)  # no dropout or batch norm: stays in eval mode

    def features(self, faces: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(descriptor (B, 128), activations [stem, level4, level3, level2, level1, level0]).

        faces: aligned chips (B, 3, 150, 150), RGB in [-1, 1]. The activations (after each ReLU,
        shapes (B, *LEVEL_SHAPES[i])) suit a perceptual / identity feature loss.
        """
        assert_shape(faces, (None, 3, CHIP, CHIP), "faces")
        x = ((faces + 1.0) * 127.5 - self.mean) / 256.0  # dlib's input layer on 0..255 RGB
        x = self.stem(x)
        activations = [x]
        for level in self.levels:
            x = level(x)
            activations.append(x)
        return self.fc(x.mean(dim=(2, 3))), activations

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """Descriptors (B, 128) of aligned chips (B, 3, 150, 150) in [-1, 1]; dlib's, to ~1e-6."""
        return self.features(faces)[0]
