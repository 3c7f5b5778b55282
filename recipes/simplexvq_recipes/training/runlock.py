"""One run at a time per run folder: an exclusive ``flock`` on ``<run folder>/.lock``, held while the run trains.

Two runs started in one folder would interleave their checkpoints, prune each other's and overwrite each other's
``config.yaml`` and ``results.json``; the second is refused in one line naming the process that holds the folder.
The kernel releases the lock when its process ends, however it ends (SIGKILL included), so a stale ``.lock`` file
never blocks a later run. Only the main process locks (the other ranks of a multi-process run share its folder). A run
that created its folder and stops before writing anything into it (a refused setting) removes the folder again.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusyError(ValueError):
    """The run folder is held by another run, or cannot be written; the message names the fix."""


class RunFolderLock:
    """``acquire()`` creates the run folder and locks ``.lock`` in it (raising :class:`RunFolderBusyError`);
    ``release()`` unlocks it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.handle: int | None = None
        self.created = False

    def acquire(self) -> None:
        self.created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunFolderBusyError(
                f"cannot write the run folder {self.run_dir} ({error.strerror}); choose a writable training.output_dir"
            ) from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = os.read(handle, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(handle)
            raise RunFolderBusyError(
                f"another run is training in {self.run_dir} ({holder} holds {self.path}); wait until it ends, or "
                "choose another training.output_dir"
            ) from error
        if not os.access(self.run_dir, os.W_OK):
            os.close(handle)
            raise RunFolderBusyError(
                f"cannot write the run folder {self.run_dir}; choose a writable training.output_dir"
            )
        os.ftruncate(handle, 0)
        os.write(handle, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self.handle = handle

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            if self.created and [path.name for path in self.run_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()  # still locked: a run starting now fails to lock rather than lock a removed file
                self.run_dir.rmdir()
        except OSError:
            pass  # the folder stays; the lock is released below either way
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        os.close(self.handle)
        self.handle = None
