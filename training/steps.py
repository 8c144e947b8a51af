"""One meta-learning or fine-tuning update of E, G and D: the losses wrapped around the pure nets.

`Trainer` owns the networks and optimisers and performs a generator update followed by
`d_steps_per_g` discriminator updates, returning every loss term by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.config import ExperimentConfig
from training.discriminator import Discriminator
from training.embedder import Embedder
from training.generator import Generator
from training.losses import (
    ContentLoss,
    adversarial_generator,
    embedding_matching,
    feature_matching,
    hinge_discriminator,
    ssim,
)
from training.runtime import average_gradients


@dataclass(kw_only=True)
class Batch:
    """One step's data, images and landmark images in [-1, 1]."""

    target_image: torch.Tensor  # (B, 3, S, S)
    target_landmarks: torch.Tensor  # (B, 3, S, S)
    target_points: torch.Tensor | None = None  # (B, 68, 2) pixels; the face-aware losses align with them
    target_warped: torch.Tensor | None = (
        None  # (B, 3, S, S) a reference warped onto the target (warp-guided G)
    )
    video: torch.Tensor | None = None  # (B,) int64 training-video index; None when fine-tuning
    ref_images: torch.Tensor | None = None  # (B, K, 3, S, S); None when fine-tuning
    ref_landmarks: torch.Tensor | None = None  # (B, K, 3, S, S)

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return Batch(
            target_image=self.target_image.to(device),
            target_landmarks=self.target_landmarks.to(device),
            target_points=move(self.target_points),
            target_warped=move(self.target_warped),
            video=move(self.video),
            ref_images=move(self.ref_images),
            ref_landmarks=move(self.ref_landmarks),
        )


