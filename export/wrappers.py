"""The exported graphs: E and G wrapped so the wire carries uint8 NHWC images (../shared/DESIGN.md contract).

    embedder:            image, landmark_image uint8 (B, S, S, 3) -> embedding (B, 512), adain (B, D)
    generator:           landmark_image uint8 (B, S, S, 3), adain (B, D) -> image uint8 (B, S, S, 3)
    generator_<avatar>:  landmark_image uint8 (B, S, S, 3) -> image uint8 (B, S, S, 3), psi' baked in

A warp-guided G takes `warped` uint8 (B, S, S, 3) after its other inputs (facekit/contract.py).

Scaling to [-1, 1], NHWC <-> NCHW and the final rounding live inside the graph, so a client
never needs to know the model's value range. Spectral norm is baked into plain weights first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from training.embedder import Embedder
from training.generator import Generator


def bake(module: nn.Module) -> nn.Module:
    """A copy of `module` with every parametrization (spectral norm) folded into plain weights."""
    module = copy.deepcopy(module).eval()
    for m in module.modules():
        if parametrize.is_parametrized(m):
            # The copy shares its Parametrized* class with the source, and removing deletes the
            # class's property: without a class of its own, a second bake of the source would fail.
            cls = type(m)
            own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            m.__class__ = type(cls.__name__, cls.__bases__, own)
            for name in list(m.parametrizations.keys()):  # type: ignore[union-attr,operator]
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return module


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_wire(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded like training.runtime.to_uint8."""
    x = torch.round((images.clamp(-1.0, 1.0) + 1.0) * 127.5)
    return x.permute(0, 2, 3, 1).to(torch.uint8)


class EmbedderIO(nn.Module):
    """E plus G's projection P: one call per photo gives e and psi = P·e."""

    def __init__(self, *, embedder: Embedder, generator: Generator) -> None:
        super().__init__()
        self.embedder = bake(embedder)
        self.projection = bake(generator.projection)

    def forward(self, image: torch.Tensor, landmark_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embedder(to_model_range(image), to_model_range(landmark_image))  # (B, 512)
        return e, self.projection(e)  # (B, 512), (B, D)


class GeneratorIO(nn.Module):
    """G with psi as an input: frames of different avatars share one batch."""

    def __init__(self, *, generator: Generator) -> None:
        super().__init__()
        self.generator = bake(generator)

    def forward(self, landmark_image: torch.Tensor, adain: torch.Tensor) -> torch.Tensor:
        return to_wire(self.generator(to_model_range(landmark_image), adain))


class PersonalGeneratorIO(nn.Module):
    """A fine-tuned G with its psi' (1, D) as a constant: landmark image in, the avatar's frame out."""

    def __init__(self, *, generator: Generator, adain: torch.Tensor) -> None:
        super().__init__()
        self.generator = bake(generator)
        self.register_buffer("adain", adain.detach().reshape(1, -1).float())

    def forward(self, landmark_image: torch.Tensor) -> torch.Tensor:
        adain: torch.Tensor = self.adain  # type: ignore[assignment]
        psi = adain.expand(landmark_image.shape[0], -1)  # (B, D)
        return to_wire(self.generator(to_model_range(landmark_image), psi))


class WarpGeneratorIO(nn.Module):
    """GeneratorIO of a warp-guided G: also the avatar's reference warped onto the driving landmarks."""

    def __init__(self, *, generator: Generator) -> None:
        super().__init__()
        self.generator = bake(generator)

    def forward(
        self, landmark_image: torch.Tensor, adain: torch.Tensor, warped: torch.Tensor
    ) -> torch.Tensor:
        return to_wire(self.generator(to_model_range(landmark_image), adain, to_model_range(warped)))


class WarpPersonalGeneratorIO(PersonalGeneratorIO):
    """PersonalGeneratorIO of a warp-guided G' (its forward takes `warped` too)."""

    def forward(self, landmark_image: torch.Tensor, warped: torch.Tensor | None = None) -> torch.Tensor:
        adain: torch.Tensor = self.adain  # type: ignore[assignment]
        psi = adain.expand(landmark_image.shape[0], -1)  # (B, D)
        if warped is None:
            raise ValueError("a warp-guided generator needs `warped`")
        return to_wire(self.generator(to_model_range(landmark_image), psi, to_model_range(warped)))
