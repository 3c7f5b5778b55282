"""wav2vec 2.0 for pretraining: transformers' ``Wav2Vec2Model`` (CNN + Transformer) and a pretraining head around a
simplexvq quantizer.

The public API (documented in ``docs/speech.md``; downstream feature extraction, probes and export build on it)::

    model = build_model(config)                    # ModelConfig or PretrainConfig -> Wav2Vec2Pretrainer
    out = model(waveforms, lengths)                # PretrainOutput: loss, losses, accuracy, quantizer output
    enc = model.encode(waveforms, lengths, layers=[6, 12])   # EncoderOutput: codes (B, T, G), features by layer
    model.wav2vec2                                 # transformers.Wav2Vec2Model (save_pretrained exports it)
    model.quantizer                                # the simplexvq quantizer
    model, config = load_pretrained(run_dir_or_checkpoint)

Appendix B.2: the CNN encodes 16 kHz waveforms to 50 Hz features; frames are masked (6.5% span starts, spans of
10) and replaced by a learned embedding before the Transformer; the CNN features of the masked frames are
quantized and the Transformer outputs must pick them out among distractors from the same utterance (eq. 15).
As in transformers' ``Wav2Vec2ForPreTraining``, the encoder's ``extract_features`` (the layer-normalised CNN
features) feed the quantizer and the recipe's mask goes in as ``mask_time_indices``. Only the public API of
``Wav2Vec2Model`` is used (its config, forward outputs, ``gradient_checkpointing_enable``), so the recipe runs with
transformers 4.57 and 5.x. Importing this module does not import ``transformers``; building a model does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import simplexvq
from simplexvq_recipes.speech.pretraining import losses as L
from simplexvq_recipes.speech.pretraining.config import ModelConfig, PretrainConfig
from simplexvq_recipes.speech.pretraining.masking import padding_mask, sample_distractors, span_mask
from simplexvq_recipes.training.checkpoint import checkpoint_problem, latest_complete
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.training.quantizers import recipe_spec

if TYPE_CHECKING:
    import transformers

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class PretrainOutput:
    """Result of one pretraining forward pass.

    * ``loss``: the total, ``contrastive + quantizer_loss_weight * quantizer + feature_penalty_weight * penalty``;
    * ``losses``: the unweighted terms by name: ``contrastive``, ``feature_penalty`` and the quantizer's own
      (``knn_ce``, ``commitment``, ...; each already weighted inside the quantizer);
    * ``accuracy``: fraction of masked frames whose target scores above every distractor;
    * ``quantizer``: the :class:`simplexvq.QuantizerOutput` of the masked frames (``indices`` (N, G), ``stats``);
    * ``mask``: (B, T) the masked frames; ``num_masked``: N;
    * ``codes``: (B, T, G) hard codes of every frame of the unmasked input, only with ``return_codes=True``.
    """

    loss: Tensor
    losses: dict[str, Tensor]
    accuracy: Tensor
    quantizer: simplexvq.QuantizerOutput
    mask: Tensor
    num_masked: int
    codes: Tensor | None = None


@dataclass
class EncoderOutput:
    """Result of :meth:`Wav2Vec2Pretrainer.encode` on unmasked input.

    * ``codes``: (B, T, G) hard code per frame and codebook, ``-1`` at padded frames;
    * ``layers``: requested layer -> (B, T, embed_dim) features, transformers' ``hidden_states[layer]`` (0: the
      Transformer's input, the projected CNN features plus the positional convolution; i >= 1: the output of
      Transformer layer i, the last one after the final layer norm in pre-norm models), zero at padded frames;
    * ``cnn_features``: (B, T, C) CNN output before its layer norm; ``padding_mask``: (B, T) True at padded frames;
    * ``lengths``: (B,) unpadded frames per utterance (``None`` when no input lengths were given).
    """

    codes: Tensor
    layers: dict[int, Tensor] = field(default_factory=dict)
    cnn_features: Tensor | None = None
    padding_mask: Tensor | None = None
    lengths: Tensor | None = None


INSTALL_HINT = "pip install 'transformers>=4.57'"
EXTRACTOR_NORMS = {"group_norm": "group", "layer_norm": "layer"}
"""``model.extractor_mode`` -> transformers' ``feat_extract_norm``."""


