"""Exclusive locks between processes, on an open file, waited for with a deadline.

The ingest lock (one run per index) and the snapshot lock (writers take
turns) are the same mechanism with their own messages.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable
from typing import IO


def hold_exclusive(handle: IO, wait_s: float, poll_s: float, on_wait: Callable[[], None] | None = None) -> bool:
    """Take an exclusive lock on `handle`, trying for up to `wait_s` seconds (0: once).

    Returns False when another process still held it at the deadline;
    `on_wait` is called once, when the first try finds the lock taken and
    there is time left to wait. The lock lasts until the file is closed.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            if on_wait is not None:
                on_wait()
                on_wait = None
            time.sleep(poll_s)
