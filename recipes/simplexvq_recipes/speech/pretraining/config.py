"""Typed configuration of the wav2vec 2.0 pretraining recipe (OmegaConf structured dataclasses, no Literal types).

Defaults are the paper's ``base`` setting (Table 4 and appendix B.2, 1 x 1024 codebook); the YAML presets in
``simplexvq_recipes/configs/speech/`` change what differs (``base``, ``base_2x320``, ``tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from simplexvq import QuantizerSpec
from simplexvq_recipes.training.settings import LOOP_RENAMED_KEYS, TrainingConfig

EXTRACTOR_MODES = ("group_norm", "layer_norm")
ON_ERROR = ("raise", "skip")


def _require(condition: bool, message: str) -> None:
    """A setting that cannot work: refused when the config is built (at load, before any run folder exists)."""
    if not condition:
        raise ValueError(message)


def _positive(section: str, config: object, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if value is not None:
            _require(value > 0, f"{section}.{key} must be > 0, got {value}")


def _probabilities(section: str, config: object, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        _require(0.0 <= value < 1.0, f"{section}.{key} must be in [0, 1), got {value}")


PRESETS = ("base", "base_2x320", "tiny")


def _base_conv_layers() -> list[list[int]]:
    """Table 4: 512 channels, kernels 10-3-3-3-3-2-2, strides 5-2-2-2-2-2-2 (16 kHz -> 50 Hz)."""
    return [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@dataclass(kw_only=True)
class ModelConfig:
    """CNN feature encoder + Transformer (transformers' ``Wav2Vec2Model``) and the wav2vec 2.0 pretraining head
    (appendix B.2)."""

    # convolutional feature encoder (transformers' ``feature_extractor``)
    conv_layers: list[list[int]] = field(default_factory=_base_conv_layers)
    """``[channels, kernel, stride]`` per layer."""
    extractor_mode: str = "group_norm"
    """``group_norm``: group norm after the first CNN layer only (BASE); ``layer_norm``: after every layer (LARGE)."""
    conv_bias: bool = False
    # Transformer (transformers' ``encoder``)
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 8
    ffn_dim: int = 4096
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    input_dropout: float = 0.1
    """Dropout after the feature projection (fairseq's ``dropout_input``)."""
    layer_drop: float = 0.05
    layer_norm_first: bool = False
    # pretraining head
    quantizer: QuantizerSpec = field(default_factory=lambda: QuantizerSpec(method="softmax-knn_ce", codebook_size=1024))
    """Any registered quantizer and its options (:class:`simplexvq.QuantizerSpec`: ``method``, ``groups``,
    ``codebook_size``, ``knn_k``, ``knn_scope``, ``memory_efficient``, ...); ``None`` options keep the library's
    defaults. Its ``dim`` is ``groups * codebook_dim``, fixed by the model. With several processes an unset
    ``knn_scope`` of a KNN method becomes ``global`` (neighbours across ranks, so a short batch cannot stop the run)."""
    codebook_dim: int = 256
    """Dimension of one group's code vectors (Table 4 / section 4.2: 256 for 1 x 1024, 128 for 2 x 320)."""
    final_dim: int = 256
    target_dropout: float = 0.1
    """Dropout on the CNN features before they are quantized (fairseq's ``dropout_features``)."""
    feature_grad_mult: float = 0.1
    """Scales the gradient reaching the CNN (wav2vec 2.0 base); 1.0 disables the scaling."""
    mask_prob: float = 0.065
    """Fraction of frames that start a masked span (B.2: 6.5%)."""
    mask_length: int = 10
    min_masks: int = 2
    """Masked spans per utterance at least (so distractors exist)."""
    num_negatives: int = 100
    logit_temperature: float = 0.1
    quantizer_loss_weight: float = 1.0
    """Weight of the quantizer's auxiliary loss (eq. 9 adds it with weight 1; each term is already weighted by
    ``quantizer.regularizer_weight`` / ``commitment_weight``)."""
    feature_penalty_weight: float = 10.0

    def __post_init__(self) -> None:
        _require(len(self.conv_layers) > 0, "model.conv_layers must list at least one [channels, kernel, stride]")
        for layer in self.conv_layers:
            _require(
                len(layer) == 3 and all(int(v) > 0 for v in layer),
                f"model.conv_layers: each layer is [channels, kernel, stride] of positive sizes, got {list(layer)}",
            )
        _require(
            self.extractor_mode in EXTRACTOR_MODES,
            f"model.extractor_mode must be one of {', '.join(EXTRACTOR_MODES)}, got {self.extractor_mode!r}",
        )
        _positive("model", self, "embed_dim", "num_layers", "num_heads", "ffn_dim", "pos_conv_kernel")
        _positive("model", self, "pos_conv_groups", "codebook_dim", "final_dim", "mask_length", "num_negatives")
        _positive("model", self, "logit_temperature")
        _require(
            self.embed_dim % self.num_heads == 0 and self.embed_dim % self.pos_conv_groups == 0,
            f"model.embed_dim ({self.embed_dim}) must be a multiple of model.num_heads ({self.num_heads}) and of "
            f"model.pos_conv_groups ({self.pos_conv_groups})",
        )
        _probabilities("model", self, "dropout", "attention_dropout", "activation_dropout", "input_dropout")
        _probabilities("model", self, "layer_drop", "target_dropout")
        _require(0.0 < self.mask_prob <= 1.0, f"model.mask_prob must be in (0, 1], got {self.mask_prob}")
        _require(self.min_masks >= 0, f"model.min_masks must be >= 0, got {self.min_masks}")
        _require(self.feature_grad_mult >= 0, f"model.feature_grad_mult must be >= 0, got {self.feature_grad_mult}")

    def num_frames(self, num_samples: int) -> int:
        """CNN output frames of ``num_samples`` input samples."""
        for _, kernel, stride in self.conv_layers:
            num_samples = max((num_samples - kernel) // stride + 1, 0)
        return num_samples

    @property
    def groups(self) -> int:
        """Codebooks of the quantizer (the spec's ``groups``, else the library's default)."""
        return self.quantizer.groups if self.quantizer.groups is not None else 1

    @property
    def codebook_size(self) -> int:
        if self.quantizer.codebook_size is None:
            raise ValueError("set model.quantizer.codebook_size (entries per codebook)")
        return self.quantizer.codebook_size

    @property
    def quantizer_dim(self) -> int:
        """Features the quantizer sees: ``groups * codebook_dim``."""
        return self.groups * self.codebook_dim

    @property
    def feature_dim(self) -> int:
        """Channels of the CNN output."""
        return self.conv_layers[-1][0]

    @property
    def receptive_field(self) -> int:
        """Input samples behind one output frame (400 for the base CNN)."""
        field, jump = 1, 1
        for _, kernel, stride in self.conv_layers:
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @property
    def downsampling(self) -> int:
        """Input samples per output frame (320 for the base CNN: 16 kHz -> 50 Hz)."""
        factor = 1
        for _, _, stride in self.conv_layers:
            factor *= stride
        return factor


@dataclass(kw_only=True)
class DataConfig:
    """Manifests, reading and batching."""

    manifest_dir: str = ""
    """Folder with ``<train_subset>.tsv`` and ``<valid_subset>.tsv`` (fairseq format)."""
    train_subset: str = "train"
    valid_subset: str = "valid"
    sample_rate: int = 16000
    crop_samples: int = 250_000
    """Random crop length in samples (B.2); longer utterances are cropped, shorter ones padded in the batch."""
    min_samples: int = 16000
    """Utterances shorter than this (after resampling) are left out."""
    batch_size: int = 32
    """Utterances per batch per process; with ``max_tokens`` also set, the smaller batch wins."""
    max_tokens: int | None = None
    """Padded samples per batch per process (length-aware batching); ``None``: ``batch_size`` alone."""
    normalize: bool = False
    """Zero-mean unit-variance waveforms (wav2vec 2.0 base: off)."""
    on_error: str = "raise"
    """Unreadable or missing audio: ``raise`` (error naming the file) or ``skip`` (warn and leave it out)."""
    num_workers: int = 0
    valid_crop_samples: int | None = None
    """Crop of validation utterances (centre crop); ``None``: ``crop_samples``."""

    def __post_init__(self) -> None:
        _positive("data", self, "sample_rate", "crop_samples", "batch_size", "max_tokens", "valid_crop_samples")
        _require(self.min_samples >= 0, f"data.min_samples must be >= 0, got {self.min_samples}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(
            self.on_error in ON_ERROR, f"data.on_error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}"
        )


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with warmup then cosine annealing (B.2: 5e-4 -> 5e-6, betas (0.9, 0.99), no weight decay)."""

    lr: float = 5e-4
    final_lr: float = 5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 32000


@dataclass(kw_only=True)
class SpeechTrainingConfig(TrainingConfig):
    """The shared loop's settings (:class:`~simplexvq_recipes.training.settings.TrainingConfig`) with the paper's
    speech defaults."""

    output_dir: str = "runs/speech"
    steps: int = 400_000
    grad_clip_norm: float = 10.0
    eval_every: int = 5000
    checkpoint_every: int = 5000


@dataclass(kw_only=True)
class PretrainConfig:
    """Everything a pretraining run needs; saved as ``config.yaml`` in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: SpeechTrainingConfig = field(default_factory=SpeechTrainingConfig)

    def __post_init__(self) -> None:
        for key in ("crop_samples", "valid_crop_samples"):
            samples = getattr(self.data, key)
            if samples is not None:
                _require(
                    self.model.num_frames(samples) >= 2,
                    f"data.{key}={samples} gives fewer than 2 frames of the CNN (it needs "
                    f"{self.model.receptive_field + self.model.downsampling} samples at least)",
                )

    RENAMED_KEYS = {
        **LOOP_RENAMED_KEYS,
        "model.quantizer.name": "model.quantizer.method",
        "model.quantizer.codebook_dim": "model.codebook_dim",
    }


def preset_path(name: str) -> Path:
    """Path of a packaged YAML preset (``base``, ``base_2x320``, ``tiny``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown speech preset {name!r}; known presets: {', '.join(PRESETS)}")
    return Path(str(resources.files("simplexvq_recipes") / "configs" / "speech" / f"{name}.yaml"))
