"""Frozen configuration dataclasses, read from one YAML per experiment (training/configs/).

A checkpoint stores `ExperimentConfig.to_dict()`, so export and serving rebuild every network from
the file alone. Values marked (check) in ../shared/PAPER.md are config values here, not literals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from facekit.rasterize import DrawStyle

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 256  # frames and landmark images are image_size x image_size
    embedding_dim: int = 512  # size of e and of each projection column
    base_channels: int = 64  # width of the first block; doubles per downsampling block
    max_channels: int = 512  # cap on any block's width
    generator_bottleneck: int = 16  # spatial size at which G's AdaIN residual blocks run
    generator_res_blocks: int = 5  # AdaIN residual blocks at the bottleneck
    embedder_bottleneck: int = 4  # E and D downsample to this size before pooling
    discriminator_extra_blocks: int = 1  # residual blocks V adds at its bottleneck
    attention_down: int = 32  # resolution of self-attention in E, D and G's down path; 0 = none
    attention_up: int = 64  # resolution of self-attention in G's up path; 0 = none
    pooling: str = "sum"  # "sum" or "max": global pooling at the end of E and V
    spectral_norm: bool = True
    # ReLU after the Linear that maps a narrow E's last width to embedding_dim. On in the model
    # trained before 2026-12: with it, every unit of e died (training/evaluation/spread.py).
    embedding_relu: bool = True
    # e scaled to norm sqrt(embedding_dim): without it nothing bounds e's size once L_MCH no longer
    # trains E, and under a warp-guided G (whose AdaIN path starts with tiny gradients) Adam let it
    # drift to |e| ~ 350 within 200 steps.
    embedding_norm: bool = False
    # Warp-guided G (training/generator.py): G also takes the avatar's reference frame warped onto
    # the driving landmarks (facekit.warp) and predicts a correction and a blend mask over it.
    warp_guided: bool = False
    line_width: int = 2  # landmark drawing, see facekit.rasterize.DrawStyle
    antialias: bool = True

    @property
    def draw_style(self) -> DrawStyle:
        return DrawStyle(line_width=self.line_width, antialias=self.antialias)


@dataclass(frozen=True)
class PerceptualNet:
    """One perceptual network of L_CNT; weights from a local file (see README, "Loss weights")."""

    weights: str = ""  # path to a state dict; "" or missing file -> seeded random substitute
    layers: tuple[int, ...] = ()  # indices into the VGG `features` sequence (ReLU outputs)
    convention: str = "caffe"  # input normalisation the weights expect: caffe | torchvision | vggface


@dataclass(frozen=True)
class LossConfig:
    vgg19_weight: float = 1.5e-1  # L_CNT, VGG19 (ImageNet) term (check)
    vggface_weight: float = 2.5e-2  # L_CNT, VGGFace term (check)
    vgg19: PerceptualNet = PerceptualNet(layers=(1, 6, 11, 20, 29), convention="caffe")
    vggface: PerceptualNet = PerceptualNet(layers=(1, 6, 11, 18, 25), convention="caffe")
    pixel_weight: float = 0.0  # extra L1 on pixels in [-1, 1]; 0 in the paper
    adversarial_weight: float = 1.0  # the -D(x_hat) term of L_ADV
    feature_matching_weight: float = 10.0  # L_FM
    matching_weight: float = 80.0  # L_MCH
    # Whether L_MCH's gradient reaches E. The paper's L1(W_i, ê_i) has a trivial minimum at
    # W = ê = 0: with it on, weight 80 drove every unit of ê to zero (the collapsed embedder of
    # 2026-11). Off: W_i follows ê_i (all that fine-tuning's w' = w0 + ê needs), E learns from G.
    matching_trains_embedder: bool = False
    # Face-aware terms from dlib's face-recognition ResNet (training/dlib_face.py) on aligned
    # 150x150 chips of x and x_hat: L1 of its activations (the VGGFace role of L_CNT) and the
    # distance between their 128-d descriptors (identity).
    face_weight: float = 0.0
    identity_weight: float = 0.0
    # Extra pixel L1 inside the mouth and eyes (soft masks around the target's landmarks 36-67):
    # where a warp of the reference must fail (teeth, mouth interior, blinks) and a whole-frame
    # loss hears least. The mean over the masked pixels, times this weight.
    region_weight: float = 0.0
    # (1 - SSIM) of x_hat against x, SSIM as the evaluation computes it (skimage's 7x7 window):
    # the figure on which a warp-guided G has to beat the warp it starts from.
    ssim_weight: float = 0.0
    substitute_seed: int = 0  # seed of the random perceptual substitute when weights are absent


@dataclass(frozen=True)
class MetaLearnConfig:
    data: str = "data/preprocessed"  # output of `talkinghead preprocess`
    validation_videos: tuple[str, ...] = ()  # clip ids kept out of training
    k_shot: int = 8  # K reference frames per episode
    batch_size: int = 1  # episodes (videos) per step
    steps: int = 100000
    lr_generator: float = 5e-5  # E and G
    lr_discriminator: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    d_steps_per_g: int = 2  # discriminator updates per generator update (check)
    augment_flip: bool = True
    # Whether meta-learning trains E and P (psi = P·ê). A warp-guided G warm-started from a paper G
    # keeps them frozen: the warp carries who the person is, and with E trainable the spread of ê
    # between people fell 8x in 2,250 steps (psi of different people 0.1-1% apart) - a dying embedder.
    train_embedder: bool = True
    log_every: int = 10
    sample_every: int = 200
    spread_every: int = 50  # log the embedder's spread on the validation videos (0: never)
    checkpoint_every: int = 200
    seed: int = 0
    num_workers: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 200  # reimplementations: ~125 for T=1 up to ~560
    batch_size: int = 4
    lr_generator: float = 5e-5
    lr_discriminator: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    d_steps_per_g: int = 1
    augment_flip: bool = False
    # T = 1 with a warp-guided G (training/finetune.py: one_shot_sources): besides the photo warped
    # onto itself (a warp equal to its target, which teaches G' nothing), this many copies of the
    # photo under a random similarity, each warped back onto the photo's own landmarks; the target
    # stays the real photo. Spread (standard deviations, clipped at 2): log scale, degrees and shift
    # as a share of the image side, about the real reference -> driving spread of the evaluation
    # people at 128 px (0.038, 4.3 deg, 6.0 px; their T = 8 training pairs 0.030, 5.4 deg, 3.8 px).
    one_shot_sources: int = 8
    one_shot_log_scale: float = 0.035
    one_shot_degrees: float = 5.0
    one_shot_shift: float = 0.04
    # T > 1 with a warp-guided G: besides each frame's pair with the nearest other frame, this many
    # pairs of it made as at T = 1 (the frame under a random similarity, warped back onto it), the
    # similarity's spread `synthetic_spread` times T = 1's. The real pairs alone teach G' the
    # references' own expressions: at T = 8 its landmarks and identity drifted from the driver's
    # with more steps (150 steps, against the warp frame by frame: NME +0.0023, identity +0.011).
    # 4 pairs at T = 1's spread: +0.0007, -0.003, but G' then "corrected" near-perfect warps (a
    # still head: SSIM below the warp's); at half the spread +0.0002, -0.004, and SSIM +0.020
    # against +0.0175 on real pairs alone (models/MODEL_CARD.md).
    synthetic_sources: int = 4
    synthetic_spread: float = 0.5
    log_every: int = 10
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation suite's protocol (training/evaluation); the people are meta.validation_videos."""

    reference_seconds: float = 2.0  # references are T frames spread over the clip's first seconds
    drive_every: int = 5  # driving frames: every n-th frame after the reference window
    shots: tuple[int, ...] = (1, 8)  # T values evaluated
    stills: tuple[str, ...] = ("*_photo.*", "*_painting.*")  # one-shot stills, globs in the faces folder
    still_driver: str = "dpe_s"  # the evaluation clip whose motion drives the stills
    still_every: int = 2  # the driver's frames used for the stills: every n-th ...
    still_frames: int = 50  # ... up to this many
    jitter_clip: str = "dreamtalk_mead_w009"  # a nearly still head: landmark jitter with/without smoothing


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    meta: MetaLearnConfig = field(default_factory=MetaLearnConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        return _build(cls, raw, "config")

    def replace(self, **sections: Any) -> ExperimentConfig:
        """Return a copy with whole sections or dotted overrides, e.g. replace(**{"meta.steps": 5})."""
        raw = self.to_dict()
        for key, value in sections.items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node, dict) or part not in node:
                    raise KeyError(f"unknown config key {key!r}")
                node = node[part]
            if not isinstance(node, dict) or leaf not in node:
                raise KeyError(f"unknown config key {key!r}")
            node[leaf] = value
        return ExperimentConfig.from_dict(raw)


