"""E, G, D per config: shapes, parameter counts against the paper, and AdaIN driven by psi = P·ê."""

from __future__ import annotations

import pytest
import torch

from training.config import load_config
from training.discriminator import Discriminator
from training.embedder import Embedder
from training.generator import Generator


def millions(net: torch.nn.Module) -> float:
    return sum(p.numel() for p in net.parameters()) / 1e6


def test_paper_parameter_counts_within_25_percent_of_the_paper() -> None:
    cfg = load_config("paper").model
    e, g, d = Embedder(cfg=cfg), Generator(cfg=cfg), Discriminator(cfg=cfg, num_videos=0)
    assert abs(millions(e) - 15) / 15 < 0.25, millions(e)
    assert abs(millions(g) - 38) / 38 < 0.25, millions(g)
    assert abs(millions(d) - 20) / 20 < 0.25, millions(d)
    assert g.adain_size == 13184  # psi's size in the reference reimplementation


@pytest.mark.parametrize("name", ["smoke", "small"])
def test_shapes(name: str) -> None:
    cfg = load_config(name).model
    s = cfg.image_size
    e, g, d = Embedder(cfg=cfg), Generator(cfg=cfg), Discriminator(cfg=cfg, num_videos=3)
    x, y = torch.rand(2, 3, s, s) * 2 - 1, torch.rand(2, 3, s, s) * 2 - 1
    emb = e(x, y)
    assert emb.shape == (2, 512) and (emb >= 0).all() == cfg.embedding_relu  # small: a plain Linear
    assert e.embed(x.unsqueeze(1).expand(2, 4, 3, s, s), y.unsqueeze(1).expand(2, 4, 3, s, s)).shape == (
        2,
        512,
    )
    out = g(y, g.project(emb))
    assert out.shape == (2, 3, s, s) and out.abs().max() <= 1
    score, feats = d(out, y, torch.tensor([0, 2]))
    assert score.shape == (2,) and len(feats) >= 3
    with pytest.raises(ValueError, match="expected shape"):
        g(y[:, :, :-1], g.project(emb))


def test_generator_output_follows_embedding_and_landmarks() -> None:
    torch.manual_seed(0)
    cfg = load_config("smoke").model
    s = cfg.image_size
    g = Generator(cfg=cfg).eval()
    y = torch.full((1, 3, s, s), -1.0)
    y[..., 10:20, 10:40] = 1.0
    e1, e2 = torch.rand(1, 512) * 4, torch.rand(1, 512) * 4
    base = g(y, g.project(e1))
    assert (g(y, g.project(e2)) - base).abs().mean() > 1e-3  # another person, another face
    y_moved = torch.roll(y, shifts=20, dims=2)
    assert (g(y_moved, g.project(e1)) - base).abs().mean() > 1e-3  # landmarks move the face
    # psi comes from P alone: zeroing P makes every embedding give the same frame
    with torch.no_grad():
        g.projection.weight.zero_()
    assert torch.allclose(g(y, g.project(e1)), g(y, g.project(e2)))


def test_projection_is_linear_so_mean_commutes() -> None:
    g = Generator(cfg=load_config("smoke").model)
    e = torch.rand(5, 512)
    assert torch.allclose(g.project(e.mean(0, keepdim=True)), g.project(e).mean(0, keepdim=True), atol=1e-6)


def test_projection_discriminator_uses_the_video_column_and_personalises() -> None:
    torch.manual_seed(0)
    cfg = load_config("smoke").model
    s = cfg.image_size
    d = Discriminator(cfg=cfg, num_videos=2).eval()
    x = torch.rand(1, 3, s, s)
    with torch.no_grad():
        d.W[1] += 1.0
        r0, _ = d(x, x, torch.tensor([0]))
        r1, _ = d(x, x, torch.tensor([1]))
        assert not torch.allclose(r0, r1)
        with pytest.raises(ValueError, match="video index"):
            d(x, x)
        d.personalise(torch.zeros(512))
        rp, _ = d(x, x)  # w' = w0 + 0 ignores W
        d.W.zero_()
        rp2, _ = d(x, x)
    assert torch.allclose(rp, rp2)


