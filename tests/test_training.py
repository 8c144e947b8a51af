"""Meta-learning and fine-tuning do what a user expects: losses fall, runs resume, substitutes
are announced and recorded, fine-tuning lowers the error on a held-out person's other frames."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from talkinghead.cli import main as cli
from training import checkpoint
from training.config import load_config
from training.data import EpisodeDataset, load_frames
from training.discriminator import Discriminator
from training.embedder import Embedder
from training.evaluation.methods import FeedForward
from training.finetune import generate, personalise, render
from training.generator import Generator
from training.losses import ContentLoss, region_mask, ssim
from training.runtime import from_uint8
from training.steps import Batch, Trainer

FACES = Path(__file__).resolve().parents[2] / "shared/data/faces"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"test clips not found at {FACES}")
MODEL = Path(__file__).resolve().parents[1] / "models/talkinghead-small.pt"


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real clips preprocessed at the smoke size (64 px), 24 frames each."""
    if not FACES.is_dir():
        pytest.skip(f"test clips not found at {FACES}")
    out = tmp_path_factory.mktemp("pre")
    code = cli(
        [
            "preprocess",
            str(FACES),
            str(out),
            "--size",
            "64",
            "--max-frames",
            "24",
            "--workers",
            "1",
            "--include",
            "dpe_d",
            "--include",
            "eamm_happy",
        ]
    )
    assert code == 0
    return out


def _batch(item: dict[str, torch.Tensor]) -> Batch:
    return Batch(
        target_image=item["target_image"][None],
        target_landmarks=item["target_landmarks"][None],
        target_points=item["target_points"][None],
        video=item["video"][None],
        ref_images=item["ref_images"][None],
        ref_landmarks=item["ref_landmarks"][None],
    )


@needs_faces
def test_a_few_dozen_steps_on_one_clip_lower_the_reconstruction_error(smoke_data: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config("smoke").replace(**{"meta.lr_generator": 1e-3, "meta.lr_discriminator": 1e-3})
    data = EpisodeDataset(
        root=smoke_data,
        k_shot=2,
        image_size=64,
        draw_style=cfg.model.draw_style,
        include=["dpe_d"],
        exclude=[],
        flip=False,
        seed=0,
    )
    m = cfg.model
    trainer = Trainer(
        cfg=cfg,
        embedder=Embedder(cfg=m),
        generator=Generator(cfg=m),
        discriminator=Discriminator(cfg=m, num_videos=data.num_videos),
    )
    fixed = [_batch(data[0]) for _ in range(6)]

    def l1() -> float:
        with torch.no_grad():
            errs = [
                (trainer.generator(b.target_landmarks, trainer.psi(b)[0]) - b.target_image).abs().mean()
                for b in fixed
            ]
        return float(torch.stack(errs).mean())

    before = l1()
    for _ in range(40):
        losses, _ = trainer.step(_batch(data[0]))
    expected = {
        "cnt_vgg19",
        "cnt_vggface",
        "cnt_pixel",
        "cnt_face",
        "id_face",
        "adv",
        "fm",
        "d_mch",
        "d_real",
    }
    assert expected <= set(losses)
    after = l1()
    assert after < 0.7 * before, (before, after)


def test_the_region_loss_hears_errors_in_the_mouth_and_eyes_not_elsewhere() -> None:
    """`loss.region_weight`: an error inside the mouth costs far more than the same error, pixel
    for pixel, in the background, and the mask covers the open mouth's interior."""

    def ring(cx: float, cy: float, rx: float, ry: float, n: int) -> list[tuple[float, float]]:
        angles = np.pi + np.linspace(0, 2 * np.pi, n, endpoint=False)  # point 0 leftmost
        return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]

    # eyes 36-47 (6 points each; 36 and 45 the outer corners), outer lips 48-59, inner lips 60-67:
    # a face with its mouth open
    layout = ring(44, 50, 7, 3, 6) + ring(84, 50, 7, 3, 6) + ring(64, 92, 16, 10, 12) + ring(64, 92, 10, 5, 8)
    points = torch.zeros(1, 68, 2)
    points[0, 36:68] = torch.tensor(layout, dtype=torch.float32)
    mask = region_mask(points, 128)[0, 0]
    mouth_centre = points[0, 60:68].mean(dim=0).round().long()
    assert mask[mouth_centre[1], mouth_centre[0]] > 0.5
    assert mask[:10, :10].max() < 1e-3 and 0.02 < float(mask.mean()) < 0.2
    off = ("vgg19_weight", "vggface_weight", "face_weight", "identity_weight", "pixel_weight")
    cfg = load_config("smoke").replace(**{f"loss.{k}": 0.0 for k in off}, **{"loss.region_weight": 1.0})
    loss = ContentLoss(cfg=cfg.loss)
    real = torch.zeros(1, 3, 128, 128)
    in_mouth, in_corner = real.clone(), real.clone()
    x, y = int(mouth_centre[0]), int(mouth_centre[1])
    in_mouth[..., y - 3 : y + 3, x - 3 : x + 3] = 1.0
    in_corner[..., :6, :6] = 1.0
    mouth_cost = float(loss(in_mouth, real, points)["cnt_region"])
    corner_cost = float(loss(in_corner, real, points)["cnt_region"])
    whole_frame = float((in_mouth - real).abs().mean())  # what the pixel L1 makes of it
    assert mouth_cost > 4 * whole_frame and corner_cost < 1e-3 * mouth_cost
    with pytest.raises(ValueError, match="landmarks"):
        loss(in_mouth, real)