T = TypeVar("T")


def _build(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        ftype = fields[name].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = _typed(value, str(ftype), f"{where}.{name}")
        counted = (
            cls.__name__ in _NON_NEGATIVE and str(ftype) in ("int", "float") and not name.endswith("seed")
        )
        if counted and not kwargs[name] >= 0:  # (NaN too)
            raise ValueError(f"{where}.{name}: must be 0 or more, got {value!r}")
    return cls(**kwargs)


# Sections whose numbers (counts, steps, rates, loss weights, spreads; not seeds) mean nothing
# below 0. A negative synthetic spread was stored in the checkpoint and failed inside the first
# step of every later fine-tuning (numpy's "scale < 0"); a negative weight or rate trained on.
_NON_NEGATIVE = {"LossConfig", "MetaLearnConfig", "FinetuneConfig"}


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _typed(value: Any, ftype: str, where: str) -> Any:
    """`value` as a field annotated `ftype` holds it (an int for a float field becomes a float), or
    ValueError naming the key: `image_size: abc` in a YAML file or a --set was a traceback from
    deep in the networks' construction."""
    if ftype.startswith("tuple[") and isinstance(value, list | tuple):
        kinds = [k.strip() for k in ftype[len("tuple[") : -1].split(",")]
        if kinds[-1] == "...":
            kinds = [kinds[0]] * len(value)
        if len(kinds) == len(value):
            return tuple(
                _typed(v, k, f"{where}[{i}]") for i, (v, k) in enumerate(zip(value, kinds, strict=True))
            )
    else:
        kind = _SCALARS.get(ftype)
        fits = kind is not None and isinstance(value, kind) and (ftype == "bool") == isinstance(value, bool)
        if fits:  # (a bool is an int: not taken for a number)
            return float(value) if ftype == "float" else value
    raise ValueError(f"{where}: expected {ftype}, got {value!r}")


_DATACLASSES: dict[str, type] = {
    c.__name__: c
    for c in (ModelConfig, PerceptualNet, LossConfig, MetaLearnConfig, FinetuneConfig, EvalConfig)
}


def load_config(name_or_path: str | Path) -> ExperimentConfig:
    """Load `paper`, `small`, `smoke` (training/configs/<name>.yaml) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config {str(name_or_path)!r}; built-in configs: {known}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML ({getattr(error, 'problem', None) or error})") from None
    return ExperimentConfig.from_dict(raw)
