"""Run `ragline ingest` as a real process and SIGKILL it at a chosen moment (for test_crash_safety.py).

A run is watched from outside, the way a crash would meet it: commits to the
store are counted by a `CommitWatcher` of the store's kind (the local store's
SQLite file by `PRAGMA data_version` on a read-only connection; a store that
other processes may open while the ingest writes, such as pgvector, by its
`index_version()` read through a handle of this process), and new entries
under <data_dir>/index/ (the local store's persisted snapshot) are spotted by
polling the folder every quarter millisecond (woken at once by inotify when
a file appears there, and without a pause once a snapshot is being
written), so a kill can be aimed at the n-th write of a run or at the
moment the n-th snapshot file appears. A store that neither can watch is
killed after a random delay instead. Neither
watcher knows the store's file names, so they keep working when the snapshot
format changes.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ragline.store.base import VectorStore

POLL_S = 0.00025
VERSION_POLL_S = 0.002  # a query to another process's server per poll: not a busy loop on a shared CPU
IDLE_POLL_S = 0.01  # a run that is not to be killed is only watched for its exit
RUN_DEADLINE_S = 300
LEFTOVER_DEADLINE_S = 30


@dataclass(frozen=True, slots=True)
class KillPlan:
    """Kill once `at` commits ("commits") or `at` new snapshot entries ("snapshot") were seen, `delay_s` later;
    or ("delay") `delay_s` after the start, for a store that cannot be watched."""

    trigger: str
    at: int
    delay_s: float = 0.0


@dataclass(slots=True)
class RunOutcome:
    killed: bool
    commits_seen: int
    snapshot_entries_seen: int
    seconds: float
    report: dict | None = None


@dataclass(slots=True)
class CrashTally:
    """The suite's figures, printed at the end."""

    kills: int = 0
    kills_during_snapshot: int = 0
    kills_by_trigger: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    resumed_runs: int = 0
    finished_before_the_kill: int = 0
    rounds: int = 0
    queries_compared: int = 0
    files_edited: int = 0
    files_deleted: int = 0
    files_added: int = 0


class CommitWatcher(Protocol):
    """Counts the commits another process makes to a store, polled every `poll_s`."""

    poll_s: float

    def poll(self) -> int:
        """The commits seen so far."""
        ...

    def close(self) -> None: ...


class SqliteCommits:
    """Counts the commits other processes make to a SQLite database, by polling `PRAGMA data_version`."""

    poll_s = POLL_S

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._db: sqlite3.Connection | None = None
        self._version: int | None = None

    def poll(self) -> int:
        try:
            if self._db is None:
                if not self.path.exists():
                    return self.count
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0.01)
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:  # being created, or waiting for the writer to recover its WAL after a kill
            self._disconnect()
            return self.count
        if self._version is not None and version != self._version:
            self.count += 1
        self._version = version
        return self.count

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db, self._version = None, None

    def close(self) -> None:
        self._disconnect()


class IndexVersionCommits:
    """Counts the commits that change a store's chunks or access, by polling its `index_version()` through a
    handle of this process's own: for stores that other processes may open while the ingest writes.

    Commits that fall between two polls count once: a kill aimed at the n-th
    comes a little later, never earlier.
    """

    poll_s = VERSION_POLL_S

    def __init__(self, open_store: Callable[[], VectorStore]) -> None:
        self.count = 0
        self._store = open_store()
        self._version = self._store.index_version()

    def poll(self) -> int:
        version = self._store.index_version()
        if version != self._version:
            self.count += 1
        self._version = version
        return self.count

    def close(self) -> None:
        self._store.close()


