"""simplexvq: smoothed vector quantization pushed toward the simplex vertices (Morita 2025) and its baselines."""

from simplexvq import functional
from simplexvq.config import GumbelTemperature, QuantizerConfig
from simplexvq.metrics import CodebookUsageMeter
from simplexvq.output import QuantizerOutput
from simplexvq.quantizer import ProductQuantizer
from simplexvq.registry import (
    available_quantizers,
    build_quantizer,
    built_in_quantizers,
    quantizer_config,
    register_quantizer,
)
from simplexvq.spec import QuantizerSpec

__version__ = "0.1.0"

__all__ = [
    "CodebookUsageMeter",
    "GumbelTemperature",
    "ProductQuantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "QuantizerSpec",
    "available_quantizers",
    "build_quantizer",
    "built_in_quantizers",
    "functional",
    "quantizer_config",
    "register_quantizer",
]