def test_the_ssim_loss_is_the_evaluations_ssim_and_its_gradient_sharpens_a_blur() -> None:
    """`loss.ssim_weight` trains the figure the evaluation reports: the torch SSIM equals skimage's
    structural_similarity on a real face (blurred, shifted, itself), and a step down its gradient
    from a blurred copy raises skimage's SSIM to the original."""
    import cv2
    from PIL import Image
    from skimage.metrics import structural_similarity

    face = np.asarray(Image.open(MODEL.parents[1] / "facekit/assets/demo_portrait.png").convert("RGB"))
    face = cv2.resize(face, (128, 128), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(face, (5, 5), 2.0)
    shifted = np.roll(face, 3, axis=1)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return from_uint8(x[None])

    for other in (blurred, shifted, face):
        expected = structural_similarity(face, other, channel_axis=-1, data_range=255)
        assert abs(float(ssim(tensor(face), tensor(other))[0]) - expected) < 1e-4
    fake = tensor(blurred).requires_grad_(True)
    (1 - ssim(fake, tensor(face)).mean()).backward()
    assert fake.grad is not None
    stepped = (fake - 0.5 * fake.grad / fake.grad.abs().max()).detach().clamp(-1, 1)
    after = ((stepped[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    before_score = structural_similarity(face, blurred, channel_axis=-1, data_range=255)
    after_score = structural_similarity(face, after, channel_axis=-1, data_range=255)
    assert after_score > before_score + 0.01, (before_score, after_score)


@pytest.mark.parametrize("trains_embedder", [False, True])
def test_embedding_matching_moves_the_embedder_only_when_configured(trains_embedder: bool) -> None:
    """L_MCH = L1(W_i, ê_i) has a trivial minimum at W = ê = 0; with weight 80 it killed every unit
    of the first small model's ê. By default it trains W alone."""
    torch.manual_seed(0)
    cfg = load_config("smoke").replace(
        **{
            "loss.matching_trains_embedder": trains_embedder,
            **{f"loss.{k}": 0.0 for k in ("vgg19_weight", "vggface_weight", "pixel_weight", "face_weight")},
            **{
                f"loss.{k}": 0.0 for k in ("identity_weight", "adversarial_weight", "feature_matching_weight")
            },
        }
    )
    trainer = Trainer.for_meta_learning(cfg, num_videos=2)
    s = cfg.model.image_size
    batch = Batch(
        target_image=torch.zeros(1, 3, s, s),
        target_landmarks=torch.zeros(1, 3, s, s),
        video=torch.tensor([1]),
        ref_images=torch.rand(1, 2, 3, s, s) * 2 - 1,
        ref_landmarks=torch.zeros(1, 2, 3, s, s),
    )
    before = [p.detach().clone() for p in trainer.embedder.parameters()]  # type: ignore[union-attr]
    w_before = trainer.discriminator.W.detach().clone()
    losses, _ = trainer.step(batch)
    moved = any(not torch.equal(a, p) for a, p in zip(before, trainer.embedder.parameters(), strict=True))  # type: ignore[union-attr]
    assert moved == trains_embedder
    assert ("mch" in losses) == trains_embedder and "d_mch" in losses
    assert not torch.equal(w_before, trainer.discriminator.W)  # W always follows ê


@needs_faces
def test_train_command_checkpoints_records_substitutes_and_resumes(
    smoke_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert cli(["train", "--config", "smoke", "--data", str(smoke_data), "--run", str(run)]) == 0
    assert "random-weight vgg19 substitute" in caplog.text  # said at start, not silently
    assert f"step 2: checkpoint {run / 'last.pt'} (done)" in caplog.text  # and at the end, where it went
    ckpt = checkpoint.load(run / "last.pt")
    assert ckpt["step"] == 2 and ckpt["kind"] == "meta"
    assert ckpt["perceptual"]["vgg19"].startswith("random-substitute")
    assert checkpoint.config_of(ckpt) == load_config("smoke").replace(**{"meta.data": str(smoke_data)})
    assert ckpt["discriminator"]["W"].shape[0] == 2  # one column per training video
    assert (run / "metrics.jsonl").read_text().count("\n") == 2 and (run / "config.yaml").is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert (
            cli(["train", "--config", "smoke", "--data", str(smoke_data), "--run", str(run), "--steps", "4"])
            == 0
        )
    assert "resumed" in caplog.text
    assert checkpoint.load(run / "last.pt")["step"] == 4
    release = checkpoint.release(checkpoint.load(run / "last.pt"))
    assert "W" not in release["discriminator"] and "optimizers" not in release
    emb, _gen, disc = checkpoint.build_networks(release)  # fine-tuning works from a release
    assert emb is not None and disc is not None


@needs_faces
def test_a_diverging_run_keeps_its_last_checkpoint_and_fails(
    smoke_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Learning rates of 1e8 (given as YAML 1.1 leaves them, text: '1e8' reached Adam as a string,
    a TypeError traceback). Every loss turns NaN; before, the run logged NaNs, wrote last.pt with
    NaN weights over the good one and exited 0 (helper-77). Now it stops at the first loss that is
    not finite, writes nothing more and exits 1; the checkpoint of the run's 2 good steps stays."""
    run = tmp_path / "run"
    base = ["train", "--config", "smoke", "--data", str(smoke_data), "--run", str(run)]
    assert cli(base) == 0
    good = checkpoint.load(run / "last.pt")
    with caplog.at_level(logging.INFO):
        code = cli([*base, "--run", str(tmp_path / "nan"), "--steps", "6", "--set", "meta.lr_generator=1e8"])
    assert code == 1 and "training diverged at step" in caplog.text, caplog.text[-2000:]
    for name in ("last.pt", "previous.pt"):  # the run wrote nothing after its first bad step
        if (tmp_path / "nan" / name).exists():
            saved = checkpoint.load(tmp_path / "nan" / name)
            assert all(torch.isfinite(t).all() for t in saved["generator"].values()), name
    assert checkpoint.load(run / "last.pt")["step"] == good["step"] == 2
    # resuming a run with another model's config: one line, not a 25-line size mismatch
    with pytest.raises(SystemExit, match="is a run of config 'smoke', with another model than 'small'"):
        cli(["train", "--config", "small", "--data", str(smoke_data), "--run", str(run), "--steps", "4"])
    with pytest.raises(SystemExit):  # argparse: must be >= 1
        cli([*base, "--steps", "0"])


@needs_faces
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(smoke_data: Path, tmp_path: Path) -> None:
    """Resuming redrew the episodes (the data's generator started again from the seed, the
    sampler took a new order from torch's state, numpy's state was not restored): 3 + 3 steps
    ended up to 2.2e-3 away from 6 straight. Now every weight is the same, to the bit (one
    thread: with two, kernels may sum in another order beside other work, and Adam's first,
    sign-like steps make that up to 5e-5)."""
    base = ["train", "--config", "smoke", "--data", str(smoke_data), "--threads", "1"]
    assert cli([*base, "--run", str(tmp_path / "straight"), "--steps", "4"]) == 0
    assert cli([*base, "--run", str(tmp_path / "halves"), "--steps", "2"]) == 0
    assert cli([*base, "--run", str(tmp_path / "halves"), "--steps", "4"]) == 0
    straight = checkpoint.load(tmp_path / "straight" / "last.pt")
    halves = checkpoint.load(tmp_path / "halves" / "last.pt")
    for part in ("embedder", "generator", "discriminator"):
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, halves[part][name]), f"{part}.{name}"


def test_train_dry_run_without_data_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="preprocess"):
        cli(
            ["train", "--config", "smoke", "--data", str(tmp_path), "--run", str(tmp_path / "r"), "--dry-run"]
        )


PORTRAIT = Path(__file__).resolve().parents[1] / "facekit/assets/demo_portrait.png"


@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_one_photo_fine_tuning_trains_on_warps_that_differ_from_the_photo() -> None:
    """A warp-guided G' learns to correct the reference warped onto the target. With one photo the
    only reference is the target itself, warped onto its own landmarks: the photo, to the pixel, so
    G' learned nothing (evaluation, T = 1: fine-tuned SSIM 0.725 against feed-forward 0.724). The
    pool keeps that pair and adds the photo under random similarities warped back onto it: warps
    with real errors (the demo portrait: 4-9 grey levels; real T = 8 pairs 4-6), target the photo."""
    from PIL import Image

    from facekit.detect import make_detector
    from training.finetune import prepare_images, training_views

    cfg = checkpoint.config_of(checkpoint.load(MODEL))
    portrait = np.asarray(Image.open(PORTRAIT).convert("RGB"))
    frames, points = prepare_images([portrait], ["portrait"], make_detector("dlib"), cfg.model.image_size)
    pool = training_views(frames, points, cfg, torch.device("cpu"))
    assert pool.target_warped is not None
    photo = from_uint8(frames)
    assert torch.equal(pool.target_image, photo.expand_as(pool.target_image))  # the target: the photo
    error = (pool.target_warped - pool.target_image).abs().mean(dim=(1, 2, 3)) * 127.5  # grey levels
    assert (error > 1.0).sum() >= 4 and error.max() > 3.0, error  # before: one pair, 0.00
    assert len(error) == 1 + cfg.finetune.one_shot_sources
    assert error[0] == 0  # the photo onto itself, kept
    assert error[1:].min() > 1.0 and error[1:].mean() > 3.0, error
    # switched off, the pool is the one trivial pair it was
    off = training_views(frames, points, cfg.replace(**{"finetune.one_shot_sources": 0}), torch.device("cpu"))
    assert off.target_warped is not None and len(off.target_warped) == 1
    assert torch.equal(off.target_warped, photo)


def test_fine_tuning_on_several_frames_warps_each_from_the_nearest_other() -> None:
    """T > 1 keeps its real pairs (each frame, the nearest other frame warped onto it) first,
    whatever the one-photo settings: three views of the demo portrait, moved a few pixels each.
    Then `synthetic_sources` pairs of each frame: the frame the target, its warp under a random
    similarity the source (on real pairs alone G' learned the references' own expressions), at
    `synthetic_spread` times the one-photo spread."""
    import cv2
    from PIL import Image

    from facekit.detect import make_detector
    from facekit.warp import warp_nearest
    from training.finetune import prepare_images, training_views

    cfg = load_config("small-warp")
    portrait = np.asarray(Image.open(PORTRAIT).convert("RGB"))
    frame, pts = prepare_images([portrait], ["portrait"], make_detector("dlib"), cfg.model.image_size)
    moves = [np.array([[1.0, 0, dx], [0, 1.0, dy]]) for dx, dy in ((0, 0), (4, -2), (-3, 3))]
    frames = np.stack([cv2.warpAffine(frame[0], m, frame.shape[1:3]) for m in moves])
    points = np.stack([pts[0] + m[:, 2] for m in moves]).astype(np.float32)
    others = [[j for j in range(3) if j != i] for i in range(3)]
    expected = np.stack(
        [warp_nearest(frames[o], points[o], points[i : i + 1])[0] for i, o in enumerate(others)]
    )
    for n in (0, 8):
        pool = training_views(
            frames,
            points,
            cfg.replace(**{"finetune.one_shot_sources": n, "finetune.synthetic_sources": 0}),
            torch.device("cpu"),
        )
        assert pool.target_warped is not None and len(pool.target_warped) == 3
        assert torch.equal(pool.target_warped, from_uint8(expected))
        assert torch.equal(pool.target_image, from_uint8(frames))
    k = cfg.finetune.synthetic_sources
    assert k == 4
    pool = training_views(frames, points, cfg, torch.device("cpu"))
    assert pool.target_warped is not None and len(pool.target_warped) == 3 + 3 * k
    assert torch.equal(pool.target_warped[:3], from_uint8(expected))  # the real pairs, first
    targets = np.repeat(frames, k, axis=0)
    assert torch.equal(pool.target_image, from_uint8(np.concatenate([frames, targets])))
    assert torch.equal(
        pool.target_points, torch.from_numpy(np.concatenate([points, np.repeat(points, k, 0)]))
    )
    error = (pool.target_warped[3:] - pool.target_image[3:]).abs().mean(dim=(1, 2, 3)) * 127.5
    assert error.min() > 1.0, error  # each a warp with errors to correct, not the frame itself
    assert len({tuple(pool.target_warped[i].flatten()[:500].tolist()) for i in range(3, 3 + k)}) == k
    # half T = 1's spread (a wider one taught G' to change near-perfect warps): the same draws, smaller
    assert cfg.finetune.synthetic_spread == 0.5
    wide = training_views(
        frames, points, cfg.replace(**{"finetune.synthetic_spread": 1.0}), torch.device("cpu")
    )
    assert wide.target_warped is not None
    wide_error = (wide.target_warped[3:] - wide.target_image[3:]).abs().mean(dim=(1, 2, 3)) * 127.5
    assert (error < wide_error).all(), (error, wide_error)


@needs_faces
@pytest.mark.skipif(not MODEL.is_file(), reason=f"committed model not found at {MODEL}")
def test_finetuning_lowers_the_error_on_a_validation_persons_later_frames(tmp_path: Path) -> None:
    """The evaluation suite's protocol in small: references from the clip's first 1.6 s, scored on
    the frames after them (a warp-guided G warps the nearest reference onto each)."""
    meta = checkpoint.load(MODEL)
    cfg = checkpoint.config_of(meta)
    person = cfg.meta.validation_videos[0]
    argv = ["preprocess", str(FACES), str(tmp_path), "--config", "small", "--max-frames", "80"]
    assert cli([*argv, "--workers", "1", "--include", person]) == 0
    frames, points = load_frames(tmp_path / person)
    shots, later = np.arange(0, 40, 5), np.arange(45, 80, 5)
    real = from_uint8(frames[later])

    def error(ckpt: dict, psi: torch.Tensor) -> float:
        _, gen, _ = checkpoint.build_networks(ckpt, with_discriminator=False)
        with torch.no_grad():
            _, out = render(gen, psi, points[later], refs=frames[shots], ref_points=points[shots])
        return float((from_uint8(out) - real).abs().mean())

    before = error(meta, FeedForward(meta).psi(frames[shots], points[shots]))
    avatar = person.replace("_", "-")
    personal = personalise(meta, frames[shots], points[shots], avatar=avatar, steps=10, snapshots=[5])
    after = error(personal, personal["adain"])
    # the shipped warp-guided G: 0.0267 -> 0.0224 (-16 %) after 10 steps
    assert after < 0.97 * before, (before, after)
    # the snapshot at step 5 (what `talkinghead evaluate --snapshots` scores) is what 5 steps make
    kept = personal["snapshots"][5]
    five = personalise(meta, frames[shots], points[shots], avatar=avatar, steps=5)
    assert torch.allclose(kept["adain"], five["adain"], atol=1e-6)
    for name, weights in five["generator"].items():
        assert torch.allclose(kept["generator"][name], weights, atol=1e-6), name
    moved = [n for n, w in personal["generator"].items() if not torch.equal(w, kept["generator"][n])]
    assert moved, "the snapshot is a copy of step 5, not the weights training went on changing"


@needs_faces
def test_warp_guided_mode_trains_personalises_and_renders_from_the_references(
    smoke_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = ["train", "--config", "smoke", "--data", str(smoke_data), "--run", str(run)]
    assert cli([*args, "--set", "model.warp_guided=true"]) == 0
    meta = checkpoint.load(run / "last.pt")
    assert checkpoint.config_of(meta).model.warp_guided
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.9 < logged["l1_vs_warp"] < 1.1  # G's error over the warp's: a few steps in, the warp
    frames, points = load_frames(smoke_data / "dpe_d")
    personal = personalise(meta, np.asarray(frames[:3]), points[:3], avatar="warp-test", steps=2)
    refs = personal["references"]
    assert refs["frames"].shape == (3, 64, 64, 3) and refs["points"].shape == (3, 68, 2)
    drawn, made = generate(personal, points[10:14])
    assert drawn.shape == made.shape == (4, 64, 64, 3)
    # two steps from an untrained G: still (almost) the warp of the nearest reference
    from facekit.warp import warp_nearest

    warped = warp_nearest(refs["frames"], refs["points"], points[10:14]).astype(np.float64)
    assert np.abs(made - warped).mean() < 3.0


def test_a_frozen_embedder_keeps_psi_while_g_learns() -> None:
    """`meta.train_embedder: false` (the warp-guided config, warm-started from a paper G): E and P
    do not move, so psi of a person stays what the warm start made it, while G still trains."""
    torch.manual_seed(0)
    cfg = load_config("smoke").replace(**{"meta.train_embedder": False, "model.warp_guided": True})
    trainer = Trainer.for_meta_learning(cfg, num_videos=2)
    s = cfg.model.image_size
    batch = Batch(
        target_image=torch.rand(1, 3, s, s) * 2 - 1,
        target_landmarks=torch.zeros(1, 3, s, s),
        video=torch.tensor([1]),
        ref_images=torch.rand(1, 2, 3, s, s) * 2 - 1,
        ref_landmarks=torch.zeros(1, 2, 3, s, s),
        target_points=torch.rand(1, 68, 2) * s,
        target_warped=torch.rand(1, 3, s, s) * 2 - 1,
    )
    with torch.no_grad():
        psi_before = trainer.psi(batch)[0].clone()
    g_before = [p.detach().clone() for p in trainer.generator.parameters() if p.requires_grad]
    for _ in range(3):
        trainer.step(batch)
    with torch.no_grad():
        assert torch.equal(trainer.psi(batch)[0], psi_before)
    g_after = [p for p in trainer.generator.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(g_before, g_after, strict=True))


def test_a_checkpoint_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A directory where the file goes: the .tmp beside it was left behind (finetune --out DIR)."""
    (tmp_path / "avatar.pt").mkdir()
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "avatar.pt", {"kind": "personalised"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avatar.pt"]
