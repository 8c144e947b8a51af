"""Perceptual networks of the content loss L_CNT: VGG19 (ImageNet) and VGGFace (VGG16 layout).

Weights come from local files named in the config (README, "Perceptual-loss weights"): this
machine cannot download them. Without a file the network is a seeded random-weight VGG of the same
layout, announced at start and recorded in the checkpoint, never silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from training.config import PerceptualNet

log = logging.getLogger(__name__)

# torchvision's `features` layouts; indices in PAPER.md (conv1, 6, 11, ...) are the ReLUs here.
_LAYOUTS: dict[str, list[int | str]] = {
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
    "vggface": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}
# (mean, std) per channel of the network's own input space, and whether it expects BGR 0-255.
_CONVENTIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], bool]] = {
    "caffe": ((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), True),  # BGR, 0-255, mean-subtracted
    "torchvision": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),  # RGB, 0-1, ImageNet std
    "vggface": ((129.186, 104.762, 93.594), (1.0, 1.0, 1.0), False),  # RGB, 0-255 (vgg_face_dag)
}


class PerceptualNetwork(nn.Module):
    """A frozen VGG trunk returning the activations at `layers` for images in [-1, 1]."""

    mean: torch.Tensor
    std: torch.Tensor
    source: str  # "file:<path>" or "random-substitute(seed=N)", recorded in checkpoints

    def __init__(self, *, arch: str, spec: PerceptualNet, substitute_seed: int) -> None:
        super().__init__()
        if spec.convention not in _CONVENTIONS:
            raise ValueError(f"{arch}: unknown convention {spec.convention!r}; known {list(_CONVENTIONS)}")
        if not spec.layers:
            raise ValueError(f"{arch}: no layers configured")
        self.layers = tuple(sorted(spec.layers))
        self.features = _build(_LAYOUTS[arch], self.layers[-1] + 1)
        mean, std, self.bgr = _CONVENTIONS[spec.convention]
        scale = 1.0 if spec.convention == "torchvision" else 255.0
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) / scale)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) / scale)
        path = Path(spec.weights) if spec.weights else None
        if path is not None and path.is_file():
            _load_conv_weights(self.features, torch.load(path, map_location="cpu", weights_only=True))
            self.source = f"file:{path}"
        else:
            gen = torch.Generator().manual_seed(substitute_seed)
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            self.source = f"random-substitute(seed={substitute_seed})"
            why = f"weights file {spec.weights!r} not found" if spec.weights else "no weights file configured"
            log.warning(
                "perceptual network %s: %s; using a seeded random-weight %s substitute "
                "(content loss is a random-feature loss; see README)",
                arch,
                why,
                arch,
            )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualNetwork:  # always frozen, always eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x + 1.0) / 2.0  # (B, 3, H, W) RGB in [0, 1]
        if self.bgr:
            x = x.flip(1)
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                out.append(x)
        return out


def _build(layout: list[int | str], depth: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    cin = 3
    for item in layout:
        if item == "M":
            mods.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(item, int)
            mods += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
            cin = item
    return nn.Sequential(*mods[:depth])


def _load_conv_weights(features: nn.Sequential, state: dict[str, torch.Tensor]) -> None:
    """Copy conv weights in file order; works for torchvision (`features.N.weight`) and
    vgg_face_dag (`conv1_1.weight`) state dicts alike."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 4]
    biases = [
        state[k[: -len("weight")] + "bias"] for k, v in state.items() if k.endswith("weight") and v.ndim == 4
    ]
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    if len(weights) < len(convs):
        raise ValueError(f"weights file has {len(weights)} conv layers, the network needs {len(convs)}")
    for conv_layer, w, b in zip(convs, weights, biases, strict=False):
        if w.shape != conv_layer.weight.shape:
            raise ValueError(
                f"conv weight shape {tuple(w.shape)} != expected {tuple(conv_layer.weight.shape)}"
            )
        conv_layer.weight.data.copy_(w)
        if conv_layer.bias is not None:
            conv_layer.bias.data.copy_(b)
