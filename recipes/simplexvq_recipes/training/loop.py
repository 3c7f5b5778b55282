"""The training loop every recipe runs: a recipe supplies a :class:`TrainingTask`, the loop does the rest.

What the loop gives every recipe (the features of fairseq2's wav2vec2 recipe, the Accelerate wav2vec 2.0 script
and timm's ``train.py``): one process or many (Accelerate; gloo on CPU), gradient accumulation
(``training.grad_accumulation``), gradient clipping, bf16/fp16 autocast on GPUs (``training.mixed_precision``), an
optional ``torch.compile`` of the model, atomic checkpoints in formats that cannot run code, exact resume (also
after SIGKILL) with a check of the resumed config, fallback from a damaged newest checkpoint, a start-up summary,
``train.log``, TensorBoard, ``history.json`` and ``results.json`` with ``train_seconds`` summed over resumes.

Validation runs with the quantizers' neighbour search local to each process
(:func:`~simplexvq_recipes.training.distributed.local_neighbours`), so ranks with different numbers of validation
batches still meet in the same collectives.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from simplexvq_recipes.training.atomic import atomic_write_json, atomic_write_text
from simplexvq_recipes.training.checkpoint import CHECKPOINTS, CheckpointManager, set_aside_newer
from simplexvq_recipes.training.config import config_to_dict, config_to_yaml
from simplexvq_recipes.training.distributed import any_rank, check_launch, local_neighbours
from simplexvq_recipes.training.resume import (
    CONFIG_FILE,
    check_resume_config,
    config_type,
    record_changes,
    resume_point,
)
from simplexvq_recipes.training.runlock import RunFolderBusyError, RunFolderLock
from simplexvq_recipes.training.runlog import RunLog, show_progress_bar
from simplexvq_recipes.training.settings import RESUME_SAFE_KEYS, TrainingConfig
from simplexvq_recipes.training.tracking import HISTORY_FILE, MetricHistory

RESULTS_FILE = "results.json"


@dataclass
class StepOutput:
    """One batch's loss (to minimise) and its detached metrics (tensors, averaged over steps and ranks)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a task's validation needs from the loop."""

    accelerator: Accelerator
    history: MetricHistory
    run_dir: Path
    log: RunLog


class TrainData(ABC):
    """One rank's training batches, deterministic given the epoch (exact resume)."""

    @abstractmethod
    def batches(self, epoch: int, start: int) -> Iterable[Any]:
        """This rank's batches of ``epoch`` from the ``start``-th on."""

    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""


