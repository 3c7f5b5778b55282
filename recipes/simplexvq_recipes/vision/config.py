"""Configuration of the discrete-autoencoding recipe (section 4.1, appendix B.1); packaged YAML presets in
``simplexvq_recipes/configs/vision/`` (``--preset NAME``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from simplexvq_recipes.training.settings import LOOP_RENAMED_KEYS, TrainingConfig
from simplexvq_vision import AutoencoderConfig
from simplexvq_vision.data import BAD_IMAGE_POLICIES, NORMALIZATIONS

PRESETS: tuple[str, ...] = (
    "imagenet_16x16x32",
    "imagenet_64x64x3",
    "imagenet_64x64x32",
    "photos_8x8x32",
    "photos_demo",
)
"""The paper's three Table 3 architectures on ImageNet, and two CPU-sized runs on offline photographs."""


def preset_path(name: str) -> Path:
    """Path of a packaged YAML preset (installed with the package, so it works outside a source checkout)."""
    if name not in PRESETS:
        raise KeyError(f"unknown vision preset {name!r}; known presets: {', '.join(PRESETS)}")
    return Path(str(resources.files("simplexvq_recipes") / "configs" / "vision" / f"{name}.yaml"))


def preset_paths() -> dict[str, Path]:
    """``--preset`` name -> packaged YAML file."""
    return {name: preset_path(name) for name in PRESETS}


# Euclidean STE / rotation-trick baselines train with lr 5e-5 and no weight decay (B.1).
EUCLIDEAN_HARD_METHODS: tuple[str, ...] = ("ste-euclid", "rotation-euclid")


@dataclass
class DataConfig:
    """Images: the ImageNet folder layout, or tiles of offline photographs for demos and tests."""

    dataset: str = "imagenet"
    """``imagenet``: ``root/<train_split>/<class>/*`` and ``root/<val_split>/<class>/*`` center-cropped to
    ``image_size``; ``photos``: tiles of scikit-image's (and optionally opencv-doc's) photographs."""
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 256
    batch_size: int = 16
    """Per process: the paper's 64 is 16 x 4 GPUs."""
    eval_batch_size: int = 32
    num_workers: int = 8
    on_bad_image: str = "error"
    """``error``: stop with the unreadable file's name; ``skip``: warn naming it and use the next image."""
    normalization: str = "imagenet"
    """Model input space: ``imagenet`` (mean/std), ``symmetric`` ([-1, 1]) or ``none`` ([0, 1])."""
    photo_sources: list[str] = field(default_factory=lambda: ["skimage"])
    photo_scales: list[float] = field(default_factory=lambda: [0.25, 0.5])

    def validate(self) -> None:
        if self.dataset not in ("imagenet", "photos"):
            raise ValueError(f"data.dataset must be 'imagenet' or 'photos', got {self.dataset!r}")
        if self.dataset == "imagenet" and not self.root:
            raise ValueError("data.root must name the ImageNet folder (with train/ and val/ class folders)")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        for name in ("image_size", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine annealing to ``final_lr_ratio`` of the peak (B.1)."""

    lr: float | None = None
    """Peak learning rate; None: 1e-4, or 5e-5 for the Euclidean STE / rotation baselines."""
    weight_decay: float | None = None
    """None: 1e-4, or 0 for the Euclidean STE / rotation baselines."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 16_000
    final_lr_ratio: float = 0.5

    def resolved(self, method: str) -> tuple[float, float]:
        """(peak lr, weight decay) for ``method``, applying the paper's per-method defaults."""
        euclidean_hard = method in EUCLIDEAN_HARD_METHODS
        lr = self.lr if self.lr is not None else (5e-5 if euclidean_hard else 1e-4)
        weight_decay = self.weight_decay if self.weight_decay is not None else (0.0 if euclidean_hard else 1e-4)
        return lr, weight_decay


@dataclass(kw_only=True)
class VisionTrainingConfig(TrainingConfig):
    """The shared loop's settings (:class:`~simplexvq_recipes.training.settings.TrainingConfig`) with the image
    recipe's defaults, plus the size of the reconstruction grid."""

    output_dir: str = "runs/vision"
    epochs: int = 25
    grid_images: int = 8
    """Validation images shown in ``reconstructions.png``."""


@dataclass
class EvalConfig:
    """Feature metrics of the evaluate command (training never computes them)."""

    inception_weights: str = "auto"
    """``auto`` (torchvision's cached file if present), ``download``, a file path, or ``none``; without weights
    the Fréchet distance on a random-init Inception-v3 is reported, never labelled FID."""
    feature_metrics: bool = True
    is_splits: int = 10
    max_batches: int = 0
    """Validation batches per process to evaluate; 0: the whole validation set (what the paper reports)."""


@dataclass
class VisionRecipeConfig:
    """Everything one training run needs; saved as ``<training.output_dir>/config.yaml`` for the evaluate command."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: VisionTrainingConfig = field(default_factory=VisionTrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    RENAMED_KEYS = {
        **LOOP_RENAMED_KEYS,
        "model.method": "model.quantizer.method",
        "model.knn_k": "model.quantizer.knn_k",
        "model.codebook_size": "model.quantizer.codebook_size",
        "model.groups": "model.quantizer.groups",
        "model.quantizer_options": "model.quantizer.",
    }

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.model.latent_shape(self.data.image_size)  # image size divisible by the encoder's reduction
        self.training.validate()
        if self.training.activation_checkpointing:
            raise ValueError(
                "training.activation_checkpointing applies to Transformer layers; the image autoencoder has none "
                "(set it to false)"
            )
