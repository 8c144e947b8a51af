"""The embedder E(x, y) -> R^512 of the paper (Sec. 3.2): a frame and its landmark image to a
person embedding; the avatar embedding ê is the mean over K frames."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.blocks import DownTrunk, assert_shape, global_pool
from training.config import ModelConfig


class Embedder(nn.Module):
    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = DownTrunk(cfg=cfg, cin=6)
        c = self.trunk.out_channels
        # Narrow (small) configs map their last width to the 512-d embedding of the contract.
        layers: list[nn.Module] = [nn.Linear(c, cfg.embedding_dim)] + (
            [nn.ReLU()] if cfg.embedding_relu else []
        )
        self.proj: nn.Module = nn.Identity() if c == cfg.embedding_dim else nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, landmark_image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) x2 in [-1, 1] -> (B, embedding_dim)."""
        s = self.cfg.image_size
        assert_shape(image, (None, 3, s, s), "image")
        assert_shape(landmark_image, (None, 3, s, s), "landmark_image")
        h = self.trunk(torch.cat([image, landmark_image], dim=1))[-1]
        e = self.proj(global_pool(h, self.cfg.pooling))  # (B, embedding_dim)
        if self.cfg.embedding_norm:
            e = F.normalize(e, dim=1) * math.sqrt(self.cfg.embedding_dim)
        return e

    def embed(self, images: torch.Tensor, landmark_images: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, H, W) x2 -> ê (B, embedding_dim), the mean over the K frames."""
        b, k = images.shape[:2]
        e = self(images.flatten(0, 1), landmark_images.flatten(0, 1))
        return e.view(b, k, -1).mean(dim=1)
