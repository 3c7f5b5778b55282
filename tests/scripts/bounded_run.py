"""``subprocess.run`` for commands that might hang (tests only): on timeout the whole process group is killed, so
torchrun's workers do not outlive a failed test, and ``subprocess.TimeoutExpired`` is raised."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence


def run_bounded(
    command: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session with text output captured; kill its process group after ``timeout`` s."""
    process = subprocess.Popen(
        list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