def import_transformers() -> Any:
    """``transformers``, or an ImportError that says what to install."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"the speech recipe's encoder is transformers' Wav2Vec2Model, and transformers does not import "
            f"({error}): {INSTALL_HINT} (or install simplexvq with the speech extra)"
        ) from error
    return transformers


def wav2vec2_config(config: ModelConfig) -> transformers.Wav2Vec2Config:
    """The ``transformers.Wav2Vec2Config`` of the recipe's encoder. The masking and quantizer fields describe the
    recipe (``mask_time_prob`` also makes transformers create ``masked_spec_embed``, the mask embedding); the
    recipe passes its own mask as ``mask_time_indices``, so transformers' SpecAugment never draws one."""
    return import_transformers().Wav2Vec2Config(
        conv_dim=[int(layer[0]) for layer in config.conv_layers],
        conv_kernel=[int(layer[1]) for layer in config.conv_layers],
        conv_stride=[int(layer[2]) for layer in config.conv_layers],
        conv_bias=config.conv_bias,
        feat_extract_norm=EXTRACTOR_NORMS[config.extractor_mode],
        feat_extract_activation="gelu",
        hidden_size=config.embed_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.ffn_dim,
        hidden_act="gelu",
        hidden_dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout,
        feat_proj_dropout=config.input_dropout,
        layerdrop=config.layer_drop,
        num_conv_pos_embeddings=config.pos_conv_kernel,
        num_conv_pos_embedding_groups=config.pos_conv_groups,
        do_stable_layer_norm=config.layer_norm_first,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        apply_spec_augment=True,
        mask_time_prob=config.mask_prob,
        mask_time_length=config.mask_length,
        mask_time_min_masks=config.min_masks,
        mask_feature_prob=0.0,
        num_codevector_groups=config.groups,
        **({} if config.quantizer.codebook_size is None else {"num_codevectors_per_group": config.codebook_size}),
        codevector_dim=config.quantizer_dim,
        proj_codevector_dim=config.final_dim,
        num_negatives=config.num_negatives,
        contrastive_logits_temperature=config.logit_temperature,
        feat_quantizer_dropout=config.target_dropout,
        architectures=["Wav2Vec2Model"],
    )


def build_wav2vec2(config: ModelConfig) -> transformers.Wav2Vec2Model:
    """The CNN feature encoder + Transformer, ``transformers.Wav2Vec2Model`` (SDPA attention where torch has it),
    initialised by transformers as wav2vec 2.0 is: Kaiming-normal convolutions, N(0, 0.02) Transformer linear
    layers, the positional convolution's and the projection's own rules, a uniform mask embedding."""
    return import_transformers().Wav2Vec2Model(wav2vec2_config(config))


