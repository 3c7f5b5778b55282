"""A tiny Accelerate training loop with checkpoints, used to test exact resume after SIGKILL.

    python resume_worker.py OUTPUT_DIR STEPS [--kill-after-step N]

Trains a small model with dropout (so the RNG state matters) and a KNN-CE quantizer with Gumbel noise on a
shuffled dataset, checkpointing every 3 steps; writes OUTPUT_DIR/final.pt with the parameters at the end.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

import simplexvq
from simplexvq_recipes.training.checkpoint import CheckpointManager
from simplexvq_recipes.training.schedule import warmup_cosine_scheduler
from simplexvq_recipes.training.tracking import MetricHistory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--kill-after-step", type=int, default=None)
    args = parser.parse_args()

    accelerator = Accelerator(
        cpu=True,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
    )
    set_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 8))
    # own generator: creating an epoch iterator must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3))
    quantizer = simplexvq.build_quantizer("hard_gumbel-knn_ce", dim=8, codebook_size=4, knn_k=2)
    params = list(model.parameters()) + list(quantizer.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=2, total_steps=args.steps, final_ratio=0.1)
    model, quantizer, optimizer, loader, scheduler = accelerator.prepare(model, quantizer, optimizer, loader, scheduler)
    manager = CheckpointManager(accelerator, os.path.join(args.output_dir, "checkpoints"), keep_last=2)

    state = manager.load() or {"step": 0, "epoch": 0, "batch": 0, "history": []}
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch"]
    history = MetricHistory(state["history"])
    while step < args.steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
        for (x,) in batches:
            out = quantizer(model(x))
            loss = (out.quantized - x).pow(2).mean() + out.loss
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            history.log(accelerator, step, {"loss": loss})
            if step % 3 == 0:
                manager.save(step, {"epoch": epoch, "batch": batch_in_epoch, "history": history.rows})
            if args.kill_after_step is not None and step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    if accelerator.is_main_process:
        final = {f"model.{k}": v for k, v in accelerator.unwrap_model(model).state_dict().items()}
        final.update({f"quantizer.{k}": v for k, v in accelerator.unwrap_model(quantizer).state_dict().items()})
        torch.save({"params": final, "losses": history.series("loss")[1]}, os.path.join(args.output_dir, "final.pt"))


if __name__ == "__main__":
    main()