class FolderWakeup:
    """Sleeps until something is created or renamed into a folder, or a timeout passes.

    Linux inotify, so that a poller looks the moment a snapshot file
    appears instead of up to a poll period later; elsewhere, a plain sleep.
    """

    _EVENTS = 0x100 | 0x80 | 0x8  # IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE

    def __init__(self, folder: Path) -> None:
        self._fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(folder), self._EVENTS) >= 0:
            self._fd = fd
        elif fd >= 0:
            os.close(fd)  # the folder does not exist yet: sleep instead

    def wait(self, timeout_s: float) -> None:
        if self._fd < 0:
            time.sleep(timeout_s)
        elif select.select([self._fd], [], [], timeout_s)[0]:
            os.read(self._fd, 65536)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def folder_entries(folder: Path) -> set[tuple[str, int]]:
    """(path, inode) of everything under `folder`: a new file or a rename gives a pair not seen before."""
    found: set[tuple[str, int]] = set()
    pending = [str(folder)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        found.add((entry.path, entry.inode()))
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                    except OSError:  # removed while we looked
                        continue
        except OSError:  # not created yet, or removed while we looked
            continue
    return found


def _live_members(group: int) -> list[int]:
    """Processes of a process group that are still running (zombies left to a non-reaping init don't count)."""
    live = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            live.append(int(entry.name))
    return live


def _wait_for_leftovers(group: int) -> None:
    """A killed ingest must not leave processes behind (workers that hold its lock or keep writing)."""
    if not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + LEFTOVER_DEADLINE_S
    while live := _live_members(group):
        if time.monotonic() > deadline:
            for pid in live:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(
                f"processes {live} of a killed `ragline ingest` were still running {LEFTOVER_DEADLINE_S} s "
                "after it died: worker processes must exit when their parent does"
            )
        time.sleep(0.05)


def run_ingest(
    command: list[str], env: dict[str, str], plan: KillPlan | None, commits: CommitWatcher | None = None,
    snapshot_dir: Path | None = None,
) -> RunOutcome:
    """Run one ingest; with a plan, SIGKILL it at the planned moment unless it finishes first.

    `commits` watches the store's commits (a "commits" plan needs it), `snapshot_dir` is where the store
    persists its snapshot (a "snapshot" plan needs it); the watcher is closed afterwards. A run that ends by
    itself must succeed; its `--json` report, if any, is returned.
    """
    if plan is not None:
        needed = {"commits": commits, "snapshot": snapshot_dir, "delay": True}[plan.trigger]
        assert needed is not None, f"a {plan.trigger} kill needs its watcher"
    before = folder_entries(snapshot_dir) if snapshot_dir else set()
    seen = commits.poll() if commits else 0
    poll_s = commits.poll_s if commits else POLL_S
    new_entries: set[tuple[str, int]] = set()
    wakeup = FolderWakeup(snapshot_dir) if snapshot_dir else None
    wait = wakeup.wait if wakeup else time.sleep
    started = time.monotonic()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            deadline = time.monotonic() + RUN_DEADLINE_S
            fire = False
            while not fire and process.poll() is None:
                if time.monotonic() >= deadline:  # a hang guard, 100x a run's length: not a speed check
                    raise TimeoutError(f"`{' '.join(command)}` still running after {RUN_DEADLINE_S} s")
                seen = commits.poll() if commits else 0
                if snapshot_dir:
                    new_entries |= folder_entries(snapshot_dir) - before
                if plan is None:
                    time.sleep(IDLE_POLL_S)
                    continue
                fire = plan.trigger == "delay" or (seen if plan.trigger == "commits" else len(new_entries)) >= plan.at
                if not (fire or plan.trigger == "snapshot" and new_entries):  # spin while a snapshot is written
                    wait(poll_s)
            if fire:
                if plan.delay_s:
                    time.sleep(plan.delay_s)
                process.send_signal(signal.SIGKILL)  # a no-op if it has just exited by itself
            process.wait(timeout=RUN_DEADLINE_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if commits:
                commits.close()
            if wakeup:
                wakeup.close()
            _wait_for_leftovers(process.pid)
        seconds = time.monotonic() - started
        killed = process.returncode == -signal.SIGKILL
        report = None
        if not killed:
            stderr.seek(0)
            assert process.returncode == 0, f"ingest exited with {process.returncode}:\n{stderr.read().decode()}"
            stdout.seek(0)
            output = stdout.read().decode()
            if "--json" in command:
                report = json.loads(output)
    return RunOutcome(killed, seen, len(new_entries), seconds, report)