class Trainer(nn.Module):
    """E, G, D with their losses. In fine-tuning mode E is absent and psi' is a parameter."""

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        embedder: Embedder | None,
        generator: Generator,
        discriminator: Discriminator,
        adain: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedder = embedder
        self.generator = generator
        self.discriminator = discriminator
        self.content = ContentLoss(cfg=cfg.loss)
        self.adain = nn.Parameter(adain.detach().clone()) if adain is not None else None  # psi'
        finetune = self.adain is not None
        opt = cfg.finetune if finetune else cfg.meta
        if self.adain is not None:  # fine-tuning: psi' trains, P is no longer used (PAPER.md)
            generator.projection.requires_grad_(False)
            g_params = [p for p in generator.parameters() if p.requires_grad] + [self.adain]
        elif cfg.meta.train_embedder:
            g_params = list(generator.parameters()) + (list(embedder.parameters()) if embedder else [])
        else:  # E and P frozen: psi stays what the warm start's embedder made it
            generator.projection.requires_grad_(False)
            if embedder is not None:
                embedder.requires_grad_(False)
            g_params = [p for p in generator.parameters() if p.requires_grad]
        self.frozen_embedder = not finetune and not cfg.meta.train_embedder
        self.train(self.training)
        d_params = [p for n, p in discriminator.named_parameters() if not (finetune and n == "W")]
        self.opt_g = torch.optim.Adam(g_params, lr=opt.lr_generator, betas=opt.betas)
        self.opt_d = torch.optim.Adam(d_params, lr=opt.lr_discriminator, betas=opt.betas)
        self.d_steps = opt.d_steps_per_g

    @classmethod
    def for_meta_learning(cls, cfg: ExperimentConfig, num_videos: int) -> Trainer:
        """Fresh E, G and D (one row of W per training video), ready to meta-learn."""
        m = cfg.model
        return cls(
            cfg=cfg,
            embedder=Embedder(cfg=m),
            generator=Generator(cfg=m),
            discriminator=Discriminator(cfg=m, num_videos=num_videos),
        )

    def train(self, mode: bool = True) -> Trainer:
        super().train(mode)
        if self.frozen_embedder and self.embedder is not None:  # no spectral-norm power iterations
            self.embedder.eval()
        return self

    def psi(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """AdaIN parameters for the batch and ê (None when fine-tuning)."""
        if self.adain is not None:
            return self.adain.expand(batch.target_image.shape[0], -1), None
        assert self.embedder is not None and batch.ref_images is not None and batch.ref_landmarks is not None
        e_hat = self.embedder.embed(batch.ref_images, batch.ref_landmarks)  # (B, 512)
        return self.generator.project(e_hat), e_hat

    def step(self, batch: Batch) -> tuple[dict[str, float], torch.Tensor]:
        """One G update then d_steps D updates; returns the named losses and the generated frames."""
        lc = self.cfg.loss
        psi, e_hat = self.psi(batch)
        fake = self.generator(batch.target_landmarks, psi, batch.target_warped)
        losses = self.content(fake, batch.target_image, batch.target_points)
        if lc.adversarial_weight > 0 or lc.feature_matching_weight > 0:
            self.discriminator.requires_grad_(False)
            score_fake, feats_fake = self.discriminator(fake, batch.target_landmarks, batch.video)
            if lc.adversarial_weight > 0:
                losses["adv"] = adversarial_generator(score_fake, lc.adversarial_weight)
            if lc.feature_matching_weight > 0:
                with torch.no_grad():
                    _, feats_real = self.discriminator(
                        batch.target_image, batch.target_landmarks, batch.video
                    )
                losses["fm"] = feature_matching(feats_real, feats_fake, lc.feature_matching_weight)
            self.discriminator.requires_grad_(True)
        if e_hat is not None and lc.matching_weight > 0 and lc.matching_trains_embedder:
            assert batch.video is not None
            w_video = self.discriminator.W[batch.video].detach()
            losses["mch"] = embedding_matching(w_video, e_hat, lc.matching_weight)
        total_g = sum(losses.values(), fake.new_zeros(()))
        if total_g.requires_grad:  # False only when every generator term is switched off
            self.opt_g.zero_grad(set_to_none=True)
            total_g.backward()
            average_gradients(p for g in self.opt_g.param_groups for p in g["params"])
            self.opt_g.step()
        out = {k: v.item() for k, v in losses.items()}
        out["g_total"] = total_g.item()
        if batch.target_warped is not None:  # < 1 once G improves on the warp it was given
            with torch.no_grad():
                warp_error = (batch.target_warped - batch.target_image).abs().mean()
                out["l1_vs_warp"] = (
                    (fake - batch.target_image).abs().mean() / warp_error.clamp(min=1e-6)
                ).item()
                # > 0 once G's frames are structurally closer to the truth than the warp's
                out["ssim_vs_warp"] = (
                    (ssim(fake, batch.target_image) - ssim(batch.target_warped, batch.target_image))
                    .mean()
                    .item()
                )
        if (
            lc.adversarial_weight > 0
            or lc.feature_matching_weight > 0
            or (e_hat is not None and lc.matching_weight > 0)
        ):
            for _ in range(self.d_steps):
                out.update(self.discriminator_step(batch, fake.detach(), e_hat))
        return out, fake.detach()

    def discriminator_step(
        self, batch: Batch, fake: torch.Tensor, e_hat: torch.Tensor | None
    ) -> dict[str, float]:
        score_real, _ = self.discriminator(batch.target_image, batch.target_landmarks, batch.video)
        score_fake, _ = self.discriminator(fake, batch.target_landmarks, batch.video)
        losses = hinge_discriminator(score_real, score_fake)
        if e_hat is not None and self.cfg.loss.matching_weight > 0:
            assert batch.video is not None
            w_video = self.discriminator.W[batch.video]
            losses["d_mch"] = embedding_matching(w_video, e_hat.detach(), self.cfg.loss.matching_weight)
        total = sum(losses.values(), fake.new_zeros(()))
        self.opt_d.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(p for g in self.opt_d.param_groups for p in g["params"])
        self.opt_d.step()
        out = {k: v.item() for k, v in losses.items()}
        out["d_total"] = total.item()
        out["d_score_real"] = score_real.mean().item()
        out["d_score_fake"] = score_fake.mean().item()
        return out