class TrainingTask(ABC):
    """What a recipe supplies to :func:`run_training`."""

    name: str = "train"
    """Shown on the progress bar and in the summary."""
    find_unused_parameters: bool = False
    """DDP must expect parameters without gradient in a step (LayerDrop)."""
    skip_empty_batches: bool = False
    """Let a rank's empty batch (unreadable files skipped) skip the step on every rank."""
    safe_resume_keys: tuple[str, ...] = ()
    """Recipe settings a resume may change, besides the loop's :data:`RESUME_SAFE_KEYS`."""

    @abstractmethod
    def build_model(self, accelerator: Accelerator) -> nn.Module:
        """The freshly initialised model (the global RNG is seeded with ``training.seed``)."""

    @abstractmethod
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer: ...

    @abstractmethod
    def schedule(self, total_steps: int) -> Callable[[int], float]:
        """Multiplier of the peak learning rate at an optimizer step."""

    @abstractmethod
    def train_data(self, accelerator: Accelerator) -> TrainData: ...

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Any, accelerator: Accelerator) -> StepOutput:
        """Forward one batch through ``model`` (the prepared, possibly compiled one) and return its loss."""

    @abstractmethod
    def validate(self, model: nn.Module, context: RunContext, step: int) -> dict[str, Any]:
        """Validate the unwrapped ``model`` on every rank, log into ``context.history``, write plots; returns the
        metrics that :meth:`results` turns into ``results.json``."""

    @abstractmethod
    def results(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """JSON-ready results of the final validation."""

    def before_step(self, model: nn.Module, step: int) -> None:  # noqa: B027 (optional hook)
        """Called before each batch with the optimizer step about to be taken (schedules inside the model)."""

    def batch_is_empty(self, batch: Any) -> bool:
        return False

    def interval_metrics(self, accelerator: Accelerator) -> dict[str, Tensor]:
        """Extra training metrics of the logging interval (collective: called on every rank), e.g. code usage."""
        return {}

    def finish(self, metrics: dict[str, Any], context: RunContext) -> None:  # noqa: B027 (optional hook)
        """Final plots (called on every rank after the last validation)."""

    def summary(self, model: nn.Module) -> list[str]:
        """Extra lines of the start-up summary."""
        return []


class IntervalAverage:
    """Sums of step metrics since the last log; :meth:`compute` averages over steps and ranks (one all-reduce)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def update(self, metrics: dict[str, Tensor]) -> None:
        for name, value in metrics.items():
            value = torch.as_tensor(value).detach().float().to(self.device).reshape(-1)
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def compute(self, accelerator: Accelerator) -> dict[str, Tensor]:
        names = sorted(self.sums)
        if not names:
            return {}
        sizes = [self.sums[name].numel() for name in names]
        packed = torch.cat([self.sums[name] for name in names]) / max(self.count, 1)
        packed = accelerator.reduce(packed, reduction="mean")
        self.sums, self.count = {}, 0
        return dict(zip(names, packed.split(sizes), strict=True))


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU (the quantizer is float32 anyway)."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(settings: TrainingConfig, find_unused_parameters: bool = False) -> Accelerator:
    """CPU (gloo across processes) where there is no GPU or ``training.cpu``; mixed precision as configured."""
    cpu = settings.cpu or not torch.cuda.is_available()  # cpu=True gives MULTI_CPU under torchrun
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(settings.mixed_precision, "cpu" if cpu else "cuda"),
        log_with="tensorboard" if settings.tensorboard else None,
        project_dir=settings.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # shuffles given (seed, epoch)
    )
    check_launch(accelerator)
    return accelerator


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def run_training(task: TrainingTask, config: Any, settings: TrainingConfig) -> dict[str, Any]:
    """Train (or resume) ``task`` with the loop ``settings``; ``config`` is the whole recipe config, saved as
    ``config.yaml`` (and in every checkpoint). Returns the final results (also written to ``results.json``).

    Before anything is written: the checkpoint to resume from is chosen and its config compared with ``config``
    (:mod:`~simplexvq_recipes.training.resume`), and the run folder is locked against a second run
    (:mod:`~simplexvq_recipes.training.runlock`)."""
    settings.validate()
    run_dir = Path(settings.output_dir)
    recipe = config_type(config)
    resumed_from = resume_point(run_dir, settings)
    changes: dict[str, tuple[Any, Any]] = {}
    if resumed_from is not None:
        safe_keys = RESUME_SAFE_KEYS + task.safe_resume_keys
        changes = check_resume_config(resumed_from, config_to_dict(config), safe_keys, recipe)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    accelerator = make_accelerator(settings, task.find_unused_parameters)
    lock = RunFolderLock(run_dir)
    refused: RunFolderBusyError | None = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunFolderBusyError as error:
            refused = error
    if any_rank(accelerator, refused is not None):
        raise refused or RunFolderBusyError(f"the main process could not lock the run folder {run_dir}")
    try:
        return _train(task, config, settings, accelerator, resumed_from, changes)
    finally:
        lock.release()


def _train(
    task: TrainingTask,
    config: Any,
    settings: TrainingConfig,
    accelerator: Accelerator,
    resumed_from: Path | None,
    changes: dict[str, tuple[Any, Any]],
) -> dict[str, Any]:
    """The body of :func:`run_training`, with the run folder locked."""
    run_dir = Path(settings.output_dir)
    recipe = config_type(config)
    log = RunLog(accelerator, run_dir)
    set_seed(settings.seed)
    model = task.build_model(accelerator)
    data = task.train_data(accelerator)  # samplers seeded identically on every rank
    set_seed(settings.seed, device_specific=True)  # different masks and dropout on each rank from here on
    optimizer = task.build_optimizer(model)
    accumulation = settings.grad_accumulation
    steps_per_epoch = len(data) // accumulation
    if any_rank(accelerator, steps_per_epoch == 0):  # the run would loop over epochs forever without a step
        raise ValueError(_too_few_batches(len(data), accumulation))
    total_steps = settings.steps or settings.epochs * steps_per_epoch
    scheduler = LambdaLR(optimizer, task.schedule(total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    training_model = torch.compile(model) if settings.compile else model

    manager = CheckpointManager(
        accelerator,
        run_dir / CHECKPOINTS,
        model=unwrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        keep_last=settings.keep_last,
        config_yaml=config_to_yaml(config),
    )
    restored = manager.restore(resumed_from) if resumed_from is not None else None
    set_aside = None
    if restored and accelerator.is_main_process:
        set_aside = set_aside_newer(
            run_dir / CHECKPOINTS, restored[0], [run_dir / RESULTS_FILE, run_dir / HISTORY_FILE]
        )
    accelerator.wait_for_everyone()
    state = restored[1] if restored else {"step": 0, "epoch": 0, "batch": 0, "history": [], "train_seconds": 0.0}
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch"]
    seconds_before = float(state.get("train_seconds", 0.0))
    history = MetricHistory(state["history"])
    changes.update(_schedule_change(changes, task, settings, steps_per_epoch, total_steps, step, optimizer))
    if accelerator.is_main_process:
        atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(config))
        record_changes(run_dir, step, changes)
    if settings.tensorboard:
        accelerator.init_trackers("tensorboard")
    context = RunContext(accelerator, history, run_dir, log)
    _summary(log, task, unwrapped, accelerator, settings, total_steps, data, restored, changes)
    if set_aside is not None:
        moved = ", ".join(sorted(path.name for path in set_aside.iterdir()))
        log.say(f"resumed from {restored[0].name}: moved what the abandoned later run left ({moved}) into {set_aside}")

    def validate() -> dict[str, Any]:
        with local_neighbours(unwrapped):
            return task.validate(unwrapped, context, step)

    def checkpoint() -> None:
        seconds = seconds_before + time.perf_counter() - started
        trainer_state = {"epoch": epoch, "batch": batch_in_epoch, "history": history.rows, "train_seconds": seconds}
        manager.save(step, {**trainer_state, "recipe": recipe})

    interval = IntervalAverage(accelerator.device)  # per batch
    step_metrics = IntervalAverage(accelerator.device)  # per optimizer step
    progress = tqdm(
        total=total_steps,
        initial=step,
        disable=not (show_progress_bar(settings.progress_bar) and accelerator.is_local_main_process),
        desc=task.name,
        dynamic_ncols=True,
    )
    final: dict[str, Any] = {}
    started = time.perf_counter()
    timer = (started, step)
    if step == 0 and settings.eval_at_start:
        validate()
    model.train()
    micro = 0
    while step < total_steps:
        whole_epoch, steps_before, skipped = batch_in_epoch == 0, step, 0
        for batch in data.batches(epoch, batch_in_epoch):
            batch_in_epoch += 1
            if task.skip_empty_batches and any_rank(accelerator, task.batch_is_empty(batch)):
                warnings.warn(f"step {step + 1}: no readable data in a rank's batch; batch skipped", stacklevel=1)
                skipped += 1
                continue
            micro += 1
            task.before_step(unwrapped, step)
            sync = micro == accumulation
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    out = task.train_step(training_model, batch, accelerator)
                accelerator.backward(out.loss / accumulation)
            interval.update({"loss": out.loss.detach(), **out.metrics})
            if not sync:
                continue
            micro = 0
            if settings.grad_clip_norm > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
                step_metrics.update({"grad_norm": torch.as_tensor(norm)})
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            last = step == total_steps
            # also at checkpoints, so that a resumed run averages the same intervals as an unbroken one
            if _due(step, settings.log_every) or _due(step, settings.checkpoint_every) or last:
                metrics = {
                    **interval.compute(accelerator),
                    **step_metrics.compute(accelerator),
                    **task.interval_metrics(accelerator),
                }
                metrics["lr"] = torch.tensor(scheduler.get_last_lr()[0])
                now = time.perf_counter()
                metrics["seconds_per_step"] = torch.tensor((now - timer[0]) / max(1, step - timer[1]))
                timer = (now, step)
                scalars = history.log(accelerator, step, metrics, prefix="train/")
                progress.set_postfix(loss=f"{scalars.get('train/loss', math.nan):.4f}")
                log.interval(step, total_steps, scalars)
            if _due(step, settings.eval_every) or last:
                final = validate()
            if _due(step, settings.checkpoint_every) or last:
                checkpoint()
            if last:
                break
        else:
            if whole_epoch and step == steps_before:  # identical on every rank: skips are decided collectively
                raise ValueError(
                    f"epoch {epoch} ended without an optimizer step: {skipped} of its {len(data)} batches per process "
                    "held no readable data and were skipped; fix or remove the unreadable files"
                )
            epoch, batch_in_epoch = epoch + 1, 0
            if micro:  # batches at the end of an epoch that do not fill an optimizer step are left out
                optimizer.zero_grad(set_to_none=True)
                micro = 0
    progress.close()

    if not final:  # resumed a run that had already finished
        final = validate()
    train_seconds = seconds_before + time.perf_counter() - started
    results = {**task.results(final), "step": step, "train_seconds": train_seconds}
    if accelerator.is_main_process:
        atomic_write_json(run_dir / RESULTS_FILE, results)
        atomic_write_json(run_dir / HISTORY_FILE, history.rows)
    task.finish(final, context)
    log.say(f"finished at step {step} after {train_seconds:.1f} s of training; results in {run_dir / RESULTS_FILE}")
    accelerator.end_training()
    return results


def _too_few_batches(batches: int, accumulation: int) -> str:
    if batches == 0:
        return (
            "the training set gives no batch per process (fewer examples than one batch per process; whole batches "
            "only): lower the batch size or the number of processes, or give more training data"
        )
    return (
        f"one epoch gives {batches} batch(es) per process, fewer than the training.grad_accumulation={accumulation} "
        "batches of one optimizer step: lower training.grad_accumulation or the batch size, or give more training data"
    )


def _summary(
    log: RunLog,
    task: TrainingTask,
    model: nn.Module,
    accelerator: Accelerator,
    settings: TrainingConfig,
    total_steps: int,
    data: TrainData,
    restored: tuple[Path, dict[str, Any]] | None,
    changes: dict[str, tuple[Any, Any]],
) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        f"{task.name}: {settings.output_dir}",
        f"  processes {accelerator.num_processes} on {accelerator.device.type}, mixed precision "
        f"{accelerator.mixed_precision}, compile {settings.compile}",
        f"  parameters {parameters:,} ({trainable:,} trainable)",
        f"  {total_steps} optimizer steps of {settings.grad_accumulation} batch(es) per process "
        f"({len(data)} batches per process per epoch), grad clip {settings.grad_clip_norm or 'off'}",
        *task.summary(model),
    ]
    if restored:
        lines.append(f"  resumed from {restored[0]} at step {restored[1]['step']}")
    for key, (old, new) in changes.items():
        lines.append(f"  changed on resume: {key} {old!r} -> {new!r}")
    log.say("\n".join(lines))


def _schedule_change(
    changes: dict[str, tuple[Any, Any]],
    task: TrainingTask,
    settings: TrainingConfig,
    steps_per_epoch: int,
    total_steps: int,
    step: int,
    optimizer: torch.optim.Optimizer,
) -> dict[str, tuple[Any, Any]]:
    """A resume that changes the run's length recomputes the learning-rate schedule for the new total (a warmup +
    cosine schedule then continues on the longer or shorter curve). The learning rate at the resume step before and
    after is returned as one more recorded change, so the jump is in ``config_changes.json`` and the log."""
    if "training.steps" not in changes and "training.epochs" not in changes:
        return {}
    old_steps = changes.get("training.steps", (settings.steps, None))[0]
    old_epochs = changes.get("training.epochs", (settings.epochs, None))[0]
    old_total = old_steps or old_epochs * steps_per_epoch
    if old_total == total_steps:
        return {}
    base_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    before = base_lr * task.schedule(old_total)(step)
    after = base_lr * task.schedule(total_steps)(step)
    key = f"learning rate at step {step} (schedule recomputed for {total_steps} instead of {old_total} steps)"
    return {key: (before, after)}


def validation_batches(batches: Iterable[Any], max_batches: int) -> Iterable[Any]:
    """The first ``max_batches`` of ``batches`` (all when 0)."""
    return batches if not max_batches else itertools.islice(batches, max_batches)
