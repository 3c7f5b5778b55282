"""fairseq2's ``Wav2Vec2VectorQuantizer`` interface, implemented by delegating to a simplexvq quantizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from fairseq2.models.wav2vec2 import Wav2Vec2VectorQuantizer, Wav2Vec2VectorQuantizerOutput
from fairseq2.nn import Linear
from torch import Tensor

import simplexvq
from simplexvq.fairseq2_extension.aux_loss import GradScale, inject_aux_loss
from simplexvq.protocol import Quantizer, check_quantizer


@dataclass
class SimplexVQQuantizerOutput(Wav2Vec2VectorQuantizerOutput):
    """fairseq2's quantizer output (same fields, same meaning) plus what simplexvq adds.

    * ``cb``: (N x S_msk, G x M) onehot of the code chosen per group (argmax of pi, or the nearest code).
    * ``code_perplexity`` / ``prob_perplexity``: perplexity of the mean onehot code / of the mean assignment
      probability pi, summed over groups as fairseq2 does; detached, so fairseq2's diversity term has no gradient
      (for hard methods, which have no pi, ``prob_perplexity`` is ``code_perplexity``).
    * ``temperature``: the Gumbel temperature for the Gumbel methods (the field's fairseq2 meaning), the learnable
      logit temperature averaged over groups for softmax, 0.0 for the hard methods (zero-temperature argmax).
    * ``aux_loss``: the quantizer's weighted auxiliary loss (eq. 9's ``L_reg``), a per-batch mean. Detached when
      it was injected into the gradient (adding it to a loss again cannot double count); with ``inject_aux_loss``
      off it keeps its graph, to be added as ``aux_loss * num_targets``.
    * ``aux_losses`` (detached, by name), ``indices`` (N, S_msk, G), ``stats`` (per group, detached).
    """

    aux_loss: Tensor = field(default_factory=lambda: torch.zeros(()))
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    indices: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)


class SimplexVQWav2Vec2Quantizer(Wav2Vec2VectorQuantizer):
    """A simplexvq quantizer behind fairseq2's wav2vec 2.0 quantizer interface.

    ``input_proj`` maps the ``input_dim`` CNN features to ``output_dim = G x codebook_dim`` (the codebook space,
    like fairseq's ``vq_dim``); the simplexvq quantizer ``core`` quantizes that, and its output (``output_dim``)
    goes to the model's ``final_target_proj``.

    **Auxiliary loss.** In training the quantizer's loss is injected into the gradient (``aux_loss.py``) with
    weight ``N x S_msk``, the batch's number of contrastive targets: fairseq2 sums the contrastive loss over
    targets and the trainer divides the gradients by the total number of targets, so the optimiser sees the
    gradient of ``mean contrastive loss + L_reg`` (eq. 9, averaged over micro-batches and ranks by their target
    counts, like fairseq2's diversity term). The model's diversity term gets no gradient: ``prob_perplexity`` is
    detached, whatever ``diversity_weight`` the trainer passes.

    **Padding.** fairseq2 passes only masked positions, (N, S_msk, input_dim); its mask spans lie inside each
    row's length and every row has the same number of them, so no padding can reach the quantizer.

    **Steps.** ``num_updates`` (persistent, as in fairseq2's Gumbel quantizer) counts training forward passes and
    is handed to the core's ``set_num_updates`` before each pass; it drives the Gumbel temperature
    ``codebook_sampling_temperature`` of the Gumbel methods.

    **Contract.** ``core`` is any registered quantizer (:class:`simplexvq.Quantizer`: checked when it is built);
    :meth:`decode` maps (..., G) code indices to the (..., output_dim) code vectors.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_codebooks: int,
        num_codebook_entries: int,
        codebook_sampling_temperature: tuple[float, float, float],
        *,
        method: str,
        quantizer_kwargs: dict[str, Any],
        inject_aux_loss: bool = True,
    ) -> None:
        super().__init__(input_dim, output_dim, num_codebooks, num_codebook_entries, codebook_sampling_temperature)
        self.method = method
        self.quantizer_kwargs = dict(quantizer_kwargs)
        self.inject_aux_loss = inject_aux_loss
        self.input_proj = Linear(input_dim, output_dim, bias=True)
        self.core = self._build_core()
        self.num_updates: Tensor
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._grad_scale: GradScale | None = None
        self._samples_gumbel = simplexvq.quantizer_traits(method).gumbel

    def _build_core(self) -> Quantizer:
        """``build_quantizer(method, **quantizer_kwargs)``: ``quantizer_kwargs`` holds the shapes (``dim`` =
        ``output_dim``, ``codebook_size``, ``groups``) and the options (``SimplexVQWav2Vec2Config.quantizer_kwargs``).
        """
        core = simplexvq.build_quantizer(self.method, **self.quantizer_kwargs)
        return check_quantizer(core, name=f"quantizer {self.method!r}")

    def reset_parameters(self) -> None:
        """Re-initialise the simplexvq quantizer and the step counter (``input_proj`` resets itself).

        fairseq2 calls ``reset_parameters()`` module by module after materialising a model built on the meta
        device; the simplexvq modules initialise in their constructors, so a fresh one is built and copied in.
        """
        reference = next(self.core.parameters(), None)
        if reference is None or reference.device.type == "meta":
            return
        with torch.device(reference.device):
            fresh = self._build_core()
        self.core.load_state_dict(fresh.state_dict())
        self.num_updates.zero_()

    def pop_grad_scale(self) -> GradScale | None:
        """The :class:`GradScale` of the last training forward pass, for the model to probe (once)."""
        scale, self._grad_scale = self._grad_scale, None
        return scale

    def forward(self, x: Tensor) -> SimplexVQQuantizerOutput:
        """``x``: (N, S_msk, input_dim) features of the masked positions."""
        batch_size, seq_len = x.shape[:2]
        self.core.set_num_updates(int(self.num_updates))
        out = self.core(self.input_proj(x))
        if self.training:
            self.num_updates.add_(1)

        quantized = out.quantized
        aux_loss = out.loss
        self._grad_scale = None
        if self.inject_aux_loss and self.training and torch.is_grad_enabled() and aux_loss.requires_grad:
            self._grad_scale = GradScale()
            quantized = inject_aux_loss(quantized, aux_loss, batch_size * seq_len, self._grad_scale)
            aux_loss = aux_loss.detach()

        indices = out.indices.reshape(batch_size * seq_len, self.num_codebooks)
        cb = F.one_hot(indices, self.num_codebook_entries).to(quantized.dtype).flatten(1)
        code_perplexity = out.stats["code_perplexity"].sum()
        prob_perplexity = out.stats.get("prob_perplexity", out.stats["code_perplexity"]).sum()
        return SimplexVQQuantizerOutput(
            quantized_vectors=quantized,
            cb=cb,
            code_perplexity=code_perplexity,
            prob_perplexity=prob_perplexity.detach(),
            temperature=self._temperature(out.stats),
            aux_loss=aux_loss,
            aux_losses={name: loss.detach() for name, loss in out.losses.items()},
            indices=out.indices,
            stats=out.stats,
        )

    def decode(self, indices: Tensor) -> Tensor:
        """Code vectors of ``indices`` (..., G), e.g. ``SimplexVQQuantizerOutput.indices``: (..., output_dim), the
        quantized vectors eval mode gives for those codes (``-1`` -> zeros); see :meth:`simplexvq.Quantizer.decode`."""
        return self.core.decode(indices)

    def _temperature(self, stats: dict[str, Tensor]) -> float:
        if self._samples_gumbel and isinstance(self.core, simplexvq.ProductQuantizer):
            return float(self.core.gumbel_temperature)
        if "temperature" in stats:
            return float(stats["temperature"].float().mean())
        return 0.0

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, output_dim={self.output_dim}, num_codebooks={self.num_codebooks}, "
            f"num_codebook_entries={self.num_codebook_entries}, method={self.method}, "
            f"inject_aux_loss={self.inject_aux_loss}"
        )
