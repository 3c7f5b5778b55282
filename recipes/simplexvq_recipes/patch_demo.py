"""Quick-start demo: discrete autoencoding of real photo patches, KNN-CE against collapse-prone baselines.

Each method trains the same small patch autoencoder (MLP encoder -> product quantizer -> MLP decoder) with the
L2 reconstruction loss plus the quantizer's auxiliary loss, then reports codebook usage and reconstruction
error on patches of photos never seen in training.

    python -m simplexvq_recipes.patch_demo                      # every row of the paper's Table 1 + SimVQ
    python -m simplexvq_recipes.patch_demo --methods softmax-knn_ce ste-euclid --steps 1000
    python -m simplexvq_recipes.patch_demo --methods softmax-knn_ce --quantizer-option memory_efficient=true groups=2

The quantizer is a :class:`simplexvq.QuantizerSpec` (``DemoConfig.quantizer``): ``--methods`` picks its
``method`` row by row, and ``--quantizer-option NAME=VALUE`` sets any option of the core (values are read as
YAML: ``true``, ``null``, ``0.5``), checked with the core's messages before any training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any

import torch
import yaml
from torch import Tensor, nn

import simplexvq
from simplexvq_recipes.natural_patches import PatchSplits, load_patch_splits

# The rows of the paper's Table 1, in its order, plus SimVQ (a baseline the paper does not have).
TABLE1_METHODS: tuple[str, ...] = simplexvq.paper_methods("table1", include_simvq=True)


def demo_quantizer() -> simplexvq.QuantizerSpec:
    """The demo's quantizer settings: one codebook of 64 codes, K = 4 neighbours (used by the KNN regularizers,
    ignored by the other methods), everything else the library's defaults."""
    return simplexvq.QuantizerSpec(method="softmax-knn_ce", codebook_size=64, groups=1, knn_k=4)


@dataclass(kw_only=True)
class DemoConfig:
    """Hyperparameters of one demo run (one quantizer).

    ``quantizer`` holds the method and every quantizer option; ``method`` is a shorthand that replaces
    ``quantizer.method`` (``DemoConfig(method="ste-euclid", steps=300)``).
    """

    quantizer: simplexvq.QuantizerSpec = field(default_factory=demo_quantizer)
    latent_dim: int = 8
    hidden: int = 128
    steps: int = 400
    batch_size: int = 1024
    lr: float = 2e-3
    seed: int = 0
    method: InitVar[str | None] = None

    def __post_init__(self, method: str | None) -> None:
        if method is not None:
            self.quantizer = self.quantizer.replace(method=method)
        for name in ("codebook_size", "groups"):
            if getattr(self.quantizer, name) is None:
                raise ValueError(
                    f"the patch demo counts code usage per codebook, so quantizer.{name} must be set (it is null); "
                    f"the default is {getattr(demo_quantizer(), name)}"
                )


@dataclass(kw_only=True)
class DemoResult:
    """What one run measured; ``quantizer`` is the spec it ran with (``QuantizerSpec.to_dict``)."""

    method: str
    train_usage: float
    usage: float
    per_sample_usage: float
    perplexity: float
    rmse: float
    seconds: float
    quantizer: dict[str, Any] = field(default_factory=dict)


class PatchAutoencoder(nn.Module):
    """MLP encoder -> any registered simplexvq quantizer -> MLP decoder, on flattened RGB patches."""

    def __init__(self, patch_dim: int, config: DemoConfig) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(patch_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.latent_dim)
        )
        self.quantizer = config.quantizer.build(dim=config.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, patch_dim)
        )

    def forward(self, patches: Tensor) -> tuple[Tensor, simplexvq.QuantizerOutput]:
        quantized = self.quantizer(self.encoder(patches))
        return self.decoder(quantized.quantized), quantized


