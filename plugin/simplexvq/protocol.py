"""The typed contract of a registered quantizer: what adapters may call and what forward returns.

Every factory registered with :func:`simplexvq.register_quantizer` builds an ``nn.Module`` satisfying
:class:`Quantizer`; adapters (the recipes, the fairseq2 family) call these methods directly instead of probing with
``hasattr``. :func:`check_quantizer` checks a module against the contract once, where it is built, with a message
naming what is missing. fairseq2's abstract ``Wav2Vec2VectorQuantizer`` plays the same role for its quantizers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from simplexvq.output import QuantizerOutput


@runtime_checkable
class Quantizer(Protocol):
    """What a registered quantizer is (an ``nn.Module``) and returns.

    * ``forward(z, padding_mask=None)``: ``z`` (..., dim), ``padding_mask`` (...) True at padded positions ->
      :class:`~simplexvq.QuantizerOutput` (quantized vectors, (..., G) indices, the weighted auxiliary
      ``loss`` / ``losses`` to add to the task loss, per-group ``stats``).
    * ``code_vectors()``: the (G, M, d) code vectors.
    * ``decode(indices)``: (..., G) indices -> (..., dim) vectors, what eval mode outputs for those codes;
      ``-1`` (padding) -> zeros.
    * ``set_num_updates(step)``: the optimizer step, for schedules (the Gumbel temperature); a quantizer without
      one accepts and ignores it.
    """

    def __call__(self, z: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput: ...

    def forward(self, z: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput: ...

    def code_vectors(self) -> Tensor: ...

    def decode(self, indices: Tensor) -> Tensor: ...

    def set_num_updates(self, num_updates: int) -> None: ...


REQUIRED_METHODS: tuple[str, ...] = ("forward", "code_vectors", "decode", "set_num_updates")


def check_quantizer(module: object, *, name: str = "quantizer") -> Quantizer:
    """Return ``module`` if it satisfies :class:`Quantizer`; otherwise raise ``TypeError`` naming the missing
    methods (a third-party factory's module, checked where it is built rather than deep inside a training step)."""
    missing = [method for method in REQUIRED_METHODS if not callable(getattr(module, method, None))]
    if missing:
        raise TypeError(
            f"{name} {type(module).__name__} does not satisfy simplexvq.Quantizer: missing {', '.join(missing)}. "
            "A registered quantizer is an nn.Module with forward(z, padding_mask=None) -> QuantizerOutput, "
            "code_vectors(), decode(indices) and set_num_updates(step) (see simplexvq.protocol)"
        )
    return module  # type: ignore[return-value]
