"""Messages of a run: printed once (main process) and appended to ``<run folder>/train.log``."""

from __future__ import annotations

import time
from pathlib import Path

from accelerate import Accelerator

LOG_FILE = "train.log"


class RunLog:
    """``say(message)`` prints on the main process and appends a time-stamped line to ``train.log``."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / LOG_FILE

    def say(self, message: str) -> None:
        if not self.accelerator.is_main_process:
            return
        print(message, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.path.open("a", encoding="utf-8") as file:
            for line in message.splitlines() or [""]:
                file.write(f"{stamp} {line}\n")
