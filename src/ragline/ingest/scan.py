"""Find the files of a source folder: stable order, excludes applied, nothing outside the folder.

A symbolic link is followed only when it resolves inside the folder, and a
link to a folder never is (its target is walked under its own path already),
so a scan cannot loop or leave the folder. Files whose names say they hold
secrets are skipped and reported, as are the links that are not followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Found:
    """A file of a source folder, or the reason it is skipped."""

    path: Path
    relative: str  # posix path from the folder, printable (see `printable`)
    skipped: str = ""


def printable(path: Path | str) -> str:
    """A path as text that any store and terminal accept: undecodable bytes of a name become `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def first_match(relative: str, name: str, patterns: list[str]) -> str | None:
    """The first pattern matching the name or the relative path (a leading `./` in a pattern is ignored)."""
    for pattern in patterns:
        bare = pattern.removeprefix("./")
        if fnmatch(name, bare) or fnmatch(relative, bare):
            return pattern
    return None


def scan(root: Path, exclude: list[str], secrets: list[str]) -> Iterator[Found]:
    """Files under `root` (resolved) in a stable order; excluded names silently, secrets and links reported."""
    if root.is_file():
        yield _check_file(root, root.name, root.name, root, secrets)
        return
    for directory, dirnames, filenames in os.walk(root):
        base = Path(directory)
        rel_dir = base.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        kept = []
        for name in sorted(dirnames):
            relative = prefix + name
            if first_match(relative, name, exclude):
                continue
            if pattern := first_match(relative, name, secrets):
                yield Found(base / name, printable(relative), f"name matches ingest.exclude_secrets {pattern!r}")
            elif (base / name).is_symlink():
                yield Found(base / name, printable(relative), _link_reason(base / name, root, folder=True))
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            relative = prefix + name
            if first_match(relative, name, secrets) or not first_match(relative, name, exclude):
                yield _check_file(base / name, relative, name, root, secrets)  # a secret is always reported


def _check_file(path: Path, relative: str, name: str, root: Path, secrets: list[str]) -> Found:
    if pattern := first_match(relative, name, secrets):
        return Found(path, printable(relative), f"name matches ingest.exclude_secrets {pattern!r}")
    if path.is_symlink():
        return Found(path, printable(relative), _link_reason(path, root, folder=False))
    return Found(path, printable(relative))


def _link_reason(link: Path, root: Path, folder: bool) -> str:
    """Why a link is not followed, or "" for a link to a file inside the folder."""
    target = Path(os.path.realpath(link))
    if not target.is_relative_to(root):
        return "symbolic link to outside the ingested folder (not followed)"
    if not target.exists():
        return "broken symbolic link"
    if folder:
        return "symbolic link to a folder inside the ingested folder (indexed under its own path)"
    return ""
