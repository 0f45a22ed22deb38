"""Plumbing for runs that last days (not in the paper): one run per output folder.

`claim_output_dir` takes an exclusive lock on OUTPUT_DIR/.lock with flock(2). A second run into the
same folder is refused while the lock is held; the operating system releases it when the holding
process ends, however it ends (Ctrl-C, SIGTERM, kill -9, a crash), so a dead run never leaves a false
claim behind and no stale-lock cleaning is needed. The file holds the holder's pid and host, for the
refusal's message. (Where flock does not exist, on Windows, runs are not locked.)
"""
import os
import socket
from pathlib import Path

from config import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def claim_output_dir(folder: Path):
    """Create `folder` and lock it for this process; returns the open lock file: the lock lasts until it is
    closed (it is a context manager) or the process ends. Raises ConfigError if another run holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / ".lock", "a+")
    if fcntl is None:
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(f"--output-dir {folder} is in use by a run that is still going ({holder}): wait for "
                          f"it to end, or choose another --output-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock
