"""ProductQuantizer: G groups x M entries, composed from the pieces chosen by a QuantizerConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simplexvq.codebook import Codebook, SimVQCodebook
from simplexvq.config import QuantizerConfig
from simplexvq.hard import ESTIMATORS, hard_losses, nearest_codes
from simplexvq.logits import CodeLogits
from simplexvq.output import QuantizerOutput
from simplexvq.regularizers import REGULARIZERS
from simplexvq.smoothing import SMOOTHINGS
from simplexvq.stats import hard_code_stats, probability_stats
from simplexvq.validation import check_quantizer_input


class ProductQuantizer(nn.Module):
    """Product vector quantizer implementing every method of the paper's Table 1 and SimVQ.

    Input ``z`` of shape (..., dim) is split into ``groups`` chunks; chunk g is quantized with codebook g of
    ``codebook_size`` entries. The quantizer runs in float32 whatever the autocast state (smoothing and
    nearest-neighbour search are unstable in half precision) and returns the output in the input's dtype.

    Training mode uses the configured smoothing or gradient estimator; eval mode quantizes hard (argmax) for every
    method, or returns the smoothed ``Q pi`` when ``config.inference == "soft"``.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        init_std = config.codebook_init_std or config.group_dim**-0.5
        codebook_cls = SimVQCodebook if config.method == "simvq" else Codebook
        self.codebook = codebook_cls(config.groups, config.codebook_size, config.group_dim, init_std)
        self.logits = (
            CodeLogits(
                config.groups,
                config.distance,
                config.init_temperature,
                learnable=config.learnable_temperature,
                min_temperature=config.min_temperature,
            )
            if config.is_smoothing
            else None
        )
        self.num_updates = 0

    # ----------------------------------------------------------------------------------------------------------
    def set_num_updates(self, num_updates: int) -> None:
        """Tell the quantizer the optimizer step, for the Gumbel temperature schedule (fairseq's hook name)."""
        self.num_updates = num_updates

    @property
    def gumbel_temperature(self) -> float:
        return self.config.gumbel_temperature.at(self.num_updates)

    def code_vectors(self) -> Tensor:
        """The (G, M, d) code vectors (for SimVQ, the projected ones)."""
        return self.codebook()

    def extra_repr(self) -> str:
        c = self.config
        extra = f", regularizer={c.regularizer}, k={c.knn_k}" if c.is_smoothing else f", beta={c.commitment_weight}"
        return f"method={c.method}, groups={c.groups}, codebook_size={c.codebook_size}, dim={c.dim}, " + (
            f"distance={c.distance}{extra}"
        )

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, z: Tensor, padding_mask: Tensor | None = None, *, return_probs: bool = False) -> QuantizerOutput:
        """Quantize ``z`` (..., dim). ``padding_mask`` (...) marks padded positions with True (PyTorch's
        ``key_padding_mask`` convention); they take no part in any loss or statistic."""
        config = self.config
        valid = check_quantizer_input(z, config.dim, padding_mask)
        lead_shape = z.shape[:-1]
        flat = z.reshape(-1, config.groups, config.group_dim)
        # float32 at least (also under autocast), float64 for a .double() quantizer
        compute_dtype = torch.promote_types(self.codebook.weight.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = flat[valid].to(compute_dtype)
            if config.is_smoothing:
                quantized, indices, losses, stats, probs = self._smoothed(x, return_probs)
            else:
                quantized, indices, losses, stats = self._hard(x)
                probs = None

        num_rows = flat.shape[0]
        out = flat.new_zeros(num_rows, config.groups, config.group_dim)
        out[valid] = quantized.to(z.dtype)
        all_indices = torch.full((num_rows, config.groups), -1, dtype=torch.long, device=z.device)
        all_indices[valid] = indices
        if probs is not None:
            all_probs = probs.new_zeros(num_rows, config.groups, config.codebook_size)
            all_probs[valid] = probs
            probs = all_probs.reshape(*lead_shape, config.groups, config.codebook_size)
        loss = sum(losses.values()) if losses else x.new_zeros(())
        return QuantizerOutput(
            quantized=out.reshape(z.shape),
            indices=all_indices.reshape(*lead_shape, config.groups),
            loss=loss,
            losses=losses,
            stats=stats,
            probs=probs,
        )

    def _smoothed(
        self, x: Tensor, return_probs: bool
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor], Tensor | None]:
        config = self.config
        codebook = self.codebook().to(x.dtype)
        log_pi = torch.log_softmax(self.logits(x, codebook), dim=-1)
        pi = log_pi.exp()
        indices = pi.argmax(dim=-1)
        regularized = log_pi
        if self.training:
            smoothed = SMOOTHINGS[config.method](log_pi, self.gumbel_temperature)
            weights = smoothed.weights
            if config.regularize_samples:
                regularized = smoothed.sample_log_probs
        elif config.inference == "hard":
            weights = F.one_hot(indices, config.codebook_size).to(pi.dtype)
        else:
            weights = pi
        quantized = torch.einsum("ngm,gmd->ngd", weights, codebook)

        losses: dict[str, Tensor] = {}
        if config.regularizer != "none":
            regularizer = REGULARIZERS[config.regularizer](regularized, config.knn_k)
            losses[config.regularizer] = config.regularizer_weight * regularizer
        stats = hard_code_stats(indices, config.codebook_size)
        stats.update(probability_stats(pi))
        stats["temperature"] = self.logits.temperature.detach()
        return quantized, indices, losses, stats, (pi if return_probs else None)

    def _hard(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        config = self.config
        nearest = nearest_codes(x, self.codebook().to(x.dtype), config.distance)
        quantized = ESTIMATORS[config.method](nearest.inputs, nearest.codes)
        losses = hard_losses(
            config.method, nearest.inputs.flatten(1), nearest.codes.flatten(1), config.commitment_weight
        )
        return quantized, nearest.indices, losses, hard_code_stats(nearest.indices, config.codebook_size)
