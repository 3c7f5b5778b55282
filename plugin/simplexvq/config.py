"""Typed configuration of a product quantizer; every invalid combination is rejected here, in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from simplexvq.scale.backends.names import BACKEND_NAMES, BackendName

Method = Literal["softmax", "soft_gumbel", "hard_gumbel", "ste", "rotation", "simvq"]
Regularizer = Literal["knn_ce", "knn_l2", "perplexity", "none"]
Distance = Literal["cosine", "euclid"]
Inference = Literal["hard", "soft"]

KnnScope = Literal["local", "global"]
Backend = BackendName
StreamedPrecision = Literal["auto", "fp32"]

SMOOTHING_METHODS: tuple[str, ...] = ("softmax", "soft_gumbel", "hard_gumbel")
HARD_METHODS: tuple[str, ...] = ("ste", "rotation", "simvq")
METHODS: tuple[str, ...] = SMOOTHING_METHODS + HARD_METHODS
REGULARIZERS: tuple[str, ...] = ("knn_ce", "knn_l2", "perplexity", "none")
DISTANCES: tuple[str, ...] = ("cosine", "euclid")
KNN_REGULARIZERS: tuple[str, ...] = ("knn_ce", "knn_l2")
KNN_SCOPES: tuple[str, ...] = ("local", "global")
BACKENDS: tuple[str, ...] = BACKEND_NAMES
STREAMED_PRECISIONS: tuple[str, ...] = ("auto", "fp32")


@dataclass(kw_only=True)
class GumbelTemperature:
    """Gumbel-softmax temperature ``max(start * decay**step, end)`` (fairseq's schedule); constant by default."""

    start: float = 1.0
    end: float = 1.0
    decay: float = 1.0

    def at(self, step: int) -> float:
        return max(self.start * self.decay**step, self.end)


@dataclass(kw_only=True)
class QuantizerConfig:
    """Everything that defines a :class:`~simplexvq.ProductQuantizer`.

    The input's last dimension ``dim`` is split into ``groups`` chunks of ``dim // groups``; each chunk is
    quantized by its own codebook of ``codebook_size`` entries (product quantization) and the outputs are
    concatenated back to ``dim``.
    """

    dim: int
    codebook_size: int
    groups: int = 1
    method: Method = "softmax"
    """``softmax`` / ``soft_gumbel`` / ``hard_gumbel`` smooth the onehot code (section 2.2); ``ste`` /
    ``rotation`` / ``simvq`` quantize hard and estimate gradients (section 2.1, SimVQ)."""
    regularizer: Regularizer = "knn_ce"
    """Auxiliary loss of the smoothing methods (eq. 11-13); must be ``none`` for hard methods, which use eq. 10."""
    distance: Distance | None = None
    """Logits (smoothing) or nearest-neighbour metric (hard). Default: cosine (A.1), Euclidean for SimVQ."""
    knn_k: int = 8
    """K of eq. 13: neighbours per simplex vertex (the paper uses 2 per GPU x 4 GPUs = 8)."""
    regularizer_weight: float = 1.0
    regularize_samples: bool = False
    """Apply the regularizer to the Gumbel samples p instead of the assignment probabilities pi (section 3)."""
    commitment_weight: float | None = None
    """beta of eq. 10; default 1.0 (appendix A.2), 0.25 for SimVQ (its paper's default)."""
    init_temperature: float | None = None
    """Initial learnable logit temperature (A.1); default 0.1 for cosine logits, 1.0 for Euclidean ones."""
    learnable_temperature: bool = True
    min_temperature: float = 1e-3
    """Lower clamp on the learnable temperature, so logits stay finite in float32."""
    gumbel_temperature: GumbelTemperature = dataclasses.field(default_factory=GumbelTemperature)
    inference: Inference = "hard"
    """``hard``: eval mode returns the argmax code vector for every method (section 3); ``soft``: eval mode
    returns the smoothed output ``Q pi`` (smoothing methods only)."""
    codebook_init_std: float | None = None
    """Std of the normal initialisation of code vectors; default ``(dim // groups) ** -0.5``."""
    knn_scope: KnnScope = "local"
    """``local``: the K nearest rows of each vertex are searched in this process's batch (the paper, section 5.3);
    ``global``: among the batches of all data-parallel ranks (exact; value = single-process loss on the
    concatenated batch, gradient scaled for DDP's averaging; see :mod:`simplexvq.scale.knn_loss`). KNN
    regularizers only."""
    memory_efficient: bool = False
    """Stream the softmax smoothing, the KNN regularizer and the statistics over chunks of rows, never building the
    (N, G, M) matrices (:mod:`simplexvq.scale.streamed`); same values and gradients. ``method='softmax'`` with a KNN
    regularizer or ``none``; ``forward(return_probs=True)`` is then unavailable."""
    chunk_size: int | None = None
    """Rows per chunk of the streamed computations (memory-efficient path, streamed KNN top-K); default: about
    4M elements per (chunk, G, M) buffer. In the dense path it streams the KNN top-K of ``knn_loss``."""
    vertex_subsample: int | None = None
    """In training, regularize a random subset of S vertices per group and step (section 5.3's workaround): an
    unbiased estimate of eq. 13 (normalised by S K) whose top-K state and KNN gradient scale with S instead of M.
    Eval mode uses every vertex. Under ``knn_scope='global'`` rank 0's draw is broadcast."""

    backend: Backend = "auto"
    """Implementation of the memory-efficient streamed layer (:mod:`simplexvq.scale.backends`), chosen once per
    quantizer: ``reference`` (portable PyTorch, the yardstick), ``cpu`` (CPU speed tricks), ``triton`` (fused,
    sync-free GPU kernels; falls back to ``reference`` with one warning when they cannot run), ``auto`` (``cpu`` on
    CPU tensors, ``triton`` on GPU tensors when the ``triton`` package imports, else ``reference``). Every backend
    gives the same values and gradients and accepts every option; under ``torch.compile`` the ``cpu`` backend is
    replaced by ``reference``. Only used with ``memory_efficient=True``."""
    streamed_precision: StreamedPrecision = "auto"
    """Input precision of the ``triton`` backend's kernels (``memory_efficient=True``), by PyTorch's conventions.
    ``auto``: under float16 / bfloat16 autocast the kernels take their inputs in the autocast dtype (tensor-core
    products, float32 accumulation, float32 softmax statistics; outputs and gradients come back in float32);
    otherwise float32, whose products are IEEE or TF32 as ``torch.get_float32_matmul_precision()`` says.
    ``fp32``: float32 inputs also under autocast. The other backends, a float64 quantizer and bfloat16 on CPU
    tensors (Triton's interpreter cannot read bfloat16) always run in float32 / float64."""

    def __post_init__(self) -> None:
        if isinstance(self.gumbel_temperature, dict):
            self.gumbel_temperature = GumbelTemperature(**self.gumbel_temperature)
        derived = set()
        if self.distance is None:
            self.distance = "euclid" if self.method == "simvq" else "cosine"
            derived.add("distance")
        if self.commitment_weight is None:
            self.commitment_weight = 0.25 if self.method == "simvq" else 1.0
            derived.add("commitment_weight")
        if self.init_temperature is None:
            self.init_temperature = 0.1 if self.distance == "cosine" else 1.0
            derived.add("init_temperature")
        self._derived = frozenset(derived)  # a plain attribute, not a field: asdict() and equality ignore it
        self.validate()

    def replace(self, **changes: Any) -> QuantizerConfig:
        """A copy with ``changes`` applied. Fields this config left to their defaults (``distance``,
        ``commitment_weight``, ``init_temperature``: derived from ``method`` and ``distance``) are derived again
        for the new values, so ``config.replace(method="simvq")`` gets SimVQ's defaults, not the old method's."""
        derived = getattr(self, "_derived", frozenset())  # configs unpickled from before this attribute existed
        unset = {name: None for name in derived if name not in changes}
        return dataclasses.replace(self, **unset, **changes)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and how to fix it."""
        _positive_int("dim", self.dim)
        _positive_int("codebook_size", self.codebook_size)
        _positive_int("groups", self.groups)
        _positive_int("knn_k", self.knn_k)
        if self.dim % self.groups:
            raise ValueError(
                f"QuantizerConfig: dim={self.dim} is not divisible by groups={self.groups}; each group quantizes "
                "dim // groups features, so choose dim a multiple of groups"
            )
        _one_of("method", self.method, METHODS)
        _one_of("regularizer", self.regularizer, REGULARIZERS)
        _one_of("distance", self.distance, DISTANCES)
        _one_of("inference", self.inference, ("hard", "soft"))
        if self.method in HARD_METHODS and self.regularizer != "none":
            raise ValueError(
                f"QuantizerConfig: method={self.method!r} quantizes hard and is trained with the commitment and "
                f"codebook losses of eq. 10, not with regularizer={self.regularizer!r}; set regularizer='none' "
                "or pick a smoothing method (softmax, soft_gumbel, hard_gumbel)"
            )
        if self.method in HARD_METHODS and self.inference == "soft":
            raise ValueError(
                f"QuantizerConfig: inference='soft' needs a smoothing method, but method={self.method!r} is hard"
            )
        if self.regularize_samples and self.method not in ("soft_gumbel", "hard_gumbel"):
            raise ValueError("QuantizerConfig: regularize_samples=True only applies to Gumbel methods")
        for name in ("regularizer_weight", "commitment_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"QuantizerConfig: {name} must be >= 0, got {value}")
        for name in ("init_temperature", "min_temperature"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"QuantizerConfig: {name} must be > 0, got {value}")
        if self.init_temperature < self.min_temperature:
            raise ValueError(
                f"QuantizerConfig: init_temperature={self.init_temperature} is below "
                f"min_temperature={self.min_temperature}"
            )
        self._validate_scale()
        schedule = self.gumbel_temperature
        if not (schedule.start > 0 and schedule.end > 0 and 0 < schedule.decay <= 1):
            raise ValueError(
                f"QuantizerConfig: gumbel_temperature needs start > 0, end > 0 and 0 < decay <= 1, got {schedule}"
            )

    def _validate_scale(self) -> None:
        """The options of issue 4: global KNN, memory-efficient streaming, chunking, vertex subsampling."""
        _one_of("knn_scope", self.knn_scope, KNN_SCOPES)
        _one_of("backend", self.backend, BACKENDS)
        if self.streamed_precision not in STREAMED_PRECISIONS:
            raise ValueError(
                f"QuantizerConfig: streamed_precision={self.streamed_precision!r} is not one of "
                f"{', '.join(STREAMED_PRECISIONS)}: 'auto' follows autocast (half-precision kernels under float16 / "
                "bfloat16 autocast), 'fp32' keeps the streamed layer in float32"
            )
        knn = self.regularizer in KNN_REGULARIZERS
        if self.knn_scope == "global" and not knn:
            raise ValueError(
                f"QuantizerConfig: knn_scope='global' searches the KNN regularizer's neighbours across ranks, but "
                f"regularizer={self.regularizer!r}; use regularizer='knn_ce' or 'knn_l2', or knn_scope='local'"
            )
        if not isinstance(self.memory_efficient, bool):
            raise ValueError(f"QuantizerConfig: memory_efficient must be True or False, got {self.memory_efficient!r}")
        if self.memory_efficient and self.method != "softmax":
            raise ValueError(
                f"QuantizerConfig: memory_efficient=True streams softmax smoothing as attention and needs "
                f"method='softmax', got method={self.method!r}: Gumbel methods draw noise over the whole (N, M) "
                "matrix and hard methods never build it; use memory_efficient=False"
            )
        if self.memory_efficient and self.regularizer not in (*KNN_REGULARIZERS, "none"):
            raise ValueError(
                f"QuantizerConfig: memory_efficient=True supports regularizer='knn_ce', 'knn_l2' or 'none', got "
                f"{self.regularizer!r}; use memory_efficient=False for the perplexity loss"
            )
        if self.chunk_size is not None:
            _positive_int("chunk_size", self.chunk_size)
            if not (self.memory_efficient or knn):
                raise ValueError(
                    "QuantizerConfig: chunk_size streams the KNN regularizer or the memory-efficient path, but "
                    f"regularizer={self.regularizer!r} and memory_efficient=False; leave chunk_size=None"
                )
        if self.vertex_subsample is not None:
            _positive_int("vertex_subsample", self.vertex_subsample)
            if not knn:
                raise ValueError(
                    f"QuantizerConfig: vertex_subsample subsamples the KNN regularizer's vertices, but "
                    f"regularizer={self.regularizer!r}; use regularizer='knn_ce' or 'knn_l2'"
                )
            if self.vertex_subsample > self.codebook_size:
                raise ValueError(
                    f"QuantizerConfig: vertex_subsample={self.vertex_subsample} exceeds codebook_size="
                    f"{self.codebook_size}; pick S <= M (S = M, or None, uses every vertex)"
                )

    @property
    def group_dim(self) -> int:
        """Dimension of one group's code vectors."""
        return self.dim // self.groups

    @property
    def is_smoothing(self) -> bool:
        return self.method in SMOOTHING_METHODS


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"QuantizerConfig: {name} must be a positive integer, got {value!r}")


def _one_of(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"QuantizerConfig: {name}={value!r} is not one of {', '.join(choices)}")