class Wav2Vec2Pretrainer(nn.Module):
    """wav2vec 2.0 with a simplexvq quantizer; ``wav2vec2`` alone is the exportable feature extractor."""

    def __init__(self, config: ModelConfig, num_processes: int = 1) -> None:
        super().__init__()
        self.config = config
        self.wav2vec2 = build_wav2vec2(config)
        quantizer_dim = config.quantizer_dim
        spec = recipe_spec(config.quantizer, num_processes)
        self.quantizer = spec.build(dim=quantizer_dim)
        self.quantizer_input = nn.Linear(config.feature_dim, quantizer_dim)
        """Projects the (layer-normalised) CNN features to the quantizer's ``groups * codebook_dim``."""
        self.project_q = nn.Linear(quantizer_dim, config.final_dim)
        self.final_proj = nn.Linear(config.embed_dim, config.final_dim)
        self.target_dropout = nn.Dropout(config.target_dropout)
        self._cnn_output: dict[str, Tensor] = {}
        self.wav2vec2.feature_extractor.register_forward_hook(self._on_cnn_output)
        self.register_load_state_dict_pre_hook(_refuse_torchaudio_layout)

    def _on_cnn_output(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        """The CNN's output (B, C, T): its gradient scaled by ``feature_grad_mult`` (everything reaching the CNN
        passes here), kept for the feature penalty of the pass that produced it."""
        output = L.scale_gradient(output, self.config.feature_grad_mult)
        self._cnn_output["features"] = output
        return output

    # ------------------------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.config.groups

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def mask_embedding(self) -> nn.Parameter:
        """The learned embedding of masked frames (transformers' ``masked_spec_embed``)."""
        return self.wav2vec2.masked_spec_embed

    def set_num_updates(self, num_updates: int) -> None:
        """Forward the optimizer step to the quantizer (Gumbel temperature schedules of the built-in quantizers)."""
        if isinstance(self.quantizer, simplexvq.ProductQuantizer):
            self.quantizer.set_num_updates(num_updates)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each Transformer layer's activations in the backward pass instead of keeping them (less
        memory, the same gradients: dropout is replayed with the saved RNG state), through transformers'
        ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before transformers 5). The parameters
        and the ``state_dict`` are unchanged."""
        encoder = self.wav2vec2
        enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
        # positional: the keyword is gradient_checkpointing_kwargs in 4.x, activation_checkpointing_kwargs in 5.x
        enable({"use_reentrant": False})

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Unpadded CNN frames of waveforms of ``lengths`` samples."""
        for _, kernel, stride in self.config.conv_layers:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            lengths = lengths.clamp_min(0)
        return lengths

    def num_frames(self, num_samples: int) -> int:
        """CNN frames of a waveform of ``num_samples`` samples."""
        return self.config.num_frames(num_samples)

    # ------------------------------------------------------------------------------------------------------------
    def _run_encoder(
        self, waveforms: Tensor, lengths: Tensor | None, mask: Tensor | None, *, hidden_states: bool = False
    ) -> tuple[Any, Tensor, Tensor | None, Tensor]:
        """transformers' forward with the recipe's ``mask`` (None: no frame masked): its output, the CNN features
        (B, T, C) before their layer norm, the frame lengths and the (B, T) padding mask."""
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must have shape (batch, samples), got {tuple(waveforms.shape)}")
        batch, num_samples = waveforms.shape
        num_frames = self.num_frames(num_samples)
        device = waveforms.device
        attention_mask = frame_lengths = None
        if lengths is not None:
            lengths = lengths.to(device)
            attention_mask = (torch.arange(num_samples, device=device)[None] < lengths[:, None]).long()
            frame_lengths = self.frame_lengths(lengths)
        padding = padding_mask(frame_lengths, batch, num_frames, device)
        if mask is None:  # an explicit empty mask: transformers would draw its own in training mode otherwise
            mask = torch.zeros(batch, num_frames, dtype=torch.bool, device=device)
        output = self.wav2vec2(
            waveforms,
            attention_mask=attention_mask,
            mask_time_indices=mask,
            output_hidden_states=hidden_states,
            return_dict=True,
        )
        features = self._cnn_output.pop("features").transpose(1, 2)
        return output, features, frame_lengths, padding

    def forward(
        self,
        waveforms: Tensor,
        lengths: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        return_codes: bool = False,
    ) -> PretrainOutput:
        """Pretraining loss of a batch of waveforms (B, samples) with valid ``lengths`` (B,) in samples.

        ``generator`` (a CPU generator) draws the masks and distractors; by default the global RNG does.
        ``return_codes``: also return the hard codes of every frame of the unmasked input (as :meth:`encode`),
        reusing this pass's CNN features (validation).
        """
        config = self.config
        batch, num_samples = waveforms.shape if waveforms.dim() == 2 else (0, 0)
        num_frames = self.num_frames(num_samples)
        if lengths is None:
            frame_lengths = torch.full((batch,), num_frames, dtype=torch.long)
        else:
            frame_lengths = self.frame_lengths(lengths.cpu())
        mask = span_mask(
            frame_lengths,
            num_frames,
            mask_prob=config.mask_prob,
            mask_length=config.mask_length,
            min_masks=config.min_masks,
            generator=generator,
        ).to(waveforms.device)
        output, features, _, padding = self._run_encoder(waveforms, lengths, mask)
        penalty = L.feature_penalty(features, padding)
        normed = output.extract_features
        unmasked = self.target_dropout(normed)
        x = output.last_hidden_state

        quantized = self.quantizer(self.quantizer_input(unmasked[mask]))
        targets = self.project_q(quantized.quantized)
        predictions = self.final_proj(x[mask])
        distractors, valid = sample_distractors(mask.sum(dim=1), config.num_negatives, generator=generator)
        logits = L.contrastive_logits(
            predictions, targets, distractors.to(targets.device), config.logit_temperature, valid.to(targets.device)
        )
        contrastive, accuracy = L.contrastive_loss(logits)

        loss = contrastive + config.quantizer_loss_weight * quantized.loss + config.feature_penalty_weight * penalty
        terms = {"contrastive": contrastive, "feature_penalty": penalty, **quantized.losses}
        return PretrainOutput(
            loss=loss,
            losses=terms,
            accuracy=accuracy,
            quantizer=quantized,
            mask=mask,
            num_masked=int(mask.sum()),
            codes=self._codes(normed, padding) if return_codes else None,
        )

    def _codes(self, normed: Tensor, padding: Tensor) -> Tensor:
        """Hard codes (B, T, G) of layer-normalised CNN features, -1 at padding (quantizer in eval mode)."""
        with _eval_mode(self.quantizer), torch.no_grad():
            return self.quantizer(self.quantizer_input(normed), padding).indices

    def encode(self, waveforms: Tensor, lengths: Tensor | None = None, *, layers: Sequence[int] = ()) -> EncoderOutput:
        """Per-frame codes and contextual features of unmasked input.

        The quantizer runs in eval mode and without gradients here (hard argmax or nearest codes, whatever the
        module's mode); the rest runs in the module's current mode, so call ``model.eval()`` (and
        ``torch.no_grad()``) for features.
        ``layers``: transformers' ``hidden_states`` indices, 0 the Transformer's input, 1..num_layers its layers.
        """
        num_layers = self.config.num_layers
        for layer in layers:
            if not 0 <= layer <= num_layers:
                raise ValueError(f"layer {layer} does not exist: choose layers in 0..{num_layers}")
        output, features, frame_lengths, padding = self._run_encoder(
            waveforms, lengths, None, hidden_states=bool(layers)
        )
        codes = self._codes(output.extract_features, padding)
        hidden = output.hidden_states
        return EncoderOutput(
            codes=codes,
            layers={layer: hidden[layer].masked_fill(padding[..., None], 0.0) for layer in layers},
            cnn_features=features,
            padding_mask=padding,
            lengths=frame_lengths,
        )


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints of the torchaudio-based encoder (simplexvq_recipes before the transformers encoder)
# --------------------------------------------------------------------------------------------------------------

