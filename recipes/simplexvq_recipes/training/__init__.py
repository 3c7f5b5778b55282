"""Shared training pieces for every recipe: the training loop (:mod:`.loop`) with its ``training:`` settings
(:mod:`.settings`), configs, checkpoints, resume checks, schedules, logging and plots."""
