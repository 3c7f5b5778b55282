"""Shared training pieces for every recipe: configs, checkpoints, schedules, logging, plots."""
