"""The paper's losses (Sec. 3.3) as pure functions plus the content loss module.

L(E, G) = L_CNT + L_ADV + L_MCH and D's hinge loss. Each term is computed only when its weight is
non-zero and returned by name, so logs and tests see every term separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig
from training.perceptual import PerceptualNetwork


class ContentLoss(nn.Module):
    """L_CNT: weighted L1 between VGG19 and VGGFace activations of x and x_hat (+ optional pixel L1)."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.nets = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, weight, spec in (
            ("vgg19", cfg.vgg19_weight, cfg.vgg19),
            ("vggface", cfg.vggface_weight, cfg.vggface),
        ):
            if weight > 0:
                self.nets[name] = PerceptualNetwork(arch=name, spec=spec, substitute_seed=cfg.substitute_seed)
                self.weights[name] = weight

    @property
    def sources(self) -> dict[str, str]:
        """Where each perceptual network's weights came from (recorded in checkpoints)."""
        return {name: str(net.source) for name, net in self.nets.items()}

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, net in self.nets.items():
            with torch.no_grad():
                target = net(real)
            feats = net(fake)
            out[f"cnt_{name}"] = self.weights[name] * sum(
                (F.l1_loss(f, t) for f, t in zip(feats, target, strict=False)),
                torch.zeros((), device=fake.device),
            )
        if self.cfg.pixel_weight > 0:
            out["cnt_pixel"] = self.cfg.pixel_weight * F.l1_loss(fake, real)
        return out


def adversarial_generator(score_fake: torch.Tensor, weight: float) -> torch.Tensor:
    """The -D(x_hat) part of L_ADV."""
    return -weight * score_fake.mean()


def feature_matching(real: list[torch.Tensor], fake: list[torch.Tensor], weight: float) -> torch.Tensor:
    """L_FM: L1 between D's intermediate activations of the real and generated frame."""
    return weight * sum(
        (F.l1_loss(f, r.detach()) for f, r in zip(fake, real, strict=False)), fake[0].new_zeros(())
    )


def hinge_discriminator(score_real: torch.Tensor, score_fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """D's hinge loss max(0, 1 + D(x_hat)) + max(0, 1 - D(x)), each side named."""
    return {
        "d_real": F.relu(1.0 - score_real).mean(),
        "d_fake": F.relu(1.0 + score_fake).mean(),
    }


def embedding_matching(w_video: torch.Tensor, embedding: torch.Tensor, weight: float) -> torch.Tensor:
    """L_MCH: L1 between D's per-video column W_i and the embedder's ê_i."""
    return weight * F.l1_loss(w_video, embedding)
