"""simplexvq: smoothed vector quantization pushed toward the simplex vertices (Morita 2025) and its baselines."""

from simplexvq import functional
from simplexvq.config import GumbelTemperature, QuantizerConfig
from simplexvq.metrics import CodebookUsageMeter
from simplexvq.output import QuantizerOutput
from simplexvq.protocol import Quantizer, check_quantizer
from simplexvq.quantizer import ProductQuantizer
from simplexvq.registry import (
    PAPER_METHODS,
    QuantizerTraits,
    available_quantizers,
    build_quantizer,
    built_in_quantizers,
    paper_methods,
    quantizer_config,
    quantizer_traits,
    register_quantizer,
)
from simplexvq.spec import QuantizerSpec

__version__ = "0.1.0"

__all__ = [
    "PAPER_METHODS",
    "CodebookUsageMeter",
    "GumbelTemperature",
    "ProductQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "QuantizerSpec",
    "QuantizerTraits",
    "available_quantizers",
    "build_quantizer",
    "built_in_quantizers",
    "check_quantizer",
    "functional",
    "paper_methods",
    "quantizer_config",
    "quantizer_traits",
    "register_quantizer",
]