def train_and_evaluate(config: DemoConfig, data: PatchSplits) -> DemoResult:
    """Train one method on ``data.train`` and measure it on ``data.val`` (hard codes, eval mode)."""
    torch.manual_seed(config.seed)
    model = PatchAutoencoder(data.train.shape[1], config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    for _ in range(config.steps):
        batch = data.train[torch.randint(len(data.train), (config.batch_size,), generator=generator)]
        reconstruction, quantized = model(batch)
        loss = (reconstruction - batch).pow(2).sum(dim=-1).mean() + quantized.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start

    model.eval()
    train_usage, _ = evaluate(model, data.train[:: max(1, len(data.train) // 32768)], config)
    usage, rmse = evaluate(model, data.val, config)
    return DemoResult(
        method=config.quantizer.method,
        train_usage=train_usage["usage"].mean().item(),
        usage=usage["usage"].mean().item(),
        per_sample_usage=usage["per_sample_usage"].mean().item(),
        perplexity=usage["perplexity"].mean().item(),
        rmse=rmse,
        seconds=seconds,
        quantizer=config.quantizer.to_dict(),
    )


@torch.no_grad()
def evaluate(model: PatchAutoencoder, patches: Tensor, config: DemoConfig) -> tuple[dict[str, Tensor], float]:
    """Code-usage statistics (hard codes) and reconstruction rMSE over ``patches``.

    A "sample" for per-sample usage is a block of 64 consecutive patches (8 x 8 patches of one photo region).
    """
    groups = config.quantizer.groups
    meter = simplexvq.CodebookUsageMeter(groups, config.quantizer.codebook_size)
    squared_error = 0.0
    for chunk in patches.split(4096):
        reconstruction, quantized = model(chunk)
        whole_blocks = len(chunk) // 64 * 64
        meter.update(quantized.indices[:whole_blocks].reshape(-1, 64, groups))
        squared_error += (reconstruction - chunk).pow(2).sum().item()
    return meter.compute(), (squared_error / patches.numel()) ** 0.5


def format_table(results: list[DemoResult], codebook_size: int) -> str:
    """The Markdown table of the results. Training times are left out (they are printed per method and kept in the
    JSON): they depend on the machine and its load, while every column here is reproducible."""
    lines = [
        f"| method | train code use (of {codebook_size}) | val code use | val per-block use | val code perplexity "
        "| val rMSE |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {100 * r.train_usage:.1f}% | {100 * r.usage:.1f}% | {100 * r.per_sample_usage:.1f}% "
            f"| {r.perplexity:.1f} | {r.rmse:.4f} |"
        )
    return "\n".join(lines)


def parse_option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with the value read as YAML (``true``, ``null``, ``0.5``, ``[1, 2]``)."""
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. memory_efficient=true), got {text!r}")
    return name.strip(), yaml.safe_load(value)


def demo_configs(methods: Sequence[str], base: DemoConfig, options: Sequence[tuple[str, Any]] = ()) -> list[DemoConfig]:
    """One config per method: ``base`` with its quantizer's method replaced and ``options`` applied, each checked
    with the core's validation (unknown option names get a suggestion) before anything trains."""
    values = {**base.quantizer.to_dict(), **dict(options)}
    configs = []
    for method in methods:
        spec = simplexvq.QuantizerSpec.from_dict({**values, "method": method})
        try:
            spec.validate(dim=base.latent_dim)
        except ValueError as error:
            raise ValueError(f"quantizer {method!r}: {error}") from error
        configs.append(dataclasses.replace(base, quantizer=spec))
    return configs


def main(argv: list[str] | None = None) -> list[DemoResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults, quantizer_defaults = DemoConfig(), demo_quantizer()
    parser.add_argument("--methods", nargs="+", default=list(TABLE1_METHODS), help="registered quantizer names")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--codebook-size", type=int, default=quantizer_defaults.codebook_size)
    parser.add_argument("--knn-k", type=int, default=quantizer_defaults.knn_k)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--quantizer-option",
        nargs="+",
        type=parse_option,
        default=[],
        metavar="NAME=VALUE",
        help="any QuantizerSpec option, value as YAML (e.g. memory_efficient=true chunk_size=512 groups=2)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    base = DemoConfig(
        quantizer=quantizer_defaults.replace(codebook_size=args.codebook_size, knn_k=args.knn_k),
        steps=args.steps,
        seed=args.seed,
    )
    try:
        configs = demo_configs(args.methods, base, args.quantizer_option)
    except (KeyError, ValueError, TypeError) as error:
        parser.error(str(error).strip("'\""))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_patch_splits()
    print(f"data: {len(data.train)} training / {len(data.val)} validation 4x4 RGB patches from disjoint photos")
    options = {k: v for k, v in configs[0].quantizer.to_dict().items() if k != "method"}
    print("quantizer options: " + " ".join(f"{name}={value}" for name, value in options.items()))
    results = []
    for config in configs:
        result = train_and_evaluate(config, data)
        print(
            f"  {result.method:>22}: code use {100 * result.train_usage:5.1f}% train, {100 * result.usage:5.1f}% "
            f"val, rMSE {result.rmse:.4f} ({result.seconds:.1f} s)"
        )
        results.append(result)
    codebook_size = configs[0].quantizer.codebook_size
    print()
    print(format_table(results, codebook_size))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=2)
    return results


if __name__ == "__main__":
    main()
