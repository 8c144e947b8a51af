"""Building blocks shared by E, G and D: residual down/up blocks, AdaIN, self-attention, and the
downsampling trunk that E and D's V share.

BigGAN-style pre-activation residual blocks (Brock et al.) as the paper uses them; spectral norm on
every convolution when the config asks for it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from training.config import ModelConfig


def conv(cin: int, cout: int, k: int = 3, *, sn: bool) -> nn.Module:
    layer = nn.Conv2d(cin, cout, k, padding=k // 2)
    return spectral_norm(layer) if sn else layer


def channel_plan(base: int, cap: int, n: int) -> list[int]:
    """Widths of n successive downsampling blocks: base, 2*base, ... capped at `cap`."""
    return [min(base * 2**i, cap) for i in range(n)]


class ResBlockDown(nn.Module):
    """x -> [norm] -> ReLU -> conv -> [norm] -> ReLU -> conv -> avgpool, plus a 1x1 skip; halves H, W."""

    def __init__(self, cin: int, cout: int, *, sn: bool, norm: bool, preact: bool = True) -> None:
        super().__init__()
        self.preact = preact
        self.norm1 = nn.InstanceNorm2d(cin, affine=True) if norm else nn.Identity()
        self.norm2 = nn.InstanceNorm2d(cout, affine=True) if norm else nn.Identity()
        self.conv1 = conv(cin, cout, sn=sn)
        self.conv2 = conv(cout, cout, sn=sn)
        self.skip = conv(cin, cout, 1, sn=sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(x)) if self.preact else x
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        return F.avg_pool2d(h, 2) + F.avg_pool2d(self.skip(x), 2)


class ResBlock(nn.Module):
    """Same-size residual block; without AdaIN (used in V) it has no normalisation."""

    def __init__(self, ch: int, *, sn: bool, adain: bool) -> None:
        super().__init__()
        self.norm1 = AdaIN(ch) if adain else None
        self.norm2 = AdaIN(ch) if adain else None
        self.conv1 = conv(ch, ch, sn=sn)
        self.conv2 = conv(ch, ch, sn=sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x) if self.norm1 is not None else x
        h = self.conv1(F.relu(h))
        h = self.norm2(h) if self.norm2 is not None else h
        return x + self.conv2(F.relu(h))


class ResBlockUp(nn.Module):
    """x -> AdaIN -> ReLU -> 2x nearest upsample -> conv -> AdaIN -> ReLU -> conv, plus upsampled 1x1 skip."""

    def __init__(self, cin: int, cout: int, *, sn: bool) -> None:
        super().__init__()
        self.norm1 = AdaIN(cin)
        self.norm2 = AdaIN(cout)
        self.conv1 = conv(cin, cout, sn=sn)
        self.conv2 = conv(cout, cout, sn=sn)
        self.skip = conv(cin, cout, 1, sn=sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x)), scale_factor=2.0, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        return h + self.skip(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AdaIN(nn.Module):
    """Instance norm whose scale and bias come from outside (a slice of psi = P·e).

    The generator calls `set_params` with (B, 2*C) before its forward pass and `clear_params`
    after it; scale is 1 + psi_s so that psi = 0 is the identity normalisation.
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.channels = ch
        self.params: torch.Tensor | None = None

    @property
    def num_params(self) -> int:
        return 2 * self.channels

    def set_params(self, params: torch.Tensor) -> None:
        self.params = params  # (B, 2C)

    def clear_params(self) -> None:
        self.params = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.params is None:
            raise RuntimeError("AdaIN parameters were not set before the forward pass")
        scale, bias = self.params.unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1, 1) each
        return F.instance_norm(x) * (1.0 + scale) + bias


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al.) with a learned residual gate initialised at 0.

    softmax(Q K^T) V with no 1/sqrt(d) scale, computed one of two ways (the same numbers):
    - blocked (the CPU, and every ONNX export): QUERY_BLOCK query positions at a time, so each
      block's attention rows stay in the CPU's cache and the large matrix is never transposed. At
      64x64 the full matrix is 64 MB per frame; blocking took the exported generator from 13 to 28
      frames/s in ONNX Runtime (BENCHMARKS.md).
    - fused (CUDA tensors): one `scaled_dot_product_attention` call, which never writes the matrix
      to device memory at all. `fused` forces either way (export/speed.py times both).
    """

    QUERY_BLOCK = 256

    def __init__(self, ch: int, *, sn: bool) -> None:
        super().__init__()
        self.query = conv(ch, max(ch // 8, 1), 1, sn=sn)
        self.key = conv(ch, max(ch // 8, 1), 1, sn=sn)
        self.value = conv(ch, ch, 1, sn=sn)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.fused: bool | None = None  # None: fused on CUDA tensors, blocked elsewhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, C/8)
        k = self.key(x).flatten(2)  # (B, C/8, HW)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if x.is_cuda if self.fused is None else self.fused:
            heads = (q.unsqueeze(1), k.transpose(1, 2).unsqueeze(1), v.unsqueeze(1))  # one head each
            out = F.scaled_dot_product_attention(*heads, scale=1.0).squeeze(1)  # (B, HW, C)
        else:
            step = self.QUERY_BLOCK
            rows = [
                torch.bmm(torch.softmax(torch.bmm(q[:, i : i + step], k), dim=-1), v)  # (B, step, C)
                for i in range(0, h * w, step)
            ]
            out = torch.cat(rows, dim=1)
        return x + self.gamma * out.transpose(1, 2).reshape(b, c, h, w)


class DownTrunk(nn.Module):
    """Residual downsampling blocks without normalisation, self-attention at `attention_down`.

    Shared shape of E and of D's V (each with its own weights). Returns every block's output so
    that D can use them for feature matching.
    """

    def __init__(self, *, cfg: ModelConfig, cin: int) -> None:
        super().__init__()
        n = int(math.log2(cfg.image_size // cfg.embedder_bottleneck))
        widths = channel_plan(cfg.base_channels, cfg.max_channels, n)
        layers: list[nn.Module] = []
        size, prev = cfg.image_size, cin
        for i, w in enumerate(widths):
            layers.append(ResBlockDown(prev, w, sn=cfg.spectral_norm, norm=False, preact=i > 0))
            size //= 2
            if size == cfg.attention_down:
                layers.append(SelfAttention(w, sn=cfg.spectral_norm))
            prev = w
        self.layers = nn.ModuleList(layers)
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


def global_pool(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) by sum or max, then ReLU (PAPER.md: E ends in pooling + ReLU)."""
    if mode == "sum":
        return F.relu(x.sum(dim=(2, 3)))
    if mode == "max":
        return F.relu(x.amax(dim=(2, 3)))
    raise ValueError(f"pooling must be 'sum' or 'max', got {mode!r}")


def assert_shape(t: torch.Tensor, shape: tuple[int | None, ...], name: str) -> None:
    """Check a tensor at a module boundary; None matches any size (stylegan3 misc.assert_shape)."""
    if t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape, strict=False)):
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