_TORCHAUDIO_PREFIXES = (
    ("wav2vec2.encoder.feature_projection.", "wav2vec2.feature_projection."),
    ("wav2vec2.encoder.transformer.", "wav2vec2.encoder."),
)
_TORCHAUDIO_WEIGHT_NORM = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def is_torchaudio_layout(state: Mapping[str, Any]) -> bool:
    """Whether a pretrainer ``state_dict`` was written with torchaudio's encoder (``mask_embedding`` at the top,
    the Transformer under ``wav2vec2.encoder.transformer``)."""
    return "mask_embedding" in state or any(name.startswith("wav2vec2.encoder.transformer.") for name in state)


def convert_torchaudio_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A pretrainer ``state_dict`` of the torchaudio-based encoder under this model's names (the same tensors).

    torchaudio's and transformers' wav2vec 2.0 share their module names below the two containers that differ
    (``encoder.feature_projection`` -> ``feature_projection``, ``encoder.transformer`` -> ``encoder``); the mask
    embedding moves into the encoder (``masked_spec_embed``); an old ``weight_g``/``weight_v`` weight norm becomes
    the parametrization torch builds today."""
    converted: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "mask_embedding":
            name = "wav2vec2.masked_spec_embed"
        for old, new in _TORCHAUDIO_PREFIXES:
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        head, _, leaf = name.rpartition(".")
        if "pos_conv_embed.conv" in head and leaf in _TORCHAUDIO_WEIGHT_NORM:
            name = f"{head}.{_TORCHAUDIO_WEIGHT_NORM[leaf]}"
        converted[name] = tensor
    return converted


def _refuse_torchaudio_layout(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Loading a torchaudio-layout checkpoint into the model directly (e.g. resuming an old run): one clear error
    instead of a list of missing keys. :func:`load_pretrained` converts such weights; optimizer moments cannot be
    carried over because the parameters are ordered differently."""
    own = {name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)}
    if is_torchaudio_layout(own):
        raise ValueError(
            "these weights were written by the torchaudio-based encoder of an older simplexvq_recipes; "
            "load_pretrained, extract_features and the exports read them (converted on load); to train on from "
            "them, start a new run from load_pretrained's model (resuming the old run's optimizer state is not "
            "supported)"
        )


