"""Entry point wrapper: a recipe error is one short message from rank 0, not a traceback from every process."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from simplexvq_recipes.training.checkpoint import CheckpointError

RECIPE_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, CheckpointError)
"""Errors that describe bad input (a setting, a file, a checkpoint) and name the fix in their message."""

TRACEBACK_VARIABLE = "SIMPLEXVQ_TRACEBACK"
"""Set to 1 to get the full traceback of a recipe error."""


def is_recipe_error(error: BaseException) -> bool:
    return isinstance(error, RECIPE_ERRORS) or type(error).__name__ in ("AudioReadError", "UnreadableImageError")


def run_cli(main: Callable[[], Any]) -> None:
    """Run ``main()``; on a recipe error print ``error: <message>`` once (rank 0) and exit with status 2."""
    try:
        main()
    except Exception as error:
        if not is_recipe_error(error) or os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"error: {message}\n(set {TRACEBACK_VARIABLE}=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
