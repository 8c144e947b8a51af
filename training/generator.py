"""The generator G(y, ê) of the paper (Sec. 3.2): landmark image -> frame of the person whose
embedding is ê. Every AdaIN scale and bias comes from psi = P·ê (one linear projection P)."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.blocks import (
    AdaIN,
    ResBlock,
    ResBlockDown,
    ResBlockUp,
    SelfAttention,
    assert_shape,
    channel_plan,
    conv,
)
from training.config import ModelConfig


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        sn = cfg.spectral_norm
        n = int(math.log2(cfg.image_size // cfg.generator_bottleneck))
        widths = channel_plan(cfg.base_channels, cfg.max_channels, n)
        down: list[nn.Module] = []
        size, prev = cfg.image_size, 3
        for i, w in enumerate(widths):
            down.append(ResBlockDown(prev, w, sn=sn, norm=True, preact=i > 0))
            size //= 2
            if size == cfg.attention_down:
                down.append(SelfAttention(w, sn=sn))
            prev = w
        self.down = nn.Sequential(*down)
        self.res = nn.Sequential(
            *[ResBlock(prev, sn=sn, adain=True) for _ in range(cfg.generator_res_blocks)]
        )
        up: list[nn.Module] = []
        for w in reversed(widths):
            up.append(ResBlockUp(prev, w // 2, sn=sn))
            size *= 2
            if size == cfg.attention_up:
                up.append(SelfAttention(w // 2, sn=sn))
            prev = w // 2
        self.up = nn.Sequential(*up)
        self.out_norm = AdaIN(prev)
        self.out_conv = conv(prev, 3, sn=sn)
        self.adain_layers = [m for m in self.modules() if isinstance(m, AdaIN)]
        self.adain_size = sum(m.num_params for m in self.adain_layers)
        self.projection = nn.Linear(cfg.embedding_dim, self.adain_size, bias=False)  # P
        nn.init.normal_(self.projection.weight, std=0.02)

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """psi = P·ê: (B, embedding_dim) -> (B, adain_size)."""
        return self.projection(embedding)

    def forward(self, landmark_image: torch.Tensor, adain: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], psi (B, adain_size) -> image (B, 3, H, W) in [-1, 1]."""
        s = self.cfg.image_size
        assert_shape(landmark_image, (None, 3, s, s), "landmark_image")
        assert_shape(adain, (landmark_image.shape[0], self.adain_size), "adain")
        offset = 0
        for layer in self.adain_layers:
            layer.set_params(adain[:, offset : offset + layer.num_params])
            offset += layer.num_params
        h = self.up(self.res(self.down(landmark_image)))
        return torch.tanh(self.out_conv(torch.relu(self.out_norm(h))))