def test_warp_guided_generator_starts_as_the_warp_and_learns_a_correction() -> None:
    torch.manual_seed(0)
    cfg = load_config("smoke").replace(**{"model.warp_guided": True}).model
    s = cfg.image_size
    g = Generator(cfg=cfg)
    y = torch.rand(2, 3, s, s) * 2 - 1
    warped = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4) * 2 - 1, size=(s, s), mode="bilinear")
    psi = torch.randn(2, g.adain_size) * 0.1
    start = g(y, psi, warped)
    assert (start - warped).abs().max() < 0.05  # an untrained G returns the warp (to ~1 grey level)
    start.sum().backward()
    silent = [n for n, p in g.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]

    def idle_at_start(name: str) -> bool:  # attention behind SAGAN's zero gamma, P (psi is given)
        return any(t in name for t in (".query.", ".key.", ".value.")) or name == "projection.weight"

    # every convolution learns from the first step (a zero head let none of them); the image's
    # first block has no pre-activation, so its input norm is never used
    assert [n for n in silent if not (idle_at_start(n) or n.startswith("down.0.norm1."))] == []
    g.zero_grad()
    with pytest.raises(ValueError, match="needs `warped`"):
        g(y, psi)
    with pytest.raises(ValueError, match="takes none"):
        Generator(cfg=load_config("smoke").model)(y, psi, warped)
    target = warped.clone()  # the warp is right except where a mouth opened: a dark patch
    target[..., s // 2 : s // 2 + 12, s // 3 : 2 * s // 3] = -1.0
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    for _ in range(180):  # it plateaus for ~60 steps, then learns the patch
        loss = (g(y, psi, warped) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * (warped - target).abs().mean().item()  # the correction learned (0.05)


def test_a_warp_guided_g_warm_started_from_a_paper_g_starts_from_its_features() -> None:
    """`talkinghead train --init-from`: the warp-guided G computes the paper G's features (its new
    input channels start at zero) and returns the warp on top of them, so the correction head
    learns from trained features instead of from nothing."""
    from training.steps import Trainer
    from training.train import warm_start

    torch.manual_seed(0)
    paper_cfg = load_config("smoke")
    warp_cfg = paper_cfg.replace(**{"model.warp_guided": True})

    paper, warp = Trainer.for_meta_learning(paper_cfg, 3), Trainer.for_meta_learning(warp_cfg, 3)
    with torch.no_grad():  # a "trained" paper G: weights away from their initialisation
        for p in paper.generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {
        "embedder": paper.embedder.state_dict(),
        "generator": paper.generator.state_dict(),
        "discriminator": paper.discriminator.state_dict(),
        "video_ids": ["a", "b", "c"],
    }
    done = warm_start(warp, ckpt, ["a", "b", "c"])
    assert "discriminator.W" in done["copied"]
    assert all(k.startswith("generator.out_conv.") for k in done["kept"]), done["kept"]
    s = paper_cfg.model.image_size
    y = torch.rand(2, 3, s, s) * 2 - 1
    warped = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8) * 2 - 1, size=(s, s), mode="bilinear")
    psi = torch.randn(2, paper.generator.adain_size) * 0.3
    features: list[torch.Tensor] = []
    for g in (paper.generator, warp.generator):
        g.eval()
        hook = g.out_conv.register_forward_hook(lambda m, i, o: features.append(i[0]))
        with torch.no_grad():
            made = g(y, psi, warped if g is warp.generator else None)
        hook.remove()
    assert features[1].abs().mean() > 0  # alive
    # the same features; the warp-guided head sees them through a leaky ReLU, the paper's a ReLU
    assert torch.allclose(features[0], features[1].clamp(min=0), atol=1e-4)
    assert (made - warped).abs().max() < 0.05
    done = warm_start(Trainer.for_meta_learning(warp_cfg, 3), ckpt, ["x", "y", "z"])
    assert "discriminator.W" in done["kept"]  # other videos: W means nothing to this run


def test_fused_self_attention_computes_what_the_blocked_one_does() -> None:
    """CUDA tensors take one scaled_dot_product_attention call, the CPU and ONNX export the
    blocked products: the same function, forward and backward (training on a GPU uses the fused)."""
    from training.blocks import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(64, sn=True).eval()  # eval: no power iteration between the two
    with torch.no_grad():
        attention.gamma.fill_(1.0)  # 0 at initialisation would hide the attention term
    x = torch.randn(2, 64, 32, 32)  # 1,024 positions: 4 query blocks
    outs, grads = [], []
    for fused in (False, True):
        attention.fused = fused
        attention.zero_grad()
        out = attention(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(attention.query.parametrizations.weight.original.grad.clone())
    assert (outs[0] - x).abs().mean() > 1e-2  # the attention term is there
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    attention.fused = None  # the default on a CPU tensor: blocked
    assert torch.equal(attention(x).detach(), outs[0])
