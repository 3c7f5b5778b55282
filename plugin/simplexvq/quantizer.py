"""ProductQuantizer: G groups x M entries, composed from the pieces chosen by a QuantizerConfig."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from simplexvq.codebook import Codebook, SimVQCodebook
from simplexvq.config import KNN_REGULARIZERS, QuantizerConfig
from simplexvq.hard import ESTIMATORS, hard_losses, nearest_codes
from simplexvq.logits import CodeLogits
from simplexvq.output import QuantizerOutput
from simplexvq.regularizers import REGULARIZERS, knn_regularizer
from simplexvq.scale.backends import StreamedBackend, make_backend, resolve_backend
from simplexvq.scale.distributed import world_of
from simplexvq.scale.streamed import StreamedRequest
from simplexvq.smoothing import SMOOTHINGS
from simplexvq.stats import hard_code_stats, probability_stats
from simplexvq.validation import check_quantizer_input


class ProductQuantizer(nn.Module):
    """Product vector quantizer implementing every method of the paper's Table 1 and SimVQ.

    Input ``z`` of shape (..., dim) is split into ``groups`` chunks; chunk g is quantized with codebook g of
    ``codebook_size`` entries. The quantizer runs in float32 whatever the autocast state (smoothing and
    nearest-neighbour search are unstable in half precision) and returns the output in the input's dtype; only
    the Triton kernels of the streamed layer take half-precision inputs under autocast (they accumulate and keep
    the softmax statistics in float32; ``QuantizerConfig.streamed_precision``).

    Training mode uses the configured smoothing or gradient estimator; eval mode quantizes hard (argmax) for every
    method, or returns the smoothed ``Q pi`` when ``config.inference == "soft"``.

    Scale options (issue 4): ``knn_scope="global"`` searches the KNN regularizer's neighbours across all ranks
    (call forward on every rank, also with an empty or fully padded batch); ``memory_efficient=True`` streams the
    softmax smoothing, the KNN regularizer and the statistics over ``chunk_size`` rows at a time;
    ``vertex_subsample`` regularizes a random subset of vertices per training step.

    Host syncs. A call reads nothing back from the device (no size read from a mask, no flag read from a check, no
    compaction of padded rows) when the streamed layer's backend is sync-free (``backend="triton"``) or under
    ``torch.compile``: padded rows stay in place as masked rows and the input checks run on the device
    (``torch._assert_async``). Otherwise padded rows are left out before the computation and the input checks raise
    their error messages on the host. Under ``torch.compile`` the dense methods keep rows in place only without a
    ``padding_mask`` (with one they compact, a graph break).
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
        # The streamed layer's backend (memory_efficient=True), made on the first call for the input's device; it
        # holds its own state between steps (not in state_dict, not broadcast by DDP).
        self.streamed_backend: StreamedBackend | None = None

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
        if c.knn_scope != "local":
            extra += f", knn_scope={c.knn_scope}"
        if c.memory_efficient:
            extra += ", memory_efficient=True"
        if c.vertex_subsample is not None:
            extra += f", vertex_subsample={c.vertex_subsample}"
        return f"method={c.method}, groups={c.groups}, codebook_size={c.codebook_size}, dim={c.dim}, " + (
            f"distance={c.distance}{extra}"
        )

    @property
    def _global_knn(self) -> bool:
        """True when the KNN regularizer searches across ranks of an initialised, multi-rank process group."""
        return self.config.regularizer in KNN_REGULARIZERS and world_of(self.config.knn_scope) is not None

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, z: Tensor, padding_mask: Tensor | None = None, *, return_probs: bool = False) -> QuantizerOutput:
        """Quantize ``z`` (..., dim). ``padding_mask`` (...) marks padded positions with True (PyTorch's
        ``key_padding_mask`` convention); they take no part in any loss or statistic."""
        config = self.config
        streams = config.is_smoothing and config.memory_efficient
        backend = self._backend_for(z) if streams and isinstance(z, Tensor) else None
        sync_free = torch.compiler.is_compiling() or (backend is not None and backend.sync_free)
        valid = self._valid_positions(z, padding_mask, on_device=sync_free)
        # Rows stay in place (masks as weights) on the sync-free path when every step can weight them.
        in_place = sync_free and (padding_mask is None or streams)
        lead_shape = z.shape[:-1]
        flat = z.reshape(-1, config.groups, config.group_dim)
        # float32 at least (also under autocast), float64 for a .double() quantizer
        compute_dtype = torch.promote_types(self.codebook.weight.dtype, torch.float32)
        layer_dtype = self._streamed_dtype(z, backend, compute_dtype)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = (flat if in_place else flat[valid]).to(compute_dtype)
            row_mask = valid if in_place and padding_mask is not None else None
            if streams:
                quantized, indices, losses, stats, probs = self._smoothed_streamed(
                    x, return_probs, row_mask, layer_dtype
                )
            elif config.is_smoothing:
                quantized, indices, losses, stats, probs = self._smoothed(x, return_probs)
            else:
                quantized, indices, losses, stats = self._hard(x)
                probs = None

        loss = sum(losses.values()) if losses else x.new_zeros(())
        if in_place:
            out, all_indices = quantized.to(z.dtype), indices
        else:
            num_rows = flat.shape[0]
            out = flat.new_zeros(num_rows, config.groups, config.group_dim)
            out[valid] = quantized.to(z.dtype)
            all_indices = torch.full((num_rows, config.groups), -1, dtype=torch.long, device=z.device)
            all_indices[valid] = indices
            if probs is not None:
                all_probs = probs.new_zeros(num_rows, config.groups, config.codebook_size)
                all_probs[valid] = probs
                probs = all_probs
        if probs is not None:
            probs = probs.reshape(*lead_shape, config.groups, config.codebook_size)
        return QuantizerOutput(
            quantized=out.reshape(z.shape),
            indices=all_indices.reshape(*lead_shape, config.groups),
            loss=loss,
            losses=losses,
            stats=stats,
            probs=probs,
        )

    def _streamed_dtype(self, z: Tensor, backend: StreamedBackend | None, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the streamed layer's inputs (``QuantizerConfig.streamed_precision``): the autocast dtype
        when autocast is on for ``z``'s device, the option is ``auto`` and the backend runs the Triton kernels
        (half-precision products, float32 accumulation and statistics); otherwise ``compute_dtype``."""
        if self.config.streamed_precision != "auto" or compute_dtype != torch.float32:
            return compute_dtype
        if backend is None or backend.name != "triton" or getattr(backend, "fell_back", False):
            return compute_dtype
        device_type = z.device.type
        if not torch.is_autocast_enabled(device_type):
            return compute_dtype
        dtype = torch.get_autocast_dtype(device_type)
        if dtype not in (torch.float16, torch.bfloat16) or (dtype == torch.bfloat16 and device_type == "cpu"):
            return compute_dtype  # Triton's interpreter (CPU tensors) cannot read bfloat16
        return dtype

    def _backend_for(self, z: Tensor) -> StreamedBackend:
        """The streamed layer's backend for ``z``'s device, made once (again only if what it resolves to changes:
        the module moved to another device type, or ``torch.compile`` traces the call, where ``cpu`` becomes
        ``reference``)."""
        name = resolve_backend(self.config.backend, z.device)
        if name == "cpu" and torch.compiler.is_compiling():
            name = "reference"  # the CPU tricks read candidate counts back: not traceable
        if self.streamed_backend is None or self.streamed_backend.name != name:
            self.streamed_backend = make_backend(name)
        return self.streamed_backend

    def _valid_positions(self, z: Tensor, padding_mask: Tensor | None, *, on_device: bool = False) -> Tensor:
        """The flat mask of unpadded positions; input errors are raised by :func:`check_quantizer_input`
        (``on_device``: the checks of values run on the device, without reading a flag back).

        A rank of a global KNN with nothing to quantize (empty or fully padded batch) must still join the
        collectives, so for it an empty selection is returned instead of the usual error.
        """
        if on_device:
            return check_quantizer_input(z, self.config.dim, padding_mask, on_device=True, allow_empty=self._global_knn)
        if self._global_knn and isinstance(z, Tensor) and z.dim() >= 2 and z.shape[-1] == self.config.dim:
            positions = z.shape[:-1].numel()
            if padding_mask is None:
                empty = positions == 0
            else:
                same_shape = padding_mask.shape == z.shape[:-1] and padding_mask.dtype == torch.bool
                empty = same_shape and bool(padding_mask.all())
            if empty and z.is_floating_point():
                return torch.zeros(positions, dtype=torch.bool, device=z.device)
        return check_quantizer_input(z, self.config.dim, padding_mask)

    def _knn_vertices(self, device: torch.device) -> Tensor | None:
        """The training step's random vertex subset (G, S), identical on every rank of a global KNN."""
        config = self.config
        if config.vertex_subsample is None or not self.training:
            return None
        scores = torch.rand(config.groups, config.codebook_size, device=device)
        vertices = scores.argsort(dim=-1)[:, : config.vertex_subsample].sort(dim=-1).values
        if self._global_knn:
            dist.broadcast(vertices, src=0)
        return vertices

    def _knn_defined(self, num_rows: int) -> bool:
        """Whether to compute the KNN regularizer on ``num_rows`` local rows. Training always does (K > N is an
        error there: a smaller K would change the loss asked for); an eval-mode batch with fewer than K rows, whose
        loss trains nothing, leaves it out of ``losses`` instead of failing. A global search always runs (every
        rank must join its collectives; it checks the global row count)."""
        return self.training or num_rows >= self.config.knn_k or self._global_knn

    def _knn(self, log_probs: Tensor) -> Tensor:
        config = self.config
        return knn_regularizer(
            log_probs,
            config.knn_k,
            config.regularizer.removeprefix("knn_"),
            scope=config.knn_scope,
            chunk_size=config.chunk_size,
            vertices=self._knn_vertices(log_probs.device),
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
        if config.regularizer in KNN_REGULARIZERS:
            if self._knn_defined(x.shape[0]):
                losses[config.regularizer] = config.regularizer_weight * self._knn(regularized)
        elif config.regularizer != "none":
            regularizer = REGULARIZERS[config.regularizer](regularized, config.knn_k)
            losses[config.regularizer] = config.regularizer_weight * regularizer
        stats = hard_code_stats(indices, config.codebook_size)
        stats.update(probability_stats(pi))
        stats["temperature"] = self.logits.temperature.detach()
        return quantized, indices, losses, stats, (pi if return_probs else None)

    def _smoothed_streamed(
        self, x: Tensor, return_probs: bool, valid: Tensor | None, layer_dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor], None]:
        """``memory_efficient=True``: the softmax path of :meth:`_smoothed`, streamed by the configured backend
        (:mod:`simplexvq.scale.backends`); ``valid`` (N,) the unpadded rows when padded rows are kept in place.
        The backend takes its inputs in ``layer_dtype`` (default: ``x``'s) and its results come back in
        ``x``'s dtype."""
        config = self.config
        if return_probs:
            raise ValueError(
                "return_probs=True would build the (N, G, M) probabilities that memory_efficient=True avoids; "
                "use a quantizer with memory_efficient=False to inspect them"
            )
        codebook = self.codebook().to(x.dtype)
        knn_reg = config.regularizer in KNN_REGULARIZERS and self._knn_defined(x.shape[0])
        soft_output = self.training or config.inference == "soft"
        layer_dtype = layer_dtype or x.dtype
        request = StreamedRequest(
            z=x.to(layer_dtype),
            codebook=codebook.to(layer_dtype),
            temperature=self.logits.temperature.to(layer_dtype),
            distance=config.distance,
            knn_k=config.knn_k if knn_reg else None,
            knn_distance=config.regularizer.removeprefix("knn_") if knn_reg else "ce",
            compute_output=soft_output,
            chunk_size=config.chunk_size,
            scope=config.knn_scope,
            vertices=self._knn_vertices(x.device) if knn_reg else None,
            valid=valid,
        )
        result = self._backend_for(x).quantize(request)
        if soft_output:
            quantized = result.quantized.to(x.dtype)
        else:  # the hard code vectors, as the dense path's onehot @ Q (zero rows at padding)
            codes = codebook[torch.arange(config.groups, device=x.device), result.indices.clamp_min(0)]
            quantized = codes if valid is None else torch.where(valid[:, None, None], codes, codes.new_zeros(()))
        losses: dict[str, Tensor] = {}
        if knn_reg:
            losses[config.regularizer] = config.regularizer_weight * result.knn_loss.to(x.dtype)
        stats = hard_code_stats(result.indices, config.codebook_size)
        stats.update({name: value.to(x.dtype) for name, value in result.stats.items()})
        stats["temperature"] = self.logits.temperature.detach()
        return quantized, result.indices, losses, stats, None

    def _hard(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        config = self.config
        nearest = nearest_codes(x, self.codebook().to(x.dtype), config.distance)
        quantized = ESTIMATORS[config.method](nearest.inputs, nearest.codes)
        losses = hard_losses(
            config.method, nearest.inputs.flatten(1), nearest.codes.flatten(1), config.commitment_weight
        )
        return quantized, nearest.indices, losses, hard_code_stats(nearest.indices, config.codebook_size)

    # ----------------------------------------------------------------------------------------------------------
    def decode(self, indices: Tensor) -> Tensor:
        """Code vectors of ``indices`` (..., G): the (..., dim) output that eval mode's hard inference gives for
        these codes (for hard methods with cosine distance the unit-normalised code vectors, as they quantize on
        the sphere). ``-1`` (a padded position, as in :attr:`QuantizerOutput.indices`) decodes to zeros.

        Checks that every index lies in ``[-1, codebook_size)``, which reads one boolean back from the device.
        """
        config = self.config
        if not isinstance(indices, Tensor):
            raise TypeError(f"decode expects a tensor of code indices, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(
                f"decode expects integer code indices, got dtype {indices.dtype}; pass QuantizerOutput.indices "
                "(torch.long) or cast with .long()"
            )
        if indices.dim() == 0 or indices.shape[-1] != config.groups:
            raise ValueError(
                f"decode expects indices of shape (..., groups) = (..., {config.groups}), got "
                f"{tuple(indices.shape)}; pass QuantizerOutput.indices, which has one code per group"
            )
        out_of_range = (indices < -1) | (indices >= config.codebook_size)
        if bool(out_of_range.any()):
            bad = indices[out_of_range].flatten()[:5].tolist()
            raise ValueError(
                f"decode: code indices must lie in [0, {config.codebook_size}) (codebook_size), or be -1 for "
                f"padding; got {bad}"
            )
        codebook = self.code_vectors()
        if not config.is_smoothing and config.distance == "cosine":
            codebook = F.normalize(codebook, dim=-1)
        flat = indices.reshape(-1, config.groups).to(codebook.device)
        groups = torch.arange(config.groups, device=codebook.device)
        vectors = codebook[groups, flat.clamp_min(0)]
        vectors = torch.where((flat >= 0).unsqueeze(-1), vectors, vectors.new_zeros(()))
        return vectors.reshape(*indices.shape[:-1], config.dim)
