"""Validation on a held-out split: code usage of unmasked utterances and the contrastive task, over all ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from torch import Tensor

import simplexvq
from simplexvq_recipes.speech.data.dataset import Batch
from simplexvq_recipes.speech.pretraining.model import Wav2Vec2Pretrainer

VALIDATION_SEED = 20_250_001


@torch.no_grad()
def validate(
    model: Wav2Vec2Pretrainer, batches: Iterable[Batch], accelerator: Accelerator, *, seed: int = 0
) -> dict[str, Tensor]:
    """Code usage per codebook (:class:`simplexvq.CodebookUsageMeter`) and contrastive loss / accuracy.

    ``model`` is the unwrapped module (no DDP hooks, so ranks may see different numbers of batches). Codes are
    those of every unpadded frame of the unmasked input (eval mode: hard codes). The contrastive task uses masks
    and distractors from a private generator seeded identically at every validation, so successive validations
    are comparable and the training RNG is never touched. Every rank must call this (two all-reduces at the end).
    """
    was_training = model.training
    model.eval()
    meter = simplexvq.CodebookUsageMeter(model.num_groups, model.codebook_size, device=accelerator.device)
    generator = torch.Generator().manual_seed(VALIDATION_SEED + seed + 7919 * accelerator.process_index)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss * n, accuracy * n, n
    try:
        for batch in batches:
            if len(batch) == 0:
                continue
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                out = model(batch.waveforms, batch.lengths, generator=generator, return_codes=True)
            meter.update(out.codes)
            n = float(out.num_masked)
            totals += torch.tensor(
                [out.losses["contrastive"].item() * n, out.accuracy.item() * n, n],
                dtype=torch.float64,
                device=accelerator.device,
            )
    finally:
        model.train(was_training)
    usage = meter.compute()
    totals = accelerator.reduce(totals, reduction="sum")
    count = totals[2].clamp_min(1.0)
    return {
        "usage": usage["usage"],
        "per_sample_usage": usage["per_sample_usage"],
        "perplexity": usage["perplexity"],
        "dead_codes": usage["dead_codes"].double(),
        "frames": usage["num_positions"],
        "counts": usage["counts"],
        "contrastive": totals[0] / count,
        "accuracy": totals[1] / count,
    }
