"""Quick-start demo: discrete autoencoding of real photo patches, KNN-CE against collapse-prone baselines.

Each method trains the same small patch autoencoder (MLP encoder -> product quantizer -> MLP decoder) with the
L2 reconstruction loss plus the quantizer's auxiliary loss, then reports codebook usage and reconstruction
error on patches of photos never seen in training.

    python -m simplexvq_recipes.patch_demo                      # every row of the paper's Table 1 + SimVQ
    python -m simplexvq_recipes.patch_demo --methods softmax-knn_ce ste-euclid --steps 1000
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

import simplexvq
from simplexvq_recipes.natural_patches import PatchSplits, load_patch_splits

# The rows of the paper's Table 1, in its order, plus SimVQ.
TABLE1_METHODS: tuple[str, ...] = (
    "ste-euclid",
    "ste-cosine",
    "rotation-euclid",
    "rotation-cosine",
    *(
        f"{smoothing}-{regularizer}"
        for smoothing in ("hard_gumbel", "soft_gumbel", "softmax")
        for regularizer in ("perplexity", "knn_l2", "knn_ce")
    ),
    "simvq",
)


@dataclass(kw_only=True)
class DemoConfig:
    """Hyperparameters of one demo run (one method)."""

    method: str = "softmax-knn_ce"
    codebook_size: int = 64
    groups: int = 1
    latent_dim: int = 8
    hidden: int = 128
    knn_k: int = 4
    steps: int = 400
    batch_size: int = 1024
    lr: float = 2e-3
    seed: int = 0
    quantizer_overrides: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class DemoResult:
    method: str
    train_usage: float
    usage: float
    per_sample_usage: float
    perplexity: float
    rmse: float
    seconds: float


class PatchAutoencoder(nn.Module):
    """MLP encoder -> any registered simplexvq quantizer -> MLP decoder, on flattened RGB patches."""

    def __init__(self, patch_dim: int, config: DemoConfig) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(patch_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.latent_dim)
        )
        kwargs = dict(dim=config.latent_dim, codebook_size=config.codebook_size, groups=config.groups)
        if "knn" in config.method:
            kwargs["knn_k"] = config.knn_k
        kwargs.update(config.quantizer_overrides)
        self.quantizer = simplexvq.build_quantizer(config.method, **kwargs)
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
        method=config.method,
        train_usage=train_usage["usage"].mean().item(),
        usage=usage["usage"].mean().item(),
        per_sample_usage=usage["per_sample_usage"].mean().item(),
        perplexity=usage["perplexity"].mean().item(),
        rmse=rmse,
        seconds=seconds,
    )


@torch.no_grad()
def evaluate(model: PatchAutoencoder, patches: Tensor, config: DemoConfig) -> tuple[dict[str, Tensor], float]:
    """Code-usage statistics (hard codes) and reconstruction rMSE over ``patches``.

    A "sample" for per-sample usage is a block of 64 consecutive patches (8 x 8 patches of one photo region).
    """
    meter = simplexvq.CodebookUsageMeter(config.groups, config.codebook_size)
    squared_error = 0.0
    for chunk in patches.split(4096):
        reconstruction, quantized = model(chunk)
        whole_blocks = len(chunk) // 64 * 64
        meter.update(quantized.indices[:whole_blocks].reshape(-1, 64, config.groups))
        squared_error += (reconstruction - chunk).pow(2).sum().item()
    return meter.compute(), (squared_error / patches.numel()) ** 0.5


def format_table(results: list[DemoResult], codebook_size: int) -> str:
    lines = [
        f"| method | train code use (of {codebook_size}) | val code use | val per-block use | val code perplexity "
        "| val rMSE | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {100 * r.train_usage:.1f}% | {100 * r.usage:.1f}% | {100 * r.per_sample_usage:.1f}% "
            f"| {r.perplexity:.1f} | {r.rmse:.4f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[DemoResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(TABLE1_METHODS), help="registered quantizer names")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--codebook-size", type=int, default=DemoConfig.codebook_size)
    parser.add_argument("--knn-k", type=int, default=DemoConfig.knn_k)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_patch_splits()
    print(f"data: {len(data.train)} training / {len(data.val)} validation 4x4 RGB patches from disjoint photos")
    results = []
    for method in args.methods:
        config = DemoConfig(
            method=method, steps=args.steps, codebook_size=args.codebook_size, knn_k=args.knn_k, seed=args.seed
        )
        result = train_and_evaluate(config, data)
        print(
            f"  {method:>22}: code use {100 * result.train_usage:5.1f}% train, {100 * result.usage:5.1f}% val, "
            f"rMSE {result.rmse:.4f} ({result.seconds:.1f} s)"
        )
        results.append(result)
    print()
    print(format_table(results, args.codebook_size))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=2)
    return results


if __name__ == "__main__":
    main()