def build_model(config: ModelConfig | PretrainConfig, num_processes: int = 1) -> Wav2Vec2Pretrainer:
    """A freshly initialised :class:`Wav2Vec2Pretrainer` from a model or full recipe config; ``num_processes``
    decides the quantizer's default neighbour scope (:func:`~simplexvq_recipes.training.quantizers.recipe_spec`)."""
    if isinstance(config, PretrainConfig):
        config = config.model
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig or PretrainConfig, got {type(config).__name__}")
    return Wav2Vec2Pretrainer(config, num_processes)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) of a run folder (its newest intact checkpoint, the one a resumed run would
    continue from) or of one ``step_*`` checkpoint folder."""
    path = Path(path)
    if path.name.startswith("step_") and (path / "trainer_state.json").exists():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise FileNotFoundError(f"{path} is not an intact checkpoint: {problem}")
        return path.parent.parent, path
    checkpoint = latest_complete(path / CHECKPOINTS)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{path} is neither a run folder with an intact checkpoints/step_* nor a checkpoint folder written by the "
            "speech recipe (with trainer_state.json)"
        )
    return path, checkpoint


def checkpoint_config_file(run_dir: Path, checkpoint: Path) -> Path:
    """The config ``checkpoint`` was trained with: its own ``config.yaml``, so that a checkpoint copied out of its
    run (or set aside under ``checkpoints/abandoned-*``) still describes itself; for checkpoints that carry none
    (older runs), the run folder's ``config.yaml``."""
    for candidate in (checkpoint / CONFIG_FILE, run_dir / CONFIG_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"neither {checkpoint / CONFIG_FILE} nor {run_dir / CONFIG_FILE} exists: the checkpoint's config is needed "
        "to rebuild its model; put the run's config.yaml back"
    )


def load_pretrained(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Wav2Vec2Pretrainer, PretrainConfig]:
    """Rebuild the model of a recipe run and load its weights; returns ``(model, config)`` with the model in eval.

    ``path``: a run folder (its newest checkpoint is loaded) or one ``checkpoints/step_XXXXXXXX`` folder. The
    config is the one the checkpoint carries (:func:`checkpoint_config_file`). Weights of the torchaudio-based encoder
    (older runs) are converted on load (:func:`convert_torchaudio_state_dict`).
    """
    run_dir, checkpoint = resolve_checkpoint(path)
    config_file = checkpoint_config_file(run_dir, checkpoint)
    config = load_config(PretrainConfig, config_file)
    model = build_model(config)
    weights = checkpoint / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: not a checkpoint written by the speech recipe")
    state = load_file(str(weights), device=str(map_location))
    if is_torchaudio_layout(state):
        state = convert_torchaudio_state_dict(state)
    model.load_state_dict(state)
    return model.to(map_location).eval(), config
