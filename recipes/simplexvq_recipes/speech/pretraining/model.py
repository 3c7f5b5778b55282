"""wav2vec 2.0 for pretraining: torchaudio's CNN and Transformer, and a pretraining head around a simplexvq quantizer.

The public API (documented in ``docs/speech.md``; downstream feature extraction, probes and export build on it)::

    model = build_model(config)                    # ModelConfig or PretrainConfig -> Wav2Vec2Pretrainer
    out = model(waveforms, lengths)                # PretrainOutput: loss, losses, accuracy, quantizer output
    enc = model.encode(waveforms, lengths, layers=[6, 12])   # EncoderOutput: codes (B, T, G), features by layer
    model.wav2vec2                                 # torchaudio.models.Wav2Vec2Model (feature_extractor + encoder)
    model.quantizer                                # the simplexvq quantizer
    model, config = load_pretrained(run_dir_or_checkpoint)

Appendix B.2: the CNN encodes 16 kHz waveforms to 50 Hz features; frames are masked (6.5% span starts, spans of
10) and replaced by a learned embedding before the Transformer; the CNN features of the masked frames are
quantized and the Transformer outputs must pick them out among distractors from the same utterance (eq. 15).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchaudio
from safetensors.torch import load_file
from torch import Tensor, nn

import simplexvq
from simplexvq_recipes.speech.pretraining import losses as L
from simplexvq_recipes.speech.pretraining.config import ModelConfig, PretrainConfig
from simplexvq_recipes.speech.pretraining.masking import padding_mask, sample_distractors, span_mask
from simplexvq_recipes.training.checkpoint import checkpoint_problem, latest_complete
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.training.quantizers import recipe_spec

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
    * ``layers``: requested layer -> (B, T, embed_dim) features (0: the Transformer's input, i.e. the projected CNN
      features; i >= 1: the output of Transformer layer i);
    * ``cnn_features``: (B, T, C) CNN output; ``padding_mask``: (B, T) True at padded frames;
    * ``lengths``: (B,) unpadded frames per utterance (``None`` when no input lengths were given).
    """

    codes: Tensor
    layers: dict[int, Tensor] = field(default_factory=dict)
    cnn_features: Tensor | None = None
    padding_mask: Tensor | None = None
    lengths: Tensor | None = None


def build_wav2vec2(config: ModelConfig) -> torchaudio.models.Wav2Vec2Model:
    """The CNN feature encoder + Transformer from torchaudio (no auxiliary head), initialised for pretraining as
    wav2vec 2.0 is: Kaiming-normal convolutions (so activations keep their scale through the CNN) and BERT's
    N(0, 0.02) Transformer linear layers (torchaudio's factory keeps PyTorch's defaults, made for loading weights)."""
    model = torchaudio.models.wav2vec2_model(
        extractor_mode=config.extractor_mode,
        extractor_conv_layer_config=[tuple(layer) for layer in config.conv_layers],
        extractor_conv_bias=config.conv_bias,
        encoder_embed_dim=config.embed_dim,
        encoder_projection_dropout=config.input_dropout,
        encoder_pos_conv_kernel=config.pos_conv_kernel,
        encoder_pos_conv_groups=config.pos_conv_groups,
        encoder_num_layers=config.num_layers,
        encoder_num_heads=config.num_heads,
        encoder_attention_dropout=config.attention_dropout,
        encoder_ff_interm_features=config.ffn_dim,
        encoder_ff_interm_dropout=config.activation_dropout,
        encoder_dropout=config.dropout,
        encoder_layer_norm_first=config.layer_norm_first,
        encoder_layer_drop=config.layer_drop,
        aux_num_out=None,
    )
    for block in model.feature_extractor.conv_layers:
        nn.init.kaiming_normal_(block.conv.weight)
    model.encoder.transformer.layers.apply(_bert_init)
    return model


