"""The projection discriminator D(x, y, i) of the paper (Sec. 3.2).

V maps (frame, landmark image) to R^512; the realism score is r = V(x, y)^T (W_i + w_0) + b with one
column W_i per training video. W is training-only state: it never enters an inference export.
For fine-tuning, `personalise` replaces W_i + w_0 by w' = w_0 + ê_NEW (PAPER.md, "Fine-tuning").
"""

from __future__ import annotations

import torch
from torch import nn

from training.blocks import DownTrunk, ResBlock, assert_shape, global_pool
from training.config import ModelConfig


class Discriminator(nn.Module):
    def __init__(self, *, cfg: ModelConfig, num_videos: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = DownTrunk(cfg=cfg, cin=6)
        c = self.trunk.out_channels
        self.extra = nn.ModuleList(
            [ResBlock(c, sn=cfg.spectral_norm, adain=False) for _ in range(cfg.discriminator_extra_blocks)]
        )
        self.proj: nn.Module = nn.Identity() if c == cfg.embedding_dim else nn.Linear(c, cfg.embedding_dim)
        self.W = nn.Parameter(torch.randn(num_videos, cfg.embedding_dim) * 0.02)  # per-video columns
        self.w0 = nn.Parameter(torch.randn(cfg.embedding_dim) * 0.02)
        self.b = nn.Parameter(torch.zeros(()))
        self.w_prime: nn.Parameter | None = None  # set by personalise()

    def personalise(self, embedding: torch.Tensor) -> None:
        """Fine-tuning D': w' = w_0 + ê_NEW becomes a trainable vector; W is no longer used."""
        self.w_prime = nn.Parameter((self.w0 + embedding.reshape(-1)).detach().clone())

    def forward(
        self, image: torch.Tensor, landmark_image: torch.Tensor, video: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (score (B,), intermediate features for feature matching)."""
        s = self.cfg.image_size
        assert_shape(image, (None, 3, s, s), "image")
        feats = self.trunk(torch.cat([image, landmark_image], dim=1))
        h = feats[-1]
        for block in self.extra:
            h = block(h)
            feats.append(h)
        v = self.proj(global_pool(h, self.cfg.pooling))  # (B, embedding_dim)
        if self.w_prime is not None:
            w = self.w_prime.expand_as(v)
        else:
            if video is None:
                raise ValueError("a meta-learning discriminator needs the video index of each frame")
            w = self.W[video] + self.w0  # (B, embedding_dim)
        assert_shape(w, tuple(v.shape), "projection")
        return (v * w).sum(dim=1) + self.b, feats
