"""One run at a time per run folder: an exclusive ``flock`` on ``<run folder>/.lock``, held while the run trains.

Two runs started in one folder would interleave their checkpoints, prune each other's and overwrite each other's
``config.yaml`` and ``results.json``; the second is refused in one line naming the process that holds the folder.
The kernel releases the lock when its process ends, however it ends (SIGKILL included), so a stale ``.lock`` file
never blocks a later run. A run removes ``.lock`` when it ends (while still holding it; a run that locked a file
removed meanwhile retries on the new one), and removes the run folder too when it created it and wrote nothing
else (a setting refused before training). Only the main process locks (the other ranks of a multi-process run share
its folder).
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
        except OSError as error:
            raise self._unwritable(error) from error
        for _ in range(10):
            handle = self._open()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                holder = os.read(handle, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(handle)
                raise RunFolderBusyError(
                    f"another run is training in {self.run_dir} ({holder} holds {self.path}); wait until it ends, "
                    "or choose another training.output_dir"
                ) from error
            if self._still_linked(handle):
                break
            os.close(handle)  # the holder removed the file after we opened it: lock the current one
        else:
            raise RunFolderBusyError(f"cannot lock {self.path}: it keeps being replaced; is another run starting?")
        if not os.access(self.run_dir, os.W_OK):
            self._unlock(handle)
            raise self._unwritable(PermissionError(13, "Permission denied"))
        os.ftruncate(handle, 0)
        os.write(handle, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self._unlock(self.handle)
            self.handle = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise self._unwritable(error) from error

    def _still_linked(self, handle: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            return False

    def _unlock(self, handle: int) -> None:
        """Remove ``.lock`` (and the folder, when this run created it and it holds nothing else), then unlock."""
        try:
            self.path.unlink()
            if self.created and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
        except OSError:
            pass  # a read-only folder: the file stays, unlocked
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)

    def _unwritable(self, error: OSError) -> RunFolderBusyError:
        return RunFolderBusyError(
            f"cannot write the run folder {self.run_dir} ({error.strerror}); choose a writable training.output_dir"
        )
