"""The ``training:`` section shared by every recipe: one set of key names for the loop, checkpoints and resume."""

from __future__ import annotations

from dataclasses import dataclass

MIXED_PRECISION: tuple[str, ...] = ("auto", "no", "bf16", "fp16")

LOOP_RENAMED_KEYS: dict[str, str] = {
    "training.max_steps": "training.steps",
    "training.valid_every": "training.eval_every",
    "optim.clip_grad_norm": "training.grad_clip_norm",
    "optim.grad_clip_norm": "training.grad_clip_norm",
    "output_dir": "training.output_dir",
}
"""Keys of the recipes' former loops, rejected with the new name."""

RESUME_SAFE_KEYS: tuple[str, ...] = (
    "training.output_dir",
    "training.steps",
    "training.epochs",
    "training.log_every",
    "training.eval_every",
    "training.eval_at_start",
    "training.eval_max_batches",
    "training.checkpoint_every",
    "training.keep_last",
    "training.progress_bar",
    "training.tensorboard",
    "training.resume",
    "training.resume_from",
    "training.threads",
    "training.compile",
    "training.activation_checkpointing",
)
"""Settings a resumed run may change: they decide how long to train, how often to log, validate and save, and how
fast a step runs, never the model or the data. Changing the run's length (``steps`` / ``epochs``) recomputes the
learning-rate schedule for the new total; the learning rate at the resume step before and after is recorded in
``config_changes.json`` and the log."""


@dataclass(kw_only=True)
class TrainingConfig:
    """Loop, logging, validation, checkpoints and resume of a recipe run."""

    output_dir: str = "runs/run"
    """Run folder: ``config.yaml``, ``train.log``, ``checkpoints/step_*``, ``tensorboard/``, ``results.json``,
    ``history.json`` and the recipe's plots."""
    seed: int = 0
    steps: int = 0
    """Optimizer steps to train; 0: ``epochs`` passes over the training set."""
    epochs: int = 0
    """Passes over the training set when ``steps`` is 0."""
    grad_accumulation: int = 1
    """Batches per optimizer step (their gradients are averaged: the update of one batch this many times larger)."""
    grad_clip_norm: float = 0.0
    """Max global gradient norm; 0 disables clipping."""
    log_every: int = 50
    eval_every: int = 2000
    """Validate every this many steps (and at the end); 0: only at the end."""
    eval_at_start: bool = True
    """Also validate the untrained model at step 0 (the starting point of the curves)."""
    eval_max_batches: int = 0
    """Validation batches per process during training; 0: the whole validation set."""
    checkpoint_every: int = 2000
    keep_last: int = 2
    resume: bool = True
    """Continue from the newest intact checkpoint in ``output_dir`` if there is one."""
    resume_from: str | None = None
    """A ``step_XXXXXXXX`` folder to resume from instead of the newest (``resume`` must be true)."""
    mixed_precision: str = "auto"
    """``auto`` (bf16 on GPUs that support it, else fp16 on GPUs, float32 on CPU), ``no``, ``bf16`` or ``fp16``."""
    compile: bool = False
    """``torch.compile`` the model for training (validation runs the plain module)."""
    activation_checkpointing: bool = False
    """Recompute the Transformer layers' activations in the backward pass (less memory, same gradients)."""
    progress_bar: bool | None = None
    """A tqdm bar on stderr: ``null`` (default) only when stderr is a terminal, ``true`` always, ``false`` never.
    Every ``log_every`` steps the training metrics also go to stdout and ``train.log`` as one line."""
    tensorboard: bool = True
    threads: int | None = None
    """``torch.set_num_threads`` per process (``None``: PyTorch's default)."""
    cpu: bool = False
    """Train on the CPU even where GPUs are available (machines without GPUs always do, with gloo across
    processes)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError(f"set training.steps >= 1 or training.epochs >= 1 (got {self.steps}, {self.epochs})")
        for key in ("log_every", "checkpoint_every", "keep_last", "grad_accumulation"):
            if getattr(self, key) < 1:
                raise ValueError(f"training.{key} must be >= 1, got {getattr(self, key)}")
        if self.eval_every < 0 or self.eval_max_batches < 0:
            raise ValueError("training.eval_every and training.eval_max_batches must be >= 0")
        if self.grad_clip_norm < 0:
            raise ValueError(f"training.grad_clip_norm must be >= 0 (0: no clipping), got {self.grad_clip_norm}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"training.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.resume_from is not None and not self.resume:
            raise ValueError("training.resume_from needs training.resume=true")
