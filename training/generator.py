"""The generator G(y, ê) of the paper (Sec. 3.2): landmark image -> frame of the person whose
embedding is ê. Every AdaIN scale and bias comes from psi = P·ê (one linear projection P).

Warp-guided mode (`model.warp_guided`, after first-order-model and LivePortrait): G also takes w,
the avatar's reference frame warped piecewise-affinely onto the driving landmarks (facekit.warp),
and predicts a small flow f that moves the warp's pixels (the piecewise-affine warp is only as
right as 68 landmarks: jaw, hairline and lips land a few pixels off), and a correction r and blend
mask m over the moved warp: x_hat = clamp(w(grid + f) + m r, -1, 1), with f = 0.1 tanh(.),
r = 2 tanh(.) and m = sigmoid(.) from one final convolution (the one layer without spectral norm).
The flow runs inside the graph (GridSample, ONNX opset 16+), so frames still batch across avatars.
That convolution starts small (weights ~N(0, 1e-3), zero bias: f ~ 0, r ~ 0.02, m = 1/2), so an
untrained G returns the warp to about one grey level, and training moves f and r where the warp is
wrong. Its input goes through a leaky ReLU, not the paper's ReLU: two runs without the flow (one
from scratch with the head at exactly zero, one warm-started from a trained paper G) both ended
with every input of the head at or near 0 (dead ReLUs, within 250 steps for the warm-started one)
and G the warp to four decimals; switching the correction off is the cheapest answer wherever the
warp is right, and behind a ReLU it cannot be undone. `talkinghead train --init-from` starts this
G from a trained checkpoint (training/train.py: warm_start). psi keeps its role:
identity and style still come from the embedder through AdaIN."""

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

# Weights of the warp-guided head at initialisation: small enough that G starts as the warp (about
# one grey level off), large enough that every earlier layer gets a gradient on the first step.
WARP_HEAD_INIT_STD = 1e-3
# How far the head may move the warp's pixels, in grid units ([-1, 1] across the image): 0.1 is 6
# pixels at 128 px, the size of the landmark warp's own misalignments (jaw, hairline, lips).
FLOW_RANGE = 0.1


class Generator(nn.Module):
    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        sn = cfg.spectral_norm
        n = int(math.log2(cfg.image_size // cfg.generator_bottleneck))
        widths = channel_plan(cfg.base_channels, cfg.max_channels, n)
        down: list[nn.Module] = []
        size, prev = cfg.image_size, 6 if cfg.warp_guided else 3
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
        self.out_conv: nn.Module
        if cfg.warp_guided:  # correction (3), mask logit (1) and flow (2), near zero at the start
            last = nn.Conv2d(prev, 6, 3, padding=1)
            centres = (torch.arange(cfg.image_size, dtype=torch.float32) + 0.5) / cfg.image_size * 2 - 1
            gy, gx = torch.meshgrid(centres, centres, indexing="ij")
            self.register_buffer("grid", torch.stack([gx, gy], dim=-1)[None], persistent=False)
            nn.init.normal_(last.weight, std=WARP_HEAD_INIT_STD)
            nn.init.zeros_(last.bias)  # type: ignore[arg-type]
            self.out_conv = last
        else:
            self.out_conv = conv(prev, 3, sn=sn)
        self.adain_layers = [m for m in self.modules() if isinstance(m, AdaIN)]
        self.adain_size = sum(m.num_params for m in self.adain_layers)
        self.projection = nn.Linear(cfg.embedding_dim, self.adain_size, bias=False)  # P
        nn.init.normal_(self.projection.weight, std=0.02)

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """psi = P·ê: (B, embedding_dim) -> (B, adain_size)."""
        return self.projection(embedding)

    def forward(
        self, landmark_image: torch.Tensor, adain: torch.Tensor, warped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1], psi (B, adain_size) [, warped reference (B, 3, H, W) in
        [-1, 1], warp-guided mode only] -> image (B, 3, H, W) in [-1, 1]."""
        s = self.cfg.image_size
        assert_shape(landmark_image, (None, 3, s, s), "landmark_image")
        assert_shape(adain, (landmark_image.shape[0], self.adain_size), "adain")
        if (warped is not None) != self.cfg.warp_guided:
            raise ValueError("a warp-guided generator needs `warped`; the paper's G takes none")
        offset = 0
        for layer in self.adain_layers:
            layer.set_params(adain[:, offset : offset + layer.num_params])
            offset += layer.num_params
        try:
            return self._synthesise(landmark_image, warped)
        finally:
            # psi lives for one pass: held after it, it kept this batch's autograd graph alive
            # until the next call, and torch.export warned of tensors assigned during export
            for layer in self.adain_layers:
                layer.clear_params()

    def _synthesise(self, landmark_image: torch.Tensor, warped: torch.Tensor | None) -> torch.Tensor:
        x = landmark_image
        if warped is not None:
            assert_shape(warped, tuple(landmark_image.shape), "warped")
            x = torch.cat([landmark_image, warped], dim=1)  # (B, 6, H, W)
        h = self.out_norm(self.up(self.res(self.down(x))))
        if warped is None:
            return torch.tanh(self.out_conv(torch.relu(h)))
        # Leaky: where the warp is already right the cheapest way to add nothing is to switch the
        # head's inputs off, and behind a ReLU that state absorbs (no gradient comes back).
        out = self.out_conv(nn.functional.leaky_relu(h, 0.2))
        correction, mask = 2 * torch.tanh(out[:, :3]), torch.sigmoid(out[:, 3:4])  # (B, 3|1, H, W)
        flow = FLOW_RANGE * torch.tanh(out[:, 4:6]).permute(0, 2, 3, 1)  # (B, H, W, 2): x, y
        moved = nn.functional.grid_sample(
            warped,
            self.get_buffer("grid") + flow,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
        return (moved + mask * correction).clamp(-1.0, 1.0)
