"""The paper's losses (Sec. 3.3) as pure functions plus the content loss module.

L(E, G) = L_CNT + L_ADV + L_MCH and D's hinge loss. Each term is computed only when its weight is
non-zero and returned by name, so logs and tests see every term separately.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig
from training.dlib_face import DlibFaceNet, chips, default_model_path
from training.perceptual import PerceptualNetwork


class ContentLoss(nn.Module):
    """L_CNT: weighted L1 between VGG19 and VGGFace activations of x and x_hat (+ optional pixel
    L1), and the face-aware terms of dlib's face-recognition network (`FaceLoss`)."""

    def __init__(self, *, cfg: LossConfig) -> None:
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
        self.face = (
            FaceLoss(face_weight=cfg.face_weight, identity_weight=cfg.identity_weight)
            if cfg.face_weight > 0 or cfg.identity_weight > 0
            else None
        )

    @property
    def sources(self) -> dict[str, str]:
        """Where each perceptual network's weights came from (recorded in checkpoints)."""
        out = {name: str(net.source) for name, net in self.nets.items()}
        if self.face is not None:
            out["face"] = self.face.source
        return out

    def forward(
        self, fake: torch.Tensor, real: torch.Tensor, points: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
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
        if self.cfg.ssim_weight > 0:
            out["cnt_ssim"] = self.cfg.ssim_weight * (1.0 - ssim(fake, real).mean())
        if self.face is None and self.cfg.region_weight <= 0:
            return out
        if points is None:
            raise ValueError("the face-aware losses need the target frames' landmarks (Batch.target_points)")
        if self.face is not None:
            out.update(self.face(fake, real, points))
        if self.cfg.region_weight > 0:
            mask = region_mask(points, fake.shape[-1])
            err = (fake - real).abs().mean(dim=1, keepdim=True)
            out["cnt_region"] = self.cfg.region_weight * (err * mask).sum() / mask.sum().clamp(min=1.0)
        return out


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 7) -> torch.Tensor:
    """(B,) mean SSIM of images (B, C, H, W) in [-1, 1], differentiable: the evaluation's figure
    (skimage's structural_similarity: a uniform `window` x `window` window, sample covariance,
    channels averaged, only windows wholly inside the image), so a loss on it trains what the
    evaluation reports."""
    a, b = (a + 1) / 2, (b + 1) / 2  # [0, 1]: SSIM is not shift-invariant (the luminance term)
    c1, c2 = 0.01**2, 0.03**2  # K1, K2 of data range 1

    def mean(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, window, stride=1)

    n = window * window
    unbiased = n / (n - 1)
    mu_a, mu_b = mean(a), mean(b)
    var_a = unbiased * (mean(a * a) - mu_a * mu_a)
    var_b = unbiased * (mean(b * b) - mu_b * mu_b)
    cov = unbiased * (mean(a * b) - mu_a * mu_b)
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return score.mean(dim=(1, 2, 3))


def region_mask(points: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1]: Gaussian blobs around the eyes' and the mouth's landmarks
    (36-67 of the 68), sigma a tenth of the outer-eye-corner distance, so the mask covers
    each region and a little skin around it whatever the face's scale."""
    pts = points[:, 36:68].float()  # (B, 32, 2) x, y pixels
    eyes = (points[:, 45] - points[:, 36]).norm(dim=-1).clamp(min=1.0)  # (B,)
    sigma = (eyes / 10.0)[:, None, None, None]
    grid = torch.arange(size, device=points.device, dtype=torch.float32) + 0.5
    dx = grid[None, None, None, :] - pts[:, :, None, None, 0]  # (B, 32, 1, S)
    dy = grid[None, None, :, None] - pts[:, :, None, None, 1]  # (B, 32, S, 1)
    blobs = torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))  # (B, 32, S, S)
    return blobs.amax(dim=1, keepdim=True)


class FaceLoss(nn.Module):
    """dlib's face-recognition ResNet on chips aligned by the target's landmarks: L1 of its
    activations (`cnt_face`, the VGGFace role of L_CNT) and the Euclidean distance between the
    128-d descriptors of x_hat and x (`id_face`: the figure the evaluation reports as identity)."""

    def __init__(self, *, face_weight: float, identity_weight: float) -> None:
        super().__init__()
        self.net = DlibFaceNet()
        self.face_weight, self.identity_weight = face_weight, identity_weight
        self.source = f"file:{default_model_path().name}"

    def forward(
        self, fake: torch.Tensor, real: torch.Tensor, points: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """fake, real (B, 3, S, S) in [-1, 1]; points (B, 68, 2) pixels of the target frames."""
        with torch.no_grad():
            real_desc, real_acts = self.net.features(chips(real, points, pyramid=False))
        fake_desc, fake_acts = self.net.features(chips(fake, points, pyramid=False))
        out: dict[str, torch.Tensor] = {}
        if self.face_weight > 0:
            out["cnt_face"] = self.face_weight * sum(
                (F.l1_loss(f, r) for f, r in zip(fake_acts, real_acts, strict=True)), fake.new_zeros(())
            )
        if self.identity_weight > 0:
            out["id_face"] = self.identity_weight * (fake_desc - real_desc).norm(dim=-1).mean()
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
