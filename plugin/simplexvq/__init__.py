"""simplexvq: smoothed vector quantization pushed toward the simplex vertices (Morita 2025) and its baselines."""

from simplexvq import functional
from simplexvq.config import GumbelTemperature, QuantizerConfig
from simplexvq.metrics import CodebookUsageMeter
from simplexvq.output import QuantizerOutput
from simplexvq.quantizer import ProductQuantizer
from simplexvq.registry import available_quantizers, build_quantizer, quantizer_config, register_quantizer

__version__ = "0.1.0"

__all__ = [
    "CodebookUsageMeter",
    "GumbelTemperature",
    "ProductQuantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "available_quantizers",
    "build_quantizer",
    "functional",
    "quantizer_config",
    "register_quantizer",
]
