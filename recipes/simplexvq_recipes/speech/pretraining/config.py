"""Typed configuration of the wav2vec 2.0 pretraining recipe (OmegaConf structured dataclasses, no Literal types).

Defaults are the paper's ``base`` setting (Table 4 and appendix B.2, 1 x 1024 codebook); the YAML presets in
``simplexvq_recipes/configs/speech/`` change what differs (``base``, ``base_2x320``, ``tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PRESETS = ("base", "base_2x320", "tiny")


def _base_conv_layers() -> list[list[int]]:
    """Table 4: 512 channels, kernels 10-3-3-3-3-2-2, strides 5-2-2-2-2-2-2 (16 kHz -> 50 Hz)."""
    return [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@dataclass(kw_only=True)
class QuantizerSection:
    """Which registered quantizer quantizes the CNN features, and its size.

    ``name`` is any :func:`simplexvq.available_quantizers` name (``softmax-knn_ce``, ``ste-euclid``,
    ``hard_gumbel-perplexity``, ...). The quantizer works on ``groups * codebook_dim`` features, produced from the
    CNN features by a linear projection. Fields left ``None`` keep the library's defaults.
    """

    name: str = "softmax-knn_ce"
    groups: int = 1
    codebook_size: int = 1024
    codebook_dim: int = 256
    """Dimension of one group's code vectors (Table 4 / section 4.2: 256 for 1 x 1024, 128 for 2 x 320)."""
    knn_k: int | None = None
    """K of eq. 13 per process (local KNN); the library default is 8."""
    regularizer_weight: float | None = None
    commitment_weight: float | None = None
    distance: str | None = None
    init_temperature: float | None = None
    learnable_temperature: bool | None = None
    gumbel_temperature: list[float] | None = None
    """``[start, end, decay]`` of the Gumbel temperature (wav2vec 2.0 uses ``[2.0, 0.5, 0.999995]``)."""
    knn_scope: str | None = None
    """``local`` (per process, the paper) or ``global`` (neighbours searched across ranks)."""
    memory_efficient: bool | None = None
    """Stream the softmax quantizer and its KNN search in chunks, never holding the (N, M) probabilities."""
    chunk_size: int | None = None
    """Rows per chunk of the memory-efficient path (library default when unset)."""
    vertex_subsample: int | None = None
    """Regularize a random subset of this many vertices per step and group (the paper's section 5.3 workaround)."""

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`simplexvq.build_quantizer` (unset fields are left to the library)."""
        kwargs: dict[str, Any] = {
            "dim": self.groups * self.codebook_dim,
            "groups": self.groups,
            "codebook_size": self.codebook_size,
        }
        for name in (
            "knn_k",
            "regularizer_weight",
            "commitment_weight",
            "distance",
            "init_temperature",
            "learnable_temperature",
            "knn_scope",
            "memory_efficient",
            "chunk_size",
            "vertex_subsample",
        ):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.gumbel_temperature is not None:
            if len(self.gumbel_temperature) != 3:
                raise ValueError(
                    f"quantizer.gumbel_temperature must be [start, end, decay], got {self.gumbel_temperature}"
                )
            start, end, decay = self.gumbel_temperature
            kwargs["gumbel_temperature"] = {"start": start, "end": end, "decay": decay}
        return kwargs


@dataclass(kw_only=True)
class ModelConfig:
    """CNN feature encoder + Transformer (torchaudio) and the wav2vec 2.0 pretraining head (appendix B.2)."""

    # convolutional feature encoder (torchaudio ``feature_extractor``)
    conv_layers: list[list[int]] = field(default_factory=_base_conv_layers)
    """``[channels, kernel, stride]`` per layer."""
    extractor_mode: str = "group_norm"
    conv_bias: bool = False
    # Transformer (torchaudio ``encoder``)
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
    quantizer: QuantizerSection = field(default_factory=QuantizerSection)
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

    @property
    def feature_dim(self) -> int:
        """Channels of the CNN output."""
        return self.conv_layers[-1][0]

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


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with warmup then cosine annealing (B.2: 5e-4 -> 5e-6, betas (0.9, 0.99), no weight decay)."""

    lr: float = 5e-4
    final_lr: float = 5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 32000
    clip_grad_norm: float = 10.0
    """Max global gradient norm; 0 disables clipping."""


@dataclass(kw_only=True)
class TrainingConfig:
    """Loop, logging, validation and checkpoints."""

    output_dir: str = "runs/speech"
    seed: int = 0
    max_steps: int = 400_000
    log_every: int = 50
    valid_every: int = 5000
    checkpoint_every: int = 5000
    keep_last: int = 2
    mixed_precision: str = "auto"
    """``auto`` (bf16 on GPUs that support it, else fp16 on GPUs, float32 on CPU), ``no``, ``bf16`` or ``fp16``."""
    progress_bar: bool = True
    tensorboard: bool = True
    resume: bool = True
    """Continue from the newest complete checkpoint in ``output_dir`` if there is one."""
    threads: int | None = None
    """``torch.set_num_threads`` per process (``None``: PyTorch's default)."""
    cpu: bool = False
    """Train on the CPU even where GPUs are available (machines without GPUs always do, with gloo across
    processes)."""


@dataclass(kw_only=True)
class PretrainConfig:
    """Everything a pretraining run needs; saved as ``config.yaml`` in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


def preset_path(name: str) -> Path:
    """Path of a packaged YAML preset (``base``, ``base_2x320``, ``tiny``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown speech preset {name!r}; known presets: {', '.join(PRESETS)}")
    return Path(str(resources.files("simplexvq_recipes") / "configs" / "speech" / f"{name}.yaml"))