def _bert_init(module: nn.Module) -> None:
    """Linear layers of the Transformer: N(0, 0.02) weights, zero biases (BERT's and wav2vec 2.0's init)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


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
        self.mask_embedding = nn.Parameter(torch.empty(config.embed_dim).uniform_())
        self.target_dropout = nn.Dropout(config.target_dropout)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.config.groups

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def set_num_updates(self, num_updates: int) -> None:
        """Forward the optimizer step to the quantizer (Gumbel temperature schedules of the built-in quantizers)."""
        if isinstance(self.quantizer, simplexvq.ProductQuantizer):
            self.quantizer.set_num_updates(num_updates)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each Transformer layer's activations in the backward pass instead of keeping them (less
        memory, the same gradients: dropout is replayed with the saved RNG state). The parameters and the
        ``state_dict`` are unchanged."""
        for layer in self.wav2vec2.encoder.transformer.layers:
            layer.forward = _checkpointed(layer.forward)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Unpadded CNN frames of waveforms of ``lengths`` samples."""
        for _, kernel, stride in self.config.conv_layers:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            lengths = lengths.clamp_min(0)
        return lengths

    # ------------------------------------------------------------------------------------------------------------
    def _features(self, waveforms: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """CNN features (B, T, C), their lengths and the (B, T) padding mask."""
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must have shape (batch, samples), got {tuple(waveforms.shape)}")
        features, frame_lengths = self.wav2vec2.feature_extractor(waveforms, lengths)
        padding = padding_mask(frame_lengths, features.shape[0], features.shape[1], features.device)
        return features, frame_lengths, padding

    def _contextualize(self, x: Tensor, padding: Tensor, num_layers: int | None = None) -> list[Tensor] | Tensor:
        """Run the Transformer on projected features ``x``; all layer outputs when ``num_layers`` is given."""
        x = x.masked_fill(padding[..., None], 0.0)
        attention_mask = None
        if padding.any():
            batch, length = padding.shape
            attention_mask = (-10000.0 * padding[:, None, None, :].to(x.dtype)).expand(batch, 1, length, length)
        transformer = self.wav2vec2.encoder.transformer
        if num_layers is None:
            return transformer(x, attention_mask=attention_mask)
        return transformer.get_intermediate_outputs(x, attention_mask=attention_mask, num_layers=num_layers)

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
        features, frame_lengths, padding = self._features(waveforms, lengths)
        batch, num_frames, _ = features.shape
        features = L.scale_gradient(features, config.feature_grad_mult)
        penalty = L.feature_penalty(features, padding)

        projection = self.wav2vec2.encoder.feature_projection
        normed = projection.layer_norm(features)
        unmasked = self.target_dropout(normed)
        x = projection.dropout(projection.projection(normed))

        if frame_lengths is None:
            frame_lengths = torch.full((batch,), num_frames, dtype=torch.long, device=features.device)
        mask = span_mask(
            frame_lengths,
            num_frames,
            mask_prob=config.mask_prob,
            mask_length=config.mask_length,
            min_masks=config.min_masks,
            generator=generator,
        ).to(features.device)
        x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        x = self._contextualize(x, padding)

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
        ``layers``: 0 is the Transformer's input, 1..num_layers the outputs of its layers.
        """
        num_layers = self.config.num_layers
        for layer in layers:
            if not 0 <= layer <= num_layers:
                raise ValueError(f"layer {layer} does not exist: choose layers in 0..{num_layers}")
        features, frame_lengths, padding = self._features(waveforms, lengths)
        codes = self._codes(self.wav2vec2.encoder.feature_projection.layer_norm(features), padding)
        outputs: dict[int, Tensor] = {}
        if layers:
            x = self.wav2vec2.encoder.feature_projection(features)
            if 0 in layers:
                outputs[0] = x.masked_fill(padding[..., None], 0.0)
            deepest = max(layers)
            if deepest > 0:
                hidden = self._contextualize(x, padding, num_layers=deepest)
                outputs.update({layer: hidden[layer - 1] for layer in layers if layer > 0})
        return EncoderOutput(
            codes=codes,
            layers={layer: outputs[layer] for layer in layers},
            cnn_features=features,
            padding_mask=padding,
            lengths=frame_lengths,
        )


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


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


def load_pretrained(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Wav2Vec2Pretrainer, PretrainConfig]:
    """Rebuild the model of a recipe run and load its weights; returns ``(model, config)`` with the model in eval.

    ``path``: a run folder (its newest checkpoint is loaded) or one ``checkpoints/step_XXXXXXXX`` folder. The
    config is the ``config.yaml`` the recipe wrote in the run folder.
    """
    run_dir, checkpoint = resolve_checkpoint(path)
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: load_pretrained needs the run's saved config")
    config = load_config(PretrainConfig, config_file)
    model = build_model(config)
    weights = checkpoint / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: not a checkpoint written by the speech recipe")
    device = str(map_location)
    model.load_state_dict(load_file(str(weights), device=device))
    return model.to(map_location).eval(), config
