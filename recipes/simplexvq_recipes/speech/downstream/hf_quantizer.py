"""The simplexvq quantizer written beside a Hugging Face export (which cannot hold it): a ``QuantizerConfig`` as
plain JSON and the weights as safetensors, nothing a load could execute."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

import simplexvq

QUANTIZER_WEIGHTS = "simplexvq_quantizer.safetensors"
QUANTIZER_CONFIG = "simplexvq_quantizer.json"
QUANTIZER_FORMAT = "simplexvq.hf_export.quantizer"

# --------------------------------------------------------------------------------------------------------------
# The quantizer beside the encoder
# --------------------------------------------------------------------------------------------------------------


def save_quantizer(out_dir: Path, projection: nn.Module, quantizer: nn.Module) -> bool:
    """Write ``projection`` (layer-normalised CNN features -> quantizer input) and a built-in quantizer (its
    ``QuantizerConfig`` as JSON, its weights as safetensors). Returns False for a third-party quantizer."""
    if not isinstance(quantizer, simplexvq.ProductQuantizer):
        return False
    weight, bias = projection.weight, projection.bias  # torch's or fairseq2's Linear
    tensors = {"projection.weight": weight} | ({} if bias is None else {"projection.bias": bias})
    tensors.update({f"quantizer.{name}": t for name, t in quantizer.state_dict().items()})
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(out_dir / QUANTIZER_WEIGHTS))
    description = {
        "format": QUANTIZER_FORMAT,
        "quantizer_config": dataclasses.asdict(quantizer.config),
        "projection": {"in_features": weight.shape[1], "out_features": weight.shape[0], "bias": bias is not None},
        "usage": "codes = quantizer(projection(Wav2Vec2Model(...).extract_features)).indices",
    }
    (out_dir / QUANTIZER_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
    return True


def load_quantizer(folder: str | Path) -> tuple[nn.Linear, simplexvq.ProductQuantizer]:
    """``(projection, quantizer)`` written beside a Hugging Face export (both in eval mode): the quantizer's input
    is ``projection(output.extract_features)`` of ``transformers.Wav2Vec2Model``."""
    folder = Path(folder)
    config_file = folder / QUANTIZER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing: this export holds the encoder only (a third-party quantizer, or not an "
            "export of simplexvq_recipes.speech.downstream.hf_export)"
        )
    description = json.loads(config_file.read_text())
    if description.get("format") != QUANTIZER_FORMAT:
        raise ValueError(
            f"{config_file} is not a simplexvq quantizer description (format {description.get('format')!r})"
        )
    quantizer = simplexvq.ProductQuantizer(simplexvq.QuantizerConfig(**description["quantizer_config"]))
    projection = nn.Linear(**description["projection"])
    tensors = load_file(str(folder / QUANTIZER_WEIGHTS))
    projection.load_state_dict(
        {k.removeprefix("projection."): v for k, v in tensors.items() if k.startswith("projection.")}
    )
    quantizer.load_state_dict(
        {k.removeprefix("quantizer."): v for k, v in tensors.items() if k.startswith("quantizer.")}
    )
    return projection.eval(), quantizer.eval()
